"""Rank 0's MLflow calls during training: queued as plain-JSON records, delivered in order by one background
thread, kept in the run folder while the server is away, sent again by the next worker group (a restart or a
``--resume``), every metric at most once per (key, step).

A tracking server that restarts or drops off the network must neither stop training nor lose what was logged
meanwhile, even if rank 0 is killed before the server returns. So whatever is still held when an epoch's
checkpoint is about to be reported goes to ``mlflow_outbox.json`` in the run folder first (pictures inline):
the checkpoint a resume starts from never lies beyond what the file has. A new worker group reads that file
before logging anything and delivers it; metrics already on the server (delivered just before a kill, or an
epoch trained again after one) are skipped by (key, step).
"""

from __future__ import annotations

import base64
import json
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vitpose.config import one_line
from vitpose.run.storage import Storage

SLOW_S = 10.0  # a tracking call in flight this long counts as the server being away
OUTBOX_FILE = "mlflow_outbox.json"


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed unreachable past ``tracking.outage_patience_s``: what was not delivered is
    kept in the run folder's outbox file, which the message names; ``--resume`` sends it."""


def _permanent(err: Exception) -> bool:
    """A refusal the server answered (bad request, no permission): retrying cannot help. Everything else (no
    connection, 5xx while it restarts) is an outage worth waiting out."""
    status = getattr(err, "get_http_status_code", lambda: 500)()
    return 400 <= status < 500 and status not in (408, 429)


def _what(record: dict[str, Any]) -> str:
    kind = record["kind"]
    if kind == "metrics":
        return f"metrics of step {record['metrics'][0]['step']}" if record["metrics"] else "metrics"
    return f"{kind} {record.get('name') or record.get('key') or ''}".strip()


class Outbox:
    """Records (plain JSON dicts, see ``deliver``) for one MLflow run, delivered in order.

    A record that fails for want of the server is retried until it goes through while training goes on;
    ``close`` waits for the queue to drain. Once training has ended and the server has been gone for
    ``patience_s``, what is held stays in ``journal`` and ``close`` raises one line saying so. A record the
    server refuses (4xx) is not retried and is reported by ``close``. ``background=False`` (Tune trials): each
    ``put`` waits for its delivery.
    """

    def __init__(self, uri: str, run_id: str, patience_s: float, journal: Storage | None = None,
                 background: bool = True):
        import mlflow

        self.client = mlflow.MlflowClient(uri)
        self.uri, self.run_id, self.patience_s, self.journal = uri, run_id, patience_s, journal
        self.queue: queue.Queue = queue.Queue()
        self.pending: list[dict[str, Any]] = []  # put, not yet delivered, in order
        self.lock = threading.Lock()
        self.journaled = False  # the journal holds records: rewrite it as they are delivered
        self.on_server: set[tuple[str, int]] | None = None  # (key, step) of the run's metrics, read when needed
        self.failing_since: float | None = None  # the outage as announced
        self.in_flight_since: float | None = None  # the record being delivered
        self.refused: list[str] = []
        self.gave_up = False
        self._closing = threading.Event()
        self._files = tempfile.TemporaryDirectory(prefix="vp-outbox-")
        self._thread = threading.Thread(target=self._deliver_all, name="mlflow-outbox", daemon=True)
        if background:
            self._thread.start()
        else:
            self._closing.set()

    # ------------------------------------------------------------------------------------ putting
    def put(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.pending.append(record)
        if self._thread.is_alive():
            # MLflow's client retries a refused connection itself for minutes before it raises: a call still
            # in flight after SLOW_S is how an outage shows first.
            since = self.in_flight_since
            if since is not None and time.time() - since > SLOW_S:
                self._announce(since, f"no answer for {time.time() - since:.0f} s")
            self.queue.put(record)
        elif not self.gave_up:
            self._send(record)

    def replay(self) -> int:
        """Queue what an earlier worker group of this run left in the journal; returns how many records."""
        if self.journal is None:
            return 0
        try:
            held = json.loads(self.journal.read_text()) if self.journal.is_file() else {}
        except (OSError, ValueError):
            return 0
        records = held.get("records", []) if held.get("run_id") == self.run_id else []
        self.journaled = bool(records)  # first: a delivery rewrites the journal only when this is set
        for record in records:
            self.put(record)
        return len(records)

    def drain(self, timeout_s: float) -> None:
        """Wait, up to ``timeout_s``, until what was put so far is delivered; not at all while an outage is
        known. A healthy server takes milliseconds: an epoch's metrics then reach it before its checkpoint is
        reported. Whatever is still held then goes to the journal first, so a kill after the report loses
        nothing."""
        deadline = time.time() + timeout_s
        while self._thread.is_alive() and self.failing_since is None and time.time() < deadline:
            if self.queue.unfinished_tasks == 0:
                break
            time.sleep(0.02)
        since = self.in_flight_since
        if since is not None and self.failing_since is None:
            self._announce(since, f"no answer for {time.time() - since:.0f} s")
        with self.lock:
            held = bool(self.pending)
        if held:
            self.keep()

    def keep(self) -> None:
        """Write what is held to the journal (or remove it when nothing is); never raises (a storage outage
        must not end training: the records are still queued)."""
        if self.journal is None:
            return
        from vitpose.run.console import say

        with self.lock:
            try:
                # A worker group's start count is not kept: the group that replays counts its own start.
                records = [self._portable(r) for r in self.pending if r["kind"] != "count"]
                if records:
                    self.journal.write_text(json.dumps({"run_id": self.run_id, "records": records}))
                    self.journaled = True
                elif self.journaled:
                    self.journal.unlink()
                    self.journaled = False
            except OSError as err:
                say(f"warning: could not write {self.journal}: {one_line(err)}")

    @staticmethod
    def _portable(record: dict[str, Any]) -> dict[str, Any]:
        """The record with a picture's bytes inline: its file lives in a temp folder a killed worker loses."""
        if "file" in record:
            rest = {k: v for k, v in record.items() if k != "file"}
            return {**rest, "data_b64": base64.b64encode(Path(record["file"]).read_bytes()).decode()}
        return record

    # ---------------------------------------------------------------------------------- delivering
    def _deliver_all(self) -> None:
        while (record := self.queue.get()) is not None:
            if not self.gave_up:  # once given up, the rest stays held, in order, without waiting again
                self._send(record)
            self.queue.task_done()

    def _send(self, record: dict[str, Any]) -> None:
        from vitpose.run.console import say

        pause = 1.0
        while True:
            self.in_flight_since = self.in_flight_since or time.time()
            try:
                self.deliver(record)
                break
            except Exception as err:  # noqa: BLE001 (any client error; _permanent decides)
                self.on_server = None  # it may have arrived before the answer was lost: look again
                if _permanent(err):
                    self.refused.append(f"{_what(record)}: {one_line(err)}")
                    self.in_flight_since = None
                    self._done(record)
                    return
                self._announce(self.in_flight_since, one_line(err)[:100])
                if self._closing.is_set() and time.time() - self.failing_since > self.patience_s:
                    self.gave_up = True
                    self.in_flight_since = None
                    return
                time.sleep(pause)
                pause = min(pause * 2, 15.0)
        self.in_flight_since = None
        self._done(record)
        if self.failing_since is not None:
            say(f"MLflow server {self.uri} is back after {time.time() - self.failing_since:.0f} s; "
                "held metrics and pictures delivered")
            self.failing_since = None

    def _done(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.pending = [r for r in self.pending if r is not record]
            rewrite = self.journaled
        if rewrite:
            self.keep()

    def deliver(self, record: dict[str, Any]) -> None:
        """One record to the server. Kinds: metrics (list of key/value/timestamp/step), params (name: value),
        tag (key, value), count (a tag counting worker group starts), dict / text (an artifact file's
        content), artifact (a picture: ``file`` or ``data_b64``, with ``name`` and ``folder``)."""
        import mlflow

        client, run_id, kind = self.client, self.run_id, record["kind"]
        if kind == "metrics":
            if self.on_server is None:
                self.on_server = self._metrics_on_server()
            new = [m for m in record["metrics"] if (m["key"], m["step"]) not in self.on_server]
            if new:
                client.log_batch(run_id, metrics=[mlflow.entities.Metric(m["key"], m["value"], m["timestamp"],
                                                                         m["step"]) for m in new])
                self.on_server.update((m["key"], m["step"]) for m in new)
        elif kind == "params":
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in record["params"].items()])
        elif kind == "tag":
            client.set_tag(run_id, record["key"], record["value"])
        elif kind == "count":
            count = int(client.get_run(run_id).data.tags.get(record["key"], "0")) + 1
            client.set_tag(run_id, record["key"], str(count))
            if count > 1 and record.get("restarts_tag"):
                client.set_tag(run_id, record["restarts_tag"], str(count - 1))
        elif kind == "dict":
            client.log_dict(run_id, record["data"], record["name"])
        elif kind == "text":
            client.log_text(run_id, record["text"], record["name"])
        elif kind == "artifact":
            path = Path(record["file"]) if "file" in record else Path(self._files.name) / record["name"]
            if "file" not in record:
                path.write_bytes(base64.b64decode(record["data_b64"]))
            client.log_artifact(run_id, str(path), record.get("folder"))
        else:
            raise ValueError(f"unknown outbox record kind {kind!r}")

    def _metrics_on_server(self) -> set[tuple[str, int]]:
        seen: set[tuple[str, int]] = set()
        for key in self.client.get_run(self.run_id).data.metrics:
            seen.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key))
        return seen

    def _announce(self, since: float, cause: str) -> None:
        from vitpose.run.console import say

        if self.failing_since is None:
            self.failing_since = since
            then = ("training has ended; waiting for it" if self._closing.is_set() and self._thread.is_alive()
                    else "training goes on")
            say(f"MLflow server {self.uri} unreachable ({cause}); {then}: metrics and pictures are held "
                f"{'in ' + str(self.journal) + ' ' if self.journal else ''}and sent when the server is back")

    # ------------------------------------------------------------------------------------ closing
    def flush(self, wait_s: float) -> None:
        """Stop taking records and give what is queued ``wait_s`` to be delivered; what is left stays in the
        journal. Raises nothing (a worker on its way out after a failure)."""
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join(timeout=wait_s)
        self.keep()

    def close(self) -> None:
        """Wait until everything is delivered (or held, after ``patience_s`` of outage); raise if not all was."""
        self._closing.set()
        try:
            if self._thread.is_alive():
                self.queue.put(None)
                while self._thread.is_alive():
                    self._thread.join(timeout=1.0)
                    since = self.in_flight_since
                    if since is not None and time.time() - since > SLOW_S:
                        self._announce(since, f"no answer for {time.time() - since:.0f} s")
            self.keep()
        finally:
            self._files.cleanup()
        with self.lock:
            held = [_what(r) for r in self.pending]
        if held:
            where = f"; kept in {self.journal}, sent by --resume" if self.journal else ""
            raise TrackingUnavailable(f"MLflow server {self.uri} unreachable for over {self.patience_s:.0f} s "
                                      f"(tracking.outage_patience_s) after training: {len(held)} logged "
                                      f"item(s) not delivered, from {held[0]}{where}")
        if self.refused:
            raise TrackingUnavailable(f"MLflow server {self.uri} refused {len(self.refused)} logged item(s), "
                                      f"e.g. {self.refused[0]}")


class WorkerTracker:
    """Rank 0's handle on the driver's run: everything it logs goes through an ``Outbox``, so a worker that
    starts during an outage trains on. ``journal``: the run folder's ``mlflow_outbox.json`` (None keeps
    nothing across a kill). ``background=False`` for Tune trials: Tune may end a trial's process inside its
    last report, which would take a background queue's last items with it.
    """

    def __init__(self, uri: str, run_id: str, patience_s: float = 600.0, journal: Storage | None = None,
                 background: bool = True):
        self.uri, self.run_id = uri, run_id
        self.outbox = Outbox(uri, run_id, patience_s, journal, background)
        self.client = self.outbox.client
        self.outbox.replay()  # an earlier group's held records first, in their order
        self.outbox.put({"kind": "count", "key": "worker_group_starts", "restarts_tag": "restarts"})
        self._pictures = tempfile.TemporaryDirectory(prefix="vp-pictures-")

    def close(self) -> None:
        try:
            self.outbox.close()
        finally:
            self._pictures.cleanup()

    def flush_quietly(self, wait_s: float = 30.0) -> None:
        """On the way out of a failed worker: give what is queued ``wait_s`` to reach the server, raise nothing."""
        self.outbox.flush(wait_s)

    def log_param(self, key: str, value: Any) -> None:
        self.outbox.put({"kind": "params", "params": {key: str(value)}})

    def set_tag(self, key: str, value: str) -> None:
        self.outbox.put({"kind": "tag", "key": key, "value": str(value)})

    def log_load_report(self, report: Any) -> None:
        """The `model.init_checkpoint` load (a models.LoadReport): init_checkpoint_report.json / .txt, and its
        format, preset and key counts as ``init_checkpoint.*`` params."""
        data = report.to_json()
        self.outbox.put({"kind": "dict", "name": "init_checkpoint_report.json",
                         "data": json.loads(json.dumps({"path": report.path, **data, "notes": report.notes},
                                                       default=str))})
        self.outbox.put({"kind": "text", "name": "init_checkpoint_report.txt", "text": report.summary() + "\n"})
        params = {"format": data["format"], "preset": data["preset"] or "custom",
                  **{k: len(data[k]) for k in ("loaded", "resized", "new", "ignored")}}
        self.outbox.put({"kind": "params", "params": {f"init_checkpoint.{k}": str(v) for k, v in params.items()}})

    def log_epoch(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)  # when it was measured, not when it reached the server
        items = [{"key": k, "value": float(v), "timestamp": ts, "step": step} for k, v in metrics.items()]
        if items:
            self.outbox.put({"kind": "metrics", "metrics": items})
            self.outbox.drain(SLOW_S)

    def log_predictions(self, batch: tuple[Any, Any, list[dict]], keypoint_info: dict[str, Any], epoch: int,
                        max_crops: int = 8) -> None:
        from vitpose.visualize import draw_crops_grid

        images, heatmaps, _ = batch
        name = f"val_predictions_epoch{epoch:03d}.png"
        fig_path = Path(self._pictures.name) / name
        draw_crops_grid(images, heatmaps, keypoint_info, fig_path, max_crops=max_crops)
        self.outbox.put({"kind": "artifact", "file": str(fig_path), "name": name, "folder": "predictions"})

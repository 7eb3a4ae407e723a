"""A tracking outage with kills: nothing logged is lost, nothing arrives twice.

pipelines/teacher.py trains against a real `mlflow server`; after the first epoch's metrics arrived the server
is stopped. While it is away rank 0 is killed after a checkpoint (its epoch's metrics still held), Ray starts
a new worker group (which must train on without the server) and rank 0 is killed again; the run fails. The
server comes back and `--resume` finishes the run: every epoch's metrics and picture are on the server exactly
once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO, TEST_IMG
from tests.helpers_mlflow_server import plain_mlflow_server
from vitpose.train.session import STATUS_DIR_ENV

pytestmark = pytest.mark.slow
EPOCHS = 5


class Teacher:
    """pipelines/teacher.py in a subprocess, its console in a file; ``stop`` interrupts it if still running (its
    private Ray goes with it)."""

    def __init__(self, root: Path, storage: Path, env: dict[str, str], console: Path, *extra: str):
        sets = [f"data.root={root}", "data.synthetic.generate=true", "data.synthetic.train_instances=240",
                "data.synthetic.val_instances=32",
                "data.synthetic.unlabeled_instances=0", "model.preset=vitpose_nano", f"model.img_size={TEST_IMG}", "train.batch_size=8",
                f"train.epochs={EPOCHS}", "train.eval_every=1", "train.warmup_iters=2", "train.lr_steps=[]",
                "data.loader_workers=0", f"ray.storage_path={storage}", "ray.max_failures=1",
                "tracking.log_images=2", "tracking.experiment=outage-kill"]
        self.console = console
        with open(console, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "pipelines/teacher.py",
                                          *[a for s in sets for a in ("--set", s)], *extra],
                                         cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        return self.console.read_text()

    def wait(self, timeout: float) -> tuple[int, str]:
        return self.proc.wait(timeout=timeout), self.output()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def status(folder: Path) -> dict:
    try:
        return json.loads((folder / "rank0.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_for(what: str, check, proc: Teacher, timeout: float = 300):
    deadline = time.time() + timeout
    while not (found := check()):
        assert proc.poll() is None, f"the run ended while waiting for {what}:\n{proc.output()[-3000:]}"
        assert time.time() < deadline, f"no {what} in {timeout:.0f} s"
        time.sleep(0.1)
    return found


def test_kill_during_an_outage_then_resume_delivers_every_epoch_once(tmp_path):
    storage, status_dir, data = tmp_path / "ray", tmp_path / "status", tmp_path / "data"
    runs: list[Teacher] = []
    with plain_mlflow_server() as server:
        try:
            # MLflow's client would retry each refused call for minutes; the outbox retries anyway.
            env = {**os.environ, **server.client_env, STATUS_DIR_ENV: str(status_dir), "PYTHONWARNINGS": "ignore",
                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
            client = mlflow.MlflowClient(server.uri)
            runs.append(run := Teacher(data, storage, env, tmp_path / "first.txt"))
            found = wait_for("run id", lambda: list(storage.glob("*/mlflow_run_id.txt")), run)[0]
            run_id, journal = found.read_text().strip(), found.with_name("mlflow_outbox.json")
            wait_for("epoch 1 on the server", lambda: client.get_metric_history(run_id, "val/AP"), run)
            server.stop(crash=True)

            def held_and_saved() -> int | None:
                """The last epoch held in the run folder, once its checkpoint was reported and training went on."""
                try:
                    steps = [m["step"] for r in json.loads(journal.read_text())["records"]
                             if r["kind"] == "metrics" for m in r["metrics"]]
                except (FileNotFoundError, ValueError, KeyError):
                    return None
                now = status(status_dir)
                return max(steps) if steps and now.get("phase") == "train" and now["epoch"] > max(steps) else None

            held = wait_for("metrics held in the run folder", held_and_saved, run)
            first = status(status_dir)["pid"]
            os.kill(first, signal.SIGKILL)  # rank 0, its epochs 2..held never delivered

            def trained_on() -> bool:
                """Ray's second worker group, started while the server is away, trained an epoch and goes on."""
                now = status(status_dir)
                return now.get("pid") not in (None, first) and now.get("phase") == "train" and now["epoch"] >= held + 2

            wait_for("a restarted rank 0 training past its first epoch", trained_on, run)
            os.kill(status(status_dir)["pid"], signal.SIGKILL)
            code, out = run.wait(timeout=300)
            assert code == 1 and [line for line in out.splitlines() if line.startswith("error:")], out[-3000:]
            assert "Traceback" not in out, out[-3000:]

            server.start()
            runs.append(resumed := Teacher(data, storage, env, tmp_path / "resumed.txt", "--resume"))
            code, out = resumed.wait(timeout=600)
            assert code == 0, out[-3000:]
        finally:
            for started in runs:
                started.stop()
        counts = {key: sorted(m.step for m in client.get_metric_history(run_id, key))
                  for key in ("epoch", "train/loss", "val/AP")}
        print(f"held in the run folder up to epoch {held}, second group killed in epoch {held + 2}; "
              f"metric steps on the server: {counts}")
        for key, steps in counts.items():
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)
        pictures = sorted(Path(a.path).name for a in client.list_artifacts(run_id, "predictions"))
        assert pictures == [f"val_predictions_epoch{e:03d}.png" for e in range(1, EPOCHS + 1)], pictures
        tags = client.get_run(run_id).data.tags
        assert int(tags["worker_group_starts"]) >= 2 and tags.get("driver_resumes") == "1", tags
        assert not journal.exists()  # all delivered: nothing left to send

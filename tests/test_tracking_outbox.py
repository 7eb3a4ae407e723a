"""vitpose.run.outbox against a real `mlflow server` that the tests stop and start: rank 0's tracking calls held
through an outage and delivered in order, a worker start that never waits on the server, what is held kept in
the run folder as plain JSON and sent by the next tracker once, refusals reported."""

from __future__ import annotations

import json
import time

import mlflow
import pytest

from vitpose.run.outbox import OUTBOX_FILE, Outbox, TrackingUnavailable, WorkerTracker
from vitpose.run.storage import Storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    from tests.helpers_mlflow_server import plain_mlflow_server

    with plain_mlflow_server() as srv:
        yield srv


@pytest.fixture
def run_id(server, monkeypatch):
    # MLflow's client would retry each refused call for minutes; the outbox retries anyway.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    client = mlflow.MlflowClient(server.uri)
    exp = client.get_experiment_by_name("outbox") or client.get_experiment(client.create_experiment("outbox"))
    return client.create_run(exp.experiment_id).info.run_id


def steps(server, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in mlflow.MlflowClient(server.uri).get_metric_history(run_id, key)]


def test_a_worker_starts_and_logs_through_an_outage_then_everything_arrives_in_order(server, run_id, capsys):
    server.stop()
    try:
        t0 = time.time()
        tracker = WorkerTracker(server.uri, run_id, patience_s=120)  # counts its start: a server call, queued
        tracker.set_tag("ray_gpu_ids", "none")
        for step in (1, 2, 3):
            tracker.log_epoch({"loss": 1.0 / step}, step)
        assert time.time() - t0 < 15  # the first epoch waits for the outage to show, no call waits for the server
    finally:
        server.start()
    tracker.close()
    assert steps(server, run_id) == [1, 2, 3]
    tags = mlflow.MlflowClient(server.uri).get_run(run_id).data.tags
    assert tags["worker_group_starts"] == "1" and tags["ray_gpu_ids"] == "none"
    out = capsys.readouterr().out
    assert "unreachable" in out and "training goes on" in out and "is back after" in out


def test_what_is_held_is_kept_as_json_and_the_next_tracker_sends_it_once(server, run_id, tmp_path):
    journal = Storage.local(tmp_path / OUTBOX_FILE)
    first = WorkerTracker(server.uri, run_id, patience_s=1.0, journal=journal)
    first.log_epoch({"loss": 1.0}, 1)  # delivered
    first.outbox.drain(5.0)
    server.stop()
    try:
        picture = tmp_path / "p.png"
        picture.write_bytes(b"\x89PNG not really")
        first.outbox.put({"kind": "artifact", "file": str(picture), "name": "epoch002.png", "folder": "predictions"})
        first.log_epoch({"loss": 0.5}, 2)  # held: written to the journal before the checkpoint would be reported
        held = json.loads(journal.read_text())
        assert held["run_id"] == run_id and [r["kind"] for r in held["records"]] == ["artifact", "metrics"]
        assert "data_b64" in held["records"][0] and "file" not in held["records"][0]  # no temp paths, no repr
        with pytest.raises(TrackingUnavailable, match=r"2 logged item\(s\) not delivered.*kept in .*"
                                                      rf"{OUTBOX_FILE}, sent by --resume"):
            first.close()
    finally:
        server.start()
    # The next worker group of the run (a restart or --resume) sends it; epoch 2 trained again is not resent.
    second = WorkerTracker(server.uri, run_id, patience_s=60, journal=journal)
    second.log_epoch({"loss": 0.25}, 2)
    second.log_epoch({"loss": 0.1}, 3)
    second.close()
    assert steps(server, run_id) == [1, 2, 3]
    assert [m.value for m in mlflow.MlflowClient(server.uri).get_metric_history(run_id, "loss")][1] == 0.5
    names = [a.path for a in mlflow.MlflowClient(server.uri).list_artifacts(run_id, "predictions")]
    assert names == ["predictions/epoch002.png"] and not journal.exists()


def test_a_refused_call_is_not_retried_and_is_reported(server, run_id):
    box = Outbox(server.uri, run_id, patience_s=60)
    box.put({"kind": "params", "params": {"lr": "1"}})
    box.put({"kind": "params", "params": {"lr": "2"}})  # a param's value cannot change: the server says 400
    t0 = time.time()
    with pytest.raises(TrackingUnavailable, match=r"refused 1 logged item\(s\), e\.g\. params"):
        box.close()
    assert time.time() - t0 < 10


def test_without_a_thread_each_put_waits_for_its_delivery(server, run_id):
    box = Outbox(server.uri, run_id, patience_s=60, background=False)
    box.put({"kind": "metrics", "metrics": [{"key": "loss", "value": 1.0, "timestamp": 0, "step": 7}]})
    assert steps(server, run_id) == [7]  # delivered before put returned (a Tune trial may end right after)
    box.close()

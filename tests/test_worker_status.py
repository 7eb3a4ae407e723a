"""WorkerStatus: the status file outside watchers read, and the hold a fault test uses to land a kill (obeyed
only with the test-only switch: a hold file in a production status folder is never read)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from tests.faults.procs import Launched, cli_args, hold_env, hold_rank, read_status
from vitpose.train.session import STATUS_DIR_ENV, TEST_HOLD_ENV, WorkerStatus


def test_status_file_tracks_phase(tmp_path, monkeypatch):
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    status = WorkerStatus(rank=1)
    status.update(phase="train", epoch=2, step=5)
    seen = read_status(tmp_path, 1)
    assert (seen["rank"], seen["phase"], seen["epoch"], seen["step"], seen["held"]) == (1, "train", 2, 5, False)


def test_rank_waits_at_the_held_point_until_released(tmp_path, monkeypatch):
    for key, value in hold_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    hold = hold_rank(tmp_path, 0, phase="save", epoch=3)
    status = WorkerStatus(rank=0)
    status.update(phase="save", epoch=2)  # another epoch: passes straight through
    assert read_status(tmp_path, 0)["held"] is False

    worker = threading.Thread(target=status.update, kwargs={"phase": "save", "epoch": 3})
    worker.start()
    deadline = time.time() + 10
    while not (read_status(tmp_path, 0) or {}).get("held") and time.time() < deadline:
        time.sleep(0.01)
    assert read_status(tmp_path, 0)["held"] is True
    time.sleep(0.3)
    assert worker.is_alive(), "the rank went past the held point"
    hold.unlink()
    worker.join(5)
    assert not worker.is_alive() and read_status(tmp_path, 0)["held"] is False


def test_hold_times_out(tmp_path, monkeypatch):
    for key, value in hold_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    (tmp_path / "hold-rank0.json").write_text(json.dumps({"phase": "report", "epoch": 1, "timeout_s": 0.2}))
    t0 = time.time()
    WorkerStatus(rank=0).update(phase="report", epoch=1)
    assert 0.2 <= time.time() - t0 < 5


def test_without_the_test_switch_a_hold_file_is_never_obeyed(tmp_path, monkeypatch):
    """A status folder given to a production watchdog: a stray hold file there does not stall any step."""
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(TEST_HOLD_ENV, raising=False)
    # (a short timeout, so that a rank which does obey it fails this test in seconds rather than stalling it)
    (tmp_path / "hold-rank0.json").write_text(json.dumps({"phase": "train", "epoch": 1, "timeout_s": 0.5}))
    status = WorkerStatus(rank=0)
    t0 = time.time()
    for step in range(50):
        status.update(phase="train", epoch=1, step=step)
        assert read_status(tmp_path, 0)["held"] is False and time.time() - t0 < 0.5, f"held at step {step}"
    assert read_status(tmp_path, 0)["step"] == 49
    for value in ("0", "true", ""):  # only the explicit "1" switches holds on
        monkeypatch.setenv(TEST_HOLD_ENV, value)
        WorkerStatus(rank=0).update(phase="train", epoch=1, step=0)
        assert read_status(tmp_path, 0)["held"] is False


@pytest.mark.slow
def test_a_teacher_run_ignores_a_stray_hold_file_without_the_test_switch(synthetic_root, tmp_path):
    """The real pipeline, its rank in a Ray worker, the status folder set as for a watchdog and a hold file for
    its training steps left there: the run never stops at them. (With the switch, the fault tests and
    tests/test_storage_s3_pipelines.py land their kills through the same hold.)"""
    status_dir = tmp_path / "status"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", STATUS_DIR_ENV: str(status_dir)}
    env.pop(TEST_HOLD_ENV, None)
    # A rank that wrongly obeys it is seen held for 5 s at each step, and the test fails.
    hold_rank(status_dir, 0, phase="train", epoch=1).write_text(json.dumps({"phase": "train", "epoch": 1,
                                                                            "timeout_s": 5}))
    args = cli_args(synthetic_root, tmp_path / "ray", "train.epochs=1", "ray.num_workers=1", "deepspeed.zero_stage=0",
                    "train.precision=fp32")
    run = Launched(["pipelines/teacher.py", *args], env, tmp_path / "run.log")
    seen: list[dict] = []
    try:
        while run.proc.poll() is None and not any(s["held"] for s in seen):
            status = read_status(status_dir, 0)
            seen += [status] if status else []
            time.sleep(0.01)
        rc = run.wait(300)
    finally:
        run.cleanup()
    assert not [s for s in seen if s["held"]], "a rank stopped at a hold file without the test switch"
    assert rc == 0, run.output()[-3000:]
    assert {s["step"] for s in seen if s["phase"] == "train"} and read_status(status_dir, 0)["phase"] == "done"

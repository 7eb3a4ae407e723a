"""WorkerStatus: the status file outside watchers read, and the hold a fault test uses to land a kill."""

from __future__ import annotations

import json
import threading
import time

from tests.faults.procs import hold_rank, read_status
from vitpose.train.session import STATUS_DIR_ENV, WorkerStatus


def test_status_file_tracks_phase(tmp_path, monkeypatch):
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    status = WorkerStatus(rank=1)
    status.update(phase="train", epoch=2, step=5)
    seen = read_status(tmp_path, 1)
    assert (seen["rank"], seen["phase"], seen["epoch"], seen["step"], seen["held"]) == (1, "train", 2, 5, False)


def test_rank_waits_at_the_held_point_until_released(tmp_path, monkeypatch):
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
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
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    (tmp_path / "hold-rank0.json").write_text(json.dumps({"phase": "report", "epoch": 1, "timeout_s": 0.2}))
    t0 = time.time()
    WorkerStatus(rank=0).update(phase="report", epoch=1)
    assert 0.2 <= time.time() - t0 < 5

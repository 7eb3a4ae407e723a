"""vitpose.tracking.Outbox: rank 0's MLflow calls delivered in order from a background thread, held through
an outage, handed over in a file when the server never comes back, refusals reported."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from vitpose import tracking
from vitpose.tracking import Outbox, TrackingUnavailable


class Server:
    """Stands in for the MLflow client's calls: records what arrived; raises like an unreachable server while
    ``down`` is set, and blocks for ``slow_s`` per call (MLflow's own retries) when asked."""

    def __init__(self):
        self.got: list[int] = []
        self.down = threading.Event()
        self.slow_s = 0.0

    def log(self, step: int) -> None:
        time.sleep(self.slow_s)
        if self.down.is_set():
            raise ConnectionError("Connection refused")
        self.got.append(step)


class Refusal(Exception):
    def get_http_status_code(self) -> int:
        return 403


def test_outbox_holds_through_an_outage_and_delivers_in_order(monkeypatch, capsys):
    server = Server()
    server.down.set()
    box = Outbox("http://tracking:5000", patience_s=60)
    t0 = time.time()
    for step in range(1, 6):
        box.put(f"step {step}", server.log, step)
    assert time.time() - t0 < 0.5  # the caller (training) never waits on the server
    time.sleep(1.5)
    assert server.got == []
    server.down.clear()
    box.close()
    assert server.got == [1, 2, 3, 4, 5]
    out = capsys.readouterr().out
    assert "unreachable (Connection refused); training goes on" in out and "is back after" in out


def test_a_call_stuck_in_the_clients_own_retries_is_announced(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "SLOW_S", 0.3)
    server = Server()
    server.slow_s = 1.0
    box = Outbox("http://tracking:5000", patience_s=60)
    box.put("step 1", server.log, 1)
    time.sleep(0.6)
    box.put("step 2", server.log, 2)  # step 1 has been in flight for 0.6 s
    box.close()
    assert server.got == [1, 2]
    assert re.search(r"unreachable \(no answer for \d+ s\); training goes on", capsys.readouterr().out)


def test_after_patience_the_rest_is_kept_in_a_file_and_close_says_so(tmp_path, monkeypatch):
    server = Server()
    server.down.set()
    kept = tmp_path / "undelivered.jsonl"
    box = Outbox("http://tracking:5000", patience_s=0.5, undelivered_file=kept)
    for step in (1, 2, 3):
        box.put(f"metrics of step {step}", server.log, step)
    with pytest.raises(TrackingUnavailable, match=r"unreachable for over 0 s .* 3 logged item\(s\) not delivered, "
                                                  r"from metrics of step 1; kept in .*undelivered.jsonl"):
        box.close()
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [r["call_args"] for r in rows] == [[1], [2], [3]] and server.got == []


def test_a_refused_call_is_not_retried_and_is_reported():
    calls = []

    def refuse(step: int) -> None:
        calls.append(step)
        raise Refusal("PERMISSION_DENIED")

    box = Outbox("http://tracking:5000", patience_s=60)
    box.put("step 1", refuse, 1)
    with pytest.raises(TrackingUnavailable, match="refused 1 logged item"):
        box.close()
    assert calls == [1]


def test_without_a_thread_each_put_waits_for_its_delivery():
    server = Server()
    box = Outbox("http://tracking:5000", patience_s=60, background=False)
    box.put("step 1", server.log, 1)
    assert server.got == [1]  # delivered before put returned (a Tune trial may end right after)
    box.close()


def test_drain_waits_for_a_healthy_server_but_not_through_an_outage(monkeypatch):
    monkeypatch.setattr(tracking, "SLOW_S", 0.5)
    server = Server()
    server.slow_s = 0.2
    box = Outbox("http://tracking:5000", patience_s=60)
    box.put("step 1", server.log, 1)
    box.drain(5.0)
    assert server.got == [1]  # delivered before the epoch's checkpoint would be reported
    server.down.set()
    box.put("step 2", server.log, 2)
    t0 = time.time()
    box.drain(1.0)  # waits its timeout once, then the outage is known...
    box.put("step 3", server.log, 3)
    box.drain(1.0)  # ...and later epochs do not wait at all
    assert time.time() - t0 < 1.6 and box.failing_since is not None
    server.down.clear()
    box.close()
    assert server.got == [1, 2, 3]

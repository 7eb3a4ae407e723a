"""Processes for the fault tests: launch the real CLIs, watch the workers from outside, kill, clean up.

Rules kept here: a test kills only processes it started (a subprocess it launched, or descendants of
one, or of this pytest process when it started an in-process Ray), and proves that before each kill.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import REPO, TEST_DATA
from vitpose.train.session import STATUS_DIR_ENV, TEST_HOLD_ENV

PY = sys.executable


def cli_args(root: Path, storage: Path, *extra: str) -> list[str]:
    """``--set`` flags of the tiny 2-worker ZeRO-3 teacher every fault test uses (plus ``extra``)."""
    sets = [f"data.root={root}", *TEST_DATA,
            "model.preset=vitpose_nano", "model.img_size=[64, 48]", "train.batch_size=8", "train.epochs=4",
            "train.eval_every=1", "train.warmup_iters=2", "train.lr_steps=[]", "data.loader_workers=0",
            "deepspeed.zero_stage=3", "train.precision=bf16", f"ray.storage_path={storage}", "tracking.log_images=0",
            *extra]
    return [a for s in sets for a in ("--set", s)]


class Launched:
    """A CLI run as a subprocess, with every process it starts remembered (polled while it runs), so the
    test can check what a kill left behind and clean up exactly those."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen([PY, *args], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            self.snapshot()
            time.sleep(0.5)

    def snapshot(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for k in kids:
            self.seen.setdefault(k.pid, k)
        return kids

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._stop.set()

    def survivors(self) -> list[psutil.Process]:
        """Processes this run started that are still alive (psutil checks pid *and* start time)."""
        return [p for p in self.seen.values() if _alive(p)]

    def cleanup(self) -> list[str]:
        """Kill what is left of this run; returns what had to be killed."""
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        left = self.survivors()
        names = [f"{p.pid}:{proc_name(p)}" for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        return names


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def proc_name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


# Ray's per-node agents notice a dead raylet only after about a minute; everything else goes at once.
SLOW_TO_EXIT = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def assert_gone_with_the_driver(procs: list[psutil.Process], timeout: float = 30) -> None:
    """After the driver's SIGKILL: every Ray process it started but the agents exits by itself."""
    core = [p for p in procs if proc_name(p) not in SLOW_TO_EXIT]
    _, alive = psutil.wait_procs(core, timeout=timeout)
    assert not alive, f"still running {timeout:.0f}s after the driver died: {[proc_name(p) for p in alive]}"


def read_status(folder: Path, rank: int) -> dict | None:
    try:
        return json.loads((folder / f"rank{rank}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def hold_env(folder: Path) -> dict[str, str]:
    """The environment a run's workers need for ``hold_rank``: the status folder and the test-only switch that
    makes them obey hold files (see vitpose.train.session.WorkerStatus)."""
    return {STATUS_DIR_ENV: str(folder), TEST_HOLD_ENV: "1"}


def hold_rank(folder: Path, rank: int, phase: str, epoch: int) -> Path:
    """Ask ``rank`` to wait when it reaches ``phase`` of ``epoch`` (see WorkerStatus; the run needs
    ``hold_env``); unlink the file to let go."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"hold-rank{rank}.json"
    path.write_text(json.dumps({"phase": phase, "epoch": epoch}))
    return path


def wait_for_status(folder: Path, rank: int, when: Callable[[dict], bool], timeout: float,
                    alive: Callable[[], bool] = lambda: True) -> dict:
    """Poll a worker's status file (see vitpose.train.session.WorkerStatus) until ``when`` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = read_status(folder, rank)
        if status is not None and when(status):
            return status
        if not alive():
            raise AssertionError(f"the run ended before rank {rank} reached the kill point; last status {status}")
        time.sleep(0.005)
    raise AssertionError(f"rank {rank} did not reach the kill point in {timeout:.0f}s; last status "
                         f"{read_status(folder, rank)}")


def kill_owned(pid: int, owner_pid: int) -> str:
    """SIGKILL ``pid`` after checking that it descends from ``owner_pid`` (a process this test started);
    returns its name."""
    proc = psutil.Process(pid)
    name = proc_name(proc)
    if owner_pid not in {p.pid for p in proc.parents()}:
        raise AssertionError(f"refusing to kill {pid} ({name}): not started by this test")
    proc.send_signal(signal.SIGKILL)  # psutil checks the pid still names the same process
    return name


class WorkerKiller(threading.Thread):
    """From outside the workers: for each kill point in turn, wait until a rank's status matches, then
    SIGKILL that worker process. Records the status seen just before and just after each kill."""

    def __init__(self, status_dir: Path, owner_pid: int, points: list[tuple[int, Callable[[dict], bool]]],
                 timeout: float = 300):
        super().__init__(daemon=True)
        self.status_dir, self.owner_pid, self.points, self.timeout = status_dir, owner_pid, points, timeout
        self.kills: list[dict] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            killed: set[int] = set()
            for rank, when in self.points:
                status = wait_for_status(self.status_dir, rank, lambda s, when=when: s["pid"] not in killed and when(s),
                                         self.timeout)
                name = kill_owned(status["pid"], self.owner_pid)
                t_kill = time.time()
                killed.add(status["pid"])
                after = read_status(self.status_dir, rank)  # the dead worker's last word
                kill = {"rank": rank, "before": status, "after": after, "time": t_kill, "name": name}
                self.kills.append(kill)
                back = wait_for_status(self.status_dir, rank, lambda s: s["pid"] not in killed, self.timeout)
                kill["recovered_after"] = back["time"] - t_kill  # the replacement restored, about to train
        except BaseException as err:  # reported by the test
            self.error = err
        finally:
            self.done.set()

"""Where the training loop reports to and resumes from: a local folder, Ray Train, or a Ray Tune trial.

The ``Trainer`` only sees the ``Session`` surface (rank, world size, ``report``, ``latest_checkpoint``), so
the same loop runs in a notebook (``LocalSession``), under Ray Train on every worker (``RaySession``), as a
Tune trial (``TuneSession``) or in a benchmark that keeps nothing (``NullSession``). ``WorkerStatus`` lets
something outside a worker see where it is, and ``single_process_env`` gives a one-rank process group its
own rendezvous port.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from pyarrow.fs import LocalFileSystem

from vitpose.run.storage import Storage
from vitpose.train.run_folder import (
    SAVE_TMP_PREFIX,
    IncompleteCheckpointError,
    newest_complete_checkpoint,
    verify_checkpoint,
    write_atomic,
)

# When set, every rank keeps ``<dir>/rank<R>.json`` current (pid, epoch, step, phase) for outside watchers.
STATUS_DIR_ENV = "VITPOSE_WORKER_STATUS_DIR"
# Only with this set to 1 does a rank obey hold files (fault tests land kills with them): the status folder is
# offered to production watchdogs, where a stray hold file would otherwise stall a rank at every match.
TEST_HOLD_ENV = "VITPOSE_TEST_ONLY_HOLD_HOOK"


class Session:
    """What the loop reports to and resumes from; every kind of run shares this surface."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def latest_checkpoint(self) -> AbstractContextManager[Any]:
        """A context manager yielding the directory of the checkpoint to resume from, or None."""
        raise NotImplementedError


class NullSession(Session):
    """Keeps nothing and never resumes: for benchmarks that only time or measure the loop."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size, self.local_rank = rank, world_size, rank

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        pass

    def latest_checkpoint(self) -> AbstractContextManager[Any]:
        return nullcontext(None)


class LocalSession(Session):
    """Single process, no Ray: checkpoints are copied under ``out_dir``; used by tests and notebooks."""

    def __init__(self, out_dir: str | Path, resume_from: str | Path | None = None):
        self.out_dir = Path(out_dir)
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = self.out_dir / f"checkpoint_{len(self.checkpoints):06d}"
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copytree(checkpoint_dir, tmp)
            os.replace(tmp, dest)  # atomic: a half-copied checkpoint is never visible under its name
            self.checkpoints.append(dest)

    def latest_checkpoint(self) -> AbstractContextManager[Any]:
        return nullcontext(self.resume_from)


class RaySession(Session):
    """One worker of a Ray Train worker group; ``run_dir`` (a local folder or a storage URI) is the run's
    folder, where a checkpoint Ray had not registered yet is looked for when Ray has none."""

    def __init__(self, run_dir: str | None = None) -> None:
        import ray.train

        self.run_dir = run_dir
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def latest_checkpoint(self) -> AbstractContextManager[Any]:
        """Ray's last registered checkpoint, or a newer complete one beside it in the run folder.

        Ray registers a reported checkpoint after the report returns; a driver killed in between leaves the
        newer checkpoint on disk but unregistered, and resuming from Ray's record would train it again.
        """
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:  # a driver killed before Ray registered the first checkpoint may have left one
            return self._unregistered() if self.run_dir else nullcontext(None)
        registered = Path(ckpt.path)
        if isinstance(ckpt.filesystem, LocalFileSystem):
            if registered.is_dir():  # a local or shared run folder
                newest = newest_complete_checkpoint(registered.parent)
                if newest is not None and newest != registered and _epoch(newest) > _epoch(registered):
                    return nullcontext(newest)
            return ckpt.as_directory()
        return newer_in_storage(Storage.from_filesystem(ckpt.filesystem, ckpt.path)) or ckpt.as_directory()


    def _unregistered(self) -> AbstractContextManager[Any]:
        newest = newest_complete_checkpoint(Storage.parse(self.run_dir))
        if newest is None:
            return nullcontext(None)
        return nullcontext(newest.local_path) if newest.is_local else _downloaded(newest)


def _downloaded(ckpt: Storage) -> AbstractContextManager[Path]:
    """A local copy of a checkpoint on object storage, in a save temp folder (see ``remove_stale_save_dirs``)."""
    return ckpt.as_local_dir(prefix=f"{SAVE_TMP_PREFIX}{os.getpid()}-")


def newer_in_storage(registered: Storage) -> AbstractContextManager[Any] | None:
    """On object storage: a local copy of the newest complete checkpoint beside ``registered`` when it is newer
    than ``registered`` or ``registered`` is incomplete (cut off by a storage outage, say), else None. Checked
    in place, so only the checkpoint resumed from is downloaded."""
    newest = newest_complete_checkpoint(registered.parent)
    if newest is None or newest == registered or _epoch(newest) <= _epoch(registered):
        return None
    return _downloaded(newest)


def _epoch(ckpt_dir: Path | Storage) -> int:
    try:
        return int(verify_checkpoint(ckpt_dir)["epoch"])
    except IncompleteCheckpointError:
        return -1


class TuneSession(Session):
    """One Ray Tune trial = one training process (students are small); reports go to Tune and ASHA.

    Only epochs that carry the sweep's ``metric`` are reported: Tune refuses a result without it, and an
    epoch without evaluation (``train.eval_every`` > 1, FIFO sweeps only) has nothing to compare trials on.
    """

    def __init__(self, metric: str = "val/AP") -> None:
        self.metric = metric

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        if self.metric not in metrics:
            return
        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)

    def latest_checkpoint(self) -> AbstractContextManager[Any]:
        """The newest complete checkpoint in the trial's folder, else the one Tune restored.

        Tune's record of a trial's checkpoints is written by the driver every ~10 s; a driver killed between
        a trial persisting a checkpoint and the next snapshot would restart that trial from an older one (or
        from scratch) and train its last epochs again.
        """
        from ray import tune

        trial_dir = Path(tune.get_context().get_trial_dir())
        newest = newest_complete_checkpoint(trial_dir) if trial_dir.is_dir() else None
        if newest is not None:
            return nullcontext(newest)
        ckpt = tune.get_checkpoint()
        if ckpt is not None and not isinstance(ckpt.filesystem, LocalFileSystem):
            newer = newer_in_storage(Storage.from_filesystem(ckpt.filesystem, ckpt.path))
            if newer is not None:
                return newer
        return ckpt.as_directory() if ckpt is not None else nullcontext(None)


class WorkerStatus:
    """Where this rank is, in ``$VITPOSE_WORKER_STATUS_DIR/rank<R>.json``; nothing when the variable is unset.

    Lets something outside the worker (an operator, a stall detector, the fault-injection tests) see the pid,
    phase ('start', 'train', 'eval', 'save', 'report', 'done'), epoch (1-based, the one in progress; at
    'start' the number already done), step in the epoch and global_step (steps finished) without attaching
    to Ray. 'train' is written before each step.

    For tests only (``VITPOSE_TEST_ONLY_HOLD_HOOK=1`` in the worker's environment), a watcher can also stop a
    rank at a point it names, so a kill lands there every time rather than when a poller happens to catch a
    phase that lasts milliseconds: while ``<dir>/hold-rank<R>.json`` holds ``{"phase": P, "epoch": E}``
    matching an update, the rank writes ``"held": true`` and waits until that file is removed (at most
    ``"timeout_s"``, default 300 s). Without the switch such a file is never read. A sweep trial's ranks keep
    their files in ``<dir>/<trial id>/`` and also obey holds in ``<dir>``.
    """

    def __init__(self, rank: int):
        folder = os.environ.get(STATUS_DIR_ENV)
        self.path = Path(folder) / f"rank{rank}.json" if folder else None
        self.holds = os.environ.get(TEST_HOLD_ENV) == "1"
        self.fields: dict[str, Any] = {"pid": os.getpid(), "rank": rank}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def update(self, **fields: Any) -> None:
        if self.path is None:
            return
        self.fields.update(fields, time=time.time())
        hold = self._hold()
        self.fields["held"] = hold is not None
        write_atomic(self.path, json.dumps(self.fields))
        if hold is not None:
            deadline = time.time() + float(hold.get("timeout_s", 300))
            while self._hold() is not None and time.time() < deadline:
                time.sleep(0.05)
            self.fields["held"] = False
            write_atomic(self.path, json.dumps(self.fields))

    def _hold(self) -> dict[str, Any] | None:
        """The hold request matching the current phase and epoch, if a test left one (and enabled holds)."""
        if not self.holds:
            return None
        # A sweep trial's ranks write in <dir>/<trial id>/: a hold in <dir> applies to every trial's rank R.
        for folder in (self.path.parent, self.path.parent.parent):
            try:
                hold = json.loads((folder / f"hold-{self.path.name}").read_text())
                break
            except (FileNotFoundError, ValueError):
                continue
        else:
            return None
        wanted = (hold.get("phase"), hold.get("epoch"))
        return hold if wanted == (self.fields.get("phase"), self.fields.get("epoch")) else None


_PORTS_FROM = 20000  # above Ray's worker ports (10002-19999 by default)


def free_port() -> int:
    """A TCP port on the loopback that nothing is bound to right now, taken below the kernel's ephemeral range.

    A port the kernel handed out for ``bind(("", 0))`` comes from the range it also takes the source ports of
    outgoing connections from: in the seconds between this check and the server binding it (Ray starts a
    dozen processes before its dashboard binds) one of those connections can take it. Ports below that range
    are only ever taken by someone naming them."""
    low = _ephemeral_low()
    pick = random.SystemRandom()  # not the seeded module state: two runs seeded alike would pick alike
    for _ in range(200):
        port = pick.randrange(_PORTS_FROM, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: a busy machine; the kernel's pick is still a free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS and Windows start theirs at 49152
    return max(low, _PORTS_FROM + 1000)


def single_process_env(rank: int = 0, world_size: int = 1, port: int | None = None) -> dict[str, str]:
    """The environment torch.distributed reads for a process group on this machine: set it with
    ``os.environ.update``. Each group needs its own port, so concurrent runs never meet."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port()), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)}

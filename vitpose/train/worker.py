"""The Ray Train entry point of a teacher run, and the fatal-error protocol between workers and driver.

What crosses from the driver to every worker is one frozen ``WorkerJob``. A worker that meets an error a
retry cannot fix (bad data, a NaN loss, a broken checkpoint or config) records it in the run folder's
``fatal_error.json`` (local or object storage, ``vitpose.run.storage``) before raising: a worker group Ray
restarts reads it and stops at once instead of training up to the same error again, and the driver prints
that one message instead of Ray's tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitpose.config import TrainingConfig, one_line
from vitpose.run.storage import Storage
from vitpose.train.run_folder import IncompleteCheckpointError

FATAL_FILE = "fatal_error.json"


@dataclass(frozen=True)
class WorkerJob:
    """Everything a training worker needs from the driver.

    Args:
        config: the resolved run config as plain data (``to_dict``), validated again on the worker.
        run_dir: the run's storage folder (where ``fatal_error.json`` goes); None records nothing.
        tracking_uri: the MLflow store of the driver's run.
        mlflow_run_id: the driver's run, which rank 0 logs epochs and pictures to; None logs nothing.
    """

    config: dict[str, Any]
    run_dir: str | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


class FatalTrainingError(RuntimeError):
    """Raised in Ray Train's controller to end a run whose worker recorded an error a retry cannot fix."""


def stop_on_fatal_error(run_dir: Path | Storage) -> Any:
    """A Ray Train callback that ends the run at the first worker error recorded in ``fatal_error.json``.

    Ray Train retries every worker-group error up to ``ray.max_failures``; for bad data or a NaN loss that
    means starting every worker again only to meet the same error. An exception raised from this callback
    reaches the controller as an error its failure policy does not retry, so the run stops the first time
    and the driver reports the recorded message.
    """
    from ray.train import UserCallback

    class StopOnFatalError(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            message = read_fatal(run_dir)
            if message is not None:
                raise FatalTrainingError(f"not retried: {message}")

    return StopOnFatalError()


def unretryable_errors() -> tuple[type[BaseException], ...]:
    from vitpose.config import ConfigError
    from vitpose.data.coco import BadSampleError
    from vitpose.models.weights import CheckpointError
    from vitpose.run.tracking import TrackingUnavailable
    from vitpose.train.loop import NonFiniteLossError

    return (BadSampleError, NonFiniteLossError, IncompleteCheckpointError, ConfigError, CheckpointError,
            TrackingUnavailable)


def read_fatal(run_dir: Path | Storage) -> str | None:
    """The message a worker recorded as not worth retrying, if any."""
    path = Storage.of(run_dir) / FATAL_FILE
    return json.loads(path.read_text())["message"] if path.is_file() else None


def clear_fatal(run_dir: Path | Storage) -> None:
    """Forget an earlier run's fatal error: its cause may be fixed by now, and --resume trains again."""
    (Storage.of(run_dir) / FATAL_FILE).unlink(missing_ok=True)


def train_worker(job: WorkerJob) -> None:
    """What Ray Train runs on every worker (bound with ``functools.partial``): one ``Trainer.fit()``."""
    from vitpose.train.loop import Trainer
    from vitpose.train.session import RaySession

    logging.basicConfig(level=logging.WARNING)
    cfg = TrainingConfig.model_validate(job.config)
    session = RaySession(job.run_dir)
    tracker = None
    if session.rank == 0 and job.mlflow_run_id and job.tracking_uri:
        from vitpose.run.tracking import WorkerTracker

        tracker = WorkerTracker(job.tracking_uri, job.mlflow_run_id, cfg.tracking.outage_patience_s,
                                outbox_journal(job.run_dir))
    try:
        with recording_fatal_errors(job.run_dir, session.rank):
            Trainer(cfg, session, tracker=tracker).fit()
        if tracker is not None:
            tracker.close()  # every epoch's metrics delivered before the run counts as finished
    finally:
        if tracker is not None:
            tracker.flush_quietly()  # a failed group: what it logged still reaches the run if the server is up


@contextlib.contextmanager
def recording_fatal_errors(run_dir: str | None, rank: int) -> Iterator[None]:
    """Refuse to start when the run folder records a fatal error; record one raised inside (see the module
    docstring), then let it propagate."""
    fatal = Storage.of(run_dir) / FATAL_FILE if run_dir else None
    if fatal is not None and fatal.is_file():
        raise RuntimeError(f"not retried: {json.loads(fatal.read_text())['message']}")
    try:
        yield
    except unretryable_errors() as err:
        if fatal is not None:
            fatal.write_text(json.dumps({"rank": rank, "type": type(err).__name__, "message": one_line(err)}))
        raise


def worker_env() -> dict[str, str]:
    """The environment of a Train run's workers: allocator and console settings, where storage and tracking are
    (never credentials), and the worker status folder when one is set."""
    import os

    from vitpose.run import cluster, console
    from vitpose.run.storage import credentials_env
    from vitpose.train.session import STATUS_DIR_ENV

    return {**cluster.WORKER_ENV, **console.worker_env(), **credentials_env(),
            **{k: os.environ[k] for k in (STATUS_DIR_ENV,) if k in os.environ}}


def outbox_journal(run_dir: str | None) -> Storage | None:
    """Where rank 0 keeps what the tracking server has not taken yet (``vitpose.run.outbox``): the run folder, local
    or object storage, which the next worker group of the run (a restart, a ``--resume``) reads."""
    from vitpose.run.outbox import OUTBOX_FILE

    return Storage.of(run_dir) / OUTBOX_FILE if run_dir else None

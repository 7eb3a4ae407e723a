"""What the command-line pipelines share: their common arguments, the console and its log file, the
one-line exit on a user error, the MLflow run-id file of a run folder (local or object storage), and picking
the best checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitpose.config import ConfigError, resolve_path
from vitpose.run import console
from vitpose.run.storage import Storage

RUN_ID_FILE = "mlflow_run_id.txt"
LOG_DIR = "runs/logs"


def common_args(parser: argparse.ArgumentParser, default_config: str | None = None) -> argparse.ArgumentParser:
    """--config/--set/--resume for the training pipelines (default_config given) and --verbose for all."""
    if default_config is not None:
        parser.add_argument("--config", default=default_config, help=f"YAML config (default {default_config})")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. --set train.epochs=3 (repeatable)")
        parser.add_argument("--resume", action="store_true",
                            help="continue the most recent run with this ray.name from its latest checkpoint")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's, DeepSpeed's and the libraries' own output (always in the log file)")
    return parser


class UsageError(ConfigError):
    """Something on the command line or in an input file is wrong; the message says what and how to fix it."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to fix: printed as one line, exit code 2."""
    from vitpose.data.files import BadSampleError
    from vitpose.models import CheckpointError

    return (ConfigError, CheckpointError, BadSampleError, FileNotFoundError)


def guarded(body: Callable[[], int], *extra_errors: type[BaseException]) -> int:
    """``body()``'s exit code; a user error ends it with one ``error:`` line and exit code 2."""
    try:
        return body()
    except (*user_errors(), *extra_errors) as err:
        console.error(str(err))
        return 2


def run(body: Callable[[], int], name: str, verbose: bool = False, tracking_uri: str | None = None) -> int:
    """A long pipeline's body with the console captured (our lines shown, every line in the log file) and
    user errors as one line. ``tracking_uri``: the config's, if it names one (it places the log in a job)."""
    from vitpose.run import cluster

    folder = log_dir(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    with console.captured(folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log", verbose) as log:
        console.say(f"{name}: full log in {log}")
        try:
            return guarded(body)
        finally:
            cluster.disconnect()  # inside the capture: Ray's last words go to the log, not after our error


def sqlite_file(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, absolute (SQLAlchemy reads a relative one from the
    working folder), else None."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(os.path.abspath(uri[len("sqlite:///"):]))


def durable_runs(tracking_uri: str | None) -> Path | None:
    """Where outputs the README puts under ``runs/`` go: the repository's ``runs/``; inside a ``ray job submit
    --working-dir`` copy (which Ray deletes with the job), the folder of the job's SQLite store when that lies
    outside the copy (the README's job line puts it in the submitter's ``runs/``); None when nothing says."""
    from vitpose.run.cluster import job_working_copy

    copy = job_working_copy()
    if copy is None:
        return resolve_path("runs")
    db = sqlite_file(tracking_uri)
    return db.parent if db is not None and not db.is_relative_to(copy) else None


def log_dir(tracking_uri: str | None) -> Path:
    """``runs/logs`` (see ``durable_runs``); in a job copy with nothing durable named, the head's Ray session log
    folder, which outlives the job (beside Ray's own ``job-driver-*.log``) though not the cluster."""
    from vitpose.run.cluster import job_working_copy

    runs = durable_runs(tracking_uri)
    if runs is not None:
        return runs / "logs"
    copy = job_working_copy()
    session = next((p for p in copy.parents if p.name.startswith("session_")), None) if copy else None
    if session is None:  # not Ray's usual layout: the node's temp folder, never the copy
        import tempfile

        return Path(tempfile.gettempdir()) / "vitpose-logs"
    return session / "logs" / "vitpose"


def keep_outputs(cfg: Any, tracking_uri: str) -> None:
    """Point a generated (synthetic) dataset's relative ``data.root`` at ``durable_runs`` inside a job copy, in
    ``cfg`` itself so the workers get the same absolute path; refuse, before any work, one that would land in
    the copy with nothing durable to put it in."""
    from vitpose.run.cluster import job_working_copy

    copy = job_working_copy()
    if copy is None:
        return
    entries = [cfg.data, *(getattr(cfg.data, "datasets", None) or [])]
    for data in entries:
        if (data.kind or cfg.data.kind) != "synthetic" or not data.root or Path(data.root).is_absolute():
            continue
        runs = durable_runs(tracking_uri)
        parts = Path(data.root).parts
        if runs is None or parts[:1] != ("runs",):
            raise ConfigError(
                f"data.root={data.root} would be generated inside this job's working-dir copy {copy}, which Ray "
                "deletes when the job ends; give data.root as an absolute path every node sees, or the tracking "
                "URI as sqlite:////abs/path/runs/mlflow.db (outputs then go beside it)")
        if data is cfg.data and data.root == type(data)().root:
            data.synthetic.generate = True  # the default root, moved: generated there as it would be in runs/
        data.root = str(runs.joinpath(*parts[1:]))


def read_run_id(folder: Path | Storage) -> str | None:
    """The MLflow run a run folder (local or ``Storage``) belongs to, so a resumed run logs to the same run."""
    path = Storage.of(folder) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def write_run_id(folder: Path | Storage, run_id: str) -> None:
    (Storage.of(folder) / RUN_ID_FILE).write_text(run_id + "\n")


def best_checkpoint(result: Any, metric: str) -> tuple[Any, dict[str, Any]]:
    """The (checkpoint, metrics) of a Ray result with the highest ``metric``."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not candidates:
        raise RuntimeError(f"training finished without a checkpoint that has {metric}; nothing to register")
    return max(candidates, key=lambda cm: cm[1][metric])


def print_summary(summary: dict[str, Any]) -> None:
    for key, value in summary.items():
        console.say(f"{key:>18}: {value}")

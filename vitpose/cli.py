"""What the command-line pipelines share: their common arguments, the console and its log file, and the
one-line exit on a user error. A run's life once the config is read is ``vitpose.run.lifecycle``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitpose.config import ConfigError, load_config
from vitpose.run import console

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


def run_with_config(args: argparse.Namespace, schema: type, body: Callable[[Any], int], name: str) -> int:
    """``body(cfg)`` under ``run``, cfg being ``--config`` with ``--set`` read as ``schema``. The config is read
    first: a mistake in it is one error line before any log file, and a tracking URI it names places the log."""
    loaded: list[Any] = []
    rc = guarded(lambda: loaded.append(load_config(args.config, args.set, schema=schema)) or 0)
    if rc:
        return rc
    cfg = loaded[0]
    return run(lambda: body(cfg), name, args.verbose, cfg.tracking.tracking_uri)


def log_dir(tracking_uri: str | None) -> Path:
    """``runs/logs`` (see ``durable_runs``); in a job copy with nothing durable named, the head's Ray session log
    folder, which outlives the job (beside Ray's own ``job-driver-*.log``) though not the cluster."""
    from vitpose.run.cluster import job_working_copy
    from vitpose.run.lifecycle import durable_runs

    runs = durable_runs(tracking_uri)
    if runs is not None:
        return runs / "logs"
    copy = job_working_copy()
    session = next((p for p in copy.parents if p.name.startswith("session_")), None) if copy else None
    if session is None:  # not Ray's usual layout: the node's temp folder, never the copy
        import tempfile

        return Path(tempfile.gettempdir()) / "vitpose-logs"
    return session / "logs" / "vitpose"



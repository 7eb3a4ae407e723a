"""What the command-line pipelines share: their common arguments, the console and its log file, the
one-line exit on a user error, the MLflow run-id file of a run folder (local or object storage), and picking
the best checkpoint.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitpose import console
from vitpose.config import ConfigError, resolve_path
from vitpose.storage import Storage

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


def run(body: Callable[[], int], name: str, verbose: bool = False) -> int:
    """A long pipeline's body with the console captured (our lines shown, every line in the log file) and
    user errors as one line."""
    from vitpose import raycluster

    with console.captured(resolve_path(LOG_DIR) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log", verbose) as log:
        console.say(f"{name}: full log in {log}")
        try:
            return guarded(body)
        finally:
            raycluster.disconnect()  # inside the capture: Ray's last words go to the log, not after our error


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

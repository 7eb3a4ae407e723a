"""What a person sees in the terminal: our lines on the console, everything else in the run's log file.

A pipeline runs inside ``captured(log_path, verbose)``. While it does, the driver's ``sys.stdout`` and
``sys.stderr`` (and every logging handler that wrote to them) go through a filter: lines that carry our tag
reach the terminal with the tag removed, every line goes to the log file, and with ``verbose`` every line
reaches the terminal too. Ray forwards each worker's output to the driver's streams, so a line a training
worker prints with ``say`` (tagged, because the pipeline put ``VITPOSE_CONSOLE=1`` in the workers'
environment) passes while Ray's, DeepSpeed's and torch's own output lands in the log. The driver's own lines
use ``say`` and ``error`` too. Outside ``captured`` (a notebook, a test), ``say`` is a plain ``print``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

CONSOLE_ENV = "VITPOSE_CONSOLE"
TAG = "\u2063vp\u2063 "  # invisible separators around "vp": unlikely in anyone else's output
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_active: _Capture | None = None


def say(text: str) -> None:
    """One line for the person at the terminal."""
    if _active is not None:
        _active.emit(text, _active.terminal_out)
    elif os.environ.get(CONSOLE_ENV):
        print(TAG + text, flush=True)
    else:
        print(text, flush=True)


def fmt_secs(s: float) -> str:
    """A duration for an ETA: 4m05s, or 1h02m past an hour."""
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def error(text: str) -> None:
    """The ``error:`` line a failed run ends with (on stderr)."""
    line = f"error: {text}"
    if _active is not None:
        _active.emit(line, _active.terminal_err)
    else:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def captured(log_path: Path, verbose: bool = False) -> Iterator[Path]:
    """Route the process's output as described above while the block runs; yields the log file's path.
    Nested use keeps the outer capture (and its log file)."""
    global _active
    if _active is not None:
        yield _active.log_path
        return
    before = os.environ.get(CONSOLE_ENV)
    _never_merge_our_lines()
    _active = _Capture(Path(log_path), verbose)
    os.environ[CONSOLE_ENV] = "1"  # inherited by a local Ray's workers; clusters get it in the runtime env
    try:
        yield _active.log_path
    finally:
        _active.close()
        _active = None
        if before is None:
            os.environ.pop(CONSOLE_ENV, None)
        else:
            os.environ[CONSOLE_ENV] = before


def _never_merge_our_lines() -> None:
    """Ray merges similar lines from different workers into one ("[repeated 2x across cluster]"), which would
    drop one trial's epoch line because another's looked alike. Lines with our tag are exempt: Ray reads the
    pattern when it is imported, and a Ray imported already gets it set on its two deduplicators."""
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", re.escape(TAG))
    ray_logging = sys.modules.get("ray._private.ray_logging")
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        dedup = getattr(ray_logging, name, None)
        if dedup is not None and hasattr(dedup, "allow_re"):
            dedup.allow_re = re.compile(re.escape(TAG))


def worker_env() -> dict[str, str]:
    """Environment for Ray workers, so their ``say`` lines are tagged when the driver captures."""
    return {CONSOLE_ENV: "1"} if _active is not None else {}


class _Capture:
    def __init__(self, log_path: Path, verbose: bool):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path, self.verbose = log_path, verbose
        self.log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives with the process)
        self.lock = threading.Lock()
        # Ray Train forwards each worker line twice (its own log capture and the worker's stdout); our lines
        # are shown once. Lines that differ in anything (epoch, loss, ETA) are never merged.
        self.recent: list[str] = []
        self.terminal_out, self.terminal_err = sys.stdout, sys.stderr
        sys.stdout = _FilteredStream(self, self.terminal_out)
        sys.stderr = _FilteredStream(self, self.terminal_err)
        self.swaps = {self.terminal_out: sys.stdout, self.terminal_err: sys.stderr}
        self._swap_handler_streams(self.swaps)

    def close(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _FilteredStream) and stream.pending:
                stream.write("\n")
        sys.stdout, sys.stderr = self.terminal_out, self.terminal_err
        self._swap_handler_streams({new: old for old, new in self.swaps.items()})
        self.log.close()

    @staticmethod
    def _swap_handler_streams(swaps: dict) -> None:
        """Handlers made earlier hold the stream they were given; point them at the other one."""
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for logger in loggers:
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    for old, new in swaps.items():
                        if handler.stream is old:
                            handler.setStream(new)
                            break

    def emit(self, text: str, terminal: TextIO) -> None:
        with self.lock:
            self.log.write(text + "\n")
            terminal.write(text + "\n")
            terminal.flush()

    def route(self, line: str, terminal: TextIO) -> None:
        """One complete line of someone's output."""
        plain = _ANSI.sub("", line)
        with self.lock:
            self.log.write(plain + "\n")
            if TAG in plain:
                text = plain.split(TAG, 1)[1]
                if text in self.recent:
                    return
                self.recent = [*self.recent[-7:], text]
                # On stdout whichever stream carried it: Ray forwards worker stdout on the driver's stderr.
                self.terminal_out.write(text + "\n")
                self.terminal_out.flush()
            elif self.verbose:
                terminal.write(line + "\n")
                terminal.flush()


class _FilteredStream(io.TextIOBase):
    """A text stream that hands complete lines to the capture."""

    def __init__(self, capture: _Capture, terminal: TextIO):
        self.capture, self.terminal, self.pending = capture, terminal, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.capture.route(line.rstrip("\r"), self.terminal)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.terminal.fileno()

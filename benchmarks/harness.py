"""The benchmarks' shared timing harness and statistics.

Timing: ``interleave`` runs the arms being compared in turns (A B A B ..., rotated or through every order), so a
machine whose speed drifts slows every arm alike, and returns each arm's seconds per call; ``timed`` times one
function alone. Both read ``time.perf_counter`` and synchronise CUDA around every reading when CUDA is in use.
Statistics: ``spread`` (median, min, max of one arm), ``ratio`` (a ratio of two arms with its spread over the
paired repetitions: ratio of medians, median of per-repetition ratios, their min/max and a bootstrap 95%
interval), ``summary`` (all arms against a reference) and ``interval`` (the 95% t interval of a mean).
Record: ``Run`` notes the machine (``machine``), the load average before and after, and writes what the script
measured as JSON (``--json PATH``, default ``runs/bench/NAME.json``; see ``add_json_option``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import itertools
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vitpose.distill.stats import interval  # noqa: F401 (the sweeps' own t interval, for the benchmarks)

REPO = Path(__file__).resolve().parents[1]
BENCH_RUNS = REPO / "runs" / "bench"
PRINT = "-"  # ``--json`` without a path: also print the record as the last line of stdout



# ------------------------------------------------------------------------------------------ machine
def _cpuinfo(key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min)"


def gpu_name() -> str | None:
    """The first CUDA device's name, None without one (torch is imported only where it already is)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, GPU (None without), library versions."""
    torch = sys.modules.get("torch")
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(), "python": platform.python_version(),
            "torch": getattr(torch, "__version__", None), "threads": torch.get_num_threads() if torch else None}


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc mallopt) instead of returning it to the OS.

    By default glibc hands each large tensor back with munmap when it is freed and the next one is
    page-faulted in again, zeroed page by page: measured here (ViTPose-S training step at batch 16),
    ~230k page faults per step and 10-20% of the step in a VM. Applied to the whole process, so it
    applies to every arm alike; the same can be had with MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ in the environment.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1  # blocks under 1 GiB come from the heap
    ok &= libc.mallopt(m_trim_threshold, 1 << 40) == 1  # never give the heap's top back
    ok &= libc.mallopt(m_top_pad, 256 << 20) == 1  # grow the heap in big steps
    return bool(ok)


# ------------------------------------------------------------------------------------------- timing
def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def clock(cuda: bool | None = None) -> float:
    """``time.perf_counter()`` once the GPU's queued work is done (``cuda``: None = whenever CUDA is in use)."""
    if cuda or (cuda is None and _cuda_in_use()):
        sys.modules["torch"].cuda.synchronize()
    return time.perf_counter()


def timed(fn: Callable[[], Any], calls: int = 1, warmup: int = 0, cuda: bool | None = None) -> float:
    """Seconds per call of ``calls`` calls back to back, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    t = clock(cuda)
    for _ in range(calls):
        fn()
    return (clock(cuda) - t) / calls


Order = str | Callable[[int, list[str]], Sequence[str]]


def round_order(order: Order, r: int, names: list[str]) -> Sequence[str]:
    """The arms' order in repetition ``r``: ``fixed`` (A B, A B, ...), ``rotate`` (A B C, B C A, C A B, ...;
    with two arms A B, B A), ``permute`` (every permutation in turn: with 3 arms and 6 repetitions each arm
    sits in each place twice) or a function of (r, names)."""
    if callable(order):
        return order(r, names)
    if order == "fixed":
        return names
    if order == "rotate":
        k = r % len(names)
        return names[k:] + names[:k]
    if order == "permute":
        orders = list(itertools.permutations(names))
        return orders[r % len(orders)]
    raise ValueError(f"order {order!r}: fixed, rotate, permute or a function")


def interleave(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, order: Order = "rotate",
               calls: int = 1, self_timed: bool = False, cuda: bool | None = None,
               before_round: Callable[[int], None] | None = None,
               before_each: Callable[[str], None] | None = None,
               after_round: Callable[[int, dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each arm in each of ``reps`` repetitions, the arms taking turns within every
    repetition (``round_order``) after ``warmup`` untimed rounds (in the dict's order, ``before_each`` too).

    ``calls``: calls per measurement (for functions too short to time once). ``self_timed``: each function
    returns its own measurement in seconds (a phase inside it, a per-step average) instead of being timed
    whole. ``before_round(r)`` runs before repetition r, ``before_each(name)`` (untimed: a barrier, an untimed
    forward pass) before each timed call, ``after_round(r, times)`` after it (progress lines)."""
    names = list(fns)
    for _ in range(warmup):
        for name, fn in fns.items():
            if before_each is not None:
                before_each(name)
            fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        if before_round is not None:
            before_round(r)
        for name in round_order(order, r, names):
            if before_each is not None:
                before_each(name)
            if self_timed:
                times[name].append(float(fns[name]()))
            else:
                times[name].append(timed(fns[name], calls, cuda=cuda))
        if after_round is not None:
            after_round(r, times)
    return times


# --------------------------------------------------------------------------------------- statistics
def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one arm's repetitions."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i] of each repetition (the two arms ran side by side in it)."""
    return [a / b for a, b in zip(num, den, strict=True)]


def bootstrap_median(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median (nan, nan under two values)."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """num / den with its spread: the ratio of the medians, the median of the per-repetition ratios (the
    figure the benchmarks report: each pair ran back to back, so slow drifts cancel), their min and max and
    a bootstrap 95% interval of that median. For seconds, den / num is how many times faster num is."""
    per = paired_ratios(num, den)
    return {"of_medians": statistics.median(num) / statistics.median(den), "median": statistics.median(per),
            "min": min(per), "max": max(per), "ci95": list(bootstrap_median(per)), "per_rep": per}


class SpeedRatio:
    """For a row holding two arms' seconds per repetition in the attributes named by ``speed_pair`` (first
    the arm whose speed is the numerator): ``ratio_stats`` (``ratio`` of the other's seconds to its) and
    ``ratio``, their median per-repetition ratio."""

    speed_pair: tuple[str, str]

    @property
    def ratio_stats(self) -> dict[str, Any]:
        a, b = self.speed_pair
        return ratio(getattr(self, b), getattr(self, a))

    @property
    def ratio(self) -> float:
        return self.ratio_stats["median"]


def summary(times: dict[str, list[float]], ref: str | None = None) -> dict[str, Any]:
    """Every arm's ``spread`` and, with ``ref``, its ``ratio`` to ``ref`` (times: lower is faster)."""
    out: dict[str, Any] = {"arms": {k: spread(v) for k, v in times.items()}}
    if ref is not None:
        out["ratio_to_" + ref] = {k: ratio(v, times[ref]) for k, v in times.items() if k != ref}
    return out


def rates(fns: dict[str, Callable[..., Any]], reps: int, ref: str, calls: int = 1, items: int = 1,
          args: tuple = (), order: Order = "rotate") -> dict[str, Any]:
    """Items per second of each function called with ``args`` (each call handles ``items``), interleaved
    without warm-up (warm the functions first): {name: median items/s, "name/ref": median per-repetition
    ratio of items/s (> 1: name is faster), "spread": each arm's items/s spread and each ratio's}."""
    times = interleave({k: functools.partial(f, *args) for k, f in fns.items()}, reps, warmup=0, order=order,
                       calls=calls)
    per_s = {k: [items / t for t in v] for k, v in times.items()}
    row: dict[str, Any] = {k: statistics.median(v) for k, v in per_s.items()}
    spreads: dict[str, Any] = {k: spread(v) for k, v in per_s.items()}
    for k in fns:
        if k != ref:
            r = ratio(per_s[k], per_s[ref])
            row[f"{k}/{ref}"], spreads[f"{k}/{ref}"] = r["median"], r
    row["spread"] = spreads
    return row


# ------------------------------------------------------------------------------------------- record
def add_json_option(parser: argparse.ArgumentParser, name: str) -> None:
    """``--json [PATH]``: where the run's JSON record goes (default runs/bench/NAME.json); ``--json`` alone
    also prints it as the last line of stdout."""
    parser.add_argument("--json", nargs="?", const=PRINT, default=None, metavar="PATH",
                        help=f"JSON record of the run (default {BENCH_RUNS.relative_to(REPO)}/{name}.json); "
                             "without PATH also printed as the last line")


def command(name: str, argv: Sequence[str] | None = None) -> str:
    return shlex.join(["python", "-m", f"benchmarks.{name}", *(sys.argv[1:] if argv is None else argv)])


class Run:
    """One benchmark run's record: the command, the machine, the load average at the start and at the end,
    the wall time and whatever the script puts in ``data``; ``finish`` writes it as JSON."""

    def __init__(self, name: str, json_arg: str | None = None, argv: Sequence[str] | None = None) -> None:
        self.name, self.json_arg, self.t0 = name, json_arg, time.perf_counter()
        self.data: dict[str, Any] = {}
        self.meta: dict[str, Any] = {"benchmark": name, "command": command(name, argv), "machine": machine(),
                                     "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_start": os.getloadavg()}

    @property
    def path(self) -> Path:
        return BENCH_RUNS / f"{self.name}.json" if self.json_arg in (None, PRINT) else Path(self.json_arg)

    def finish(self, **data: Any) -> dict[str, Any]:
        self.data.update(data)
        record = {**self.meta, "machine": machine(), "load_end": os.getloadavg(),
                  "seconds": time.perf_counter() - self.t0, **self.data}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=1, default=str))
        print(f"record: {self.path}", flush=True)
        if self.json_arg == PRINT:
            print(json.dumps(record, default=str), flush=True)
        return record

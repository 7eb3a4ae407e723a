"""A sweep's answer with its uncertainty: settings run with the same seeds, each setting's mean and 95% t
interval, paired differences, and whether the champion's lead is beyond the interval.

A setting is one point of the search space with ``train.seed`` left out; its trials are its seeds. Seeds are
paired across settings (seed s fixes initial weights, views and data order for every setting), so the
difference of two settings is taken seed by seed and its interval is the t interval of those differences,
narrower than the two settings' own intervals whenever seeds explain part of the spread.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

SEED_KEY = "train.seed"
# Two-sided 95% quantiles of Student's t by degrees of freedom; 1.96 beyond the table.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t interval of the mean; low and high are NaN for one value."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    dof = len(values) - 1
    t = T975.get(dof) or next((T975[d] for d in sorted(T975) if d >= dof), 1.96)
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass
class Setting:
    params: dict[str, Any]  # the searched values without the seed
    by_seed: dict[int, float] = field(default_factory=dict)  # seed -> metric after the last epoch

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items()) or "(base config)"

    @property
    def stats(self) -> tuple[float, float, float]:
        return interval([self.by_seed[s] for s in sorted(self.by_seed)])


def group_by_setting(trials: list[tuple[dict[str, Any], float]]) -> list[Setting]:
    """(params with the seed, metric) per finished trial -> settings, in the order first seen."""
    settings: dict[str, Setting] = {}
    for params, value in trials:
        rest = {k: v for k, v in params.items() if k != SEED_KEY}
        key = repr(sorted(rest.items()))
        settings.setdefault(key, Setting(rest)).by_seed[int(params.get(SEED_KEY, 0))] = float(value)
    return list(settings.values())


def paired(a: Setting, b: Setting) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of a - b over the seeds both have."""
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    return (*interval([a.by_seed[s] - b.by_seed[s] for s in seeds]), len(seeds))


def find_setting(settings: list[Setting], spec: str | None) -> Setting | None:
    """The setting ``spec`` names (``key=value[,key=value]``, values compared as text), or None."""
    if not spec:
        return None
    wanted = dict(part.strip().split("=", 1) for part in spec.split(",") if part.strip())
    return next((s for s in settings if all(str(s.params.get(k)) == v for k, v in wanted.items())), None)


def lead(champion: Setting, other: Setting, what: str) -> str:
    mean, low, high, n = paired(champion, other)
    if n < 2:
        return f"over {what} ({other.label}): {mean:+.4f} on {n} seed(s), no interval"
    beyond = "beyond the interval" if low > 0 else "NOT beyond the interval"
    return f"over {what} ({other.label}): {mean:+.4f} [{low:+.4f}, {high:+.4f}], {beyond}"


def spread(setting: Setting) -> str:
    """The interval of a setting's mean, or that it has none (one seed)."""
    _, low, high = setting.stats
    n = len(setting.by_seed)
    return f"[{low:.4f}, {high:.4f}] (95%, t) over {n} seeds" if n > 1 else "on 1 seed, no interval"


def verdict(settings: list[Setting], baseline: str | None) -> dict[str, Any]:
    """The champion (best mean), the runner-up and the baseline, with the summary's significance line."""
    ranked = sorted(settings, key=lambda s: s.stats[0], reverse=True)
    champion = ranked[0]
    mean, low, high = champion.stats
    out: dict[str, Any] = {"champion": champion, "ranked": ranked,
                           "line": f"{champion.label}: {mean:.4f} {spread(champion)}"}
    leads = []
    if len(ranked) > 1:
        leads.append(lead(champion, ranked[1], "the runner-up"))
    base = find_setting(settings, baseline)
    if base is not None and base is not champion:
        leads.append(lead(champion, base, "the baseline"))
    out["leads"] = leads
    return out

"""What a sweep leaves to look at: ``settings.csv`` and per-setting metrics on the sweep's MLflow run, and the
sweep plot (each trial's curve, each trial's number against the searched values, each setting's mean and 95%
interval over its seeds)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vitpose.config import StudentConfig
from vitpose.distill.stats import Setting, find_setting, paired
from vitpose.run import tracking


def log_settings(ranked: list[Setting], cfg: StudentConfig, uri: str, parent: str) -> None:
    """settings.csv on the sweep run: per setting its seeds' values, mean and 95% interval, and the paired
    difference to the baseline setting (``tune.baseline``)."""
    import csv
    import tempfile

    base = find_setting(ranked, cfg.tune.baseline)
    with tempfile.TemporaryDirectory(prefix="vp-settings-") as tmp:
        path = Path(tmp) / "settings.csv"
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["setting", "seeds", "per_seed", "mean", "ci_low", "ci_high", "minus_baseline",
                          "minus_baseline_low", "minus_baseline_high"])
            for s in ranked:
                diff = paired(s, base)[:3] if base is not None else ("", "", "")
                out.writerow([s.label, len(s.by_seed), " ".join(f"{k}:{v:.4f}" for k, v in sorted(s.by_seed.items())),
                              *s.stats, *diff])
        tracking.log_artifact(uri, parent, path)
    tracking.log_metrics(uri, parent, setting_metrics(ranked, base, cfg.tune.metric))


def setting_metrics(ranked: list[Setting], base: Setting | None, metric: str) -> dict[str, float]:
    """The sweep run's metrics per setting: ``setting/<label>/<metric>_mean`` with ``_ci_low`` / ``_ci_high``
    (two seeds or more) and ``_minus_baseline`` (with its interval) against ``tune.baseline``."""
    name = metric.replace("/", "_")
    out: dict[str, float] = {}
    for s in ranked:
        key = f"setting/{metric_safe(s.label)}/{name}"
        mean, low, high = s.stats
        out[f"{key}_mean"] = mean
        if len(s.by_seed) > 1:
            out.update({f"{key}_ci_low": low, f"{key}_ci_high": high})
        if base is not None and s is not base:
            diff, d_low, d_high, n = paired(s, base)
            if n:
                out[f"{key}_minus_baseline"] = diff
            if n > 1:
                out.update({f"{key}_minus_baseline_ci_low": d_low, f"{key}_minus_baseline_ci_high": d_high})
    return out


def metric_safe(label: str) -> str:
    """A setting's label in the characters MLflow allows in a metric name."""
    return re.sub(r"[^\w\-. /]", "_", label.replace("=", " ").replace(",", ""))


def trial_curves(results: Any, metric: str) -> dict[str, list[tuple[int, float]]]:
    """Per trial, its settings as a label and the (epoch, metric) it reported, in order."""
    curves = {}
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or "epoch" not in frame:
            continue
        rows = frame[["epoch", metric]].dropna()
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted((result.config or {}).items()))
        curves[label or str((result.metrics or {}).get("trial_id"))] = [(int(e), float(v)) for e, v in rows.values]
    return curves


def plot_sweep(table: Any, metric: str, path: Path, curves: dict[str, list[tuple[int, float]]], epochs: int,
               settings: list[Setting] | None = None) -> Path:
    """Left: each trial's metric against epoch, a trial that the scheduler stopped early ending in an x.
    Then: the last metric of each trial against each searched setting, stopped trials hollow and labelled
    with the epoch they stopped at (their number is not comparable with a finished trial's). Last, when any
    setting ran with several seeds: each setting's mean with its 95% interval, its seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if c.startswith("config/")]
    seeded = list(settings or []) if any(len(s.by_seed) > 1 for s in settings or []) else []
    panels = 1 + max(len(columns), 1) + (1 if seeded else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    curve_ax = axes[0][0]
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        (line,) = curve_ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if xs and xs[-1] < epochs:
            curve_ax.plot(xs[-1], ys[-1], marker="x", markersize=9, color=line.get_color())
    curve_ax.set_xlabel("epoch")
    curve_ax.set_ylabel(metric)
    curve_ax.set_title("x: stopped early by the scheduler", fontsize=9)
    curve_ax.grid(alpha=0.3)
    if curves:
        curve_ax.legend(fontsize=7)
    stopped = table["epoch"] < epochs  # a trial whose last report is before the last epoch was stopped
    for ax, col in zip(axes[0][1:], columns, strict=False):
        values = table[col]
        numeric = values.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all()
        labels = sorted({str(v) for v in values})
        xs = values if numeric else values.map(str).map({label: i for i, label in enumerate(labels)})
        ax.scatter(xs[~stopped], table[metric][~stopped], label="finished")
        ax.scatter(xs[stopped], table[metric][stopped], facecolors="none", edgecolors="tab:red", label="stopped early")
        for x, y, ep in zip(xs[stopped], table[metric][stopped], table["epoch"][stopped], strict=True):
            ax.annotate(f"stopped @ epoch {int(ep)}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(col.removeprefix("config/"))
        ax.set_ylabel(f"{metric}, last epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if seeded:
        plot_settings(axes[0][-1], seeded, metric)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path




def plot_settings(ax: Any, settings: list[Setting], metric: str) -> None:
    """Each setting's mean and 95% interval over its seeds (best at the top), each seed's value as a dot."""
    import math

    ranked = sorted(settings, key=lambda s: s.stats[0])
    for y, s in enumerate(ranked):
        mean, low, high = s.stats
        if not math.isnan(low):
            ax.plot([low, high], [y, y], color="tab:blue", linewidth=2)
        ax.plot(mean, y, marker="D", color="tab:blue")
        ax.scatter(list(s.by_seed.values()), [y] * len(s.by_seed), s=10, color="gray", zorder=3)
    ax.set_yticks(range(len(ranked)), [s.label for s in ranked], fontsize=7)
    ax.set_xlabel(f"{metric}, last epoch: mean, 95% interval, seeds")
    ax.grid(alpha=0.3)

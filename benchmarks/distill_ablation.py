"""The distillation ablation on the synthetic data, on the shipped path: five arms x N seeds, val AP after the
last epoch, mean +- std per arm and paired differences with 95% intervals.

    python benchmarks/distill_ablation.py [--seeds 0 1 2 3 4] [--config configs/distill/synthetic_tiny.yaml]
                                          [--set KEY=VALUE ...] [--skip-online]

Needs a registered teacher (``make demo`` makes one at models:/vitpose-teacher@current). Runs the real sweep
(``pipelines/distill.py``: Ray Tune, DeepSpeed engine, MLflow) twice:

1. bank mode, arms none / token / random_token / output / both crossed with ``train.seed``; every arm of a
   seed trains on that seed's view bank (the same stored views), starts from the same initial weights and is
   read after its last epoch (FIFO scheduler: no early stopping, equal budgets);
2. online mode, arm output per seed (fresh seeded augmentation, the teacher run per batch), to check that the
   bank does not change what output distillation gives.

Arms are paired by seed: the difference of two arms is taken seed by seed, and its 95% interval is the t
interval of those N differences. The results (per-seed values included) go to
``runs/bench/distill_ablation.json``; the table printed at the end is what RESULTS.md shows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ["none", "token", "random_token", "output", "both"]
# Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy needed for 1-10 seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
COMPARISONS = [("token", "none"), ("random_token", "none"), ("output", "none"), ("both", "none"),
               ("token", "random_token"), ("output", "output (online)")]


def sweep(config: str, name: str, sets: list[str], log: Path) -> Path:
    """Run one sweep; returns its results table."""
    cmd = [sys.executable, "pipelines/distill.py", "--config", config, "--set", f"ray.name={name}",
           "--set", "tune.scheduler=fifo", "--set", "tune.registered_model=vitpose-student-ablation",
           "--set", "tune.alias=ablation", *[x for s in sets for x in ("--set", s)]]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"sweep {name} failed (exit {code}); its output is in {log}")
    return sorted((REPO / "runs" / "ray").glob(f"{name}-2*/results.csv"))[-1]


def read(table: Path, label: dict[str, str]) -> dict[str, dict[int, float]]:
    """{arm: {seed: val AP after the last epoch}}; ``label`` renames arms (the online run's output)."""
    scores: dict[str, dict[int, float]] = {}
    for row in csv.DictReader(table.open()):
        arm = label.get(row["config/distill.parts"], row["config/distill.parts"])
        scores.setdefault(arm, {})[int(row["config/train.seed"])] = float(row["val/AP"])
    return scores


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t interval of the mean."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarise(scores: dict[str, dict[int, float]], seeds: list[int]) -> dict[str, object]:
    arms = {arm: {"per_seed": [v[s] for s in seeds], "mean": statistics.mean(v[s] for s in seeds),
                  "std": statistics.stdev([v[s] for s in seeds]) if len(seeds) > 1 else 0.0}
            for arm, v in scores.items()}
    pairs = {}
    for a, b in COMPARISONS:
        if a in scores and b in scores:
            diffs = [scores[a][s] - scores[b][s] for s in seeds]
            mean, low, high = interval(diffs)
            pairs[f"{a} - {b}"] = {"per_seed": diffs, "mean": mean, "ci95": [low, high],
                                   "supported": "no difference shown" if low <= 0 <= high
                                   else ("higher" if low > 0 else "lower")}
    return {"arms": arms, "paired": pairs}


def show(result: dict[str, object], seeds: list[int]) -> None:
    print(f"\nval AP after the last epoch, seeds {seeds}:")
    print(f"| arm | {' | '.join(f'seed {s}' for s in seeds)} | mean +- std |")
    print(f"|---|{'---|' * len(seeds)}---|")
    for arm, r in result["arms"].items():
        print(f"| {arm} | {' | '.join(f'{v:.3f}' for v in r['per_seed'])} | {r['mean']:.3f} +- {r['std']:.3f} |")
    print("\n| paired difference | mean | 95% interval | reading |")
    print("|---|---|---|---|")
    for name, r in result["paired"].items():
        low, high = r["ci95"]
        print(f"| {name} | {r['mean']:+.3f} | [{low:+.3f}, {high:+.3f}] | {r['supported']} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--config", default="configs/distill/synthetic_tiny.yaml")
    p.add_argument("--set", action="append", default=[], help="extra overrides for both sweeps")
    p.add_argument("--skip-online", action="store_true", help="only the bank sweep")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "distill_ablation.json"))
    a = p.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seeds = "[" + ", ".join(map(str, a.seeds)) + "]"
    t0 = time.time()
    bank = sweep(a.config, "ablation-bank", [
        f"tune.search_space={{distill.parts: {{grid: [{', '.join(ARMS)}]}}, train.seed: {{grid: {seeds}}}}}",
        "distill.output.mode=bank", *a.set], out.with_suffix(".bank.log"))
    scores = read(bank, {})
    print(f"  bank sweep done in {time.time() - t0:.0f} s: {bank}", flush=True)
    tables = [str(bank)]
    if not a.skip_online:
        online = sweep(a.config, "ablation-online", [
            f"tune.search_space={{distill.parts: {{grid: [output]}}, train.seed: {{grid: {seeds}}}}}",
            "distill.output.mode=online", *a.set], out.with_suffix(".online.log"))
        scores.update(read(online, {"output": "output (online)"}))
        tables.append(str(online))
        print(f"  online sweep done ({time.time() - t0:.0f} s so far): {online}", flush=True)
    result = summarise(scores, a.seeds)
    result.update({"seeds": a.seeds, "config": a.config, "overrides": a.set, "tables": tables,
                   "wall_seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d"),
                   "selection": "val/AP after each trial's last epoch (FIFO, equal budgets)"})
    out.write_text(json.dumps(result, indent=1))
    show(result, a.seeds)
    print(f"\nwall time {result['wall_seconds']} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's distillation ablation on the synthetic data: val AP of none / token / output / both, per seed.

    python benchmarks/distill_ablation.py [--seeds 0 1 2] [--config configs/distill/synthetic_tiny.yaml]

Needs a registered teacher (``make demo`` makes one at models:/vitpose-teacher@current). Each seed runs the
real sweep (pipelines/distill.py) with early stopping off, so every part gets the same budget; the table
prints each part's mean and spread over seeds and its gain over ``none``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default="configs/distill/synthetic_tiny.yaml")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every sweep")
    a = p.parse_args()
    scores: dict[str, list[float]] = {}
    t0 = time.time()
    for seed in a.seeds:
        name = f"ablation-seed{seed}"
        sets = [f"train.seed={seed}", "tune.scheduler=fifo", f"ray.name={name}",
                "tune.search_space={distill.parts: {grid: [none, token, output, both]}}", *a.set]
        cmd = [sys.executable, "pipelines/distill.py", "--config", a.config, *[x for s in sets for x in ("--set", s)]]
        print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        table = sorted((REPO / "runs" / "ray").glob(f"{name}-*/results.csv"))[-1]
        for row in csv.DictReader(table.open()):
            scores.setdefault(row["config/distill.parts"], []).append(float(row["val/AP"]))
        print(f"  done ({time.time() - t0:.0f} s so far): {table}", flush=True)
    base = statistics.mean(scores["none"])
    print(f"\nval AP over seeds {a.seeds} (student {a.config}):")
    print(f"{'parts':8} {'mean':>7} {'spread':>7} {'min':>7} {'max':>7} {'vs none':>8}")
    for part in ("none", "token", "output", "both"):
        v = scores[part]
        spread = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{part:8} {statistics.mean(v):7.4f} {spread:7.4f} {min(v):7.4f} {max(v):7.4f} "
              f"{statistics.mean(v) - base:+8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

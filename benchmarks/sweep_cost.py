"""What the view bank saves: the same K-trial output-distillation sweep with the bank and with the online teacher.

    python benchmarks/sweep_cost.py [--trials 4] [--config configs/distill/synthetic_tiny.yaml]

Needs a registered teacher (``make demo``). Both sweeps run the real pipelines/distill.py with early stopping
off and output distillation on in every trial (the weights searched differ, the cost does not). Printed
side by side: total wall time, and teacher forward passes (bank: once per stored view, from the bank's own
count; online: one per training image per trial, from the trials' epochs and the dataset size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sweep(config: str, mode: str, trials: int, extra: list[str]) -> tuple[float, str]:
    weights = [round(0.5 + 0.5 * i, 2) for i in range(trials)]
    sets = ["tune.scheduler=fifo", f"ray.name=cost-{mode}", f"distill.output.mode={mode}",
            f"tune.search_space={{distill.parts: {{grid: [output]}}, distill.output.weight: {{grid: {weights}}}}}",
            *extra]
    cmd = [sys.executable, "pipelines/distill.py", "--config", config, *[x for s in sets for x in ("--set", s)]]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode} sweep failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.time() - t0, out.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--config", default="configs/distill/synthetic_tiny.yaml")
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()

    from vitpose.config import StudentConfig, load_config

    cfg = load_config(a.config, a.set, schema=StudentConfig)
    images_per_trial = cfg.data.synthetic.train_instances * cfg.train.epochs
    online_forwards = images_per_trial * a.trials
    bank_time, _ = sweep(a.config, "bank", a.trials, a.set)
    banks = sorted((REPO / "runs" / "distill" / "banks").glob("*/bank.json"), key=lambda f: f.stat().st_mtime)
    bank_info = json.loads(banks[-1].read_text())
    bank_forwards = bank_info["teacher_forwards"]
    online_time, _ = sweep(a.config, "online", a.trials, a.set)
    print(f"\n{a.trials}-trial output-distillation sweep ({a.config}):")
    print(f"{'mode':8} {'wall s':>8} {'teacher forwards':>17}")
    print(f"{'bank':8} {bank_time:8.0f} {bank_forwards:17d}   (building the bank took {bank_info['seconds']} s; "
          "a sweep that finds it built pays 0 of it)")
    print(f"{'online':8} {online_time:8.0f} {online_forwards:17d}")
    print(f"online / bank: wall x{online_time / bank_time:.2f}, teacher forwards x{online_forwards / max(bank_forwards, 1):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the view bank saves: the same K-trial output-distillation sweep with the bank and with the online teacher.

    python -m benchmarks.sweep_cost [--trials 4] [--repeats 1] [--config configs/distill/synthetic_tiny.yaml]

Needs a registered teacher (``make demo``). Both sweeps run the real pipelines/distill.py with early stopping
off and output distillation on in every trial (the weights searched differ, the cost does not). The two modes
alternate (bank, online, bank, online, ...; ``benchmarks.harness.interleave``) so a machine whose load drifts hurts both alike; each bank sweep
uses its own seed, so it builds a fresh bank and its wall time includes building it. Printed side by side:
median wall time, and teacher forward passes (bank: once per stored view, from the bank's own count; online:
one per training image per trial, from the trials' epochs and the dataset size). Banks this benchmark built
are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, Run, add_json_option, interleave, ratio

BANKS = REPO / "runs" / "distill" / "banks"


def sweep(config: str, mode: str, trials: int, seed: int, extra: list[str]) -> float:
    weights = [round(0.5 + 0.5 * i, 2) for i in range(trials)]
    sets = ["tune.scheduler=fifo", f"ray.name=cost-{mode}-{seed}", f"distill.output.mode={mode}",
            f"train.seed={seed}", "tune.registered_model=vitpose-student-sweep-cost",  # not the real champion
            f"tune.search_space={{distill.parts: {{grid: [output]}}, distill.output.weight: {{grid: {weights}}}}}",
            *extra]
    cmd = [sys.executable, "pipelines/distill.py", "--config", config, *[x for s in sets for x in ("--set", s)]]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode} sweep failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.time() - t0


def bank_dirs() -> set[Path]:
    return {p.parent for p in BANKS.glob("*/bank.json")}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="alternating bank/online pairs; medians are printed")
    p.add_argument("--config", default="configs/distill/synthetic_tiny.yaml")
    p.add_argument("--set", action="append", default=[])
    add_json_option(p, "sweep_cost")
    a = p.parse_args()
    run = Run("sweep_cost", a.json)

    from vitpose.config import StudentConfig, load_config

    cfg = load_config(a.config, a.set, schema=StudentConfig)
    online_forwards = cfg.data.synthetic.train_instances * cfg.train.epochs * a.trials
    before = bank_dirs()
    bank_infos = []
    seed = [7000]  # a seed no other run uses: a fresh bank, built inside the timed sweep

    def bank() -> float:
        seconds = sweep(a.config, "bank", a.trials, seed[0], a.set)
        new = sorted(bank_dirs() - before - {Path(b["folder"]) for b in bank_infos}, key=lambda d: d.stat().st_mtime)
        bank_infos.append({**json.loads((new[-1] / "bank.json").read_text()), "folder": str(new[-1])})
        return seconds

    def progress(rep: int, times: dict[str, list[float]]) -> None:
        print(f"repeat {rep + 1}/{a.repeats}: bank {times['bank'][-1]:.0f} s, online {times['online'][-1]:.0f} s",
              flush=True)

    try:  # bank, online, bank, online, ...: each sweep's own wall time
        times = interleave({"bank": bank, "online": lambda: sweep(a.config, "online", a.trials, seed[0], a.set)},
                           a.repeats, warmup=0, order="fixed", self_timed=True,
                           before_round=lambda rep: seed.__setitem__(0, 7000 + rep), after_round=progress)
    finally:
        for d in bank_dirs() - before:
            shutil.rmtree(d, ignore_errors=True)
    bank_forwards = bank_infos[-1]["teacher_forwards"]
    build_s = statistics.median(b["seconds"] for b in bank_infos)
    bank_s, online_s = statistics.median(times["bank"]), statistics.median(times["online"])
    print(f"\n{a.trials}-trial output-distillation sweep ({a.config}), median of {a.repeats}:")
    print(f"{'mode':8} {'wall s':>8} {'teacher forwards':>17}")
    print(f"{'bank':8} {bank_s:8.0f} {bank_forwards:17d}   (of which building the bank: {build_s:.0f} s; "
          "a later sweep that finds it built pays 0 of it)")
    print(f"{'online':8} {online_s:8.0f} {online_forwards:17d}")
    wall = ratio(times["online"], times["bank"])
    print(f"online / bank: wall x{online_s / bank_s:.2f} (per repeat {wall['min']:.2f}-{wall['max']:.2f}), "
          f"teacher forwards x{online_forwards / max(bank_forwards, 1):.1f}")
    run.finish(config=a.config, trials=a.trials, times=times, wall_online_over_bank=wall, bank_builds=bank_infos,
               teacher_forwards={"bank": bank_forwards, "online": online_forwards})
    return 0


if __name__ == "__main__":
    sys.exit(main())

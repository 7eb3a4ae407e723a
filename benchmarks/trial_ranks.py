"""A sweep trial of one rank against the same trial on two ranks (``tune.workers_per_trial``).

    python -m benchmarks.trial_ranks [--repeats 2] [--steps 24] [--config configs/distill/synthetic_tiny.yaml]

Needs a registered teacher (``make demo``). Each arm is the real ``pipelines/distill.py``: a sweep of one trial
(``distill.parts=output``, bank views, the demo's student), FIFO, two epochs of ``--steps`` steps per rank.
Arms, in turns (``benchmarks.harness.interleave``):
  1 rank x 1 CPU   the default trial: it trains in the Tune trial's process
  1 rank x 2 CPUs  the same process with both cores (two torch threads)
  2 ranks x 1 CPU  a Ray Train run of two ranks under the trial (0.99 CPU each: the trial's own process
                   holds 0.01), DeepSpeed's ZeRO stage from the config, gloo
Printed: the trial's training images per second in its second epoch (all ranks together, from its MLflow run:
``train/images_per_sec``), and the whole sweep's wall time (start-up of Ray, the teacher's fetch, the trial).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO, Run, add_json_option, interleave

ARMS = {"1 rank x 1 CPU": (1, 1.0), "1 rank x 2 CPUs": (1, 2.0), "2 ranks x 1 CPU": (2, 0.99)}


def sweep(config: str, workers: int, cpus: float, steps: int, storage: Path) -> dict[str, float]:
    """Wall time of one one-trial sweep and its trial's images/s in epoch 2 (read back from MLflow)."""
    import mlflow

    from vitpose.run.tracking import resolve_tracking_uri

    name = f"ranks-{workers}x{cpus:g}-{time.time_ns()}"
    sets = ["tune.scheduler=fifo", f"ray.name={name}", f"ray.storage_path={storage}", "train.epochs=2",
            f"train.max_steps_per_epoch={steps}", "tracking.log_images=0", f"tune.workers_per_trial={workers}",
            f"tune.cpus_per_worker={cpus}", "tune.max_concurrent_trials=1",
            "tune.registered_model=vitpose-student-trial-ranks",  # not the real champion
            "tune.search_space={distill.parts: {grid: [output]}}"]
    cmd = [sys.executable, "pipelines/distill.py", "--config", config, *[x for s in sets for x in ("--set", s)]]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode:
        sys.exit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    client = mlflow.MlflowClient(resolve_tracking_uri(None))
    (run,) = client.search_runs(client.get_experiment_by_name("vitpose-distill").experiment_id,
                                filter_string=f"tags.mlflow.runName LIKE 'trial-%' and tags.mlflow.parentRunId = "
                                              f"'{parent_run(out.stdout)}'")
    history = sorted(client.get_metric_history(run.info.run_id, "train/images_per_sec"), key=lambda m: m.step)
    return {"wall_s": wall, "images_per_sec": history[-1].value}


def parent_run(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.strip().startswith("MLflow sweep run:"))
    return line.split(":", 1)[1].strip()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trial_ranks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=24, help="steps per rank per epoch")
    p.add_argument("--config", default="configs/distill/synthetic_tiny.yaml")
    add_json_option(p, "trial_ranks")
    args = p.parse_args()
    run = Run("trial_ranks", args.json)
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="vp-trial-ranks-") as tmp:
        def arm_fn(arm: str):
            workers, cpus = ARMS[arm]
            return lambda: results[arm].append(sweep(args.config, workers, cpus, args.steps, Path(tmp)))

        interleave({arm: arm_fn(arm) for arm in ARMS}, reps=args.repeats, warmup=0)
    base = statistics.median(r["images_per_sec"] for r in results["1 rank x 1 CPU"])
    print(f"{'arm':<18} {'img/s (epoch 2)':>22} {'vs 1x1':>7} {'sweep wall s':>18}")
    rows = {}
    for arm, runs in results.items():
        rates, walls = [r["images_per_sec"] for r in runs], [r["wall_s"] for r in runs]
        rate = statistics.median(rates)
        rows[arm] = {"images_per_sec": rates, "wall_s": walls}
        print(f"{arm:<18} {rate:>9.1f} ({min(rates):.1f}-{max(rates):.1f}) {rate / base:>6.2f}x "
              f"{statistics.median(walls):>8.1f} ({min(walls):.0f}-{max(walls):.0f})")
    run.finish(arms=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

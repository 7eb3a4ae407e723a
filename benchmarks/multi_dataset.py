"""One two-dataset run vs single-dataset runs of the same budget: per-dataset val AP (issue 20).

    python -m benchmarks.multi_dataset [--seeds 0 1 2] [--epochs 6] [--steps-per-epoch 50]
                                      [--instances 800] [--arms single multi multi_moe] [--set KEY=VALUE ...]
                                      [--threads 2] [--json]

Two synthetic datasets with different keypoint sets: "coco" (17 keypoints, generator seed 0) and "crowd"
(CrowdPose's 14, remapped from generator seed 1: other images, other people), ``--instances`` training and
a fifth as many val instances each. All arms train in this process through the engine's ``Trainer`` (ZeRO-0,
bf16) on the embedded default's model (configs/teacher/synthetic_tiny.yaml: vitpose_nano, patch 8, 128x96),
with the same batch size, lr schedule and number of optimizer steps (``--epochs`` x ``--steps-per-epoch``):

* ``single``: one run per dataset, all steps on it (its val AP is that dataset's);
* ``multi``: one run on both, every batch half each (data.datasets, ratio 1:1), one backbone, one head each;
* ``multi_moe``: the same with ViTPose+ experts (model.moe, a quarter of the width per expert).

So a multi run sees each dataset half as often as that dataset's single run: the comparison is at equal
compute, one model for both sets against one model per set. Read once after the last epoch (flip test).
Printed: per arm and dataset the mean +- std of val AP over seeds; ``--json`` ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from benchmarks.harness import REPO
from vitpose.build import dataset_configs, ensure_data
from vitpose.config import TeacherConfig, load_config
from vitpose.train.session import NullSession, single_process_env

CONFIG = REPO / "configs" / "teacher" / "synthetic_tiny.yaml"
OUT = REPO / "runs" / "bench" / "multi_dataset"
DATASETS = ("coco", "crowd")


def base_sets(a: argparse.Namespace, seed: int) -> list[str]:
    steps = a.epochs * a.steps_per_epoch
    return ["deepspeed.zero_stage=0", "train.precision=bf16", f"train.seed={seed}", f"train.epochs={a.epochs}",
            f"train.max_steps_per_epoch={a.steps_per_epoch}", f"train.eval_every={a.epochs}",
            f"train.lr_steps=[{max(1, a.epochs * 4 // 5)}]", f"train.warmup_iters={min(30, steps // 10)}",
            "tracking.log_images=0", *a.set]


def multi_config(a: argparse.Namespace, seed: int, moe: bool) -> TeacherConfig:
    synth = f"{{train_instances: {a.instances}, val_instances: {a.instances // 5}, generate: true, seed: %d}}"
    datasets = (f"data.datasets=[{{name: coco, root: {OUT / 'data-coco'}, synthetic: {synth % 0}}}, "
                f"{{name: crowd, keypoints: crowdpose, root: {OUT / 'data-crowd'}, synthetic: {synth % 1}}}]")
    return load_config(CONFIG, [datasets, *(["model.moe={}"] if moe else []), *base_sets(a, seed)],
                       schema=TeacherConfig)


def run(cfg: TeacherConfig) -> dict[str, float]:
    from vitpose.train.loop import Trainer

    t0 = time.time()
    trainer = Trainer(cfg, NullSession())
    metrics = trainer.fit()
    metrics["seconds"] = time.time() - t0
    metrics["steps"] = trainer.global_step  # the same budget in every arm (checked in main)
    return metrics


def per_dataset_ap(a: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    """{arm: {dataset: val AP}} of one seed."""
    out: dict[str, dict[str, float]] = {}
    if "single" in a.arms:
        out["single"] = {}
        for name, _, one in dataset_configs(multi_config(a, seed, moe=False)):
            m = run(one)
            out["single"][name] = m["val/AP"]
            out.setdefault("steps", {})[f"single:{name}"] = m["steps"]
            print(f"seed {seed} single {name}: val AP {m['val/AP']:.4f} ({m['steps']} steps, {m['seconds']:.0f} s)",
                  flush=True)
    for arm in ("multi", "multi_moe"):
        if arm in a.arms:
            m = run(multi_config(a, seed, moe=arm == "multi_moe"))
            out[arm] = {name: m[f"val/{name}/AP"] for name in DATASETS}
            out.setdefault("steps", {})[arm] = m["steps"]
            print(f"seed {seed} {arm}: " + ", ".join(f"{n} {v:.4f}" for n, v in out[arm].items())
                  + f" ({m['steps']} steps, {m['seconds']:.0f} s)", flush=True)
    return out


def summarise(results: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    steps = {k for r in results for k in r.get("steps", {}).values()}
    if len(steps) != 1:
        raise RuntimeError(f"the arms did not take the same number of steps: {[r['steps'] for r in results]}")
    for arm in [k for k in results[0] if k != "steps"]:
        summary[arm] = {}
        for name in DATASETS:
            values = [r[arm][name] for r in results]
            summary[arm][name] = {"mean": statistics.mean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multi_dataset", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--instances", type=int, default=800, help="training instances per dataset")
    p.add_argument("--arms", nargs="+", default=["single", "multi", "multi_moe"],
                   choices=["single", "multi", "multi_moe"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    batch = load_config(CONFIG, a.set).train.batch_size
    if a.steps_per_epoch * batch > a.instances:
        p.error(f"--steps-per-epoch {a.steps_per_epoch} x batch {batch} exceeds --instances {a.instances}: a single "
                "run's epoch would be shorter than the budget")
    torch.set_num_threads(a.threads)
    for key, value in single_process_env().items():
        os.environ.setdefault(key, value)
    ensure_data(multi_config(a, 0, moe=False))  # both datasets, the crowd one remapped
    results = [per_dataset_ap(a, seed) for seed in a.seeds]
    summary = summarise(results)
    steps = a.epochs * a.steps_per_epoch
    print(f"\nper-dataset val AP after {steps} steps of batch {batch}, "
          f"seeds {a.seeds} (mean +- std):")
    for arm, per in summary.items():
        print(f"  {arm:10s} " + "  ".join(f"{n} {v['mean']:.4f} +- {v['std']:.4f}" for n, v in per.items()))
    if a.json:
        print(json.dumps({"settings": vars(a), "summary": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

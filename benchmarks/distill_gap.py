"""The distillation gap: how much of the teacher-student gap each distillation method closes, when the student
has few labels and many unlabeled images (configs/distill/synthetic_fewlabels.yaml), on the shipped path.

    python -m benchmarks.distill_gap [--arms none output unlabeled ...] [--seeds 5] [--first-seed 0]
                                     [--teacher models:/vitpose-teacher@plateau] [--set KEY=VALUE ...]
                                     [--reuse none output ...]

Every arm is one sweep (``pipelines/distill.py``: Ray Tune, DeepSpeed engine, MLflow; FIFO) of ``--seeds``
seeds; arms differ in their distillation settings only (``ARMS``) and take the same optimizer steps at the same
batch: an epoch is the labelled set's length whether or not part of it is unlabeled crops, and the ``none`` arm
trains on the labelled crops alone. Students are read after their last epoch. Per arm: the paired difference
to ``none`` with its 95% t interval over seeds, and the share of the gap it closes, (arm - none) /
(teacher - none) per seed, with its interval. The target: an arm closes >= 40% with an interval above 30%.
Results (per-seed values, the unlabeled set's size and labelling time) go to ``runs/bench/distill_gap.json``.
``--reuse ARM ...`` reads those arms from their newest sweep that finished every seed (same command otherwise)
instead of training them again, so arms can be added to a table one run at a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

from benchmarks.distill_ablation import (
    arm_curve,
    num_params,
    parse_common,
    plateau_word,
    read,
    rise_at_end,
    show,
    summarise,
    sweep,
    teacher_at_plateau,
)
from vitpose.distill.space import PARTS

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/distill/synthetic_fewlabels.yaml"
# arm -> (distill.parts, its own settings). Every arm but none learns from the teacher's heatmaps.
ARMS = {
    "none": ("none", []),
    "output": ("output", []),  # the teacher's heatmaps of the labelled crops only
    "unlabeled": ("unlabeled", []),  # plus the teacher-labelled unlabeled crops (distill.unlabeled.ratio)
    "unlabeled_confident": ("unlabeled", ["distill.output.min_confidence=0.2"]),
    "unlabeled_decay": ("unlabeled", ["distill.output.schedule=linear_decay"]),
    "unlabeled_flip": ("unlabeled", ["distill.output.flip_average=true"]),
    "unlabeled_feature": ("unlabeled", ["tune.arm_settings.unlabeled={distill.feature.weight: 0.001}"]),
    "unlabeled_second_stage": ("unlabeled", ["distill.second_stage.epochs=20"]),  # the last 10% of the epochs
}
TARGET, FLOOR = 0.40, 0.30  # the share of the gap to close, and what its interval must stay above


def labelling(log: Path) -> list[str]:
    """The sweep's lines on the unlabeled set: its size, and the teacher's labelling of it."""
    lines = log.read_text().splitlines()
    return [ln.strip() for ln in lines if "unlabelled set:" in ln or re.search(r"view bank .*unlabeled-", ln)]


def finished_sweep(name: str, seeds: list[int]) -> Path | None:
    """The newest sweep folder of ``name`` whose results hold every seed of ``seeds`` (None: none has)."""
    for results in sorted((REPO / "runs" / "ray").glob(f"{name}-2*/results.csv"), reverse=True):
        done = {int(row["config/train.seed"]) for row in csv.DictReader(results.open())}
        if set(seeds) <= done:
            return results.parent
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="none is always run")
    p.add_argument("--reuse", nargs="+", choices=list(ARMS), default=[],
                   help="arms read from their newest finished sweep instead of trained again")
    a, out, seeds = parse_common(p, "distill_gap.json")
    arms = ["none", *(arm for arm in a.arms if arm != "none")]
    t0 = time.time()
    teacher = teacher_at_plateau(a.teacher, out.with_suffix(".teacher.log"))
    from vitpose.config import StudentConfig
    from vitpose.models import create

    teacher["params"] = create(a.teacher).num_params()
    print(f"teacher {a.teacher} ({teacher['preset']}, {teacher['params']:,} parameters): val AP "
          f"{teacher['val_AP']:.3f} ({plateau_word(teacher['last_eval_gain'])})", flush=True)
    common = [f"distill.teacher_uri={a.teacher}", f"tune.seeds={a.seeds}", f"train.seed={a.first_seed}", *a.set]
    preset, n = num_params(CONFIG, common, StudentConfig)
    scores: dict[str, dict[int, float]] = {}
    folders, unlabeled_lines = {}, []
    for arm in arms:
        parts, own = ARMS[arm]
        log = out.with_suffix(f".{arm}.log")
        folder = finished_sweep(f"gap-{arm}", seeds) if arm in a.reuse else None
        if folder is not None:
            print(f"  {arm}: reusing {folder}", flush=True)
        else:
            folder = sweep(CONFIG, f"gap-{arm}", [f"tune.search_space={{distill.parts: {{grid: [{parts}]}}}}", *own,
                                                  *common], log, registered="vitpose-student-gap")
        scores.update(read(folder, dict.fromkeys(PARTS, arm)))  # one arm per sweep, whatever its parts
        folders[arm] = str(folder)
        unlabeled_lines += labelling(log) if log.exists() else []  # a reused arm's log may live under another --out
        print(f"  {arm} done, {round(time.time() - t0)} s so far", flush=True)
    none_curve = arm_curve(Path(folders["none"]), "none")
    result = summarise(scores, seeds, teacher["val_AP"], [(arm, "none") for arm in arms if arm != "none"]
                       + [("unlabeled", "output")] + [(arm, "unlabeled") for arm in arms if arm.startswith("unlabeled_")])
    meets = [arm for arm, c in result["closure"].items() if c["mean"] >= TARGET and c["ci95"][0] > FLOOR]
    result.update({"teacher": teacher, "seeds": seeds, "overrides": a.set, "config": CONFIG, "student": preset,
                   "student_params": n, "capacity_ratio": teacher["params"] / n, "date": time.strftime("%Y-%m-%d"),
                   "epochs": none_curve[-1][0] if none_curve else None, "none_curve": none_curve,
                   "none_rise_last_quarter": rise_at_end(none_curve, 0.25), "sweeps": folders,
                   "unlabeled_set": sorted(set(unlabeled_lines)), "meets_target": meets,
                   "wall_seconds": round(time.time() - t0)})
    out.write_text(json.dumps(result, indent=1))
    show("converged", result, seeds, teacher["val_AP"])
    for line in result["unlabeled_set"]:
        print(f"  {line}")
    print(f"\nstudent {preset} ({n:,} parameters, teacher/student {result['capacity_ratio']:.1f}x); target: close >= "
          f"{TARGET:.0%} of the gap with the interval above {FLOOR:.0%}: {', '.join(meets) or 'no arm'}")
    print(f"wall time {result['wall_seconds']} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

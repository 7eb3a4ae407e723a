"""The distillation benchmark on the synthetic data, on the shipped path: a teacher at its plateau, five arms
x N seeds at the demo's short budget and at a converged budget, paired differences with 95% intervals and the
share of the teacher-student gap each arm closes.

    python -m benchmarks.distill_ablation [--budgets short converged] [--seeds 5] [--first-seed 0] [--skip-online]
                                          [--teacher models:/vitpose-teacher@plateau] [--set KEY=VALUE ...]

Distillation can only show transfer when the teacher knows more than the student learns alone, so:

0. The teacher is ``--teacher`` (default ``models:/vitpose-teacher@plateau``, a ``vitpose_nano`` trained by
   ``pipelines/teacher.py --config configs/teacher/synthetic_plateau.yaml``, which this script runs when the
   alias is missing). Its val AP curve comes from its MLflow run; it is at its plateau when the last two
   evaluations differ by less than ``PLATEAU_TOL``.
1. Per budget (``converged``: ``configs/distill/synthetic_plateau.yaml``, a ``vitpose_femto`` student for 40
   epochs; ``short``: the same with the demo's 6 epochs), one sweep (``pipelines/distill.py``: Ray Tune, DeepSpeed engine,
   MLflow; FIFO, so every trial runs its whole budget) of arms none / token / random_token / output / both, each
   with the same ``--seeds`` seeds (the sweep's own ``tune.seeds``, baseline ``distill.parts=none``: its summary
   gives the champion's lead with its interval); the arms of a seed train on the same view bank's views from
   the same initial weights and are read after their last epoch. The ``none`` arm's curve (mean over seeds) says how far from
   converged the budget is: what its AP gained over the last quarter of the epochs, against its gap to the
   teacher.
2. Optionally (not ``--skip-online``) arm output again in online mode (fresh seeded augmentation, the teacher
   run per batch), to check that the bank does not change what output distillation gives.

Arms are paired by seed: the difference of two arms is taken seed by seed, and its 95% interval is the t
interval of those N differences. Gap closure per seed is (arm - none) / (teacher - none). Results, per-seed
values included, go to ``runs/bench/distill_ablation.json``; the tables printed are what the README shows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vitpose.distill.stats import interval

REPO = Path(__file__).resolve().parents[1]
ARMS = ["none", "token", "random_token", "output", "both"]
CONFIG = "configs/distill/synthetic_plateau.yaml"
# The demo's schedule, and the one the config gives: the student alone has stopped improving by its end.
BUDGETS = {"short": ["train.epochs=6", "train.lr_steps=[5]", "train.eval_every=1"], "converged": []}
TEACHER_CONFIG = "configs/teacher/synthetic_plateau.yaml"
PLATEAU_TOL = 0.01  # val AP: a teacher whose last two evaluations differ by less has stopped rising
COMPARISONS = [("token", "none"), ("random_token", "none"), ("output", "none"), ("both", "none"),
               ("token", "random_token"), ("output", "output (online)")]


def run(cmd: list[str], log: Path, what: str) -> None:
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{what} failed (exit {code}); its output is in {log}")


def sweep(config: str, name: str, sets: list[str], log: Path, registered: str = "vitpose-student-ablation") -> Path:
    """Run one sweep; returns its folder (results.csv and one folder per trial)."""
    run([sys.executable, "pipelines/distill.py", "--config", config, "--set", f"ray.name={name}",
         "--set", "tune.scheduler=fifo", "--set", f"tune.registered_model={registered}",
         "--set", "tune.alias=ablation", *[x for s in sets for x in ("--set", s)]], log, f"sweep {name}")
    for line in log.read_text().splitlines():  # the sweep's own verdict: champion, its leads with intervals
        if line.strip().startswith(("champion:", "lead ")):
            print(f"  {name}: {line.strip()}", flush=True)
    return sorted((REPO / "runs" / "ray").glob(f"{name}-2*/results.csv"))[-1].parent


def read(folder: Path, label: dict[str, str]) -> dict[str, dict[int, float]]:
    """{arm: {seed: val AP after the last epoch}}; ``label`` renames arms (the online run's output)."""
    scores: dict[str, dict[int, float]] = {}
    for row in csv.DictReader((folder / "results.csv").open()):
        arm = label.get(row["config/distill.parts"], row["config/distill.parts"])
        scores.setdefault(arm, {})[int(row["config/train.seed"])] = float(row["val/AP"])
    return scores


def arm_curve(folder: Path, arm: str) -> list[tuple[int, float]]:
    """(epoch, mean val AP over seeds) of one arm, from the trials' progress files (Tune's per-report log)."""
    by_epoch: dict[int, list[float]] = {}
    for progress in folder.glob("*/progress.csv"):
        if json.loads((progress.parent / "params.json").read_text()).get("distill.parts") != arm:
            continue
        for row in csv.DictReader(progress.open()):
            if row.get("val/AP"):
                by_epoch.setdefault(int(float(row["epoch"])), []).append(float(row["val/AP"]))
    return [(e, statistics.mean(v)) for e, v in sorted(by_epoch.items())]


def rise_at_end(curve: list[tuple[int, float]], fraction: float) -> float:
    """AP gained over the last ``fraction`` of the curve's epochs (nan when it has under two points)."""
    if len(curve) < 2:
        return math.nan
    last_epoch = curve[-1][0]
    start = [ap for e, ap in curve if e <= last_epoch * (1 - fraction)] or [curve[0][1]]
    return curve[-1][1] - start[-1]


def reading(low: float, high: float) -> str:
    return "no difference shown" if low <= 0 <= high else ("higher" if low > 0 else "lower")


def summarise(scores: dict[str, dict[int, float]], seeds: list[int], teacher_ap: float,
              comparisons: list[tuple[str, str]] = COMPARISONS) -> dict[str, object]:
    arms = {arm: {"per_seed": [v[s] for s in seeds], "mean": statistics.mean(v[s] for s in seeds),
                  "std": statistics.stdev([v[s] for s in seeds]) if len(seeds) > 1 else 0.0}
            for arm, v in scores.items()}
    pairs = {}
    for a, b in comparisons:
        if a in scores and b in scores:
            diffs = [scores[a][s] - scores[b][s] for s in seeds]
            mean, low, high = interval(diffs)
            pairs[f"{a} - {b}"] = {"per_seed": diffs, "mean": mean, "ci95": [low, high], "supported": reading(low, high)}
    closure = {}
    for arm in scores:
        if arm != "none" and "none" in scores:
            gaps = [teacher_ap - scores["none"][s] for s in seeds]
            if min(gaps) <= 0:  # the student alone at or above the teacher: no gap to close
                continue
            per_seed = [(scores[arm][s] - scores["none"][s]) / gap for s, gap in zip(seeds, gaps, strict=True)]
            mean, low, high = interval(per_seed)
            closure[arm] = {"per_seed": per_seed, "mean": mean, "ci95": [low, high]}
    return {"arms": arms, "paired": pairs, "closure": closure}


def show(budget: str, result: dict, seeds: list[int], teacher_ap: float) -> None:
    rise = result["none_rise_last_quarter"]
    print(f"\n{budget} budget ({result['epochs']} epochs): val AP after the last epoch, seeds {seeds}; teacher "
          f"{teacher_ap:.3f}; `none` rose {rise:+.3f} over the last quarter of its epochs, "
          f"against a gap to the teacher of {teacher_ap - result['arms']['none']['mean']:+.3f}")
    print(f"| arm | {' | '.join(f'seed {s}' for s in seeds)} | mean +- std | gap closed (95% interval) |")
    print(f"|---|{'---|' * len(seeds)}---|---|")
    for arm, r in result["arms"].items():
        c = result["closure"].get(arm)
        closed = f"{c['mean']:+.0%} [{c['ci95'][0]:+.0%}, {c['ci95'][1]:+.0%}]" if c else "-"
        print(f"| {arm} | {' | '.join(f'{v:.3f}' for v in r['per_seed'])} | {r['mean']:.3f} +- {r['std']:.3f} | "
              f"{closed} |")
    print("\n| paired difference | mean | 95% interval | reading |")
    print("|---|---|---|---|")
    for name, r in result["paired"].items():
        low, high = r["ci95"]
        print(f"| {name} | {r['mean']:+.3f} | [{low:+.3f}, {high:+.3f}] | {r['supported']} |")


def teacher_at_plateau(uri: str, log: Path) -> dict[str, object]:
    """The teacher's final val AP, curve and size; trains it first when its alias does not exist yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from vitpose.run.tracking import resolve_tracking_uri

    client = mlflow.MlflowClient(resolve_tracking_uri())
    name, alias = uri.removeprefix("models:/").split("@")
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        run([sys.executable, "pipelines/teacher.py", "--config", TEACHER_CONFIG, "--set", f"tracking.alias={alias}",
             "--set", f"tracking.registered_model={name}"], log, f"teacher {uri}")
        version = client.get_model_version_by_alias(name, alias)
    history = sorted(client.get_metric_history(version.run_id, "val/AP"), key=lambda m: m.step)
    curve = [(m.step, m.value) for m in history]
    record = client.get_run(version.run_id).data
    # The pipeline registers its best checkpoint and logs that checkpoint's metrics as best/*: the gap to close
    # is to the weights the students learn from, not to the last epoch's.
    registered_ap = record.metrics.get("best/val/AP", curve[-1][1])
    return {"uri": uri, "version": version.version, "run_id": version.run_id, "preset": record.params.get("model.preset"),
            "val_AP": registered_ap, "curve": curve,
            "last_eval_gain": curve[-1][1] - curve[-2][1] if len(curve) > 1 else math.nan}


def plateau_word(last_gain: float) -> str:
    if math.isnan(last_gain):
        return "one evaluation: cannot tell whether it is at its plateau"
    return "at its plateau" if abs(last_gain) < PLATEAU_TOL else "STILL RISING: train it longer"


def num_params(config: str, sets: list[str], schema: type) -> tuple[str, int]:
    """(preset, parameters) of the model a config builds (its crop, patch and keypoints included)."""
    from vitpose.build import model_spec
    from vitpose.config import load_config
    from vitpose.models.vitpose import build_model_from_spec

    cfg = load_config(REPO / config, sets, schema=schema)
    return cfg.model.preset, build_model_from_spec(model_spec(cfg), device="meta").num_params()


def parse_common(p: argparse.ArgumentParser, out_name: str) -> tuple[argparse.Namespace, Path, list[int]]:
    """The options every distillation benchmark takes (seeds, teacher, overrides, output file), parsed; returns
    (arguments, the output file, the seeds). Runs from the repository root."""
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm (tune.seeds): --first-seed, +1, ...")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--teacher", default="models:/vitpose-teacher@plateau", help="registered teacher (models:/NAME@ALIAS)")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every sweep")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / out_name))
    a = p.parse_args()
    os.chdir(REPO)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return a, out, list(range(a.first_seed, a.first_seed + a.seeds))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS, help="distill.parts arms (none is always run)")
    p.add_argument("--skip-online", action="store_true", help="only the bank sweeps")
    a, out, seeds = parse_common(p, "distill_ablation.json")
    per_seed = [f"tune.seeds={a.seeds}", f"train.seed={a.first_seed}", "tune.baseline=distill.parts=none"]
    arms = ["none", *(arm for arm in a.arms if arm != "none")]  # the baseline every arm is paired with
    t0 = time.time()
    teacher = teacher_at_plateau(a.teacher, out.with_suffix(".teacher.log"))
    from vitpose.config import StudentConfig
    from vitpose.models import create

    teacher["params"] = create(a.teacher).num_params()
    print(f"teacher {a.teacher} ({teacher['preset']}, {teacher['params']:,} parameters): val AP "
          f"{teacher['val_AP']:.3f}, last evaluation {teacher['last_eval_gain']:+.3f} "
          f"({plateau_word(teacher['last_eval_gain'])}); curve "
          + ", ".join(f"{e}: {ap:.3f}" for e, ap in teacher["curve"]), flush=True)
    common = [f"distill.teacher_uri={a.teacher}", *a.set]
    result: dict[str, object] = {"teacher": teacher, "seeds": seeds, "overrides": a.set, "budgets": {},
                                 "date": time.strftime("%Y-%m-%d"),
                                 "selection": "val/AP after each trial's last epoch (FIFO, equal budgets)"}
    for budget in a.budgets:
        config, sets = CONFIG, [*BUDGETS[budget], *common]
        preset, n = num_params(config, sets, StudentConfig)
        folder = sweep(config, f"ablation-{budget}-bank", [
            f"tune.search_space={{distill.parts: {{grid: [{', '.join(arms)}]}}}}", *per_seed,
            "distill.output.mode=bank", *sets], out.with_suffix(f".{budget}.bank.log"))
        scores, folders = read(folder, {}), [str(folder)]
        if not a.skip_online:
            online = sweep(config, f"ablation-{budget}-online", [
                "tune.search_space={distill.parts: {grid: [output]}}", *per_seed[:2],
                "distill.output.mode=online", *sets], out.with_suffix(f".{budget}.online.log"))
            scores.update(read(online, {"output": "output (online)"}))
            folders.append(str(online))
        none_curve = arm_curve(folder, "none")
        r = summarise(scores, seeds, teacher["val_AP"])
        r.update({"config": config, "student": preset, "student_params": n, "capacity_ratio": teacher["params"] / n,
                  "epochs": none_curve[-1][0] if none_curve else None, "none_curve": none_curve,
                  "none_rise_last_quarter": rise_at_end(none_curve, 0.25), "sweeps": folders,
                  "wall_seconds_so_far": round(time.time() - t0)})
        result["budgets"][budget] = r
        out.write_text(json.dumps(result, indent=1))
        print(f"  {budget} budget done, {r['wall_seconds_so_far']} s so far; student {preset} ({n:,} parameters, "
              f"teacher/student {r['capacity_ratio']:.1f}x)", flush=True)
    result["wall_seconds"] = round(time.time() - t0)
    out.write_text(json.dumps(result, indent=1))
    for budget, r in result["budgets"].items():
        show(budget, r, seeds, teacher["val_AP"])
    print(f"\nwall time {result['wall_seconds']} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

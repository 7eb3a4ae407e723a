"""Does a pretrained backbone in another project's format start fine-tuning ahead of scratch (issue 17)?

    python -m benchmarks.pretrained_start [--seeds 0 1 2] [--epochs 6] [--pretrain-epochs 6]
                                          [--finetune-instances 800] [--threshold AP] [--set KEY=VALUE ...]
                                          [--threads 1] [--json]

Three stages, all in this process through the engine's ``Trainer`` (ZeRO-0, bf16, one process, one torch
thread) on the embedded default's model and data (configs/teacher/synthetic_tiny.yaml: vitpose_nano, patch 8,
128x96 crops, 300 val instances):

1. pretraining: the pose model trained on a synthetic dataset of another generator seed than the fine-tuning
   one (other images, other people), at a square input, so its backbone has never seen the evaluation images;
2. its backbone re-saved as an MAE release file (``{"model": <timm ViT state dict>}`` with ``cls_token`` and a
   class slot in ``pos_embed``) and as a timm ``.safetensors``, each checked with
   ``python -m vitpose.models inspect FILE --json``; the square grid is what such files have (a timm
   ``pos_embed`` does not store its grid), so loading resamples it to the fine-tuning grid as it would a
   real MAE file's;
3. fine-tuning arms that differ only in ``model.init_checkpoint`` (the MAE file vs none): the same data,
   seeds (``train.seed``: head/model initialisation, data order, augmentation), epochs, lr schedule, and
   the same reading (val AP after every epoch, flip test, no selection: the curve as it is).

Printed: per arm and epoch the mean +- std of val AP over seeds, then per seed the first epoch at which
val AP >= T (T: ``--threshold``, default the scratch arm's mean AP after its last epoch; a seed that never
gets there is "> N"), and the paired difference of last-epoch AP (95% t interval). ``--json`` ends the
output with one JSON line of all numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO, interval
from vitpose.config import TeacherConfig, load_config
from vitpose.train.session import NullSession, single_process_env

CONFIG = REPO / "configs" / "teacher" / "synthetic_tiny.yaml"
OUT = REPO / "runs" / "bench" / "pretrained_start"
FINETUNE_DATA_SEED, PRETRAIN_DATA_SEED = 0, 1  # generator seeds: disjoint images (vitpose/data/synthetic.py)
PRETRAIN_TRAIN_SEED = 100  # not one of the fine-tuning seeds
ARMS = ("scratch", "pretrained")


def schedule(epochs: int) -> list[str]:
    """The shipped schedule scaled to ``epochs``: one lr step at 80% (its 10 epochs step at 8)."""
    return [f"train.epochs={epochs}", f"train.lr_steps=[{max(1, epochs * 4 // 5)}]"]


def config(out: Path, data_seed: int, sets: list[str]) -> TeacherConfig:
    """The shipped tiny teacher config on its own generated dataset under ``out``; ``sets`` last."""
    base = [f"data.root={out / f'data-seed{data_seed}'}", "data.synthetic.generate=true",
            f"data.synthetic.seed={data_seed}", "deepspeed.zero_stage=0", "train.precision=bf16"]
    return load_config(CONFIG, base + sets, schema=TeacherConfig)


def train(cfg: TeacherConfig) -> tuple[Any, list[dict[str, float]]]:
    """(trainer, per-epoch metrics) of one in-process run; checkpoints go to a temporary folder."""
    from vitpose.train.loop import Trainer

    trainer = Trainer(cfg, NullSession())
    trainer.fit()
    return trainer, trainer.history


def timm_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our backbone under timm's ViT names, as an MAE release has it: the exact reverse of formats.convert_timm."""
    sd = {k.removeprefix("backbone."): v.float() for k, v in state.items() if k.startswith("backbone.")}
    pos = sd.pop("pos_embed")
    # Our backbone adds pos_embed[:, :1] to every patch; timm gives the class slot to the class token only.
    sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos[:, 1:] + pos[:, :1]], dim=1)
    sd["cls_token"] = torch.zeros_like(pos[:, :1])
    for t in ("weight", "bias"):
        sd[f"norm.{t}"] = sd.pop(f"last_norm.{t}")  # timm's final norm is the official ViTPose last_norm
    return sd


def save_foreign(sd: dict[str, torch.Tensor], out: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    files = {"mae": out / "mae_pretrain_nano.pth", "timm": out / "timm_vit_nano.safetensors"}
    torch.save({"model": sd}, files["mae"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["timm"]))
    return files


def inspect(path: Path, expected: str) -> dict[str, Any]:
    """``python -m vitpose.models inspect FILE --json``, echoed; exits unless the file reads as ``expected``."""
    cmd = [sys.executable, "-m", "vitpose.models", "inspect", str(path), "--json"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    *text, last = run.stdout.strip().splitlines() or [""]
    report = json.loads(last) if run.returncode == 0 else {}
    # The JSON line lists every key; shown as its counts.
    counts = {k: len(v) if isinstance(v, list) else v for k, v in report.items()}
    print(f"$ python -m vitpose.models inspect {shown} --json", *text, json.dumps(counts), sep="\n", flush=True)
    if report.get("format") != expected:
        sys.exit(f"{path} reads as {report.get('format')!r}, not {expected!r}: {run.stderr[-2000:]}")
    return report


def pretrain(a: argparse.Namespace, out: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Stages 1 and 2: the pretrained backbone in both foreign formats, and what pretraining reached."""
    from vitpose.train.run_folder import gather_fp32_state_dict

    height = config(out, PRETRAIN_DATA_SEED, a.set).model.img_size[0]
    cfg = config(out, PRETRAIN_DATA_SEED, [*schedule(a.pretrain_epochs), f"train.eval_every={a.pretrain_epochs}",
                                           f"train.seed={PRETRAIN_TRAIN_SEED}", *a.set,
                                           f"model.img_size=[{height}, {height}]"])
    t0 = time.time()
    trainer, history = train(cfg)
    # Stage 0 keeps bf16 masters (checkpoint.py): the values are bf16's, stored as float32 as releases are.
    state = gather_fp32_state_dict(trainer.engine, trainer.stage, low_precision=True)
    files = save_foreign(timm_backbone(state), out)
    info = {"val_AP": history[-1]["val/AP"], "seconds": round(time.time() - t0), "img_size": [height, height],
            "data_seed": PRETRAIN_DATA_SEED, "epochs": a.pretrain_epochs,
            "train_instances": cfg.data.synthetic.train_instances}
    print(f"pretrained {cfg.model.preset} {height}x{height} on generator seed {PRETRAIN_DATA_SEED} for "
          f"{a.pretrain_epochs} epochs in {info['seconds']} s: its own val AP {info['val_AP']:.3f}", flush=True)
    for fmt, path in files.items():
        report = inspect(path, fmt)
        info[f"inspect_{fmt}"] = {k: report[k] for k in ("format", "preset", "resized")}
    return files, info


def finetune(a: argparse.Namespace, out: Path, init: Path) -> dict[str, dict[int, list[float]]]:
    """Stage 3: {arm: {seed: val AP after each epoch}}; the arms differ in model.init_checkpoint only."""
    curves: dict[str, dict[int, list[float]]] = {arm: {} for arm in ARMS}
    for seed in a.seeds:
        for arm in ARMS:
            sets = [*schedule(a.epochs), "train.eval_every=1", f"train.seed={seed}",
                    f"data.synthetic.train_instances={a.finetune_instances}", *a.set]
            if arm == "pretrained":
                sets.append(f"model.init_checkpoint={init}")
            t0 = time.time()
            _, history = train(config(out, FINETUNE_DATA_SEED, sets))
            curves[arm][seed] = [h["val/AP"] for h in history]
            print(f"  {arm} seed {seed}: AP {' '.join(f'{v:.3f}' for v in curves[arm][seed])} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return curves


def epochs_to(curve: list[float], threshold: float) -> int | None:
    """The first epoch (1-based) with val AP >= threshold, or None."""
    return next((i + 1 for i, v in enumerate(curve) if v >= threshold), None)


def summarise(curves: dict[str, dict[int, list[float]]], seeds: list[int], threshold: float | None) -> dict[str, Any]:
    epochs = len(curves["scratch"][seeds[0]])
    mean_curve = {arm: [statistics.mean(c[s][e] for s in seeds) for e in range(epochs)] for arm, c in curves.items()}
    t = threshold if threshold is not None else mean_curve["scratch"][-1]
    arms = {}
    for arm, c in curves.items():
        reach = [epochs_to(c[s], t) for s in seeds]
        arms[arm] = {"per_seed": {s: c[s] for s in seeds}, "mean": mean_curve[arm],
                     "std": [statistics.stdev(c[s][e] for s in seeds) if len(seeds) > 1 else 0.0
                             for e in range(epochs)],
                     "epochs_to_T": reach,
                     # a seed that never got there counts as N + 1: the mean is then a lower bound
                     "epochs_to_T_mean": statistics.mean(r or epochs + 1 for r in reach),
                     "epochs_to_T_all_reached": None not in reach,
                     "mean_curve_epochs_to_T": epochs_to(mean_curve[arm], t)}
    diffs = [curves["pretrained"][s][-1] - curves["scratch"][s][-1] for s in seeds]
    mean, low, high = interval(diffs)
    return {"threshold": t, "threshold_rule": "--threshold" if threshold is not None
            else "scratch arm's mean val AP after its last epoch", "epochs": epochs, "arms": arms,
            "final_AP_difference": {"per_seed": diffs, "mean": mean, "ci95": [low, high]}}


def show(r: dict[str, Any], seeds: list[int]) -> None:
    n, arms = r["epochs"], r["arms"]
    print(f"\nval AP after each epoch, mean +- std over seeds {seeds}:")
    print(f"| epoch | {' | '.join(ARMS)} |\n|---|{'---|' * len(ARMS)}")
    for e in range(n):
        cells = [f"{arms[a]['mean'][e]:.3f} +- {arms[a]['std'][e]:.3f}" for a in ARMS]
        print(f"| {e + 1} | {' | '.join(cells)} |")
    print(f"\nepochs to reach val AP >= T = {r['threshold']:.3f} ({r['threshold_rule']}); '> {n}': never in {n}:")
    print(f"| arm | {' | '.join(f'seed {s}' for s in seeds)} | mean over seeds | mean curve |")
    print(f"|---|{'---|' * len(seeds)}---|---|")
    for a in ARMS:
        x = arms[a]
        cells = " | ".join(str(v) if v else f"> {n}" for v in x["epochs_to_T"])
        mean = f"{x['epochs_to_T_mean']:.2f}" if x["epochs_to_T_all_reached"] else f">= {x['epochs_to_T_mean']:.2f}"
        print(f"| {a} | {cells} | {mean} | {x['mean_curve_epochs_to_T'] or f'> {n}'} |")
    d = r["final_AP_difference"]
    print(f"\nlast-epoch val AP, pretrained - scratch (paired by seed): {d['mean']:+.3f}, "
          f"95% interval [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrained_start", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs per arm and seed")
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--threshold", type=float, help="T (default: the scratch arm's last-epoch mean AP)")
    p.add_argument("--finetune-instances", type=int, default=800,
                   help="training instances of the fine-tuning set (pretraining: the config's 2,000)")
    p.add_argument("--set", action="append", default=[], help="overrides for every run, pretraining too")
    p.add_argument("--out", default=str(OUT))
    # One thread: beside other busy processes on 2 cores, two torch threads that wait for each other at every
    # op ran 2-4x slower than one (20-47 vs 90 img/s, measured 2026-11-30 at load average 6).
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", action="store_true", help="end with one JSON line of all numbers")
    a = p.parse_args()
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    t0 = time.time()
    torch.set_num_threads(a.threads)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for key, value in single_process_env().items():  # DeepSpeed in this process needs a rendezvous
        os.environ.setdefault(key, value)
    files, info = pretrain(a, out)
    curves = finetune(a, out, files["mae"])
    result = summarise(curves, a.seeds, a.threshold)
    show(result, a.seeds)
    result.update({"command": shlex.join(sys.argv), "seeds": a.seeds, "overrides": a.set, "pretrain": info,
                   "init_checkpoint": str(files["mae"]), "wall_seconds": round(time.time() - t0)})
    print(f"\nwall time {result['wall_seconds']} s")
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

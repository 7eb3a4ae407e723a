"""Students on CPUs: ms per crop and crops/s of eager PyTorch, onnxruntime fp32 and onnxruntime int8 (static
QDQ, calibrated on training crops), measured side by side, and the val AP int8 costs on a trained student.

    python -m benchmarks.student_latency                     # every student preset, ViTPose-S and -B
    python -m benchmarks.student_latency --quick --presets vitpose_pico vitpose_s
    python -m benchmarks.student_latency --levers            # also: which quantization settings help

Presets: the student sizes (presets narrower than ViTPose-S, without the ``_simple`` variants) at the demo's
input (configs/distill/synthetic_tiny.yaml: 128x96, patch 8); the ladder (vitpose_student_t/s/m), ViTPose-S and -B
at 256x192, patch 16, where the ladder is sized.
Weights are random for the timings (speed does not depend on their values), but calibration always uses
real training crops of the synthetic dataset at the preset's input size. Timed: the network alone, batch 1
(ms per crop) and batch 8 (crops/s), at 1 and 2 threads (torch and onnxruntime intra-op threads set alike),
the three runtimes interleaved in a rotating order per repetition (``benchmarks.harness.rates``); ratios
are medians of per-repetition ratios, > 1 meaning the first is faster.

AP: a demo-size student (the distill config's preset and input, trained directly for --epochs on the
synthetic data, fp32) evaluated by the evaluate CLI's path (``PosePredictor.predict_dataset`` + COCOeval,
flip test on) with its eager, fp32 ONNX and int8 ONNX networks. Targets (issue 19): int8 >= 1.5x fp32
onnxruntime at batch 1 with an AP drop <= 0.5 points; onnxruntime fp32 >= 1.0x eager at batch 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Run, add_json_option, rates
from vitpose.config import REPO_ROOT, TeacherConfig, load_config
from vitpose.deploy.int8 import calibration_crops, int8_report, quantize_int8
from vitpose.deploy.onnx import DEFAULT_DECONV, export_onnx
from vitpose.deploy.runtime import OrtNetwork
from vitpose.models import PRESETS, build_model

DEMO_STUDENT = REPO_ROOT / "configs" / "distill" / "synthetic_tiny.yaml"
DEMO_TEACHER = REPO_ROOT / "configs" / "teacher" / "synthetic_tiny.yaml"
BIG = ("vitpose_s", "vitpose_b")


def full_size(preset: str) -> bool:
    """Timed at 256x192, patch 16: ViTPose-S/-B and the student ladder (sized in GFLOPs at that input)."""
    return preset in BIG or preset.startswith("vitpose_student_")

THREADS = (1, 2)
BATCHES = (1, 8)
CALLS = {1: 8, 8: 1}  # calls per timed measurement: one batch-1 call is too short to time against the scheduler
# name -> quantize_int8 arguments, and "deconv" for export_onnx (the head's form in the graph); "recipe" is
# the shipped default (export_onnx's DEFAULT_DECONV, quantize_int8's defaults).
LEVERS = {
    "recipe": {},
    "previous recipe": {"deconv": "transpose", "unsigned_activations": False, "int8_matmul_outputs": True},  # until b6665b9
    "ConvTranspose head": {"deconv": "transpose"},
    "conv3x3 head": {"deconv": "conv3x3"},
    "final conv after the shuffle": {"deconv": "phases"},  # the recipe until the final conv moved before it
    "dense final conv": {"deconv": "phases_final"},
    "int8 activations": {"unsigned_activations": False},
    "int8 MatMul outputs": {"int8_matmul_outputs": True},
    "float ReLU/D2S": {"pass_through": ()},
    "float patch embed": {"exclude": ("patch_embed",)},
    "float final conv": {"exclude": ("final",)},  # final_layer, or the sub-pixel head's /final/ Conv
    "per-channel": {"per_channel": True},
    "+attention matmuls": {"weights_only": False, "op_types": ("MatMul", "Gemm", "Conv")},
    "no pre-process": {"preprocess": False},
}
FP32_FORMS = {"fp32 ConvTranspose": "transpose", "fp32 conv3x3": "conv3x3", "fp32 final conv after the shuffle": "phases",
              "fp32 dense final conv": "phases_final"}  # fp32 exports timed beside the default
LEVER_GROUP = 5  # lever sessions alive at once, beside the reference (lever_speed)


def student_presets() -> list[str]:
    width = PRESETS["vitpose_s"].embed_dim
    return [n for n, s in PRESETS.items() if s.embed_dim < width and not n.endswith("_simple")]


def preset_config(preset: str, *extra: str) -> TeacherConfig:
    """The demo's synthetic training config with ``preset`` at its benchmark input (students keep the demo's)."""
    size = ["model.img_size=[256,192]", "model.patch_size=16"] if full_size(preset) else []
    return load_config(DEMO_TEACHER, [f"model.preset={preset}", *size, "data.loader_workers=0", *extra])


def sessions(fp32: Path, int8: Path, model: torch.nn.Module, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return {"eager": model, "ort fp32": OrtNetwork(fp32, model.spec, threads),
            "ort int8": OrtNetwork(int8, model.spec, threads)}


@torch.inference_mode()
def bench_preset(preset: str, tmp: Path, reps: int, calib: int) -> list[dict[str, Any]]:
    from vitpose.build import build_datasets

    t0 = time.perf_counter()
    train, val = build_datasets(preset_config(preset), is_local_leader=True)
    torch.manual_seed(0)
    model = build_model(preset, img_size=train.input_size, patch_size=16 if full_size(preset) else 8).eval()
    fp32 = export_onnx(model, tmp / f"{preset}.onnx")
    int8 = quantize_int8(fp32, tmp / f"{preset}.int8.onnx", calibration_crops(train, calib))
    crops = torch.stack([val[i]["image"] for i in range(max(BATCHES))])
    gflops = model.flops() / 1e9
    print(f"{preset}: {list(model.spec.img_size)} patch {model.spec.patch_size}, {model.num_params() / 1e6:.2f} M "
          f"params, {gflops:.2f} GFLOPs; exported and quantized in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for threads in THREADS:
        fns = sessions(fp32, int8, model, threads)
        row: dict[str, Any] = {"preset": preset, "img_size": list(model.spec.img_size), "patch": model.spec.patch_size,
                               "params_m": model.num_params() / 1e6, "gflops": gflops, "threads": threads}
        for batch in BATCHES:
            x = crops[:batch]
            for fn in fns.values():  # warm-up: first-call allocations, onnxruntime's arena
                fn(x)
            r = rates(fns, reps, "ort fp32", calls=CALLS[batch], items=batch, args=(x,))
            for name in fns:
                row[f"b{batch} {name}"] = r[name]  # crops/s
            row[f"b{batch} int8/fp32"] = r["ort int8/ort fp32"]
            row[f"b{batch} fp32/eager"] = 1 / r["eager/ort fp32"]
        rows.append(row)
        print(f"  {threads} thread(s): batch 1 ms/crop " + ", ".join(f"{n} {1000 / row[f'b1 {n}']:.2f}" for n in fns)
              + "; batch 8 crops/s " + ", ".join(f"{n} {row[f'b8 {n}']:.1f}" for n in fns), flush=True)
    torch.set_num_threads(max(THREADS))
    return rows


def train_student(epochs: int, run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any], Any, Any]:
    """The demo student's architecture and input, trained directly (no teacher) on the synthetic data, fp32."""
    from vitpose.build import build_datasets
    from vitpose.config import StudentConfig
    from vitpose.data.keypoints import keypoint_info
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession, single_process_env

    for key, value in single_process_env().items():  # DeepSpeed in-process needs a rendezvous address
        os.environ.setdefault(key, value)
    preset = load_config(DEMO_STUDENT, schema=StudentConfig).model.preset
    cfg = preset_config(preset, f"train.epochs={epochs}", f"train.eval_every={epochs}", "train.lr_steps=[]",
                        "train.precision=fp32", "deepspeed.zero_stage=0", "deepspeed.config=configs/deepspeed/zero0.json")
    datasets = build_datasets(cfg, is_local_leader=True)
    trainer = Trainer(cfg, LocalSession(run_dir), datasets=datasets)
    trainer.fit()
    model = trainer.engine.module.float().eval()
    return model, {"spec": model.spec.to_dict(), "keypoints": keypoint_info(datasets[1]), "preset": preset}, *datasets


def ap_check(epochs: int, tmp: Path, calib: int, levers: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, meta, train, val = train_student(epochs, tmp / "student")
    fp32 = export_onnx(model, tmp / "student.onnx", meta=meta)
    crops = calibration_crops(train, calib)
    variants = LEVERS if levers else {"recipe": {}}
    out: dict[str, Any] = {"preset": meta["preset"], "epochs": epochs, "val_instances": len(val),
                           "img_size": list(model.spec.img_size)}
    for name, kw in variants.items():
        kw = dict(kw)
        src = fp32 if "deconv" not in kw else export_onnx(model, tmp / f"student-{kw['deconv']}.onnx", meta=meta,
                                                          deconv=kw.pop("deconv"))
        int8 = quantize_int8(src, tmp / f"student-{lever_file(name)}.int8.onnx", crops, **kw)
        out[name] = int8_report(model, meta, src, int8, val)
        print(f"student {name}: AP eager {out[name]['ap_eager']:.4f}, fp32 ORT {out[name]['ap_fp32']:.4f}, int8 "
              f"{out[name]['ap_int8']:.4f}; max |int8 - fp32| heatmap {out[name]['int8_vs_fp32_max_abs_diff']:.3e}",
              flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def lever_file(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


@torch.inference_mode()
def lever_speed(preset: str, tmp: Path, reps: int, calib: int) -> dict[str, float]:
    """onnxruntime at batch 1, 1 thread, each lever of ``LEVERS`` and each fp32 export of ``FP32_FORMS`` as a
    ratio to the default fp32 export (in groups of ``LEVER_GROUP``, each interleaved with the reference)."""
    from vitpose.build import build_datasets

    train, val = build_datasets(preset_config(preset), is_local_leader=True)
    torch.manual_seed(0)
    model = build_model(preset, img_size=train.input_size, patch_size=16 if full_size(preset) else 8).eval()
    forms = {form: export_onnx(model, tmp / f"lever-{preset}-{form}.onnx", deconv=form)
             for form in {DEFAULT_DECONV, *FP32_FORMS.values(), *(kw["deconv"] for kw in LEVERS.values() if "deconv" in kw)}}
    crops = calibration_crops(train, calib)
    paths = {name: forms[form] for name, form in FP32_FORMS.items()}
    for name, kw in LEVERS.items():
        kw = dict(kw)
        paths[name] = quantize_int8(forms[kw.pop("deconv", DEFAULT_DECONV)], tmp / f"lever-{preset}-{lever_file(name)}.onnx",
                                    crops, **kw)
    torch.set_num_threads(1)
    x, out = val[0]["image"][None], {}
    names = list(paths)
    # A group of sessions at a time, each group interleaved with its own reference session: all 14 of ViTPose-B
    # at once took 8.8 GB.
    for i in range(0, len(names), LEVER_GROUP):
        fns = {"fp32": OrtNetwork(forms[DEFAULT_DECONV], model.spec, 1)}
        fns.update({name: OrtNetwork(paths[name], model.spec, 1) for name in names[i : i + LEVER_GROUP]})
        for fn in fns.values():
            fn(x)
        row = rates(fns, reps, "fp32", calls=CALLS[1], items=1, args=(x,))
        out.update({name: row[f"{name}/fp32"] for name in fns if name != "fp32"})
        del fns
    torch.set_num_threads(max(THREADS))
    return out


def print_tables(rows: list[dict[str, Any]], ap: dict[str, Any] | None, levers: dict[str, dict[str, float]]) -> list[dict]:
    rt = ("eager", "ort fp32", "ort int8")
    head = (f"{'preset':<19}{'input':>13}{'params M':>9}{'GFLOPs':>8}{'thr':>4}" + "".join(f"{'b1 ms ' + n:>16}" for n in rt)
            + "".join(f"{'b8/s ' + n:>15}" for n in rt) + f"{'b1 int8/fp32':>14}{'b1 fp32/eager':>15}{'b8 int8/fp32':>14}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        size = f"{r['img_size'][0]}x{r['img_size'][1]}/{r['patch']}"
        print(f"{r['preset']:<19}{size:>13}{r['params_m']:>9.2f}{r['gflops']:>8.2f}{r['threads']:>4}"
              + "".join(f"{1000 / r[f'b1 {n}']:>16.2f}" for n in rt) + "".join(f"{r[f'b8 {n}']:>15.1f}" for n in rt)
              + f"{r['b1 int8/fp32']:>13.2f}x{r['b1 fp32/eager']:>14.2f}x{r['b8 int8/fp32']:>13.2f}x")
    small = {(r["preset"], r["threads"]): r for r in rows}
    for r in rows:
        s = small.get(("vitpose_s", r["threads"]))
        if s is not None and r["preset"].startswith("vitpose_student_"):
            print(f"{r['preset']} vs vitpose_s, {r['threads']} thread(s), batch 1: ort fp32 "
                  f"{r['b1 ort fp32'] / s['b1 ort fp32']:.1f}x, ort int8 {r['b1 ort int8'] / s['b1 ort int8']:.1f}x as fast")
    targets = []
    for r in rows:
        targets.append({"target": f"{r['preset']} {r['threads']}t b1: int8 >= 1.5x fp32 ORT", "value": r["b1 int8/fp32"],
                        "met": r["b1 int8/fp32"] >= 1.5})
        targets.append({"target": f"{r['preset']} {r['threads']}t b1: fp32 ORT >= 1.0x eager", "value": r["b1 fp32/eager"],
                        "met": r["b1 fp32/eager"] >= 1.0})
    if ap:
        rec = ap["recipe"]
        drop = 100 * (rec["ap_eager"] - rec["ap_int8"])
        print(f"\ntrained demo student ({ap['preset']} at {ap['img_size']}, {ap['epochs']} epochs, {ap['val_instances']} val "
              f"instances, flip test): AP eager {rec['ap_eager']:.4f}, fp32 ORT {rec['ap_fp32']:.4f}, int8 "
              f"{rec['ap_int8']:.4f}: drop {drop:+.2f} points")
        targets.append({"target": "int8 AP drop <= 0.5 points", "value": drop, "met": drop <= 0.5})
    if levers:
        names = [*FP32_FORMS, *LEVERS]
        print(f"\nlevers: speed / the recipe's fp32 ORT at batch 1, 1 thread{'; AP drop in points on the student' if ap else ''}")
        width = max(len(p) for p in levers) + 2
        print(f"{'':<22}" + "".join(f"{p:>{width}}" for p in levers) + ("  AP drop" if ap else ""))
        for n in names:
            drop = f"{100 * (ap[n]['ap_eager'] - ap[n]['ap_int8']):>+9.2f}" if ap and n in ap else ""
            print(f"{n:<22}" + "".join(f"{levers[p][n]:>{width - 1}.2f}x" for p in levers) + drop)
    print("\ntargets")
    for t in targets:
        print(f"  {t['target']:<48} {t['value']:>7.2f}  {'yes' if t['met'] else 'NO'}")
    return targets


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.student_latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help=f"default: {' '.join(student_presets() + list(BIG))}")
    p.add_argument("--quick", action="store_true", help="3 repetitions, 16 calibration crops, a 3-epoch student")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per cell (default 7; --quick 3)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the AP student (default 10; --quick 3)")
    p.add_argument("--calib-crops", type=int, default=64, help="calibration crops (default 64; --quick 16)")
    p.add_argument("--no-ap", action="store_true", help="skip training the student and the AP check")
    p.add_argument("--levers", action="store_true", help="also time and score the quantization levers (LEVERS)")
    add_json_option(p, "student_latency")
    a = p.parse_args()
    if a.quick:
        a.reps, a.epochs, a.calib_crops = 3, 3, 16
    presets = a.presets or student_presets() + list(BIG)
    unknown = [n for n in presets if n not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; choose from {', '.join(PRESETS)}")
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice, printed per file, is not news here
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    print(f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, {cores} cores, "
          f"load average {load:.1f}" + (" (other processes compete: compare within this run only)" if load > 0.5 * cores else ""))
    t0 = time.perf_counter()
    run = Run("student_latency", a.json)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for preset in presets for r in bench_preset(preset, Path(tmp), a.reps, a.calib_crops)]
        levers = {pr: lever_speed(pr, Path(tmp), a.reps, a.calib_crops) for pr in presets} if a.levers else {}
        ap = None if a.no_ap else ap_check(a.epochs, Path(tmp), a.calib_crops, a.levers)
    targets = print_tables(rows, ap, levers)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    run.finish(rows=rows, ap=ap, levers=levers, targets=targets)


if __name__ == "__main__":
    sys.exit(main())

"""Full vs window attention for ViTPose-B at 576x432 (36x27 tokens): training step and inference time, peak memory.

    python -m benchmarks.window_attention [--arms full,shift_pool_window:8x8,shift_pool_window:9x9]
        [--batch 2] [--reps 5] [--precisions fp32,bf16] [--no-memory] [--json]

What is timed (the code path): our `ViTPose` forward, `keypoint_mse` against random heatmaps, `loss.backward()`
and one `torch.optim.AdamW` step over the layer-decayed groups of `param_groups_layer_decay`; not the DeepSpeed
engine (its stage-0 step on one rank is the same forward/backward plus its own fused Adam). `bf16` is
`torch.autocast(cpu, bfloat16)` over fp32 weights, so the blocks take the bf16 training path of
`vitpose.models.attention.attend` (explicit softmax on the matrix units; DeepSpeed's bf16 keeps bf16 weights
instead, and the same attention path). Inference is `model.eval()` under `torch.inference_mode()` at batch 1
(fused attention kernel in both precisions).

Time: every arm is built in this one process from the same weights (the kinds share parameters). Per precision
each arm runs one warm-up step, then `--reps` rounds in which every arm runs one training step, then one
inference, in an order that rotates each round (`benchmarks.harness.interleave`), so a slower or busier stretch
of the machine falls on every arm; the table gives the median and the ratio to the first arm's median (the JSON
record also the per-round ratios' median and spread). Memory: each (arm, precision) runs in a fresh child process
(`MALLOC_MMAP_THRESHOLD_` as Ray workers set it, so freed tensors return to the system): after an AdamW step on
zero gradients (its states allocated) the kernel's high-water mark is reset (`5` > /proc/self/clear_refs) and VmHWM is read
after one more step; "step MB" is that peak minus the resident memory before the step (parameters, Adam
states), i.e. activations, gradients and temporaries of one step; "infer MB" the same for one batch-1 forward.
"saved MB" is what autograd keeps from one training forward at batch 1 (`vitpose.models.cost.activation_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import REPO, Run, add_json_option, cpu_model, interleave, ratio
from vitpose.losses import keypoint_mse
from vitpose.models import build_model
from vitpose.models.cost import activation_bytes
from vitpose.models.optim import param_groups_layer_decay

MB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_arm(arm: str) -> dict | None:
    """'full' | 'KIND:HxW' -> the model.attention dict (None for full)."""
    if arm == "full":
        return None
    kind, _, window = arm.partition(":")
    h, w = (int(v) for v in (window or "8x8").split("x"))
    return {"kind": kind, "window": [h, w]}


class Arm:
    def __init__(self, name: str, a: argparse.Namespace, state: dict | None) -> None:
        attention = parse_arm(name)
        torch.manual_seed(0)
        self.name = name
        self.model = build_model(a.preset, img_size=tuple(a.img_size), patch_size=a.patch_size,
                                 **({"attention": attention} if attention else {}))
        if state is not None:
            self.model.load_state_dict(state)  # the same weights in every arm
        self.layouts = sorted({str(blk.attn.layout) for blk in self.model.backbone.blocks})
        self.opt = torch.optim.AdamW(param_groups_layer_decay(self.model, 5e-4, 0.1, 0.75), lr=5e-4)
        gen = torch.Generator().manual_seed(1)
        hh, hw = self.model.heatmap_size
        k = self.model.spec.num_keypoints
        self.images = torch.randn(a.batch, 3, *a.img_size, generator=gen)
        self.target = torch.rand(a.batch, k, hh, hw, generator=gen)
        self.weight = torch.ones(a.batch, k)
        self.image1 = self.images[:1].clone()

    def train_step(self, dtype: torch.dtype) -> float:
        torch.manual_seed(2)  # the same drop-path draws in every arm
        self.model.train()
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = self.model(self.images)
        loss = keypoint_mse(out, self.target, self.weight)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t

    def infer(self, dtype: torch.dtype) -> float:
        self.model.eval()
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            self.model(self.image1)
        return time.perf_counter() - t


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_of(fn) -> tuple[int, int]:
    """(resident before, peak during) `fn()`, the peak from a reset high-water mark."""
    before = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return before, rss("VmHWM")


def memory_child(a: argparse.Namespace) -> None:
    arm = Arm(a.arm, a, None)
    dtype = DTYPES[a.precision]
    for p in arm.model.parameters():  # AdamW's states allocated by a step on zero gradients (no forward needed)
        p.grad = torch.zeros_like(p)
    arm.opt.step()
    arm.opt.zero_grad(set_to_none=True)
    before, peak = peak_of(lambda: arm.train_step(dtype))
    arm.opt.zero_grad(set_to_none=True)
    arm.infer(dtype)
    ibefore, ipeak = peak_of(lambda: arm.infer(dtype))
    print(json.dumps({"resident_mb": before / MB, "step_peak_mb": peak / MB, "step_mb": (peak - before) / MB,
                      "infer_mb": (ipeak - ibefore) / MB}))


def measure_memory(arm: str, precision: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.window_attention", "--memory-child", "--arm", arm, "--precision", precision,
           "--preset", a.preset, "--batch", str(a.batch), "--img-size", *map(str, a.img_size),
           "--patch-size", str(a.patch_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {arm} {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ms(values: list[float]) -> list[float]:
    return [v * 1000 for v in values]


def run(a: argparse.Namespace) -> dict:
    names = a.arms.split(",")
    t0 = time.time()
    first = Arm(names[0], a, None)
    arms = [first] + [Arm(n, a, first.model.state_dict()) for n in names[1:]]
    result = {"preset": a.preset, "img_size": a.img_size, "patch_size": a.patch_size, "batch": a.batch,
              "reps": a.reps, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": cpu_model(), "load_avg_start": os.getloadavg(),
              "grid": list(first.model.backbone.grid_size),
              "code_path": "ViTPose forward + keypoint_mse + backward + torch.optim.AdamW step (no DeepSpeed); "
                           "bf16 = torch.autocast over fp32 weights; inference = eval + inference_mode, batch 1",
              "rows": []}
    for precision in a.precisions.split(","):
        dtype = DTYPES[precision]
        fns = {}
        for arm in arms:  # warm-up (one round): allocator, AdamW states, oneDNN primitives
            fns[f"train {arm.name}"] = lambda arm=arm, dtype=dtype: arm.train_step(dtype)  # each step times itself
            fns[f"infer {arm.name}"] = lambda arm=arm, dtype=dtype: arm.infer(dtype)

        def order(r: int, keys: list[str]) -> list[str]:  # every arm's step, then every arm's inference
            k = r % len(names)
            rotated = names[k:] + names[:k]
            return [f"train {n}" for n in rotated] + [f"infer {n}" for n in rotated]

        def progress(r: int, times: dict[str, list[float]], precision: str = precision) -> None:
            print(f"  {precision} round {r + 1}/{a.reps}: " + ", ".join(
                f"{n} {times[f'train {n}'][-1]:.2f}s" for n in names), file=sys.stderr, flush=True)

        times = interleave(fns, a.reps, warmup=1, order=order, self_timed=True, after_round=progress)
        train = {n: times[f"train {n}"] for n in names}
        infer = {n: times[f"infer {n}"] for n in names}
        base_t, base_i = statistics.median(ms(train[names[0]])), statistics.median(ms(infer[names[0]]))
        for arm in arms:
            row = {"arm": arm.name, "precision": precision, "layouts": arm.layouts,
                   "gflops": arm.model.flops() / 1e9,
                   "train_ms": ms(train[arm.name]), "infer_ms": ms(infer[arm.name])}
            for what in ("train", "infer"):
                row[f"{what}_median_ms"] = statistics.median(row[f"{what}_ms"])
                row[f"{what}_min_ms"] = min(row[f"{what}_ms"])
            row["train_ratio"] = row["train_median_ms"] / base_t
            row["infer_ratio"] = row["infer_median_ms"] / base_i
            for what, samples in (("train", train), ("infer", infer)):  # per-round ratios: median and spread
                r = ratio(samples[arm.name], samples[names[0]])
                row[f"{what}_ratio_paired"] = {k: r[k] for k in ("median", "min", "max", "ci95")}
            torch.manual_seed(0)
            row["saved_mb"] = activation_bytes(arm.model, 1, dtype) / MB
            result["rows"].append(row)
    for arm in arms:
        del arm.model, arm.opt
    if not a.no_memory:
        for row in result["rows"]:
            row.update(measure_memory(row["arm"], row["precision"], a))
    result["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.time() - t0
    return result


def table(r: dict) -> str:
    mem = "step_mb" in r["rows"][0]
    head = (f"{'arm':<24} {'prec':<5} {'GFLOPs':>7} {'train ms':>9} {'x':>5} {'min':>6} {'infer ms':>9} {'x':>5} {'min':>5}"
            f" {'saved MB':>9}" + (f" {'step MB':>8} {'infer MB':>9} {'peak MB':>8}" if mem else ""))
    lines = [f"{r['preset']} {r['img_size'][0]}x{r['img_size'][1]}, patch {r['patch_size']} "
             f"({r['grid'][0]}x{r['grid'][1]} tokens), batch {r['batch']} (inference 1), median of {r['reps']}, "
             f"torch {r['torch']}, {r['threads']} threads", f"timed: {r['code_path']}",
             "ms: median (x: ratio to the first arm's median) and min over the rounds; a busy machine adds only "
             "delay, so min is the steadier figure when the load average exceeds the cores", head]
    for row in r["rows"]:
        line = (f"{row['arm']:<24} {row['precision']:<5} {row['gflops']:>7.2f} {row['train_median_ms']:>9.0f} "
                f"{row['train_ratio']:>5.2f} {row['train_min_ms']:>6.0f} {row['infer_median_ms']:>9.0f} "
                f"{row['infer_ratio']:>5.2f} {row['infer_min_ms']:>5.0f} "
                f"{row['saved_mb']:>9.0f}")
        if mem:
            line += f" {row['step_mb']:>8.0f} {row['infer_mb']:>9.0f} {row['step_peak_mb']:>8.0f}"
        lines.append(line)
    lines.append(f"load average {r['load_avg_start'][0]:.1f} at start, {r['load_avg_end'][0]:.1f} at end; "
                 f"wall {r['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.window_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vitpose_b")
    p.add_argument("--img-size", type=int, nargs=2, default=[576, 432], metavar=("H", "W"))
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--arms", default="full,shift_pool_window:8x8,shift_pool_window:9x9",
                   help="comma-separated: full or KIND:HxW (window in tokens); the first is the ratios' base")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--no-memory", action="store_true", help="skip the per-arm memory children")
    add_json_option(p, "window_attention")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child:
        memory_child(a)
        return 0
    record = Run("window_attention", a.json)
    result = run(a)
    print(table(result))
    record.finish(**result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check (not a test; needs a CUDA GPU): the same engine and models as on CPU, device from DeepSpeed.

Run on a GPU machine (no Ray or MLflow needed) as ``python -m benchmarks.gpu_check``; it prints (and writes
the speed figures to ``--json``, default runs/bench/gpu_check.json):

1. Engine runs, one process, DeepSpeed on NCCL: the embedded default's model on a small synthetic set,
   trained 2 epochs under ZeRO-0 fp32, ZeRO-2 bf16 + activation checkpointing and ZeRO-3 bf16 (loss, AP,
   img/s, checkpoint written), then a restart from the epoch-1 checkpoint that must continue at epoch 2.
2. Throughput at the paper's 256x192 input, bf16 autocast: inference (batch 64) and the training step
   (fwd + MSE + bwd + fused AdamW, batch 32) for ViTPose-B/L/H, beside the paper's A100 inference figures.
3. ViTPose-G: one bf16 training step with activation checkpointing, peak GPU memory.
4. The shipped step on the GPU (issue 19, item 6; ``--shipped``, about 6 min on an H200): section 2b of
   ``python -m benchmarks.compare_peer`` on one GPU, bf16, ViTPose-B and -L, ZeRO-0, -2 and -3 engines (the
   Trainer's real loop) against the transformers port's plain loop on the same GPU, written to ``--shipped-out``
   (default runs/bench/shipped_step_gpu.md) with the date, the GPU and the command.

Nothing here is asserted: the CPU test suite checks behaviour, this shows the GPU path runs and how fast.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import BENCH_RUNS, REPO, Run, add_json_option, timed
from vitpose.train.session import single_process_env

PAPER_A100_FPS = {"vitpose_b": 944, "vitpose_l": 411, "vitpose_h": 241}  # paper Table 9, inference


def engine_runs(data_root: Path, out: Path) -> None:
    from safetensors.torch import load_file

    from vitpose.build import ensure_data
    from vitpose.config import load_config
    from vitpose.train.loop import Trainer
    from vitpose.train.run_folder import MODEL_FILE, verify_checkpoint
    from vitpose.train.session import LocalSession

    base = [f"data.root={data_root}", "data.synthetic.generate=true", "data.synthetic.train_instances=1024", "data.synthetic.val_instances=128",
            "train.epochs=2", "train.eval_every=1", "train.lr_steps=[]", "data.loader_workers=4",
            "ray.use_gpu=true"]
    ensure_data(load_config(REPO / "configs/teacher/synthetic_tiny.yaml", base))
    runs = {
        "zero0-fp32": ["deepspeed.zero_stage=0", "train.precision=fp32"],
        "zero2-bf16-actckpt": ["deepspeed.zero_stage=2", "train.precision=bf16",
                               "model.activation_checkpointing=true"],
        "zero3-bf16": ["deepspeed.zero_stage=3", "train.precision=bf16"],
    }
    for name, sets in runs.items():
        cfg = load_config(REPO / "configs/teacher/synthetic_tiny.yaml", base + sets)
        session = LocalSession(out / name)
        t = time.time()
        trainer = Trainer(cfg, session)
        trainer.fit()
        r = session.reports
        meta = verify_checkpoint(session.checkpoints[-1])
        print(f"[engine] {name}: device {trainer.device}, loss {r[0]['train/loss']:.6f} -> {r[-1]['train/loss']:.6f}, "
              f"AP {r[-1]['val/AP']:.3f}, {r[-1]['train/images_per_sec']:.0f} img/s, "
              f"checkpoint epoch {meta['epoch'] + 1} stage {meta['zero_stage']}, {time.time() - t:.1f} s", flush=True)
        resumed = LocalSession(out / f"{name}-resumed", resume_from=session.checkpoints[0])
        trainer = Trainer(cfg, resumed)
        trainer.fit()
        last = resumed.reports[-1]["train/loss"]
        ours, theirs = (load_file(s.checkpoints[-1] / MODEL_FILE) for s in (resumed, session))
        worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs)
        print(f"[engine] {name} restarted from epoch 1: continued at epoch {trainer.start_epoch + 1}, "
              f"final loss {last:.6f} vs {r[-1]['train/loss']:.6f} uninterrupted "
              f"(rel diff {abs(last - r[-1]['train/loss']) / r[-1]['train/loss']:.1e}); saved weights and "
              f"BatchNorm statistics differ by at most {worst:.1e}", flush=True)


def bf16_train_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor):
    """fwd + MSE + bwd + fused AdamW under bf16 autocast, as a closure for ``timed``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def throughput(presets: list[str]) -> list[dict]:
    from vitpose.models import build_model

    rows = []
    for name in presets:
        model = build_model(name, img_size=(256, 192)).cuda()
        x = torch.randn(64, 3, 256, 192, device="cuda")
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            infer = 64 / timed(functools.partial(model, x), calls=10, warmup=3, cuda=True)
        model.train()
        step = bf16_train_step(model, x[:32], torch.rand(32, 17, 64, 48, device="cuda"))
        train = 32 / timed(step, calls=10, warmup=3, cuda=True)
        print(f"[speed] {name} bf16 on {torch.cuda.get_device_name()}: inference {infer:.0f} img/s at batch 64 "
              f"(the paper's figure is for an A100, other hardware: {PAPER_A100_FPS.get(name, '-')}), training step "
              f"{train:.0f} img/s at batch 32", flush=True)
        rows.append({"preset": name, "bf16 inference img/s (batch 64)": infer, "bf16 train img/s (batch 32)": train})
        del model
        torch.cuda.empty_cache()
    return rows


def giant_step(batch: int) -> dict:
    from vitpose.models import build_model

    torch.cuda.reset_peak_memory_stats()
    model = build_model("vitpose_g", img_size=(256, 192)).cuda()
    model.set_grad_checkpointing(True)
    x = torch.randn(batch, 3, 256, 192, device="cuda")
    sec = timed(bf16_train_step(model, x, torch.rand(batch, 17, 64, 48, device="cuda")), calls=3, warmup=3, cuda=True)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"[giant] vitpose_g ({params:.0f}M) bf16 autocast + activation checkpointing, batch {batch}: "
          f"{batch / sec:.0f} img/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    return {"batch": batch, "img/s": batch / sec, "peak GiB": torch.cuda.max_memory_allocated() / 2**30}


def shipped_step(out: Path, models: str, batch: int) -> None:
    """compare_peer's section 2b on this GPU, in its own process (it spawns a process per stage)."""
    cmd = [sys.executable, "-m", "benchmarks.compare_peer", "--shipped-only", "--models", models,
           "--shipped-precisions", "bf16", "--shipped-ranks", "1", "--shipped-stages", "0,2,3",
           "--shipped-batch", str(batch), "--out", str(out)]
    print("[shipped] python " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="run folder (default: a temp folder)")
    p.add_argument("--presets", default="vitpose_b,vitpose_l,vitpose_h")
    p.add_argument("--giant-batch", type=int, default=32, help="0 skips the ViTPose-G step")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--shipped", action="store_true", help="also the shipped ZeRO-0/2/3 step vs the peer (item 4)")
    p.add_argument("--shipped-only", action="store_true", help="only item 4")
    p.add_argument("--shipped-models", default="b,l")
    p.add_argument("--shipped-batch", type=int, default=32)
    p.add_argument("--shipped-out", type=Path, default=BENCH_RUNS / "shipped_step_gpu.md")
    add_json_option(p, "gpu_check")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; this check is for GPU machines (the CPU path is what `make test` checks)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB", flush=True)
    for key, value in single_process_env().items():
        os.environ.setdefault(key, value)
    # TF32 off for matmuls (torch's default) and convolutions (cuDNN's default is on): the "fp32" engine run is
    # then fp32, as labelled; the bf16 rows compute in bf16 either way.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}",
          flush=True)
    if args.shipped or args.shipped_only:
        shipped_step(args.shipped_out, args.shipped_models, args.shipped_batch)
        if args.shipped_only:
            return
    run = Run("gpu_check", args.json)
    with tempfile.TemporaryDirectory(prefix="vitpose-gpu-check-") as tmp:
        out = args.out or Path(tmp)
        if not args.skip_engine:
            engine_runs(out / "data", out)
        speed = throughput([s for s in args.presets.split(",") if s])
        giant = giant_step(args.giant_batch) if args.giant_batch > 0 else None
    run.finish(speed=speed, giant=giant)


if __name__ == "__main__":
    main()

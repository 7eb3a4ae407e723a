"""Our ViTPose against the implementation users would otherwise pick (the Hugging Face transformers
VitPose port), against this machine's matmul peak, with the accuracy of our bf16 path and the cost of
the data loader: one process, one run, same inputs, written to runs/bench/compare_peer.md (the current
figures are copied into benchmarks/RESULTS.md by hand) and runs/bench/compare_peer.json.

    pip install -c constraints.txt -e '.[bench]'          # transformers: the peer
    python -m benchmarks.compare_peer                     # S and B, ~15 min on 2 cores, plus section 2b
                                                          # (~40 min for S and B; --skip-shipped leaves it out)
    python -m benchmarks.compare_peer --models s --reps 3 --skip-ap --skip-loader   # quick look
    python -m benchmarks.compare_peer --shipped-only      # section 2b alone -> runs/bench/shipped_step.md

Sections (the issue's items):
1. Same function: our preset and ``VitPoseForPoseEstimation`` with the same architecture (hidden, depth,
   heads, ``out_indices=[depth]``, ``layer_norm_eps=1e-6``, classic decoder); our weights are copied into
   the peer (the fused qkv split into query/key/value) and the max abs heatmap difference is printed.
   Our model is built with ``drop_path_rate=0`` (the peer has no stochastic depth, so both compute the
   same function in training too); BatchNorm statistics and the last conv are randomised/scaled so the
   heatmaps are O(1) and a difference means something.
2. Speed, interleaved (ours, peer, peer, ours, ...; ``benchmarks.harness.interleave``) after warm-up, medians
   of ``--reps``: inference at
   batch 1 and 32 and the training step at batch 16 (forward, MSE loss, backward, AdamW), in fp32 and in
   bf16 autocast (``torch.autocast('cpu', torch.bfloat16)``) for both. The training step is each
   implementation's own path: ours with the fused CPU AdamW (``fused=True``), the peer with torch's
   default AdamW as a transformers user would write it. The "fwd+bwd" row leaves the optimizer out, so
   the model code alone is compared too. Ratios are ours/peer in images per second (median of the
   per-repetition ratios; the report gives their min-max beside it).
2b. The shipped training step (--shipped-only runs this alone; --skip-shipped leaves it out): our side is
   what a user runs, the real ``Trainer.train_epoch`` over the DeepSpeed engine that ``deepspeed.initialize``
   builds from configs/deepspeed/zero<stage>.json completed by vitpose/train/deepspeed_config.py (layer-decayed groups,
   clipping 1.0, DeepSpeed's precision handling: bf16 weights over fp32 masters), one pre-made batch of the
   synthetic set per rank. ZeRO-0 on one rank (2 threads) against the peer's plain torch loop; ZeRO-3 on two
   ranks (gloo, 1 thread each, spawned processes) against the peer under DDP on two ranks, at equal per-rank
   batch. The peer gets the same AdamW class (fused when the shipped JSON says so) and clipping, one parameter
   group, and the closest precision (bf16: autocast over fp32 weights). A third contender, the engine built
   from the same JSON with the other AdamW (fused / torch's default for-loop), runs in the same rotation: the
   AdamW before/after, with both engines' losses after the same steps from the same weights. Every row names
   the path it times. Targets: ZeRO-0 >= 1.0x the peer in fp32, >= 1.15x in bf16; ZeRO-3 >= 0.9x DDP.
3. The machine: fp32 and bf16 matmul throughput at 2048^3 (measured at the start and the end; the
   higher is the peak) and the model-FLOPs utilisation: analytic FLOPs (2 x the multiply-accumulates of
   ``model.flops``, x3 for a training step) / time / peak of the row's precision.
4. Our bf16 accuracy: keypoint AP of a trained small model on the synthetic val set, fp32 vs bf16
   autocast inference (flip test on, as in training's evaluation). The model is ``--checkpoint`` if given,
   else the embedded default teacher trained here with the real engine (configs/teacher/synthetic_tiny.yaml,
   --ap-epochs epochs, one process, ZeRO-0) and cached under runs/bench/compare-peer/ (first run only:
   4-12 minutes on 2 cores, depending on other load).
5. Data loader vs model: the tiny teacher as configured (configs/teacher/synthetic_tiny.yaml: 2 training
   workers with 1 CPU thread each, DeepSpeed ZeRO-3 on gloo, items loaded in the worker's own process,
   decoded images cached), run by the real engine's ``Trainer.train_epoch``: epochs fed by the real
   DataLoader vs the same batches as pre-made tensors, interleaved (the loader's first epoch, which fills
   the image cache, is a warm-up and not timed). The slowdown is the median of the per-repetition ratios
   (each pair ran back to back, so slow drifts in other load cancel). Workers are started with
   torch.multiprocessing rather than Ray (Ray adds nothing inside the step loop). ``--loader-set`` measures
   other settings, e.g. ``data.loader_workers=1`` (a loader process per worker).

6. torch.profiler tables of both training steps (--profile, default ViTPose-S fp32 and bf16).

The process keeps freed memory instead of handing it back to the OS (see ``retain_freed_memory``; both
implementations alike; --no-retain-memory to measure without). Absolute numbers move with other load on a
shared machine (the load average is recorded, and the matmul peak is measured again beside every
repetition); the A/B interleaving is what makes the ratios comparable. Tests never assert timings: this
script prints them. The sections' code is in ``benchmarks/peer/`` (one module each).
"""


from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import BENCH_RUNS, Run, add_json_option, retain_freed_memory
from benchmarks.peer.accuracy import bf16_accuracy
from benchmarks.peer.common import MODELS, TRAIN_BATCH, machine_info
from benchmarks.peer.loader import loader_vs_tensors
from benchmarks.peer.report import check_targets, markdown, shipped_markdown
from benchmarks.peer.shipped import PairRow, shipped_rows
from benchmarks.peer.speed import bench_model, matmul_gflops, profile_tables


def row_record(row: Any) -> dict[str, Any]:
    """A speed row for the JSON record: its samples, images/s and ours/peer with its spread."""
    return {**vars(row), "ips": {w: row.ips(w) for w in ("ours", "peer")}, "ratio": row.ratio_stats}


def pair_record(row: PairRow) -> dict[str, Any]:
    return {**vars(row), "ips": {w: row.ips(w) for w in ("a", "b")}, "ratio": row.ratio_stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_peer", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="s,b", help="comma list of s, b, l, h, or none (default s,b)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each inference row")
    p.add_argument("--train-reps", type=int, default=6, help="interleaved repetitions of each training row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-split", action="store_true", help="leave out the fwd+bwd (no optimizer) rows")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="keep glibc's default of returning freed memory to the OS (see retain_freed_memory)")
    p.add_argument("--checkpoint", type=Path, help="trained model for the AP check (default: train the demo teacher)")
    p.add_argument("--ap-epochs", type=int, default=6, help="epochs of the AP model when trained here")
    p.add_argument("--skip-ap", action="store_true")
    p.add_argument("--loader-steps", type=int, default=0, help="steps per timed epoch (0: the config's full epoch)")
    p.add_argument("--loader-reps", type=int, default=3)
    p.add_argument("--loader-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the tiny teacher's config for the loader section (repeatable), "
                        "e.g. data.loader_workers=1 to measure a loader process per worker")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--profile", default="s:fp32,s:bf16",
                   help="comma list of model:precision training steps to profile, ours and the peer's ('' for none)")
    p.add_argument("--skip-shipped", action="store_true", help="leave out section 2b (the shipped engine step)")
    p.add_argument("--shipped-only", action="store_true",
                   help="only section 2b, written to runs/bench/shipped_step.md unless --out is given")
    p.add_argument("--shipped-ranks", default="1,2", help="1: ZeRO-0 on one rank; 2: ZeRO-3 on two ranks")
    p.add_argument("--shipped-stages", default="",
                   help="comma list of ZeRO stages to time at every rank count instead (e.g. 0,2,3 on one GPU)")
    p.add_argument("--shipped-precisions", default="fp32,bf16")
    p.add_argument("--shipped-batch", type=int, default=TRAIN_BATCH, help="batch per rank of section 2b")
    p.add_argument("--shipped-reps", type=int, default=0, help="repetitions of section 2b (default --train-reps)")
    p.add_argument("--shipped-warmup", type=int, default=2, help="untimed steps of each contender first")
    p.add_argument("--out", type=Path, default=None,
                   help="the markdown report (default runs/bench/compare_peer.md, --shipped-only: shipped_step.md)")
    add_json_option(p, "compare_peer")
    a = p.parse_args(argv)
    stages = [x.strip() for x in a.shipped_stages.split(",") if x.strip()]
    if any(x not in ("0", "1", "2", "3") for x in stages):
        p.error(f"--shipped-stages {a.shipped_stages!r}: ZeRO stages are 0, 1, 2 or 3 (configs/deepspeed/zero<N>.json)")
    argv = sys.argv[1:] if argv is None else argv
    a.out = a.out or BENCH_RUNS / ("shipped_step.md" if a.shipped_only else "compare_peer.md")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in a.models.split(",") if m.strip() and m.strip() != "none"]
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    retained = False if a.no_retain_memory else retain_freed_memory()

    def say(text: str) -> None:
        print(text, flush=True)

    run = Run("compare_peer", a.json, argv)
    info = machine_info()
    info["freed memory kept in the process (mallopt)"] = "yes" if retained else "no"
    say(" | ".join(f"{k}: {v}" for k, v in info.items()))

    def shipped() -> tuple[list[PairRow], list[dict[str, Any]]]:
        if a.skip_shipped or not models:
            return [], []
        say("the shipped training step (section 2b)")
        return shipped_rows(models, a.shipped_precisions.split(","), [int(r) for r in a.shipped_ranks.split(",")],
                            a.shipped_batch, a.shipped_reps or a.train_reps, a.threads, retained, say,
                            a.shipped_warmup, [int(x) for x in a.shipped_stages.split(",") if x.strip()])

    if a.shipped_only:
        pairs, shipped_results = shipped()
        targets = check_targets([], {}, None, None, pairs)
        text = shipped_markdown(info, pairs, shipped_results, targets, argv, time.perf_counter() - t_start)
        a.out.write_text(text)
        say("\n" + text)
        say(f"written to {a.out}")
        run.finish(info=info, shipped=shipped_results, pairs=[pair_record(r) for r in pairs], targets=targets)
        return 0
    peaks: dict[str, float] = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[f"{name} start"] = matmul_gflops(dt)
    say(f"matmul at start: fp32 {peaks['fp32 start']:.0f} GFLOP/s, bf16 {peaks['bf16 start']:.0f} GFLOP/s")

    diffs, rows = {}, []
    for name in models:
        d, r = bench_model(name, a.reps, a.train_reps, not a.no_split, say)
        diffs[MODELS[name]] = d
        rows += r
        gc.collect()
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[f"{name} end"] = matmul_gflops(dt)
        beside = [p for r in rows if r.precision == name for p in r.peak]
        peaks[f"{name} beside rows"] = statistics.median(beside) if beside else float("nan")
        peaks[name] = max([peaks[f"{name} start"], peaks[f"{name} end"], *beside])
    say(f"matmul at end: fp32 {peaks['fp32 end']:.0f} GFLOP/s, bf16 {peaks['bf16 end']:.0f} GFLOP/s")

    pairs, shipped_results = shipped()
    ap = None if a.skip_ap else bf16_accuracy(a.checkpoint, a.ap_epochs, say)
    torch.set_num_threads(a.threads)
    loader = None if a.skip_loader else loader_vs_tensors(a.loader_steps, a.loader_reps, say, a.loader_set)

    profiles = {}
    for item in [i for i in a.profile.split(",") if i]:
        name, precision = item.split(":") if ":" in item else (item, "fp32")
        say(f"profiling {MODELS[name]} {precision} training step")
        profiles[f"{MODELS[name]} {precision}"] = profile_tables(name, precision)

    targets = check_targets(rows, peaks, ap, loader, pairs)
    text = markdown(info, peaks, diffs, rows, ap, loader, targets, argv, time.perf_counter() - t_start, profiles,
                    pairs, shipped_results)
    a.out.write_text(text)
    say("\n" + text)
    say(f"written to {a.out}")
    run.finish(info=info, peaks=peaks, same_function=diffs, rows=[row_record(r) for r in rows], ap=ap,
               loader=loader, shipped=shipped_results, pairs=[pair_record(r) for r in pairs], targets=targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

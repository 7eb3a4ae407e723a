"""Our ViTPose against the implementation users would otherwise pick (the Hugging Face transformers
VitPose port), against this machine's matmul peak, with the accuracy of our bf16 path and the cost of
the data loader: one process, one run, same inputs, written to benchmarks/RESULTS.md.

    pip install -c constraints.txt -e '.[bench]'          # transformers: the peer
    python benchmarks/compare_peer.py                     # S and B, ~15 min on 2 cores, plus section 2b
                                                          # (~40 min for S and B; --skip-shipped leaves it out)
    python benchmarks/compare_peer.py --models s --reps 3 --skip-ap --skip-loader   # quick look
    python benchmarks/compare_peer.py --shipped-only      # section 2b alone -> benchmarks/shipped_step.md

Sections (the issue's items):
1. Same function: our preset and ``VitPoseForPoseEstimation`` with the same architecture (hidden, depth,
   heads, ``out_indices=[depth]``, ``layer_norm_eps=1e-6``, classic decoder); our weights are copied into
   the peer (the fused qkv split into query/key/value) and the max abs heatmap difference is printed.
   Our model is built with ``drop_path_rate=0`` (the peer has no stochastic depth, so both compute the
   same function in training too); BatchNorm statistics and the last conv are randomised/scaled so the
   heatmaps are O(1) and a difference means something.
2. Speed, interleaved (ours, peer, peer, ours, ...) after warm-up, medians of ``--reps``: inference at
   batch 1 and 32 and the training step at batch 16 (forward, MSE loss, backward, AdamW), in fp32 and in
   bf16 autocast (``torch.autocast('cpu', torch.bfloat16)``) for both. The training step is each
   implementation's own path: ours with the fused CPU AdamW (``fused=True``), the peer with torch's
   default AdamW as a transformers user would write it. The "fwd+bwd" row leaves the optimizer out, so
   the model code alone is compared too. Ratios are ours/peer in images per second (median of the
   per-repetition ratios).
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
script prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vitpose.models import ViTPose, build_model  # noqa: E402
from vitpose.train.session import NullSession, free_port, single_process_env  # noqa: E402

TINY_TEACHER = REPO / "configs" / "teacher" / "synthetic_tiny.yaml"
CACHE = REPO / "runs" / "bench" / "compare-peer"
MODELS = {"s": "vitpose_s", "b": "vitpose_b", "l": "vitpose_l", "h": "vitpose_h"}
INFER_BATCHES = (1, 32)
TRAIN_BATCH = 16
MIN_MEASURE_S = 0.4  # batch-1 calls are repeated until one measurement lasts about this long
LR, WD = 1e-4, 0.05


# ------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min)"


def machine_info() -> dict[str, Any]:
    import transformers

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "bf16 in hardware": ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load average at start": load_average(),
    }


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc mallopt) instead of returning it to the OS.

    By default glibc hands each large tensor back with munmap when it is freed and the next one is
    page-faulted in again, zeroed page by page: measured here (ViTPose-S training step at batch 16),
    ~230k page faults per step and 10-20% of the step in a VM. Applied to the whole process, so it
    applies to both implementations alike; the same can be had with MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ in the environment. --no-retain-memory measures without.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1  # blocks under 1 GiB come from the heap
    ok &= libc.mallopt(m_trim_threshold, 1 << 40) == 1  # never give the heap's top back
    ok &= libc.mallopt(m_top_pad, 256 << 20) == 1  # grow the heap in big steps
    return bool(ok)


_MATMUL: dict[tuple[torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Median GFLOP/s of an n^3 matmul (the machine's practical peak for this precision)."""
    if (dtype, n) not in _MATMUL:
        _MATMUL[dtype, n] = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            _MATMUL[dtype, n][0] @ _MATMUL[dtype, n][1]
    a, b = _MATMUL[dtype, n]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------------------------- peer
def peer_model(ours: ViTPose) -> nn.Module:
    """transformers' VitPoseForPoseEstimation with our model's architecture (classic decoder)."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    s = ours.spec
    if s.decoder != "classic" or s.deconv_channels != 256:
        raise ValueError("the peer's classic decoder has 256 channels: compare the S/B/L/H presets")
    if s.mlp_hidden_dim % s.embed_dim:
        raise ValueError("the peer takes an integer mlp_ratio")
    backbone = VitPoseBackboneConfig(
        image_size=list(s.img_size), patch_size=[s.patch_size, s.patch_size], hidden_size=s.embed_dim,
        num_hidden_layers=s.depth, num_attention_heads=s.num_heads, mlp_ratio=s.mlp_hidden_dim // s.embed_dim,
        out_indices=[s.depth], layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )
    return VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, use_simple_decoder=False,
                                                  num_labels=s.num_keypoints))


def copy_into_peer(ours: ViTPose, peer: nn.Module) -> None:
    """Our state dict in the peer's names; the fused qkv is split into query, key and value."""
    s, d = ours.state_dict(), {}
    d["backbone.embeddings.patch_embeddings.projection.weight"] = s["backbone.patch_embed.proj.weight"]
    d["backbone.embeddings.patch_embeddings.projection.bias"] = s["backbone.patch_embed.proj.bias"]
    d["backbone.embeddings.position_embeddings"] = s["backbone.pos_embed"]
    pairs = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    for i in range(ours.spec.depth):
        o, p = f"backbone.blocks.{i}.", f"backbone.encoder.layer.{i}."
        for t in ("weight", "bias"):
            for a, b in pairs:
                d[f"{p}{b}.{t}"] = s[f"{o}{a}.{t}"]
            for name, part in zip(("query", "key", "value"), s[f"{o}attn.qkv.{t}"].chunk(3), strict=True):
                d[f"{p}attention.attention.{name}.{t}"] = part
    for t in ("weight", "bias"):
        d[f"backbone.layernorm.{t}"] = s[f"backbone.last_norm.{t}"]
    head = (("deconv_layers.0", "deconv1"), ("deconv_layers.1", "batchnorm1"), ("deconv_layers.3", "deconv2"),
            ("deconv_layers.4", "batchnorm2"), ("final_layer", "conv"))
    for a, b in head:
        for k, v in s.items():
            if k.startswith(f"keypoint_head.{a}."):
                d[f"head.{b}.{k.rsplit('.', 1)[1]}"] = v
    result = peer.load_state_dict(d, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result


def make_loud(model: ViTPose, seed: int = 0) -> None:
    """Random BatchNorm statistics and a last conv scaled to heatmaps of about 1 (an untrained head gives
    ~1e-4, where any difference would look small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.keypoint_head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        model.eval()
        peak = float(model(torch.randn(2, 3, *model.spec.img_size, generator=g)).abs().max())
        model.keypoint_head.final_layer.weight.div_(peak)
        model.keypoint_head.final_layer.bias.div_(peak)


def heatmaps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.heatmaps


def autocast(bf16: bool, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def same_function(ours: ViTPose, peer: nn.Module) -> dict[str, float]:
    x = torch.randn(4, 3, *ours.spec.img_size, generator=torch.Generator().manual_seed(1))
    out: dict[str, float] = {}
    ours.eval(), peer.eval()
    with torch.inference_mode():
        a, b = heatmaps(ours, x), heatmaps(peer, x)
        out["max abs heatmap"] = float(a.abs().max())
        out["eval fp32 max abs diff"] = float((a - b).abs().max())
        with autocast(True):
            a16, b16 = heatmaps(ours, x).float(), heatmaps(peer, x).float()
        out["eval bf16 max abs diff"] = float((a16 - b16).abs().max())
        out["bf16 vs fp32, ours"] = float((a16 - a).abs().max())
        out["bf16 vs fp32, peer"] = float((b16 - b).abs().max())
    # Training mode (BatchNorm on batch statistics) on copies, so running statistics stay as they were.
    o2, p2 = copy.deepcopy(ours).train(), copy.deepcopy(peer).train()
    ya, yb = heatmaps(o2, x), heatmaps(p2, x)
    out["train fp32 max abs diff"] = float((ya - yb).detach().abs().max())
    ya.square().mean().backward()
    yb.square().mean().backward()
    ga = o2.backbone.blocks[0].mlp.fc1.weight.grad
    gb = p2.backbone.encoder.layer[0].mlp.fc1.weight.grad
    out["train grad rel diff (block 0 fc1)"] = float((ga - gb).norm() / ga.norm())
    # The same gradient of our own model with another summation order (one thread instead of the run's): how
    # far fp32 rounding alone moves it. Through 12 blocks and batch-statistics BatchNorm on 4 images it reaches
    # 1e-3 for some weight draws, so ours-vs-peer is judged against this floor, not against zero.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        o3 = copy.deepcopy(ours).train()
        heatmaps(o3, x).square().mean().backward()
        g1 = o3.backbone.blocks[0].mlp.fc1.weight.grad
    finally:
        torch.set_num_threads(threads)
    out["train grad rel diff, ours 1 vs 2 threads"] = float((ga - g1).norm() / ga.norm())
    return out


# ------------------------------------------------------------------------------------------- timing
@dataclass
class Row:
    model: str
    precision: str
    case: str
    images: int
    flops: float  # analytic FLOPs of one call
    ours: list[float] = field(default_factory=list)  # seconds per call
    peer: list[float] = field(default_factory=list)
    peak: list[float] = field(default_factory=list)  # matmul GFLOP/s of the row's precision, measured each rep

    def ips(self, who: str) -> float:
        return self.images / statistics.median(getattr(self, who))

    @property
    def ratio(self) -> float:
        return statistics.median(p / o for o, p in zip(self.ours, self.peer, strict=True))

    def mfu(self, who: str, peak_gflops: float) -> float:
        return self.flops / statistics.median(getattr(self, who)) / (peak_gflops * 1e9)

    @property
    def mfu_adjacent(self) -> float:
        """Our utilisation against the matmul measured right beside each repetition (same load)."""
        return statistics.median(self.flops / t / (p * 1e9) for t, p in zip(self.ours, self.peak, strict=True))


def infer_fn(model: nn.Module, x: torch.Tensor, bf16: bool, calls: int) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode(), autocast(bf16):
            for _ in range(calls):
                heatmaps(model, x)
    return run


def train_fn(model: nn.Module, opt: torch.optim.Optimizer | None, x: torch.Tensor, y: torch.Tensor,
             bf16: bool) -> Callable[[], None]:
    def run() -> None:
        with autocast(bf16):
            out = heatmaps(model, x)
        loss = F.mse_loss(out.float(), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    return run


def interleave(row: Row, ours: Callable[[], None], peer: Callable[[], None], reps: int, calls: int) -> None:
    for _ in range(2):  # warm-up: allocations, oneDNN primitives, optimizer state (the 2nd training step
        ours(), peer()  # was still ~1.6x slower than the rest for both: one round left outliers in the median)
    dtype = torch.bfloat16 if row.precision == "bf16" else torch.float32
    for r in range(reps):
        row.peak.append(matmul_gflops(dtype, reps=3))
        order = (("ours", ours), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("ours", ours))
        for who, fn in order:
            t = time.perf_counter()
            fn()
            getattr(row, who).append((time.perf_counter() - t) / calls)


def calls_for(fn_one: Callable[[], None]) -> int:
    t = time.perf_counter()
    fn_one()
    return max(1, round(MIN_MEASURE_S / max(time.perf_counter() - t, 1e-4)))


def bench_model(name: str, reps: int, train_reps: int, split: bool, say: Callable[[str], None]
                ) -> tuple[dict[str, float], list[Row]]:
    preset = MODELS[name]
    torch.manual_seed(0)
    ours = build_model(preset, drop_path_rate=0.0)
    make_loud(ours)
    peer = peer_model(ours)
    copy_into_peer(ours, peer)
    diff = same_function(ours, peer)
    say(f"{preset}: peer attention '{peer.backbone.config._attn_implementation}'; " +
        ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    h, w = ours.spec.img_size
    fwd = 2 * ours.flops()  # FLOPs of one image's forward pass
    rows: list[Row] = []
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        ours.eval(), peer.eval()
        for batch in INFER_BATCHES:
            x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(batch))
            calls = calls_for(infer_fn(ours, x, bf16, 1)) if batch == 1 else 1
            row = Row(preset, precision, f"infer b{batch}", batch, batch * fwd)
            interleave(row, infer_fn(ours, x, bf16, calls), infer_fn(peer, x, bf16, calls), reps, calls)
            rows.append(row)
            say(f"  {precision} {row.case}: ours {row.ips('ours'):.2f} img/s, peer {row.ips('peer'):.2f}, "
                f"ours/peer {row.ratio:.3f}")
        x = torch.randn(TRAIN_BATCH, 3, h, w, generator=torch.Generator().manual_seed(7))
        y = torch.rand(TRAIN_BATCH, ours.spec.num_keypoints, *ours.spec.heatmap_size,
                       generator=torch.Generator().manual_seed(8))
        # Fresh copies for training: the optimizer moves the weights, the timing does not care.
        o_train, p_train = copy.deepcopy(ours).train(), copy.deepcopy(peer).train()
        cases = [("train b16", True)] + ([("train b16 fwd+bwd", False)] if split else [])
        for case, with_opt in cases:
            o_opt = torch.optim.AdamW(o_train.parameters(), lr=LR, weight_decay=WD, fused=True) if with_opt else None
            p_opt = torch.optim.AdamW(p_train.parameters(), lr=LR, weight_decay=WD) if with_opt else None
            row = Row(preset, precision, case, TRAIN_BATCH, 3 * TRAIN_BATCH * fwd)
            interleave(row, train_fn(o_train, o_opt, x, y, bf16), train_fn(p_train, p_opt, x, y, bf16), train_reps, 1)
            rows.append(row)
            say(f"  {precision} {row.case}: ours {row.ips('ours'):.2f} img/s, peer {row.ips('peer'):.2f}, "
                f"ours/peer {row.ratio:.3f}")
            del o_opt, p_opt
        del o_train, p_train
        gc.collect()
    return diff, rows


def profile_tables(name: str, precision: str, rows: int = 14) -> dict[str, str]:
    """torch.profiler's top operators (self CPU time) of one training step at batch 16, ours and the peer's."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ours = build_model(MODELS[name], drop_path_rate=0.0)
    peer = peer_model(ours)
    copy_into_peer(ours, peer)
    h, w = ours.spec.img_size
    x = torch.randn(TRAIN_BATCH, 3, h, w)
    y = torch.rand(TRAIN_BATCH, ours.spec.num_keypoints, *ours.spec.heatmap_size)
    bf16 = precision == "bf16"
    out = {}
    for who, model, fused in (("ours", ours, True), ("peer", peer, False)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, **({"fused": True} if fused else {}))
        step = train_fn(model, opt, x, y, bf16)
        step(), step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out[who] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44)
    return out


# ------------------------------------------------------------ 2b: the shipped step (the real DeepSpeed engine)
SHIPPED_STAGE = {1: 0, 2: 3}  # ranks -> the ZeRO stage timed by default: ZeRO-0 in one process, ZeRO-3 over two
SHIPPED_DS = REPO / "configs" / "deepspeed"
# Shipped step / peer's plain loop: ZeRO-0 on one rank (fp32, bf16); ZeRO-3 on two ranks / DDP on two. Other
# (ranks, stage) pairs (--shipped-stages, e.g. ZeRO-2 on one GPU) are measured without a target.
SHIPPED_TARGETS = {(1, 0, "fp32"): 1.0, (1, 0, "bf16"): 1.15, (2, 3, "fp32"): 0.9, (2, 3, "bf16"): 0.9}


@dataclass
class PairRow:
    """Two training steps timed interleaved in the same process(es): ``a`` against ``b``, each labelled with the
    path it times. Ratio = a's speed / b's speed (median of the per-repetition ratios)."""

    model: str
    precision: str
    ranks: int
    batch: int  # per rank
    kind: str  # "shipped / peer" or "fused / for-loop"
    stage: int  # the engine's ZeRO stage
    a_label: str
    b_label: str
    a: list[float] = field(default_factory=list)  # seconds per step (the slowest rank's)
    b: list[float] = field(default_factory=list)
    target: float | None = None
    note: str = ""
    a_opt: list[float] = field(default_factory=list)  # seconds of the optimizer phase of each step (see _shipped_one)
    b_opt: list[float] = field(default_factory=list)

    def opt_s(self, who: str) -> float:
        times = getattr(self, f"{who}_opt")
        return statistics.median(times) if times else float("nan")

    def ips(self, who: str) -> float:
        return self.batch * self.ranks / statistics.median(getattr(self, who))

    @property
    def ratio(self) -> float:
        return statistics.median(tb / ta for ta, tb in zip(self.a, self.b, strict=True))


def shipped_config(name: str, precision: str, batch: int, ds_json: Path | str) -> Any:
    """The tiny teacher's config (synthetic data, the real Trainer) with the model at the peer rows' size
    (256x192, patch 16), the COCO recipe's layer decay (the preset's) and gradient clipping (1.0), no drop path
    (the peer has none), no warm-up, and the DeepSpeed JSON ``ds_json``."""
    return tiny_config([f"model.preset={MODELS[name]}", "model.img_size=[256, 192]", "model.patch_size=16",
                        "model.drop_path_rate=0.0", "model.layer_decay=null", f"train.precision={precision}",
                        f"train.batch_size={batch}", "train.grad_clip=1.0", "train.warmup_iters=0",
                        f"deepspeed.config={ds_json}", "data.loader_workers=0"])


def deepspeed_fused(trainer: Any) -> bool:
    """Whether the torch AdamW that DeepSpeed built (inside any bf16 / ZeRO wrapper) runs the fused kernel."""
    return bool(trainer.engine.basic_optimizer.defaults.get("fused"))


def engine_label(trainer: Any) -> str:
    opt = trainer.engine.basic_optimizer
    kind = "fused" if deepspeed_fused(trainer) else "for-loop"
    precision = "bf16 weights, fp32 masters" if trainer.dtype == torch.bfloat16 else "fp32"
    return (f"shipped: DeepSpeed ZeRO-{trainer.stage} engine.step ({type(trainer.optimizer).__name__}), "
            f"torch {type(opt).__name__} {kind}, clip {trainer.cfg.train.grad_clip:g}, {precision}")


def variant_json(stage: int, out: Path) -> Path:
    """configs/deepspeed/zero<stage>.json with the optimizer the other way round: without ``fused`` (torch's
    default, the for-loop on CPU: what was shipped before) when the shipped JSON has it, with it otherwise."""
    data = json.loads((SHIPPED_DS / f"zero{stage}.json").read_text())
    params = data.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    if params.get("fused"):
        del params["fused"]
    else:
        params["fused"] = True
    path = out / f"zero{stage}-other-adamw.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def interleave_steps(fns: dict[str, Callable[[], None]], reps: int, sync: Callable[[], None] | None = None,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, the order turning through every permutation from repetition to
    repetition (with 3 functions and 6 repetitions each sits in each place twice). ``sync`` (a barrier) runs
    before each timed call, so ranks start a step together."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    orders = list(itertools.permutations(fns))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in orders[r % len(orders)]:
            if sync is not None:
                sync()
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _shipped_one(name: str, precision: str, rank: int, world: int, stage: int, batch: int, reps: int,
                 other_json: Path, warmup: int = 2) -> dict[str, Any] | None:
    """One model and precision on this rank: the shipped engine, the engine with the other AdamW, the peer.

    Besides each whole step, its optimizer phase is timed: the engine's ``engine.step()`` (clipping, the bf16 /
    ZeRO wrapper's copies and collectives, AdamW) and the peer's clipping, ``opt.step()`` and ``zero_grad``; the
    AdamW before/after shows there without the noise of the forward and backward passes around it. The device
    is the engine's (a GPU where DeepSpeed finds one): the peer and its batch go there too, the batch moved in
    every step as the Trainer moves it, and a GPU is synchronised before each clock reading."""
    import torch.distributed as dist

    from vitpose.build import build_model_from_config
    from vitpose.losses import keypoint_mse
    from vitpose.train.loop import Trainer

    t0, load_start = time.perf_counter(), load_average()
    trainers = {"shipped": Trainer(shipped_config(name, precision, batch, SHIPPED_DS / f"zero{stage}.json"),
                                   NullSession(rank, world)),
                "other": Trainer(shipped_config(name, precision, batch, other_json), NullSession(rank, world))}
    premade = next(iter(trainers["shipped"].train_loader))  # a real batch of this rank, made beforehand
    losses: dict[str, float] = {}
    opt_times: dict[str, list[float]] = {"shipped": [], "other": [], "peer": []}
    device = trainers["shipped"].device
    on_gpu = torch.device(device).type == "cuda"

    def synced() -> float:  # a clock reading after the device's queued work is done
        if on_gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def engine_step(key: str) -> Callable[[], None]:
        trainer = trainers[key]
        trainer.train_loader, trainer.steps_per_epoch = [premade], 1
        real_step = trainer.engine.step

        def timed_step(*args: Any, **kwargs: Any) -> Any:  # the engine's own step, timed (an instance attribute)
            t = synced()
            out = real_step(*args, **kwargs)
            opt_times[key].append(synced() - t)
            return out
        trainer.engine.step = timed_step

        def run() -> None:  # the real loop: lr, device/dtype, loss, finiteness check, backward, engine.step
            losses[key] = trainer.train_epoch(0, 1).loss
            synced()
        return run

    cfg, fused = trainers["shipped"].cfg, deepspeed_fused(trainers["shipped"])
    ours = build_model_from_config(cfg)  # the engines' initial weights (same seed)
    peer = peer_model(ours)
    copy_into_peer(ours, peer)
    del ours
    peer.to(device).train()
    net = nn.parallel.DistributedDataParallel(peer) if world > 1 else peer
    opt = torch.optim.AdamW(peer.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay, fused=fused or None)
    clip, bf16 = cfg.train.grad_clip, precision == "bf16"

    def peer_step() -> None:
        x, target, weight = (premade[k].to(device, non_blocking=True) for k in ("image", "target", "target_weight"))
        with autocast(bf16, torch.device(device).type):
            out = heatmaps(net, x)
        loss = keypoint_mse(out, target, weight)
        loss.backward()
        t = synced()
        if clip:
            torch.nn.utils.clip_grad_norm_(peer.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt_times["peer"].append(synced() - t)
        losses["peer"] = float(loss.detach())

    fns = {"shipped": engine_step("shipped"), "other": engine_step("other"), "peer": peer_step}
    times = interleave_steps(fns, reps, sync=dist.barrier if world > 1 else None, warmup=warmup)
    times.update({f"{k} opt": v[-reps:] for k, v in opt_times.items()})  # the timed repetitions' optimizer phases
    if world > 1:  # a step lasts until its slowest rank is done
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, times)
        times = {k: [max(t[k][i] for t in everyone) for i in range(reps)] for k in times}
    labels = {k: engine_label(t) for k, t in trainers.items()}
    backend = "nccl" if on_gpu else "gloo"
    labels["peer"] = (f"peer: plain loop{f', DDP ({backend})' if world > 1 else ''}, torch AdamW "
                      f"{'fused' if fused else 'for-loop'}, clip {clip:g}, "
                      f"{'autocast bf16, fp32 weights' if bf16 else 'fp32'}")
    result = {"model": MODELS[name], "precision": precision, "ranks": world, "stage": stage, "batch": batch,
              "threads": torch.get_num_threads(), "device": str(device), "labels": labels, "times": times,
              "fused": {k: deepspeed_fused(t) for k, t in trainers.items()}, "steps": warmup + reps, "losses": losses,
              "load average": f"{load_start} at start, {load_average()} at end",
              "seconds": time.perf_counter() - t0}
    fns.clear(), trainers.clear()  # the engines and the peer go with the closures
    gc.collect()
    return result if rank == 0 else None


def _shipped_rank(rank: int, world: int, port: int, job: dict[str, Any], queue: Any) -> None:
    try:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations, per step
        set_dist_env(rank, world, port)
        torch.set_num_threads(job["threads"])
        if job["retain"]:
            retain_freed_memory()
        for name, precision in job["runs"]:
            result = _shipped_one(name, precision, rank, world, job["stage"], job["batch"], job["reps"],
                                  Path(job["other_json"]), job.get("warmup", 2))
            if result is not None:
                queue.put(result)
        if rank == 0:
            queue.put({"done": True})
    except BaseException as err:  # the parent must not wait forever
        queue.put({"error": f"rank {rank}: {type(err).__name__}: {err}"})
        raise
    finally:
        queue.close()
        queue.join_thread()  # what was put is in the pipe before the process goes
    # Leave without the interpreter's teardown: gloo/DeepSpeed threads still alive at exit can abort the process.
    sys.stdout.flush()
    os._exit(0)


def pair_rows(result: dict[str, Any]) -> list[PairRow]:
    """The two rows of one result: shipped / peer (with its target) and fused / for-loop (the AdamW before/after)."""
    common = dict(model=result["model"], precision=result["precision"], ranks=result["ranks"], batch=result["batch"],
                  stage=result["stage"])
    t, labels, losses = result["times"], result["labels"], result["losses"]
    fused_key, loop_key = ("shipped", "other") if result["fused"]["shipped"] else ("other", "shipped")
    diff = abs(losses[fused_key] - losses[loop_key]) / max(abs(losses[loop_key]), 1e-12)
    return [
        PairRow(kind="shipped / peer", a_label=labels["shipped"], b_label=labels["peer"], a=t["shipped"],
                b=t["peer"], target=SHIPPED_TARGETS.get((result["ranks"], result["stage"], result["precision"])),
                a_opt=t.get("shipped opt", []), b_opt=t.get("peer opt", []), **common),
        PairRow(kind="fused / for-loop", a_label=labels[fused_key], b_label=labels[loop_key], a=t[fused_key],
                b=t[loop_key], note=f"loss after {result['steps']} steps: fused {losses[fused_key]:.6g}, for-loop "
                                    f"{losses[loop_key]:.6g} (rel. diff {diff:.1e})",
                a_opt=t.get(f"{fused_key} opt", []), b_opt=t.get(f"{loop_key} opt", []), **common),
    ]


def shipped_rows(names: list[str], precisions: list[str], ranks: list[int], batch: int, reps: int, threads: int,
                 retain: bool, say: Callable[[str], None], warmup: int = 2,
                 stages: list[int] = ()) -> tuple[list[PairRow], list[dict[str, Any]]]:
    """The shipped training step (the real Trainer's loop over a DeepSpeed engine) against the peer's plain
    torch loop, and against itself with the other AdamW; each rank count and ZeRO stage (``stages``; default
    the rank count's ``SHIPPED_STAGE``) in its own fresh processes."""
    import tempfile
    from queue import Empty

    import torch.multiprocessing as mp

    from vitpose.build import ensure_data

    ensure_data(shipped_config(names[0], precisions[0], batch, SHIPPED_DS / "zero0.json"))  # not timed
    rows: list[PairRow] = []
    results: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="shipped-step-") as tmp:
        for world, stage in [(w, st) for w in ranks for st in (stages or [SHIPPED_STAGE[w]])]:
            job = {"runs": [(n, p) for n in names for p in precisions], "stage": stage, "batch": batch, "reps": reps,
                   "threads": max(1, threads // world), "retain": retain, "warmup": warmup,
                   "other_json": str(variant_json(stage, Path(tmp)))}
            queue, port = ctx.Queue(), free_port()
            procs = [ctx.Process(target=_shipped_rank, args=(r, world, port, job, queue)) for r in range(world)]
            for p in procs:
                p.start()
            try:
                while True:
                    try:
                        result = queue.get(timeout=10)
                    except Empty:
                        dead = [p.exitcode for p in procs if not p.is_alive()]
                        if dead:
                            raise RuntimeError(f"a rank of section 2b ended (exit codes {dead}) before its results "
                                               "came back") from None
                        continue
                    if "error" in result:
                        raise RuntimeError(result["error"])
                    if result.get("done"):
                        break
                    results.append(result)
                    for row in pair_rows(result):
                        rows.append(row)
                        say(f"  {row.model} {row.precision} ZeRO-{row.stage} {row.ranks} rank(s) x batch {row.batch}, {row.kind}: "
                            f"{row.ips('a'):.2f} / {row.ips('b'):.2f} img/s = {row.ratio:.3f}"
                            f"{f' (target {row.target})' if row.target else ''}; optimizer phase "
                            f"{row.opt_s('a'):.3f} / {row.opt_s('b'):.3f} s; {row.note}")
                    say(f"    a: {rows[-2].a_label}\n    b: {rows[-2].b_label}\n    other: {result['labels']['other']}"
                        f"\n    load average {result['load average']}, {result['seconds']:.0f}s")
            finally:
                for p in procs:
                    p.join(timeout=120)
                    if p.is_alive():
                        p.kill()
    return rows, results


def shipped_section(pairs: list[PairRow], results: list[dict[str, Any]]) -> list[str]:
    L = ["## 2b. The shipped training step vs the peer's plain loop", "",
         "Our side is the step a user runs: the real `Trainer.train_epoch` (lr schedule, loss, finiteness check, "
         "`engine.backward`, `engine.step`) over the DeepSpeed engine that `deepspeed.initialize` built from "
         "configs/deepspeed/zero<stage>.json as completed by vitpose/train/deepspeed_config.py (the paper's layer-decayed "
         "groups, clipping 1.0, DeepSpeed's precision handling), fed one pre-made batch of the synthetic set. "
         "ZeRO-0 on one rank, ZeRO-3 on two ranks (gloo, one process each, threads split). The peer is "
         "`VitPoseForPoseEstimation` in a plain torch loop (DDP on two ranks) with the same AdamW class and "
         "clipping, one parameter group, at the closest precision (bf16: autocast over fp32 weights). The engine "
         "with the other AdamW (fused / torch's default for-loop) is timed in the same rotation, so the AdamW "
         "before/after is measured beside it. Three-way interleaved (every order in turn) after warm-up steps; "
         "ratio = a/b in images/s (median of per-repetition ratios); a two-rank step lasts until its slower rank "
         "is done. Optimizer phase: the median seconds of the engine's `engine.step()` (clipping, the wrapper's "
         "copies and collectives, AdamW), the peer's clipping + `opt.step()` + `zero_grad`.", "",
         "| model | precision | ZeRO | ranks x batch | a / b | a img/s | b img/s | a/b | target | optimizer phase a / b (s) "
         "| a | b | note |",
         "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in pairs:
        target = f"{r.target:g}" if r.target else "-"
        L.append(f"| {r.model} | {r.precision} | {r.stage} | {r.ranks} x {r.batch} | {r.kind} | {r.ips('a'):.2f} | "
                 f"{r.ips('b'):.2f} | **{r.ratio:.3f}** | {target} | {r.opt_s('a'):.3f} / {r.opt_s('b'):.3f} | "
                 f"{r.a_label} | {r.b_label} | {r.note} |")
    if results:
        L += ["", "Seconds per step of each repetition, in order (the slower rank's; optimizer phase after the bar):", ""]
        L += [f"- {x['model']} {x['precision']} ZeRO-{x['stage']} {x['ranks']} rank(s): " + "; ".join(
            f"{k} {', '.join(f'{t:.2f}' for t in x['times'][k])}"
            + (f" | {', '.join(f'{t:.3f}' for t in x['times'][f'{k} opt'])}" if f"{k} opt" in x["times"] else "")
            for k in ("shipped", "other", "peer")) for x in results]
        L += ["", "Load average while each ran: " + "; ".join(
            f"{x['model']} {x['precision']} ZeRO-{x['stage']} {x['ranks']} rank(s) on {x.get('device', 'cpu')}: "
            f"{x['load average']} ({x['seconds']:.0f}s)"
            for x in results) + "."]
    return L


# --------------------------------------------------------------------------- 4: bf16 accuracy (AP)
def tiny_config(overrides: list[str]) -> Any:
    from vitpose.config import load_config

    data = CACHE / "synthetic"
    return load_config(TINY_TEACHER, [f"data.root={data}", "data.synthetic.generate=true"] + overrides)


def set_dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(single_process_env(rank, world, port))


def train_ap_model(epochs: int, say: Callable[[str], None]) -> Path:
    """The embedded default teacher trained by the engine (one process, ZeRO-0); cached by model and epochs."""
    m = tiny_config([]).model
    out = CACHE / f"ap-model-{m.preset}-p{m.patch_size or 16}-{epochs}ep"
    weights = out / "model.safetensors"
    if weights.is_file():
        say(f"trained model: cached {weights.relative_to(REPO)}")
        return weights
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    set_dist_env(0, 1, free_port())
    cfg = tiny_config([f"train.epochs={epochs}", f"train.eval_every={epochs}", "deepspeed.zero_stage=0",
                       "data.loader_workers=1"])
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    session = LocalSession(out / "run")
    trainer = Trainer(cfg, session)
    trainer.fit()
    torch.set_num_threads(threads)
    last = session.checkpoints[-1]
    shutil.copy(last / "model.safetensors", weights)
    (out / "train.json").write_text(json.dumps({"config": str(TINY_TEACHER.relative_to(REPO)), "epochs": epochs,
                                                "seconds": time.perf_counter() - t0, "reports": session.reports}))
    shutil.rmtree(out / "run", ignore_errors=True)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    say(f"trained model: {epochs} epochs of {m.preset} in {time.perf_counter() - t0:.0f}s -> {weights.relative_to(REPO)}")
    return weights


def bf16_accuracy(checkpoint: Path | None, epochs: int, say: Callable[[str], None]) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from vitpose.build import build_datasets, ensure_data
    from vitpose.evaluation import CocoKeypointEvaluator, decode_batch_to_predictions
    from vitpose.models import load_model

    path = Path(checkpoint) if checkpoint else train_ap_model(epochs, say)
    model = load_model(path).eval()
    # The val crops follow the model (its input and heatmap sizes).
    cfg = tiny_config([f"model.img_size={list(model.spec.img_size)}", f"model.patch_size={model.spec.patch_size}"])
    ensure_data(cfg)
    _, val = build_datasets(cfg, True)
    loader = DataLoader(val, batch_size=32, num_workers=0)
    result: dict[str, Any] = {"model": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                              "preset": model.spec.to_dict(), "val instances": len(val)}
    for precision in ("fp32", "bf16"):
        preds = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in loader:
                images = batch["image"]
                with autocast(precision == "bf16"):
                    hm, hm_flip = model(images).float(), model(images.flip(3)).float()
                preds.extend(decode_batch_to_predictions(hm, batch, hm_flip, flip_pairs=val.flip_pairs,
                                                         input_size=val.input_size))
        result[f"{precision} seconds"] = time.perf_counter() - t0
        ap = CocoKeypointEvaluator(val.ann_file).evaluate(preds)
        result[precision] = {k: float(v) for k, v in ap.items()}
    with torch.inference_mode():
        images = next(iter(loader))["image"]
        ref = model(images)
        with autocast(True):
            max_diff = float((model(images).float() - ref).abs().max())
        result["max abs heatmap"] = float(ref.abs().max())
    result["bf16 vs fp32 max abs heatmap diff (one batch)"] = max_diff
    result["AP difference (points)"] = 100 * (result["bf16"]["AP"] - result["fp32"]["AP"])
    say(f"AP fp32 {100 * result['fp32']['AP']:.2f}, bf16 {100 * result['bf16']['AP']:.2f} "
        f"(difference {result['AP difference (points)']:+.2f} points)")
    return result


# ----------------------------------------------------------------------- 5: data loader vs tensors
def _loader_rank(rank: int, world: int, port: int, steps: int, reps: int, sets: list[str], queue: Any) -> None:
    try:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations, per step
        set_dist_env(rank, world, port)
        cfg = tiny_config(["train.eval_every=1000", *sets])
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # what Ray gives a worker (OMP_NUM_THREADS)
        from vitpose.train.loop import Trainer

        trainer = Trainer(cfg, NullSession(rank, world))
        steps = min(steps or trainer.steps_per_epoch, trainer.steps_per_epoch)
        real_loader = trainer.train_loader
        trainer.steps_per_epoch = steps
        # Warm-up, untimed: DeepSpeed's buffers, the loader processes (if any) and half the image cache (a
        # rank meets the other half over the next epochs, as in training).
        trainer.train_epoch(0, 1 + reps)
        premade = list(itertools.islice(iter(real_loader), steps))  # the same kind of batches, made beforehand
        times: dict[str, list[float]] = {"loader": [], "tensors": []}
        for r in range(reps):
            order = ("loader", "tensors") if r % 2 == 0 else ("tensors", "loader")
            for kind in order:
                trainer.train_loader = real_loader if kind == "loader" else premade
                stats = trainer.train_epoch(1 + r, 1 + reps)
                times[kind].append(stats.seconds / max(stats.steps, 1))
        if rank == 0:
            queue.put({"steps per epoch": steps, "reps": reps, "batch per worker": cfg.train.batch_size,
                       "workers": world, "loader processes per worker": cfg.data.loader_workers,
                       "image cache MB": cfg.data.image_cache_mb,
                       "zero stage": trainer.stage, "img_size": list(trainer.spec.img_size), **times})
    except BaseException as err:  # the parent must not wait forever
        queue.put({"error": f"rank {rank}: {type(err).__name__}: {err}"})
        raise


def loader_vs_tensors(steps: int, reps: int, say: Callable[[str], None], sets: list[str] = ()) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from vitpose.build import ensure_data

    cfg = tiny_config(list(sets))
    ensure_data(cfg)  # before the workers start, so generating the data is not timed
    world = cfg.ray.num_workers
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_loader_rank, args=(r, world, port, steps, reps, list(sets), queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    if "error" in result:
        raise RuntimeError(result["error"])
    loader, tensors = statistics.median(result["loader"]), statistics.median(result["tensors"])
    paired = statistics.median(a / b for a, b in zip(result["loader"], result["tensors"], strict=True))
    result.update({"loader s/step": loader, "tensors s/step": tensors, "slowdown": paired - 1})
    say(f"tiny teacher, {world} workers: {loader:.3f} s/step with the data loader, {tensors:.3f} s/step with "
        f"pre-made tensors: {100 * result['slowdown']:+.1f}%")
    return result


# -------------------------------------------------------------------------------------------- report
SHIPPED_TARGET_TEXT = """Targets (issue 19): the shipped step (DeepSpeed ZeRO-0 engine, one rank) >= 1.0x the peer's plain
loop in fp32 and >= 1.15x in bf16; ZeRO-3 on two ranks >= 0.9x the peer under DDP on two ranks."""
TARGETS = """Targets (issue 8): ours/peer >= 1.0 on every row at equal precision, >= 1.15 on the training step;
our bf16 inference >= 1.8x our fp32 at batch 32; training-step MFU >= 75% of the fp32 matmul peak; bf16 AP
within 0.5 points of fp32; the data loader slows the tiny teacher's step by <= 10%.
""" + SHIPPED_TARGET_TEXT


def check_targets(rows: list[Row], peaks: dict[str, float], ap: dict[str, Any] | None,
                  loader: dict[str, Any] | None, pairs: list[PairRow] = ()) -> list[tuple[str, str, bool]]:
    out = []
    for r in pairs:
        if r.target is not None:
            out.append((f"{r.model} {r.precision} shipped ZeRO-{r.stage} step on {r.ranks} rank(s) / "
                        f"peer's {'DDP' if r.ranks > 1 else 'plain'} loop >= {r.target:g}", f"{r.ratio:.3f}",
                        r.ratio >= r.target))
    for r in rows:
        need = 1.15 if r.case == "train b16" else 1.0
        out.append((f"{r.model} {r.precision} {r.case}: ours/peer >= {need}", f"{r.ratio:.3f}", r.ratio >= need))
    by = {(r.model, r.precision, r.case): r for r in rows}
    for model in dict.fromkeys(r.model for r in rows):
        f, b = by.get((model, "fp32", "infer b32")), by.get((model, "bf16", "infer b32"))
        if f and b:
            speed = b.ips("ours") / f.ips("ours")
            out.append((f"{model} our bf16 / fp32 inference b32 >= 1.8", f"{speed:.2f}x", speed >= 1.8))
        for precision in ("fp32", "bf16"):
            t = by.get((model, precision, "train b16"))
            if t:
                mfu = t.mfu("ours", peaks["fp32"])
                out.append((f"{model} our {precision} training-step MFU >= 75% of the fp32 peak", f"{100 * mfu:.0f}%",
                            mfu >= 0.75))
    if ap:
        d = ap["AP difference (points)"]
        out.append(("bf16 AP within 0.5 points of fp32", f"{d:+.2f}", abs(d) <= 0.5))
    if loader:
        s = loader["slowdown"]
        out.append(("data loader slows the tiny teacher's step by <= 10%", f"{100 * s:+.1f}%", s <= 0.10))
    return out


def markdown(info: dict[str, Any], peaks: dict[str, Any], diffs: dict[str, dict[str, float]], rows: list[Row],
             ap: dict[str, Any] | None, loader: dict[str, Any] | None, targets: list[tuple[str, str, bool]],
             argv: list[str], seconds: float, profiles: dict[str, dict[str, str]],
             pairs: list[PairRow] = (), shipped: list[dict[str, Any]] = ()) -> str:
    L = ["# Performance: ours vs the transformers VitPose port, and vs the machine", "",
         "Written by `python benchmarks/compare_peer.py " + " ".join(argv) + f"` ({seconds / 60:.1f} min). "
         "Every number below was measured in that one run; see the script's docstring for what each means.", "",
         "## Machine", "", "| | |", "| --- | --- |"]
    L += [f"| {k} | {v} |" for k, v in info.items()]
    L += [f"| matmul peak {p} (2048^3, best of the run) | {peaks[p]:.0f} GFLOP/s (start {peaks[f'{p} start']:.0f}, "
          f"end {peaks[f'{p} end']:.0f}, median beside the rows {peaks[f'{p} beside rows']:.0f}) |"
          for p in ("fp32", "bf16")]
    L += [""]
    L += ["## 1. Same function", "",
          "Our weights copied into `VitPoseForPoseEstimation` (ours built with drop_path_rate=0; BatchNorm "
          "statistics randomised, heatmaps scaled to ~1).", ""]
    if diffs:
        keys = list(next(iter(diffs.values())))
        L += ["| model | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        L += [f"| {m} | " + " | ".join(f"{v:.2e}" for v in d.values()) + " |" for m, d in diffs.items()]
    L += ["", "## 2-3. Speed (images/s, medians) and model-FLOPs utilisation", "",
          "Interleaved A/B. Ratio = ours/peer (median of per-repetition ratios). MFU = analytic FLOPs / time / "
          "matmul peak of the row's precision: against the best peak of the run (fp32 rows: fp32 peak; bf16 rows: "
          "bf16 peak, and in brackets against the fp32 peak), and against the matmul measured beside each "
          "repetition (same load; median). Training step: ours with fused AdamW, peer with torch's default "
          "AdamW; `fwd+bwd` rows: no optimizer step.", "",
          "| model | precision | case | ours img/s | peer img/s | ours/peer | ours MFU | ours MFU (beside) | peer MFU |",
          "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        peak = peaks[r.precision]
        extra = f" ({100 * r.mfu('ours', peaks['fp32']):.0f}% of fp32)" if r.precision == "bf16" else ""
        L.append(f"| {r.model} | {r.precision} | {r.case} | {r.ips('ours'):.2f} | {r.ips('peer'):.2f} | "
                 f"**{r.ratio:.3f}** | {100 * r.mfu('ours', peak):.0f}%{extra} | {100 * r.mfu_adjacent:.0f}% | "
                 f"{100 * r.mfu('peer', peak):.0f}% |")
    if pairs:
        L += [""] + shipped_section(pairs, shipped)
    L += ["", "## 4. bf16 accuracy", ""]
    if ap:
        L += [f"Model: `{ap['model']}` (embed {ap['preset']['embed_dim']}, depth {ap['preset']['depth']}, patch {ap['preset']['patch_size']} at {ap['preset']['img_size']}), {ap['val instances']} synthetic "
              "val instances, flip test on.", "", "| | fp32 | bf16 autocast |", "| --- | ---: | ---: |"]
        for k in ("AP", "AP50", "AP75", "AR"):
            if k in ap["fp32"]:
                L.append(f"| {k} | {100 * ap['fp32'][k]:.2f} | {100 * ap['bf16'][k]:.2f} |")
        L += [f"| eval seconds | {ap['fp32 seconds']:.1f} | {ap['bf16 seconds']:.1f} |", "",
              f"AP difference bf16 - fp32: **{ap['AP difference (points)']:+.2f} points**; max abs heatmap "
              f"difference {ap['bf16 vs fp32 max abs heatmap diff (one batch)']:.2e} (max abs heatmap "
              f"{ap['max abs heatmap']:.2f})."]
    else:
        L.append("Skipped (--skip-ap).")
    L += ["", "## 5. Data loader vs model", ""]
    if loader:
        L += [f"Tiny teacher as configured ({TINY_TEACHER.relative_to(REPO)}): {loader['workers']} training workers "
              f"(1 thread each), {loader['loader processes per worker']} loader processes per worker (0: items "
              f"loaded in the worker's own process), image cache {loader['image cache MB']:g} MB, ZeRO-"
              f"{loader['zero stage']}, batch {loader['batch per worker']} per worker at {loader['img_size']}; "
              f"{loader['reps']} interleaved epochs of {loader['steps per epoch']} steps each way.", "",
              "| feed | s/step (median) | all epochs |", "| --- | ---: | --- |",
              f"| real DataLoader | {loader['loader s/step']:.3f} | {', '.join(f'{t:.3f}' for t in loader['loader'])} |",
              f"| pre-made tensors | {loader['tensors s/step']:.3f} | {', '.join(f'{t:.3f}' for t in loader['tensors'])} |",
              "", f"Slowdown from the loader (median of the per-epoch-pair ratios): **{100 * loader['slowdown']:+.1f}%**."]
    else:
        L.append("Skipped (--skip-loader).")
    L += ["", "## Targets", "", TARGETS, "", "| target | measured | met |", "| --- | ---: | --- |"]
    L += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in targets]
    if profiles:
        L += ["", "## Profiles", "", "torch.profiler, one training step at batch 16 (forward, MSE, backward, AdamW), "
              "operators by self CPU time."]
        for title, tables in profiles.items():
            for who, table in tables.items():
                L += ["", f"{title}, {who}:", "", "```", table.strip(), "```"]
    L += ["", f"Load average at the end: {load_average()}.", ""]
    return "\n".join(L)


def shipped_markdown(info: dict[str, Any], pairs: list[PairRow], shipped: list[dict[str, Any]],
                     targets: list[tuple[str, str, bool]], argv: list[str], seconds: float) -> str:
    """The report of ``--shipped-only``: the machine, section 2b and its targets."""
    L = ["# The shipped training step (DeepSpeed engine) vs the transformers VitPose port", "",
         "Written by `python benchmarks/compare_peer.py " + " ".join(argv) + f"` ({seconds / 60:.1f} min); section "
         "2b of benchmarks/RESULTS.md, measured alone.", "", "## Machine", "", "| | |", "| --- | --- |"]
    L += [f"| {k} | {v} |" for k, v in info.items()]
    L += [""] + shipped_section(pairs, shipped)
    L += ["", "## Targets", "", SHIPPED_TARGET_TEXT, "", "| target | measured | met |", "| --- | ---: | --- |"]
    L += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in targets]
    L += ["", f"Load average at the end: {load_average()}.", ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
                   help="only section 2b, written to benchmarks/shipped_step.md unless --out is given")
    p.add_argument("--shipped-ranks", default="1,2", help="1: ZeRO-0 on one rank; 2: ZeRO-3 on two ranks")
    p.add_argument("--shipped-stages", default="",
                   help="comma list of ZeRO stages to time at every rank count instead (e.g. 0,2,3 on one GPU)")
    p.add_argument("--shipped-precisions", default="fp32,bf16")
    p.add_argument("--shipped-batch", type=int, default=TRAIN_BATCH, help="batch per rank of section 2b")
    p.add_argument("--shipped-reps", type=int, default=0, help="repetitions of section 2b (default --train-reps)")
    p.add_argument("--shipped-warmup", type=int, default=2, help="untimed steps of each contender first")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    stages = [x.strip() for x in a.shipped_stages.split(",") if x.strip()]
    if any(x not in ("0", "1", "2", "3") for x in stages):
        p.error(f"--shipped-stages {a.shipped_stages!r}: ZeRO stages are 0, 1, 2 or 3 (configs/deepspeed/zero<N>.json)")
    argv = sys.argv[1:] if argv is None else argv
    a.out = a.out or REPO / "benchmarks" / ("shipped_step.md" if a.shipped_only else "RESULTS.md")
    models = [m.strip() for m in a.models.split(",") if m.strip() and m.strip() != "none"]
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    retained = False if a.no_retain_memory else retain_freed_memory()

    def say(text: str) -> None:
        print(text, flush=True)

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

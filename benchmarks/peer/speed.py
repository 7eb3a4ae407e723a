"""Sections 2-3 and 6 of ``benchmarks.compare_peer``: inference and the training step of ours and the peer,
interleaved (``benchmarks.harness.interleave``), against this machine's matmul peak; torch.profiler tables."""

from __future__ import annotations

import copy
import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import SpeedRatio, interleave, timed
from benchmarks.peer.common import (
    INFER_BATCHES,
    LR,
    MIN_MEASURE_S,
    MODELS,
    TRAIN_BATCH,
    WD,
    autocast,
    heatmaps,
)
from benchmarks.peer.model import copy_into_peer, make_loud, peer_model, same_function
from vitpose.models import build_model

_MATMUL: dict[tuple[torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Median GFLOP/s of an n^3 matmul (the machine's practical peak for this precision)."""
    if (dtype, n) not in _MATMUL:
        _MATMUL[dtype, n] = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            _MATMUL[dtype, n][0] @ _MATMUL[dtype, n][1]
    a, b = _MATMUL[dtype, n]
    return 2 * n**3 / statistics.median(timed(lambda: a @ b) for _ in range(reps)) / 1e9


@dataclass
class Row(SpeedRatio):
    """One case of ours against the peer; ``ratio``: ours/peer in speed (the peer's seconds / ours), the
    median of the per-repetition ratios (``ratio_stats``: with their spread)."""

    speed_pair: ClassVar[tuple[str, str]] = ("ours", "peer")
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


def interleave_row(row: Row, ours: Callable[[], None], peer: Callable[[], None], reps: int, calls: int) -> None:
    """Ours and the peer in turns (ours, peer, peer, ours, ...), the matmul peak measured before each round;
    each function makes ``calls`` calls (seconds are per call)."""
    dtype = torch.bfloat16 if row.precision == "bf16" else torch.float32
    # Warm-up: allocations, oneDNN primitives, optimizer state (the 2nd training step was still ~1.6x slower
    # than the rest for both: one round left outliers in the median).
    times = interleave({"ours": ours, "peer": peer}, reps, warmup=2,
                       before_round=lambda r: row.peak.append(matmul_gflops(dtype, reps=3)))
    row.ours += [t / calls for t in times["ours"]]
    row.peer += [t / calls for t in times["peer"]]


def calls_for(fn_one: Callable[[], None]) -> int:
    return max(1, round(MIN_MEASURE_S / max(timed(fn_one), 1e-4)))


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
            interleave_row(row, infer_fn(ours, x, bf16, calls), infer_fn(peer, x, bf16, calls), reps, calls)
            rows.append(row)
            say(f"  {precision} {row.case}: ours {row.ips('ours'):.2f} img/s, peer {row.ips('peer'):.2f}, "
                f"ours/peer {row.ratio:.3f} ({row.ratio_stats['min']:.3f}-{row.ratio_stats['max']:.3f})")
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
            interleave_row(row, train_fn(o_train, o_opt, x, y, bf16), train_fn(p_train, p_opt, x, y, bf16), train_reps, 1)
            rows.append(row)
            say(f"  {precision} {row.case}: ours {row.ips('ours'):.2f} img/s, peer {row.ips('peer'):.2f}, "
                f"ours/peer {row.ratio:.3f} ({row.ratio_stats['min']:.3f}-{row.ratio_stats['max']:.3f})")
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


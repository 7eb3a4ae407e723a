"""``train.precision: auto``: the faster of bf16 and fp32 on the machine that trains, decided when a run starts.

On GPUs bf16 where the card has it. On CPUs the answer depends on the chip, not on a flag it reports: on a Xeon
with AMX a bf16 matmul ran at 900-1,470 GFLOP/s per thread, on an AMD EPYC with AVX-512 bf16 the demo teacher
trained 1.2x faster in bf16 than in fp32, and on a Xeon that reports AVX-512 bf16 but no AMX a bf16 matmul ran
at 0.6x fp32's (68 against 118 GFLOP/s) and the teacher's step took 1.24x as long. So the CPU case is measured:
one matmul of each precision on the worker's own threads, bf16 only when clearly faster.
Rank 0 decides and the other ranks take its answer, so every rank trains in the same precision; a run that
resumes keeps the precision its checkpoint was trained in rather than timing again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

CHOICES = ("fp32", "bf16")
# bf16 rounds weights' updates to 8 bits of mantissa: only worth it when it buys a clear speed-up.
BF16_MARGIN = 1.25
_SIZE, _REPS = 512, 4


def matmul_rate(dtype: torch.dtype, size: int = _SIZE, reps: int = _REPS) -> float:
    """GFLOP/s of a ``size``-cube matmul in ``dtype`` on this process's CPU threads (best of ``reps``)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # the first call picks and primes the kernel
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def fastest_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``device``: bf16 or fp32."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 is slower than fp32
        return ("bf16", "the GPU has bf16") if ok else ("fp32", "the GPU has no bf16")
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    pick = "bf16" if bf16 >= BF16_MARGIN * fp32 else "fp32"
    return pick, f"matmul {bf16:.0f} GFLOP/s in bf16, {fp32:.0f} in fp32 on this CPU"


def resolve_precision(requested: str, device: torch.device, world: int,
                      resumed: Callable[[], str | None] = lambda: None) -> tuple[str, str | None]:
    """(the precision to train in, why when it was chosen here): ``requested`` unless it is ``auto``; for
    ``auto`` the precision of the checkpoint the run resumes from (``resumed()``), else the faster one here."""
    if requested != "auto":
        return requested, None
    earlier = resumed()
    if earlier in CHOICES:  # picked when the run started: a restart keeps it (a checkpoint loads in its own)
        pick, why = earlier, "the checkpoint this run resumes from was trained in it"
    else:
        pick, why = fastest_precision(device)
    if dist.is_initialized() and world > 1:
        choice = [CHOICES.index(pick)]
        dist.broadcast_object_list(choice, src=0)
        if CHOICES[choice[0]] != pick:
            why = f"rank 0's choice (here: {pick}, {why})"
        pick = CHOICES[choice[0]]
    return pick, why


def with_concrete_precision(cfg, world: int, resumed: Callable[[], str | None]):
    """(``cfg`` with ``train.precision`` made concrete on this worker, the console line saying why, or None);
    ``resumed()``: the precision recorded in the checkpoint the run will resume from, if any."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pick, why = resolve_precision(cfg.train.precision, device, world, resumed)
    if why is None:
        return cfg, None
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": pick})})
    return cfg, f"train.precision=auto: {pick} ({why})"

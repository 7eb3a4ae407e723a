"""ZeRO-3 in fp32 without a second fp32 copy of the weights.

DeepSpeed's stage-3 optimizer keeps a flat fp32 "master" partition of the weights for the optimizer to update,
beside the partition the model computes with, and copies the first into the second after every step. When the
model's partition is itself fp32 on the optimizer's device, ``_create_fp32_partitions`` means to use it as the
master ("we don't need another copy of the weights", DeepSpeed PR 7651), but it tests
``partition.device == self.device`` where ``self.device`` is the *string* that
``get_accelerator().current_device_name()`` returns ('cpu', 'cuda:0'), and a ``torch.device`` never equals a
string, so it clones: 4 bytes per parameter / N on every rank that fp32 training does not need (ViTPose-L, 2
ranks: 0.58 GiB of stage 3's 3.46).

``shared_fp32_master(ds_config)`` wraps ``deepspeed.initialize``: for the stage-3 optimizers built inside it,
``self.device`` is a ``torch.device`` while that one method runs, so DeepSpeed's own branch aliases the two.
What follows is DeepSpeed's code as it stands for that branch: the optimizer updates the partition in place and
the copy back after the step (``_reassign_or_swap_out_partitioned_parameters``) and on checkpoint load is a copy
onto itself; the values are the same bits (tests/test_zero_memory.py: weights and losses over several steps and
a resume from a checkpoint, with and without). It applies only where that branch is valid: ZeRO stage 3, fp32
(neither ``bf16`` nor ``fp16`` enabled: their partitions are 16-bit and need the master), no optimizer or
parameter offload, and the DeepSpeed versions it was checked on (pyproject.toml allows only those); on another
version it leaves DeepSpeed alone and says so once, on the console (rank 0), since the run then needs more
memory than the one measured. ``VITPOSE_ZERO3_FP32_MASTER=separate`` turns it off (to measure or compare).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Widen with pyproject.toml's deepspeed range, after tests/test_zero_memory.py passes on the new version.
CHECKED_DEEPSPEED = ("0.19.8",)
ENV = "VITPOSE_ZERO3_FP32_MASTER"


@dataclass
class MasterSharing:
    """What ``shared_fp32_master`` did: ``applied`` is True when it patched DeepSpeed for the block;
    ``skipped`` says why not; ``shared``/``separate`` count the sub-groups DeepSpeed aliased or cloned."""

    applied: bool = False
    skipped: str = ""
    shared: int = 0
    separate: int = 0


def why_not_shared(ds_config: dict[str, Any]) -> str:
    """Empty when the fp32 master may share the parameter partition under this config; else the reason."""
    import deepspeed

    zero = ds_config.get("zero_optimization", {}) or {}
    if int(zero.get("stage", 0)) != 3:
        return "not ZeRO stage 3"
    for low in ("bf16", "fp16"):
        if (ds_config.get(low) or {}).get("enabled"):
            return f"{low} training keeps its fp32 master"
    for key in ("offload_optimizer", "offload_param"):
        if str((zero.get(key) or {}).get("device", "none")) != "none":
            return f"{key} is set"
    if os.environ.get(ENV, "").strip().lower() == "separate":
        return f"{ENV}=separate"
    if deepspeed.__version__ not in CHECKED_DEEPSPEED:
        return (f"DeepSpeed {deepspeed.__version__} is not one it was checked on ({', '.join(CHECKED_DEEPSPEED)}); "
                "ZeRO-3 fp32 keeps DeepSpeed's separate fp32 master copy (4 bytes per parameter / ranks more "
                "per rank) until vitpose/train/zero_memory.py is rechecked on it")
    return ""


_active = False
_told = False  # the console heard about an unchecked DeepSpeed in this process


def _tell_once(text: str) -> None:
    """``text`` as a console warning, once per process and on rank 0 only (every rank builds an optimizer)."""
    global _told
    import torch.distributed as dist

    if _told or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _told = True
    from vitpose.run.console import say

    say(f"warning: {text}")


@contextmanager
def shared_fp32_master(ds_config: dict[str, Any]) -> Iterator[MasterSharing]:
    """Around ``deepspeed.initialize``: build ZeRO-3 fp32 optimizers whose fp32 master is the parameter partition."""
    global _active
    result = MasterSharing()
    result.skipped = why_not_shared(ds_config)
    if result.skipped.startswith("DeepSpeed "):
        warnings.warn(result.skipped, RuntimeWarning, stacklevel=3)
        _tell_once(result.skipped)
    if result.skipped or _active:  # nested: the outer block has patched already
        result.skipped = result.skipped or "already inside shared_fp32_master"
        yield result
        return

    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3.__dict__["_create_fp32_partitions"]

    def create_fp32_partitions(self: Any) -> None:
        device = self.device
        self.device = torch.device(device)  # what the alias test compares a tensor's device with
        try:
            original(self)
        finally:
            self.device = device
        for lp, master in zip(self.fp16_partitioned_groups_flat, self.fp32_partitioned_groups_flat, strict=True):
            if lp is not None and master is lp:
                result.shared += 1
            else:
                result.separate += 1

    Stage3._create_fp32_partitions = create_fp32_partitions
    _active, result.applied = True, True
    try:
        yield result
    finally:
        Stage3._create_fp32_partitions = original
        _active = False

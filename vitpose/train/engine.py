"""The DeepSpeed engine of one training worker, and every patch we apply to DeepSpeed, in one place:
layer-wise lr decay groups of the trainable parameters; ZeRO-3 fp32 sharing the optimizer's master copy with
the model's partition (``zero_memory``); DeepSpeed's own checkpoint files read without unpickling code
(``run_folder``); a lone stage-0 rank that does not all-reduce its gradients with itself (``lone_rank``); its
process-group layer without an op training never calls (``init_comm``); and quiet about the deprecated torch
collectives it calls (``quiet_deprecated_collectives``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from vitpose.config import TrainingConfig
from vitpose.train.lone_rank import skip_lone_allreduce
from vitpose.train.run_folder import load_deepspeed_files_as_weights_only
from vitpose.train.zero_memory import shared_fp32_master


def make_engine(model: torch.nn.Module, cfg: TrainingConfig,
                ds_config: dict[str, Any]) -> tuple[Any, Any, dict[str, int]]:
    """(engine, optimizer, what the optimizer holds) of ``model`` under ``ds_config`` (completed from ``cfg``):
    ``optimizer.params`` its parameters, ``optimizer.token_params`` those of the knowledge tokens."""
    import deepspeed

    from vitpose.models import param_groups_layer_decay

    layer_decay = cfg.model.layer_decay if cfg.model.layer_decay is not None else model.spec.layer_decay_rate
    groups = param_groups_layer_decay(model, cfg.train.lr, cfg.train.weight_decay, layer_decay)
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]  # frozen parts: not optimised
    with shared_fp32_master(ds_config):  # ZeRO-3 fp32: the optimizer updates the partition, no copy
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    load_deepspeed_files_as_weights_only(engine)
    skip_lone_allreduce(engine)
    return engine, optimizer, optimized_counts(model, groups)


# DeepSpeed's CPU shared-memory all-reduce (deepspeed.ops.op_builder.cpu.comm.ShareMemCommBuilder.NAME)
SHM_COMM_OP = "deepspeed_shm_comm"


def init_comm() -> None:
    """DeepSpeed's comm layer over the process group (Ray Train's, or one it makes from the environment).

    On a CPU DeepSpeed would first compile its shared-memory all-reduce with g++, in every Python environment
    once (~30 s on 2 cores, the other ranks waiting on its lock: half a minute of a newcomer's first demo, and
    again after each new venv path). Only DeepSpeed-inference's all-reduce calls it; training's collectives go
    through torch.distributed, so it is marked unbuildable, as DeepSpeed marks it off Linux. (On a GPU DeepSpeed
    never builds it, and reading its table of buildable ops would probe every op's compiler for nothing.)"""
    import deepspeed
    import deepspeed.ops

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


# DeepSpeed's ZeRO calls these; torch 2.14 deprecates them with a FutureWarning on every call.
DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def quiet_deprecated_collectives() -> None:
    """Ignore torch's deprecation warning for the collectives DeepSpeed calls (from the ZeRO-3 model build on).
    Python shows a warning once per place unless its filters change, and something in a step changes them: in
    the demo teacher's Ray workers it was written about twice per rank and step, and carried by Ray's log monitor
    to the driver's log (2,249 times in 4 epochs): work and noise on every step, about code that is not ours."""
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)


def optimized_counts(model: torch.nn.Module, groups: list[dict[str, Any]]) -> dict[str, int]:
    held = {id(p): p for g in groups for p in g["params"]}
    tokens = getattr(getattr(model, "backbone", None), "knowledge_tokens", None)
    in_tokens = {id(p) for p in tokens.parameters()} if tokens is not None else set()
    return {"optimizer.params": sum(_numel(p) for p in held.values()),
            "optimizer.token_params": sum(_numel(p) for i, p in held.items() if i in in_tokens)}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions a parameter; ds_numel is its whole size

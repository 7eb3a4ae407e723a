"""The DeepSpeed engine of one training worker, and every patch we apply to DeepSpeed, in one place:
layer-wise lr decay groups of the trainable parameters; ZeRO-3 fp32 sharing the optimizer's master copy with
the model's partition (``zero_memory``); DeepSpeed's own checkpoint files read without unpickling code
(``run_folder``); a lone stage-0 rank that does not all-reduce its gradients with itself (``lone_rank``)."""

from __future__ import annotations

from typing import Any

import torch

from vitpose.config import TrainingConfig
from vitpose.train.lone_rank import skip_lone_allreduce
from vitpose.train.run_folder import load_deepspeed_files_as_weights_only
from vitpose.train.zero_memory import shared_fp32_master


def make_engine(model: torch.nn.Module, cfg: TrainingConfig, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """(engine, optimizer) of ``model`` under ``ds_config`` (completed from ``cfg`` already)."""
    import deepspeed

    from vitpose.models import param_groups_layer_decay

    layer_decay = cfg.model.layer_decay if cfg.model.layer_decay is not None else model.spec.layer_decay_rate
    groups = param_groups_layer_decay(model, cfg.train.lr, cfg.train.weight_decay, layer_decay)
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]  # frozen parts: not optimised
    with shared_fp32_master(ds_config):  # ZeRO-3 fp32: the optimizer updates the partition, no copy
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    load_deepspeed_files_as_weights_only(engine)
    skip_lone_allreduce(engine)
    return engine, optimizer

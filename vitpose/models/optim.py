"""Optimizer parameter groups with ViTPose's layer-wise learning-rate decay.

Owns the mapping parameter -> (layer id, lr scale, weight decay) of the official recipe:
scale = rate ** (depth + 1 - layer_id), with patch_embed/pos_embed at id 0, block i at id i + 1 and
everything else (last_norm, decoder, knowledge tokens) at id depth + 1, i.e. scale 1; no weight decay on
1-D parameters, pos_embed and the knowledge tokens.

Written here rather than through `timm.optim.param_groups_layer_decay` because that one needs a
`group_matcher` to place these ids, returns neither group names nor a starting `lr`, and its id for
unmatched parameters depends on the matcher's ordinals; twenty explicit lines are easier to audit.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter name of ViTPose (official mmpose rule)."""
    if name == "backbone.pos_embed" or name.startswith("backbone.patch_embed."):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def param_groups_layer_decay(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (layer id, decay / no decay), trainable parameters only.

    Each group has 'params', 'names' (parameter names), 'name', 'layer_id', 'lr_scale', 'lr' (= lr * lr_scale)
    and 'weight_decay'. (Not torch's 'param_names' key: torch checks it against
    'params', which DeepSpeed replaces with flat partitions.)
    `layer_decay` defaults to the model's spec.layer_decay_rate. A scheduler that sets a common lr must
    multiply by each group's 'lr_scale' (DeepSpeed's built-in schedulers do not).
    """
    spec = getattr(model, "spec", None)
    if layer_decay is None:
        if spec is None:
            raise ValueError("layer_decay is required for a model without a ViTPose spec")
        layer_decay = spec.layer_decay_rate
    depth = len(model.backbone.blocks)
    no_wd_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else {"backbone.pos_embed"}

    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen (e.g. a teacher's knowledge tokens): not optimised at all
        lid = layer_id(name, depth)
        # Under deepspeed.zero.Init a parameter is an empty placeholder; its real shape is ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        no_wd = ndim <= 1 or name in no_wd_names
        key = f"layer_{lid}_{'no_decay' if no_wd else 'decay'}"
        if key not in groups:
            scale = layer_decay ** (depth + 1 - lid)
            groups[key] = {
                "name": key,
                "layer_id": lid,
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": 0.0 if no_wd else weight_decay,
                "params": [],
                "names": [],
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["layer_id"], g["weight_decay"] == 0.0))

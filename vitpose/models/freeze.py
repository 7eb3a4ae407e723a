"""Partial fine-tuning (paper §4, "partial finetuning"): freeze the attention, the MLP, or both, in chosen blocks.

Owns: `freeze`, which sets ``requires_grad=False`` on the chosen parameters and returns a `FreezeReport`, and
`frozen_parameter_names`. A frozen parameter gets no gradient, so it is in no optimizer group
(`param_groups_layer_decay` skips it) and never moves. Each sub-layer is frozen with its pre-norm, as the official
ViTPose code does (``freeze_attn``: norm1 + attn; ``freeze_ffn``: norm2 + mlp): the norm's affine belongs to the
sub-layer it feeds. The embedding (patch conv + position embedding) is a separate switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

Blocks = Sequence[int] | Literal["all"]
_PARTS = {"attention": ("norm1", "attn"), "mlp": ("norm2", "mlp")}


@dataclass
class FreezeReport:
    """What `freeze` froze: parameter names and element count, and the blocks of each part."""

    names: list[str] = field(default_factory=list)
    num_params: int = 0
    blocks: dict[str, list[int]] = field(default_factory=dict)
    embed: bool = False

    def summary(self) -> str:
        parts = [f"{part} in blocks {_ranges(b)}" for part, b in self.blocks.items() if b]
        if self.embed:
            parts.append("the patch and position embeddings")
        if not parts:
            return "frozen: nothing"
        return f"frozen: {'; '.join(parts)} ({len(self.names)} tensors, {self.num_params / 1e6:.2f} M parameters)"


def _ranges(blocks: list[int]) -> str:
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _block_ids(value: Blocks, depth: int, key: str) -> list[int]:
    if value == "all":
        return list(range(depth))
    ids = sorted({int(b) for b in value})
    bad = [b for b in ids if not 0 <= b < depth]
    if bad:
        raise ValueError(f"model.freeze.{key}: blocks {bad} do not exist; this backbone has blocks 0-{depth - 1} "
                         "(or give \"all\")")
    return ids


def freeze(model: nn.Module, attention: Blocks = (), mlp: Blocks = (), embed: bool = False) -> FreezeReport:
    """Freeze the attention (norm1 + attn) and/or MLP (norm2 + mlp) of the given backbone blocks, and the
    embeddings if `embed`. Blocks are indices or "all". Call before building the optimizer."""
    backbone = model.backbone
    depth = len(backbone.blocks)
    report = FreezeReport(embed=embed)
    chosen: list[nn.Module | nn.Parameter] = []
    for part, value in (("attention", attention), ("mlp", mlp)):
        report.blocks[part] = _block_ids(value, depth, part)
        chosen += [getattr(backbone.blocks[b], m) for b in report.blocks[part] for m in _PARTS[part]]
    if embed:
        chosen += [backbone.patch_embed, backbone.pos_embed]
    frozen_ids = set()
    for item in chosen:
        for p in [item] if isinstance(item, nn.Parameter) else item.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
    for name, p in model.named_parameters():
        if id(p) in frozen_ids:
            report.names.append(name)
            # Under deepspeed.zero.Init a parameter is an empty placeholder; its real size is ds_numel.
            report.num_params += int(getattr(p, "ds_numel", p.numel()))
    return report


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Every parameter that does not train (frozen blocks, a student's fixed knowledge tokens): for the run's log."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]

"""ViTPose+ multi-dataset models: the mixture-of-experts MLP, per-dataset heads, and single-dataset export.

Layout (the released ViTPose+ files, mmpose and transformers alike): each block's MLP is ``fc1`` -> GELU ->
``fc2`` for the shared first ``dim - part_features`` outputs, concatenated with ``experts[i]`` for the last
``part_features``, where ``i`` is the sample's dataset. With one expert joined onto ``fc2`` (rows appended) the
MLP is a plain one: that is ``multi.export_dataset``. The heads follow the official ViTPose+ names: the primary
(first) dataset's head is ``keypoint_head``, dataset ``d >= 1``'s is ``associate_keypoint_heads.{d - 1}``.

``ModelSpec.datasets`` lists (name, keypoint count) per dataset, in order; ``ModelSpec.moe_part_features > 0``
switches the expert MLP on, with one expert per dataset (``len(datasets)``, at least one). ``ViTPose.forward``
takes ``dataset_index``: None or an int runs the whole batch through that dataset's expert and head (None is
the primary, as transformers' default index 0); a (B,) tensor routes each sample through its own expert and
returns one heatmap tensor per dataset (the samples of that dataset, in batch order): what training uses.
"""

from __future__ import annotations

import torch
import torch.nn as nn

HEAD = "keypoint_head."
# ViTPose+'s datasets, in the order of its experts and transformers' `dataset_index`; the names an official
# ViTPose+ file's datasets get when its spec is inferred (it stores none).
VITPOSE_PLUS_EXPERTS = ("coco", "aic", "mpii", "ap10k", "apt36k", "coco_wholebody")
ASSOCIATE = "associate_keypoint_heads."


class MoeMlp(nn.Module):
    """fc1 -> GELU (exact) -> cat(fc2(h), experts[dataset](h)); the names of ViTPose+'s ``MoEMlp``."""

    def __init__(self, dim: int, hidden: int, num_experts: int, part_features: int) -> None:
        super().__init__()
        if not 0 < part_features < dim:
            raise ValueError(f"moe part_features must be in (0, {dim}) for width {dim}, got {part_features}")
        self.part_features = part_features
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim - part_features)
        self.experts = nn.ModuleList([nn.Linear(hidden, part_features) for _ in range(max(num_experts, 1))])

    def forward(self, x: torch.Tensor, dataset_index: int | torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if dataset_index is None or isinstance(dataset_index, int):
            part = self.experts[dataset_index or 0](h)
        else:  # per sample: each expert on its own rows only (a training batch holds every dataset)
            part = h.new_zeros(*h.shape[:-1], self.part_features)
            for e, expert in enumerate(self.experts):
                rows = (dataset_index == e).nonzero().flatten()
                if rows.numel():
                    part = part.index_copy(0, rows, expert(h.index_select(0, rows)))
        return torch.cat([self.fc2(h), part], dim=-1)


def head_key(dataset: int) -> str:
    """The state-dict prefix of dataset ``dataset``'s head."""
    return HEAD if dataset == 0 else f"{ASSOCIATE}{dataset - 1}."


def route_heads(heads: list[nn.Module], features: torch.Tensor, dataset_index: torch.Tensor) -> list[torch.Tensor]:
    """Each dataset's samples (in batch order) through its own head; an absent dataset gives an empty tensor
    without running its head (a BatchNorm in training mode must not see an empty batch)."""
    out = []
    for d, head in enumerate(heads):
        rows = (dataset_index == d).nonzero().flatten()
        if rows.numel():
            out.append(head(features.index_select(0, rows)))
        else:
            b, _, h, w = features.shape
            out.append(features.new_zeros(0, head.num_keypoints, h * head.upsample, w * head.upsample))
    return out

"""Multi-dataset (ViTPose+) models to single-dataset ones and back from files: ``export_dataset`` (a dataset's
expert joined onto fc2, its head as ``keypoint_head``: a plain ViTPose that loads and serves as any other),
its meta, and fitting a transformers ViTPose+ file's experts and head to a multi-dataset model. The layout
is moe.py's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.nn as nn

from .moe import ASSOCIATE, HEAD, VITPOSE_PLUS_EXPERTS, head_key
from .vitpose import build_model_from_spec


def dataset_number(spec: Any, dataset: int | str) -> int:
    """The index of ``dataset`` (its index or its name) among ``spec.datasets``; ValueError naming them."""
    names = [n for n, _ in spec.datasets] or ["(single dataset)"]
    if isinstance(dataset, str):
        if dataset not in names:
            raise ValueError(f"the model has no dataset {dataset!r}; its datasets: {', '.join(names)}")
        return names.index(dataset)
    if not 0 <= dataset < max(len(spec.datasets), 1):
        raise ValueError(f"dataset index {dataset} out of range; the model's datasets: {', '.join(names)}")
    return int(dataset)


def single_dataset_state(spec: Any, state: dict[str, torch.Tensor], dataset: int | str) -> tuple[Any, dict]:
    """(spec, state dict) of the plain single-dataset model of ``dataset``: its expert joined onto each fc2
    (rows appended, exactly the MoE's function for that dataset), its head as ``keypoint_head``."""
    d = dataset_number(spec, dataset)
    experts = max(len(spec.datasets), 1) if spec.moe_part_features else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith((HEAD, ASSOCIATE)) or ".mlp.experts." in key:
            continue
        if experts and ".mlp.fc2." in key:
            value = torch.cat([value, state[key.replace(".mlp.fc2.", f".mlp.experts.{d}.")]], dim=0)
        out[key] = value
    prefix = head_key(d)
    out.update({HEAD + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    num_keypoints = spec.datasets[d][1] if spec.datasets else spec.num_keypoints
    single = dataclasses.replace(spec, datasets=(), moe_part_features=0, num_keypoints=num_keypoints)
    return single, out


def export_dataset(model: nn.Module, dataset: int | str) -> nn.Module:
    """The single-dataset ``ViTPose`` of ``dataset`` (its expert and head) from a multi-dataset model, in eval
    mode on the CPU: it saves, loads and serves like any single-dataset model."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    spec, sd = single_dataset_state(model.spec, state, dataset)
    single = build_model_from_spec(spec)
    single.load_state_dict(sd, strict=True)
    return single.eval()


def dataset_meta(meta: dict[str, Any], spec: Any, dataset: int | str) -> dict[str, Any]:
    """A multi-dataset model's meta narrowed to ``dataset``: ``keypoints`` becomes that dataset's set (from
    ``keypoints.datasets``, written by the trainer), ``exported_from`` names the dataset."""
    d = dataset_number(spec, dataset)
    out = {k: v for k, v in meta.items() if k != "spec"}
    per = (meta.get("keypoints") or {}).get("datasets")
    if per:
        out["keypoints"] = {k: v for k, v in per[d].items() if k != "name"}
    else:  # the primary's set (or one assumed for it) is not this dataset's: the loader assumes one for its count
        out.pop("keypoints", None)
        out.pop("keypoints_assumed", None)
    out["exported_from"] = {"dataset": spec.datasets[d][0] if spec.datasets else None, "index": d}
    return out


def transformers_experts(sd: dict[str, torch.Tensor], prefix: str, depth: int, num_experts: int) -> dict:
    """A transformers ViTPose+ backbone's fc2 and every expert, in our names, unjoined (``mlp.experts.i``)."""
    out = {}
    for i in range(depth):
        for t in ("weight", "bias"):
            out[f"backbone.blocks.{i}.mlp.fc2.{t}"] = sd[f"{prefix}encoder.layer.{i}.mlp.fc2.{t}"]
            for e in range(num_experts):
                out[f"backbone.blocks.{i}.mlp.experts.{e}.{t}"] = sd[f"{prefix}encoder.layer.{i}.mlp.experts.{e}.{t}"]
    return out


def fit_experts_and_heads(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Fit a converted file's experts and head to a multi-dataset model, in place: experts beyond the model's
    are dropped, the file's one head (a transformers file has one, applied to every dataset_index) is copied
    to every associate head of the same shapes. Returns (dropped keys, notes)."""
    dropped = sorted(k for k in sd if ".mlp.experts." in k and k not in expected)
    for k in dropped:
        del sd[k]
    notes = []
    if dropped:
        notes.append(f"{len(dropped)} expert tensors beyond the model's datasets ignored (dataset i takes expert i)")
    head = {k[len(HEAD):]: v for k, v in sd.items() if k.startswith(HEAD)}
    copied = []
    for d in range(1, 1 + len({k.split(".")[1] for k in expected if k.startswith(ASSOCIATE)})):
        prefix = head_key(d)
        want = {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix)}
        fits = {k for k in want if not k.endswith("num_batches_tracked")} <= set(head) and all(
            head[k].shape == v.shape for k, v in want.items() if k in head)
        if head and fits:
            sd.update({prefix + k: v for k, v in head.items() if k in want})
            copied.append(prefix.rstrip("."))
    if copied:
        notes.append(f"the file's one head also loaded into {', '.join(copied)} (as transformers applies it to "
                     "every dataset_index)")
    return dropped, notes


def infer_multi_fields(sd: dict[str, torch.Tensor], num_keypoints: int) -> dict[str, Any]:
    """ModelSpec fields (datasets, moe_part_features) of an official-layout ViTPose+ state dict, from its keys:
    experts ``backbone.blocks.0.mlp.experts.i`` and heads ``associate_keypoint_heads.j``; {} for a plain one.
    The file names no datasets: they are ViTPose+'s (VITPOSE_PLUS_EXPERTS), in order."""
    experts = [k for k in sd if re.match(r"^backbone\.blocks\.0\.mlp\.experts\.\d+\.weight$", k)]
    heads = [k for k in sd if re.match(r"^associate_keypoint_heads\.\d+\.final_layer\.weight$", k)]
    n = max(len(experts), 1 + len(heads))
    if n == 1:
        return {}
    if experts and len(experts) != 1 + len(heads):
        raise ValueError(f"the file has {len(experts)} experts and {1 + len(heads)} heads: a multi-dataset model "
                         "here has one of each per dataset")
    counts = [num_keypoints] + [sd[f"{ASSOCIATE}{j}.final_layer.weight"].shape[0] for j in range(n - 1)]
    names = VITPOSE_PLUS_EXPERTS[:n] if n <= len(VITPOSE_PLUS_EXPERTS) else [f"dataset{i}" for i in range(n)]
    part = sd[experts[0]].shape[0] if experts else 0
    return {"datasets": tuple(zip(names, counts, strict=True)), "moe_part_features": part}

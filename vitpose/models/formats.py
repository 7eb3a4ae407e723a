"""Pre-trained ViT weights in other projects' layouts, renamed into ours (the official ViTPose names).

Owns: telling the layouts apart from their keys (`detect_format`) and the exact, resize-free conversion of
each into our key names (`convert`): timm ViT state dicts (MAE/DeiT/AugReg, CLIP-style with `norm_pre`,
DINOv2 with LayerScale and register tokens), MAE/DeiT release files (`{"model": <timm state dict>}`) and
transformers VitPose folders (ViTPose+ mixture-of-experts included). What a conversion cannot represent is
either listed as ignored on purpose (class/register tokens, classifier heads, MAE's decoder) or is an error:
nothing is dropped silently. Fitting the result to a model (grids, patch size, head) is `pretrained.py`'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbone import token_grid
from .moe import VITPOSE_PLUS_EXPERTS
from .multi_dataset import transformers_experts
from .weights import CheckpointError

# The layouts we read. "vitpose" (the official mmpose layout, also what we save) is loaded by weights.py.
FORMATS = ("vitpose", "mae", "timm", "timm-dinov2", "timm-clip", "transformers-vitpose")

# ViTPose+ trains one MLP expert per dataset (moe.VITPOSE_PLUS_EXPERTS: transformers' `dataset_index` order).
# A plain model takes one expert (default 0, COCO) joined into its MLP; a multi-dataset model takes them all.

# timm-family keys dropped on purpose: tokens that are not patches (our backbone has none), classifier heads,
# and MAE's pixel decoder. Anything else that does not map is an error.
_TIMM_IGNORED = re.compile(
    r"^(cls_token|reg_token|register_tokens|dist_token|mask_token|decoder_.*|head(_dist)?\..*|fc_norm\..*"
    r"|attn_pool\..*)$"
)
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_TIMM_LAYERSCALE = re.compile(r"^blocks\.(\d+)\.(ls1|ls2)\.gamma$")

_HF_PAIRS = (("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.output.dense", "attn.proj"),
             ("mlp.fc1", "mlp.fc1"))
_HF_HEAD = {"conv": "final_layer", "deconv1": "deconv_layers.0", "batchnorm1": "deconv_layers.1",
            "deconv2": "deconv_layers.3", "batchnorm2": "deconv_layers.4"}


@dataclass
class Converted:
    """A file's weights in our names, before fitting: pos_embed in our (1, 1 + N, C) layout on the file's grid,
    the patch kernel at the file's size, the head (if any) as the file has it."""

    format: str
    tensors: dict[str, torch.Tensor]
    grid: tuple[int, int]  # the file's token grid
    embed_dim: int
    depth: int
    mlp_hidden: int
    num_heads: int | None = None  # known only where a config says it (timm/MAE weights do not)
    pre_norm: bool = False
    head_decoder: str | None = None  # "classic" / "simple" when the file has a pose head
    num_keypoints: int | None = None
    ignored: list[str] = field(default_factory=list)  # the file's keys (its own naming), dropped on purpose
    exact: list[str] = field(default_factory=list)  # our keys set without a file tensor, exactly (zero biases)
    file_names: dict[str, str] = field(default_factory=dict)  # our head key -> the file's, for the report
    notes: list[str] = field(default_factory=list)


def detect_format(obj: Any, config: dict[str, Any] | None = None) -> str:
    """The layout of a loaded file: `obj` is what torch/safetensors returned, `config` a folder's config.json."""
    if config is not None:
        if config.get("model_type") != "vitpose":
            raise CheckpointError(f"config.json has model_type {config.get('model_type')!r}, expected 'vitpose' "
                                  "(a transformers VitPoseForPoseEstimation folder)")
        return "transformers-vitpose"
    if not isinstance(obj, dict):
        raise CheckpointError(f"the file holds a {type(obj).__name__}, expected a dict of tensors")
    if isinstance(obj.get("model"), dict):
        return "mae"
    sd = obj.get("state_dict", obj)
    keys = set(sd) if isinstance(sd, dict) else set()
    if "backbone.patch_embed.proj.weight" in keys:
        return "vitpose"
    if "backbone.embeddings.patch_embeddings.projection.weight" in keys:
        return "transformers-vitpose"
    if "patch_embed.proj.weight" in keys:
        if any(_TIMM_LAYERSCALE.match(k) for k in keys):
            return "timm-dinov2"
        return "timm-clip" if "norm_pre.weight" in keys else "timm"
    first = sorted(keys)[:5]
    raise CheckpointError(
        f"unrecognised weights layout (first keys: {first}); expected an official ViTPose file, a timm ViT "
        "state dict, an MAE/DeiT release file ({'model': ...}) or a transformers VitPose folder"
    )


def _square_grid(n: int) -> tuple[int, int] | None:
    side = round(n**0.5)
    return (side, side) if side * side == n else None


def _patch_pos(pos: torch.Tensor, has_cls: bool) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """The patch part of a timm pos_embed, its (square) grid, and whether it had a class-token slot.

    timm stores (1, 1 + N, C) when the class token takes a position (original ViT, MAE, DINOv2) and (1, N, C)
    when it does not (`no_embed_class`: DeiT-3, DINOv2 with registers); the count tells which.
    """
    n = pos.shape[1]
    if has_cls and (grid := _square_grid(n - 1)) is not None:
        return pos[:, 1:], grid, True
    if (grid := _square_grid(n)) is not None:
        return pos, grid, False
    raise CheckpointError(f"pos_embed has {n} tokens: neither {n} nor {n - 1} is a square grid of patches")


def _ours(key: str) -> str:
    return "backbone." + key


def convert_timm(sd: dict[str, torch.Tensor], fmt: str) -> Converted:
    """A timm ViT state dict (also the inside of an MAE/DeiT release file) in our names, exactly."""
    out: dict[str, torch.Tensor] = {}
    ignored = sorted(k for k in sd if _TIMM_IGNORED.match(k))
    notes: list[str] = []
    exact: list[str] = []
    unmapped = []
    depth = 0
    for key, value in sd.items():
        if key in ignored or _TIMM_LAYERSCALE.match(key) or key == "pos_embed":
            continue
        if m := _TIMM_BLOCK.match(key):
            out[_ours(key)] = value
            depth = max(depth, int(m.group(1)) + 1)
        elif key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm_pre.weight", "norm_pre.bias"):
            out[_ours(key)] = value
        elif key in ("norm.weight", "norm.bias"):
            # timm's final norm is the official ViTPose `last_norm`: the same LayerNorm, another name.
            out[_ours("last_norm." + key.split(".")[1])] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{fmt} file: {len(unmapped)} backbone keys have no place in our plain ViT (e.g. {unmapped[:6]}); "
            "a ViT with other block parts (qk-norm, SwiGLU, relative positions) is not supported"
        )
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError(f"{fmt} file without patch_embed.proj.weight or pos_embed: not a plain ViT")
    patch_pos, grid, had_cls_slot = _patch_pos(sd["pos_embed"], "cls_token" in sd)
    c = patch_pos.shape[2]
    # Our backbone adds pos_embed[:, 1:] + pos_embed[:, :1]. timm adds the class slot's position to the class
    # token only, which we drop; so slot 0 is zero and each patch keeps exactly its own position: our tokens
    # are timm's patch tokens (the official ViTPose code instead adds the class position to every patch).
    out[_ours("pos_embed")] = torch.cat([torch.zeros(1, 1, c, dtype=patch_pos.dtype), patch_pos], dim=1)
    if had_cls_slot:
        ignored.append("pos_embed[:, 0] (the class token's position)")
    notes.append("final norm 'norm.*' loaded as 'backbone.last_norm.*'")
    for i in range(depth):
        # LayerScale multiplies the output of the layer before it: ls1 after attn.proj, ls2 after mlp.fc2.
        for gamma_key, target in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
            gamma = sd.get(f"blocks.{i}.{gamma_key}.gamma")
            if gamma is None:
                continue
            # gamma * (W x + b) == (gamma[:, None] * W) x + gamma * b: LayerScale folds exactly into the layer.
            w, b = _ours(f"blocks.{i}.{target}.weight"), _ours(f"blocks.{i}.{target}.bias")
            out[w] = out[w] * gamma[:, None]
            if b in out:
                out[b] = out[b] * gamma
    if any(_TIMM_LAYERSCALE.match(k) for k in sd):
        notes.append("LayerScale (ls1/ls2.gamma) folded into attn.proj / mlp.fc2 weights and biases")
    # Layers without a bias in the file (CLIP's patch conv, qkv_bias=False) compute the same with a zero bias.
    for key, value in list(out.items()):
        if key.endswith(".weight") and key[: -len("weight")] + "bias" not in out and ("norm" not in key):
            bias = key[: -len("weight")] + "bias"
            out[bias] = torch.zeros(value.shape[0], dtype=value.dtype)
            exact.append(bias)
    if exact:
        notes.append(f"zero biases for {len(exact)} layers without one in the file (the same function): "
                     f"{', '.join(exact[:3])}{' ...' if len(exact) > 3 else ''}")
    fc1 = out.get(_ours("blocks.0.mlp.fc1.weight"))
    return Converted(
        format=fmt, tensors=out, grid=grid, embed_dim=c, depth=depth,
        mlp_hidden=4 * c if fc1 is None else fc1.shape[0], pre_norm="norm_pre.weight" in sd,
        ignored=ignored, exact=exact, notes=notes,
    )


def convert_transformers(sd: dict[str, torch.Tensor], config: dict[str, Any], expert: int | None = 0) -> Converted:
    """A transformers VitPoseForPoseEstimation state dict (+ its config.json) in our names, exactly.

    ViTPose+ (num_experts > 1): each MLP's fc2 is split into shared outputs (fc2) and per-dataset outputs
    (experts.i, the last part_features channels); expert `expert` is concatenated back into one fc2, which is
    the plain MLP the MoE computes when `dataset_index` is `expert`. `expert=None` keeps fc2 and every expert
    as they are (`mlp.experts.i`), for a multi-dataset model with ViTPose+ experts (moe.py).
    """
    bb = config.get("backbone_config") or {}
    depth = int(bb.get("num_hidden_layers", 12))
    num_experts = int(bb.get("num_experts", 1))
    if expert is not None and not 0 <= expert < max(num_experts, 1):
        raise CheckpointError(f"expert {expert} does not exist: the file has {num_experts} experts "
                              f"({', '.join(VITPOSE_PLUS_EXPERTS[:num_experts])})")
    p = "backbone."
    out = {
        _ours("patch_embed.proj.weight"): sd[p + "embeddings.patch_embeddings.projection.weight"],
        _ours("patch_embed.proj.bias"): sd[p + "embeddings.patch_embeddings.projection.bias"],
        # transformers adds position_embeddings[:, 1:] + [:, :1], as we do: copied as is.
        _ours("pos_embed"): sd[p + "embeddings.position_embeddings"],
        _ours("last_norm.weight"): sd[p + "layernorm.weight"],
        _ours("last_norm.bias"): sd[p + "layernorm.bias"],
    }
    used = {p + "embeddings.patch_embeddings.projection.weight", p + "embeddings.patch_embeddings.projection.bias",
            p + "embeddings.position_embeddings", p + "layernorm.weight", p + "layernorm.bias"}
    for i in range(depth):
        src, dst = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            for a, b in _HF_PAIRS:
                out[_ours(f"{dst}{b}.{t}")] = sd[f"{src}{a}.{t}"]
                used.add(f"{src}{a}.{t}")
            qkv = [f"{src}attention.attention.{n}.{t}" for n in ("query", "key", "value")]
            out[_ours(f"{dst}attn.qkv.{t}")] = torch.cat([sd[k] for k in qkv], dim=0)
            joined = num_experts > 1 and expert is not None
            fc2 = [f"{src}mlp.fc2.{t}"] + ([f"{src}mlp.experts.{expert}.{t}"] if joined else [])
            out[_ours(f"{dst}mlp.fc2.{t}")] = torch.cat([sd[k] for k in fc2], dim=0)
            used.update(qkv + fc2)
    if num_experts > 1 and expert is None:
        out.update(transformers_experts(sd, p, depth, num_experts))
        used.update(k for k in sd if ".mlp.experts." in k)
    ignored = sorted(k for k in sd if re.match(rf"^{p}encoder\.layer\.\d+\.mlp\.experts\.\d+\.", k) and k not in used)
    head_decoder = None
    num_keypoints = None
    file_names: dict[str, str] = {}
    for key, value in sd.items():
        if key.startswith("head."):
            module, _, t = key[len("head."):].rpartition(".")
            if module not in _HF_HEAD:
                raise CheckpointError(f"transformers-vitpose file: unknown head key {key}")
            out[f"keypoint_head.{_HF_HEAD[module]}.{t}"] = value
            file_names[f"keypoint_head.{_HF_HEAD[module]}.{t}"] = key
            used.add(key)
    if "head.conv.weight" in sd:
        head_decoder = "classic" if "head.deconv1.weight" in sd else "simple"
        num_keypoints = sd["head.conv.weight"].shape[0]
    unmapped = sorted(set(sd) - used - set(ignored))
    if unmapped:
        raise CheckpointError(f"transformers-vitpose file: {len(unmapped)} keys have no place in our model "
                              f"(e.g. {unmapped[:6]})")
    notes = []
    if num_experts > 1 and expert is None:
        notes.append(f"ViTPose+ MoE: all {num_experts} experts kept (order: {', '.join(VITPOSE_PLUS_EXPERTS)})")
    elif num_experts > 1:
        name = VITPOSE_PLUS_EXPERTS[expert] if expert < len(VITPOSE_PLUS_EXPERTS) else str(expert)
        notes.append(f"ViTPose+ MoE: expert {expert} ({name}) of {num_experts} concatenated into mlp.fc2 "
                     f"(order: {', '.join(VITPOSE_PLUS_EXPERTS)})")
    eps = float(bb.get("layer_norm_eps", 1e-6))
    if eps != 1e-6:
        notes.append(f"the file's LayerNorm eps is {eps:g}, ours 1e-6")
    patch = int(out[_ours("patch_embed.proj.weight")].shape[-1])
    img = bb.get("image_size", [256, 192])
    grid = token_grid((int(img[0]), int(img[1])), patch, 2 * patch // 16)  # transformers pads like ViTPose
    if grid[0] * grid[1] != out[_ours("pos_embed")].shape[1] - 1:
        raise CheckpointError(f"config.json image_size {img} does not give the file's "
                              f"{out[_ours('pos_embed')].shape[1] - 1} position embeddings")
    c = out[_ours("pos_embed")].shape[2]
    return Converted(
        format="transformers-vitpose", tensors=out, grid=grid, embed_dim=c, depth=depth,
        mlp_hidden=out[_ours("blocks.0.mlp.fc1.weight")].shape[0], num_heads=bb.get("num_attention_heads"),
        head_decoder=head_decoder, num_keypoints=num_keypoints, ignored=ignored, notes=notes, file_names=file_names,
    )

"""Starting a model from the pre-trained files people have: `model.init_checkpoint` of any supported format.

Owns: reading a file or transformers folder and dispatching on its format (official ViTPose files go to the
strict `checkpoints.load_checkpoint`; the others are renamed by `formats.convert_*`), fitting the converted
weights to the model (position embeddings resampled to its token grid and patch kernels to its patch size with
timm's own functions, the pose head loaded only if the file has one that fits), one `LoadReport` per load, and
the preset a file suggests. A backbone key that neither loads nor is listed as ignored by its format is an
error: there are no silent partial loads.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_patch_embed

from .backbone import resize_pos_embed
from .formats import Converted, convert_timm, convert_transformers, detect_format
from .multi_dataset import fit_experts_and_heads
from .vitpose import PRESETS, ViTPose, build_model, build_model_from_spec, match_preset
from .weights import (
    SPEC_KEY,
    CheckpointError,
    LoadReport,
    infer_spec_from_state_dict,
    load_checkpoint,
    read_checkpoint,
    torch_load_weights_only,
)

log = logging.getLogger(__name__)

POS_EMBED = "backbone.pos_embed"
PATCH_WEIGHT = "backbone.patch_embed.proj.weight"
HEAD_PREFIX = "keypoint_head."
# The usual head count of a plain ViT of each width (timm, MAE, DINOv2, CLIP): a timm/MAE state dict does not
# say how many heads it was trained with, and a model with other heads computes another function.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


# ---- reading ------------------------------------------------------------------------------------------


def _read_raw(path: Path) -> tuple[str, Any, dict[str, Any] | None]:
    """(format, what the file holds, config.json of a transformers folder)."""
    if path.is_dir():
        cfg_path, weights = path / "config.json", path / "model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise CheckpointError(f"{path} is a folder without config.json and model.safetensors "
                                  "(a transformers VitPose folder has both)")
        config = json.loads(cfg_path.read_text())
        return detect_format(None, config), load_file(str(weights), device="cpu"), config
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                if SPEC_KEY in (f.metadata() or {}):
                    return "vitpose", None, None  # a file we wrote
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for foreign or truncated files
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    else:
        obj = torch_load_weights_only(path)
    return detect_format(obj), obj, None


def read_pretrained(path: str | Path, expert: int | None = 0) -> Converted | None:
    """The file converted to our names, or None for an official ViTPose file (loaded by weights.py)."""
    path = Path(path)
    fmt, obj, config = _read_raw(path)
    if fmt == "vitpose":
        return None
    if fmt == "transformers-vitpose":
        if config is None:
            raise CheckpointError(f"{path} holds transformers VitPose weights without their config.json: give "
                                  "the folder (config.json + model.safetensors)")
        try:
            return convert_transformers(obj, config, expert)
        except KeyError as e:  # a layer config.json promises is not in the weights
            raise CheckpointError(f"{path}: model.safetensors lacks {e} (config.json promises it)") from None
    sd = obj["model"] if fmt == "mae" else obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the values of {bad[:6]} are not tensors")
    return convert_timm(sd, fmt)


def build_overrides(path: str | Path) -> dict[str, Any]:
    """ModelSpec fields a model needs before it can take this file: `pre_norm` for CLIP-style ViTs."""
    conv = read_pretrained(path)
    return {"pre_norm": True} if conv is not None and conv.pre_norm else {}


# ---- fitting ------------------------------------------------------------------------------------------


def _fit_head(conv: Converted, expected: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """The file's head if it has exactly the model's head keys and shapes; otherwise the head stays new."""
    file_head = {k: v for k, v in conv.tensors.items() if k.startswith(HEAD_PREFIX)}
    model_head = {k for k in expected if k.startswith(HEAD_PREFIX) and not k.endswith("num_batches_tracked")}
    fits = set(file_head) - {k for k in file_head if k.endswith("num_batches_tracked")} == model_head and all(
        v.shape == expected[k].shape for k, v in file_head.items() if k in expected)
    if file_head and fits:
        return file_head
    if file_head:
        report.ignored_keys += sorted(conv.file_names.get(k, k) for k in file_head)
        report.notes.append(f"the file's pose head ({conv.head_decoder}, {conv.num_keypoints} keypoints) does not "
                            "fit the model's: the head is new")
    return {}


def _check_heads(conv: Converted, model: ViTPose, report: LoadReport) -> None:
    heads = model.spec.num_heads
    if conv.num_heads is not None and conv.num_heads != heads:
        raise CheckpointError(f"the file's ViT has {conv.num_heads} attention heads, the model {heads}: the same "
                              f"weights would compute another function; build it with num_heads={conv.num_heads}")
    standard = STANDARD_HEADS.get(conv.embed_dim)
    if conv.num_heads is None and standard is not None and standard != heads:
        report.notes.append(f"the file does not say its head count; a standard ViT of width {conv.embed_dim} has "
                            f"{standard}, this model {heads}: if the file is standard, build with "
                            f"num_heads={standard} to keep its function")


def fit_pretrained(conv: Converted, model: ViTPose, path: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The state dict to load into `model` and the report, or CheckpointError naming what does not fit."""
    report = LoadReport(path=path, format=conv.format, preset=match_preset(model.spec),
                        ignored_keys=list(conv.ignored), notes=list(conv.notes))
    _check_heads(conv, model, report)
    expected = model.state_dict()
    sd = {k: v for k, v in conv.tensors.items() if not k.startswith(HEAD_PREFIX)}
    spec = model.spec
    if conv.pre_norm != spec.pre_norm:
        raise CheckpointError(
            f"the file {'has' if conv.pre_norm else 'has no'} norm_pre (a CLIP-style LayerNorm before the first "
            f"block) and the model {'has' if spec.pre_norm else 'has not'}: build it with pre_norm={conv.pre_norm} "
            "(model.init_checkpoint does so by itself)")
    if sd[PATCH_WEIGHT].shape[:2] != expected[PATCH_WEIGHT].shape[:2]:
        raise CheckpointError(f"the file's ViT is {conv.embed_dim} wide, the model {spec.embed_dim}: "
                              f"{suggest_text(conv)}")
    if sd[PATCH_WEIGHT].shape[-2:] != expected[PATCH_WEIGHT].shape[-2:]:
        # FlexiViT's pseudo-inverse resize: the kernel that gives the same projection of the resized patch.
        sd[PATCH_WEIGHT] = resample_patch_embed(sd[PATCH_WEIGHT], list(expected[PATCH_WEIGHT].shape[-2:]))
        report.resized.append(PATCH_WEIGHT)
        report.notes.append(f"patch kernel {conv.tensors[PATCH_WEIGHT].shape[-1]} -> {spec.patch_size}")
    dst = model.backbone.grid_size
    if conv.grid != dst:
        sd[POS_EMBED] = resize_pos_embed(sd[POS_EMBED], conv.grid, dst, antialias=True)
        report.note_pos_embed_resized(conv.grid, dst)
    file_pad = 0 if conv.format != "transformers-vitpose" else 2 * conv.tensors[PATCH_WEIGHT].shape[-1] // 16
    if spec.padding != file_pad:
        report.notes.append(f"our patch conv pads by {spec.padding} px, the file's by {file_pad} (ViTPose's layout)")
    sd.update(_fit_head(conv, expected, report))
    if spec.datasets or spec.moe_part_features:  # a multi-dataset model: experts and heads per dataset (moe.py)
        dropped, notes = fit_experts_and_heads(sd, expected)
        report.ignored_keys += dropped
        report.notes += notes

    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    allowed_new = [k for k in missing if k.startswith((HEAD_PREFIX, "associate_keypoint_heads.",
                                                       "backbone.knowledge_tokens."))]
    mis_shaped = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in sd.items() if k in expected and v.shape != expected[k].shape]
    problems = sorted(set(missing) - set(allowed_new)) + [k for k in sd if k not in expected] + mis_shaped
    if problems:
        raise CheckpointError(f"{path} ({conv.format}) does not fit the model: {len(problems)} backbone keys do "
                              f"not load: {problems[:8]}. {suggest_text(conv)}")
    report.new = allowed_new
    report.loaded = [k for k in sd if k not in report.resized]
    return sd, report


# ---- loading ------------------------------------------------------------------------------------------


def load_pretrained(model: ViTPose, path: str | Path, *, expert: int = 0, echo: bool = False) -> LoadReport:
    """Load any supported file into `model` (see formats.FORMATS) and return the report.

    `expert` picks the ViTPose+ dataset expert (formats.VITPOSE_PLUS_EXPERTS; 0 is COCO). The report is
    logged, and printed when `echo` (the start of a training run, where the user should see it).
    """
    conv = read_pretrained(path, None if model.spec.moe_part_features else expert)  # MoE: every expert
    if conv is None:  # a head of another keypoint count is new, as for the other formats (_fit_head)
        report = load_checkpoint(model, path, new_keypoints=True)
    else:
        sd, report = fit_pretrained(conv, model, str(path))
        if not any(p.is_meta for p in model.parameters()):  # `inspect` builds on the meta device
            model.load_state_dict(sd, strict=False)
    log.info("%s", report.summary())
    if echo:
        print(report.summary(), flush=True)
    return report


def suggest_preset(conv: Converted) -> str | None:
    """The preset whose backbone has the file's width, depth and MLP (and whose decoder is the file's)."""
    decoder = conv.head_decoder or "classic"
    for name, spec in PRESETS.items():
        if (spec.embed_dim, spec.depth, spec.mlp_hidden_dim, spec.decoder) == (
                conv.embed_dim, conv.depth, conv.mlp_hidden, decoder):
            return name
    return None


def suggest_text(conv: Converted) -> str:
    name = suggest_preset(conv)
    shape = f"width {conv.embed_dim}, depth {conv.depth}, mlp {conv.mlp_hidden}"
    return f"The file holds a ViT of {shape}: " + (f"preset {name!r} fits it." if name else "no preset fits it.")


def inspect_file(path: str | Path, preset: str | None = None, expert: int = 0) -> LoadReport:
    """Load `path` into a meta-device model of `preset` (or the one the file suggests): the report, no memory."""
    conv = read_pretrained(path, expert)
    if conv is None:  # official layout: the spec stored in the file, else inferred from its keys
        if preset is not None:
            model = build_model(preset, device="meta")
        else:
            sd, file_spec = read_checkpoint(path)
            model = build_model_from_spec(file_spec or infer_spec_from_state_dict(sd), device="meta")
        with warnings.catch_warnings():  # copying into meta parameters is the point here, not a mistake
            warnings.filterwarnings("ignore", message=".*meta parameter.*")
            return load_pretrained(model, path)
    name = preset or suggest_preset(conv)
    if name is None:
        raise CheckpointError(f"{suggest_text(conv)} Give --preset, or build a ModelSpec of that shape.")
    overrides: dict[str, Any] = {"pre_norm": conv.pre_norm}
    if conv.num_heads is not None:
        overrides["num_heads"] = conv.num_heads
    if conv.num_keypoints is not None and conv.head_decoder == PRESETS[name].decoder:
        overrides["num_keypoints"] = conv.num_keypoints  # so that a head the file has is shown loading
        deconv = conv.tensors.get("keypoint_head.deconv_layers.0.weight")
        if deconv is not None:
            overrides["deconv_channels"] = deconv.shape[1]
    model = build_model(name, device="meta", **overrides)
    return load_pretrained(model, path, expert=expert)

"""Reading and writing ViTPose weights in the official (mmpose) key layout.

Owns: safe file reading (`torch.load(weights_only=True)` or safetensors, never arbitrary unpickling),
strict key/shape checking with errors that say which preset the file fits, pos_embed resampling (timm's)
for other input sizes, spec inference from a state dict, and writing `.pth` (mmcv dict) and
`.safetensors` files that carry our ModelSpec.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .backbone import guess_grid, resize_pos_embed
from .multi_dataset import infer_multi_fields
from .vitpose import PRESETS, ModelSpec, ViTPose, match_preset

SPEC_KEY = "vitpose_spec"  # in the .pth 'meta' dict and in the safetensors metadata
POS_EMBED = "backbone.pos_embed"
IGNORED_KEYS = ("backbone.cls_token",)  # official backbone has a cls slot it never uses
KNOWLEDGE_PREFIX = "backbone.knowledge_tokens."
FINAL_LAYER_KEYS = ("keypoint_head.final_layer.weight", "keypoint_head.final_layer.bias")
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects other than tensors and plain containers; we refuse to unpickle it."""


class CheckpointMismatchError(CheckpointError):
    """The file's keys or shapes do not match the model."""

    def __init__(
        self,
        path: str | Path,
        missing: list[str],
        unexpected: list[str],
        mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        suggestion: str,
    ) -> None:
        self.path = str(path)
        self.missing = missing
        self.unexpected = unexpected
        self.mis_shaped = mis_shaped
        self.suggestion = suggestion
        lines = [f"checkpoint {self.path} does not fit the model:"]
        if mis_shaped:
            lines.append(f"  mis-shaped keys ({len(mis_shaped)}), file vs model:")
            lines += _truncate([f"    {k}: {tuple(f)} vs {tuple(m)}" for k, f, m in mis_shaped])
        if missing:
            lines.append(f"  missing keys ({len(missing)}), in the model but not in the file:")
            lines += _truncate([f"    {k}" for k in missing])
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}), in the file but not in the model:")
            lines += _truncate([f"    {k}" for k in unexpected])
        lines.append(f"  {suggestion}")
        super().__init__("\n".join(lines))


def _truncate(lines: list[str]) -> list[str]:
    if len(lines) <= _MAX_LISTED:
        return lines
    return lines[:_MAX_LISTED] + [f"    ... and {len(lines) - _MAX_LISTED} more"]


@dataclass
class LoadReport:
    """What a load did, for every file format (official here, pre-trained files in pretrained.py).

    `loaded`, `resized` and `new` are our model's keys (taken from the file as is, resampled to our token grid
    or patch size, or left at their initialisation); `ignored` are the file's keys dropped on purpose, in the
    file's own naming (they have no counterpart in ours).
    """

    path: str
    pos_embed_resized: tuple[tuple[int, int], tuple[int, int]] | None = None  # (from grid, to grid)
    ignored_keys: list[str] = field(default_factory=list)  # in the file, dropped on purpose (cls_token)
    kept_initialised: list[str] = field(default_factory=list)  # knowledge tokens absent from the file
    file_spec: ModelSpec | None = None  # the spec stored in the file by save_official/save_safetensors
    format: str = "vitpose"
    preset: str | None = None  # the preset the model's shapes match (None: a custom spec)
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note_pos_embed_resized(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        """Record a position-embedding resample (the file was trained at another input size)."""
        self.pos_embed_resized = (tuple(src), tuple(dst))  # type: ignore[assignment]
        if POS_EMBED not in self.resized:
            self.resized.append(POS_EMBED)
        self.notes.append(f"position embeddings resized {src[0]}x{src[1]} -> {dst[0]}x{dst[1]} tokens (timm's "
                          "resample_abs_pos_embed): the file was trained at another input size")

    @property
    def ignored(self) -> list[str]:
        return self.ignored_keys

    def to_json(self) -> dict[str, Any]:
        """The machine-readable part: the `--json` line of `python -m vitpose.models inspect`."""
        return {"format": self.format, "preset": self.preset, "loaded": self.loaded, "resized": self.resized,
                "new": self.new, "ignored": self.ignored_keys}

    def summary(self) -> str:
        """A few lines for people: counts, the keys that were not simply copied, and the notes."""
        lines = [
            f"load {self.path}: format {self.format}, preset {self.preset or 'custom'}: {len(self.loaded)} loaded, "
            f"{len(self.resized)} resized, {len(self.new)} new, {len(self.ignored_keys)} ignored"
        ]
        for label, keys in (("resized", self.resized), ("new", self.new), ("ignored", self.ignored_keys)):
            head = [k for k in keys if k.startswith("keypoint_head.")]
            if len(head) > 1:  # a new head is one fact, not a dozen lines
                keys = [k for k in keys if k not in head] + [f"keypoint_head.* ({len(head)} keys: the pose head)"]
            if keys:
                lines += _truncate([f"  {label}: {k}" for k in keys])
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- reading ------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    # mmcv checkpoints keep numpy scalars in 'meta' (e.g. hook_msgs best_score). Rebuilding a numeric
    # numpy scalar or dtype runs no user code, so we allow exactly those (both numpy 1.x and 2.x paths).
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    allowed: list[Any] = [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
    ]
    for name in dir(np.dtypes):
        if name.endswith("DType") and name not in ("ObjectDType", "VoidDType", "StringDType"):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def torch_load_weights_only(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: rely on the message of `e`
            names = []
        if not names and "Unsupported global" not in str(e) and "Unsupported class" not in str(e):
            raise CheckpointError(f"{path} is not a PyTorch weights file (torch could not read it: {_why(e)}); {_GIVE}") from None
        if names:
            detail = f" (it references {', '.join(sorted(names))})"
        else:
            detail = next((f" ({ln.strip()})" for ln in str(e).splitlines() if "Unsupported" in ln), "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors{detail}, and loading "
            "it would run code from the file. If you trust its source, re-save only the weights elsewhere, "
            "e.g. torch.save({'state_dict': ckpt['state_dict']}, 'clean.pth')."
        ) from None
    except Exception as e:  # truncated or foreign files fail anywhere in the unpickler
        raise CheckpointError(f"{path} is not a PyTorch weights file (torch could not read it: {_why(e)}); {_GIVE}") from None


_GIVE = "give an official ViTPose .pth, a .safetensors file we wrote, or a training checkpoint folder"


def _why(err: Exception) -> str:
    """The line of torch's message that says what is wrong with the file, without its advice (which is to
    unpickle with weights_only=False, the one thing not to do with a file of unknown origin)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Unsupported operand", "invalid load key", "PytorchStreamReader", "EOF", "Ran out")):
            return ln
    specific = [ln for ln in lines if "weights_only" not in ln and "torch.load" not in ln and "issue" not in ln]
    return (specific or [type(err).__name__])[-1][:200]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """The state dict of a `.pth` (mmcv dict with 'state_dict', or a bare state dict) or `.safetensors`
    file, on CPU, and the ModelSpec it stores if we wrote it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    spec_dict: Any = None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(str(path), device="cpu")
        if SPEC_KEY in metadata:
            spec_dict = json.loads(metadata[SPEC_KEY])
    else:
        obj = torch_load_weights_only(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
        if "state_dict" in obj:
            state_dict = obj["state_dict"]
            meta = obj.get("meta")
            if isinstance(meta, dict):
                spec_dict = meta.get(SPEC_KEY)
        else:
            state_dict = obj
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(
                f"{path} is not a state dict: the values of {bad[:_MAX_LISTED]} are not tensors "
                "(expected an mmcv dict with 'state_dict', or a bare state dict)"
            )
    spec = None
    if spec_dict is not None:
        try:
            spec = ModelSpec.from_dict(dict(spec_dict))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the stored {SPEC_KEY} is invalid: {e}") from None
    return state_dict, spec


# ---- inferring what a file holds ----------------------------------------------------------------------


def infer_spec_from_state_dict(
    state_dict: dict[str, torch.Tensor], img_size: tuple[int, int] | None = None
) -> ModelSpec:
    """Rebuild the architecture from official-layout keys and shapes.

    num_heads cannot be read from weights: it is taken from the preset with the same width and depth,
    else embed_dim // 64. img_size, unless given, is the 4:3 grid that holds pos_embed's tokens (the paper's
    256x192 gives 16x12), times the patch size.
    """
    proj = state_dict.get("backbone.patch_embed.proj.weight")
    if proj is None or POS_EMBED not in state_dict:
        raise CheckpointError(
            "not a ViTPose state dict: 'backbone.patch_embed.proj.weight' or 'backbone.pos_embed' is missing "
            f"(first keys: {list(state_dict)[:5]})"
        )
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    fc1 = state_dict.get("backbone.blocks.0.mlp.fc1.weight")
    mlp_hidden = fc1.shape[0] if fc1 is not None else 4 * embed_dim
    final = state_dict.get("keypoint_head.final_layer.weight")
    if final is None:
        raise CheckpointError("not a ViTPose state dict: 'keypoint_head.final_layer.weight' is missing")
    classic = "keypoint_head.deconv_layers.0.weight" in state_dict
    deconv = state_dict["keypoint_head.deconv_layers.0.weight"].shape[1] if classic else 256
    if img_size is None:
        gh, gw = guess_grid(state_dict[POS_EMBED].shape[1] - 1)
        img_size = (gh * patch, gw * patch)
    tokens = state_dict.get(KNOWLEDGE_PREFIX + "tokens")
    if tokens is not None and (tokens.ndim != 2 or tokens.shape[1] != embed_dim) \
            or KNOWLEDGE_PREFIX + "proj.weight" in state_dict:
        raise CheckpointError(
            "the file's knowledge tokens are not in the backbone's width (or come with a trainable projection): "
            "a student distilled before tokens had a fixed mapping; distill it again"
        )
    heads = embed_dim // 64 if embed_dim % 64 == 0 else 1
    for preset in PRESETS.values():
        if (preset.embed_dim, preset.depth) == (embed_dim, depth):
            heads = preset.num_heads
            break
    return ModelSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_hidden=None if mlp_hidden == 4 * embed_dim else mlp_hidden,
        img_size=img_size,
        patch_size=patch,
        num_keypoints=final.shape[0],
        decoder="classic" if classic else "simple",
        deconv_channels=deconv,
        num_knowledge_tokens=0 if tokens is None else tokens.shape[0],
        pre_norm="backbone.norm_pre.weight" in state_dict,
        **infer_multi_fields(state_dict, final.shape[0]),  # ViTPose+: experts and a head per dataset
    )


def _suggest(state_dict: dict[str, torch.Tensor], file_spec: ModelSpec | None) -> str:
    try:
        spec = file_spec or infer_spec_from_state_dict(state_dict)
    except CheckpointError as e:
        return f"The file does not look like a ViTPose checkpoint: {e}"
    name = match_preset(spec)
    desc = (
        f"embed_dim {spec.embed_dim}, depth {spec.depth}, mlp {spec.mlp_hidden_dim}, patch {spec.patch_size}, "
        f"{spec.decoder} decoder, {spec.num_keypoints} keypoints"
    )
    if name is None:
        return f"The file holds a model with {desc}, which matches no preset; build it with build_model_from_spec."
    preset = PRESETS[name]
    overrides = [
        f"{f}={getattr(spec, f)!r}"
        for f in ("num_keypoints", "deconv_channels", "num_knowledge_tokens", "pre_norm")
        if getattr(spec, f) != getattr(preset, f)
        and not (f == "deconv_channels" and spec.decoder == "simple")
    ]
    call = ", ".join([repr(name), *overrides])
    return f"The file holds {desc}: it fits preset {name!r}; build it with build_model({call})."


# ---- loading ------------------------------------------------------------------------------------------


def _new_final_layer(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     report: LoadReport) -> dict[str, torch.Tensor]:
    """Drop the file's pose-head final layer when only its output count (keypoints) differs from the model's:
    that layer stays new and the report says so. Anything else that differs is left for the strict check."""
    keys = [k for k in FINAL_LAYER_KEYS if k in state_dict and k in expected]
    if len(keys) != len(FINAL_LAYER_KEYS):
        return {}
    file_w, model_w = state_dict[FINAL_LAYER_KEYS[0]], expected[FINAL_LAYER_KEYS[0]]
    if file_w.shape == model_w.shape or file_w.shape[1:] != model_w.shape[1:]:
        return {}
    if state_dict[FINAL_LAYER_KEYS[1]].shape != (file_w.shape[0],):
        return {}
    dropped = {k: state_dict.pop(k) for k in keys}
    report.ignored_keys += keys
    report.notes.append(f"the file's pose head predicts {file_w.shape[0]} keypoints, the model {model_w.shape[0]}: "
                        "its final layer is new (the rest of the head and the backbone are loaded)")
    return dropped


def load_checkpoint(model: ViTPose, path: str | Path, *, new_keypoints: bool = False) -> LoadReport:
    """Load an official-layout checkpoint into `model`, strictly.

    Every model key must be in the file with the same shape and vice versa, except: `backbone.cls_token`
    is dropped, `pos_embed` is resampled (timm's function) when only its token grid differs, and knowledge tokens
    present in the model but not in the file (official files never have them) keep their initial values.
    With `new_keypoints` (a run starting from another keypoint set's file, `model.init_checkpoint`), a pose
    head final layer whose only difference is its keypoint count stays new, and the report says so.
    Raises CheckpointMismatchError naming the file, the differing keys and the preset that fits the file.
    """
    state_dict, file_spec = read_checkpoint(path)
    report = LoadReport(path=str(path), file_spec=file_spec)
    state_dict = dict(state_dict)
    for key in IGNORED_KEYS:
        if key in state_dict:
            del state_dict[key]
            report.ignored_keys.append(key)

    expected = model.state_dict()
    new_head = _new_final_layer(state_dict, expected, report) if new_keypoints else {}
    pos_file, pos_model = state_dict.get(POS_EMBED), expected.get(POS_EMBED)
    dst = model.backbone.grid_size
    # A file we wrote says its grid: 16x12 and 12x16 hold as many tokens but are different embeddings.
    other_grid = file_spec is not None and file_spec.grid_size != dst
    if (
        pos_file is not None
        and pos_model is not None
        and (pos_file.shape != pos_model.shape or other_grid)
        and pos_file.dim() == 3
        and pos_file.shape[0] == 1
        and pos_file.shape[2] == pos_model.shape[2]
    ):
        if file_spec is not None and file_spec.grid_size[0] * file_spec.grid_size[1] == pos_file.shape[1] - 1:
            src = file_spec.grid_size
        else:
            src = guess_grid(pos_file.shape[1] - 1, dst[0] / dst[1])
        state_dict[POS_EMBED] = resize_pos_embed(pos_file, src, dst)
        report.note_pos_embed_resized(src, dst)

    missing = [k for k in expected if k not in state_dict]
    report.kept_initialised = [k for k in missing if k.startswith(KNOWLEDGE_PREFIX)]
    # BatchNorm fills a missing counter itself (files from before PyTorch 0.4.1 lack it).
    missing = [
        k for k in missing
        if k not in report.kept_initialised and k not in new_head and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        ms = model.spec
        suggestion = (
            f"The model has embed_dim {ms.embed_dim}, depth {ms.depth}, {ms.decoder} decoder, "
            f"{ms.num_keypoints} keypoints. {_suggest({**state_dict, **new_head}, file_spec)}"
        )
        raise CheckpointMismatchError(path, missing, unexpected, mis_shaped, suggestion)
    model.load_state_dict(state_dict, strict=False)
    report.preset = match_preset(model.spec)
    report.loaded = [k for k in state_dict if k not in report.resized]
    report.new = list(report.kept_initialised) + list(new_head)
    return report


# ---- writing ------------------------------------------------------------------------------------------


def _cpu_state_dict(model: ViTPose) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_official(model: ViTPose, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write {'state_dict': ..., 'meta': {...}} like mmcv, readable by the official code and by us.

    `meta` must hold plain types only (str, numbers, lists, dicts) so weights_only loading accepts it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full_meta = {**(meta or {}), SPEC_KEY: model.spec.to_dict()}
    torch.save({"state_dict": _cpu_state_dict(model), "meta": full_meta}, path)
    return path


def save_safetensors(model: ViTPose, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the official-layout state dict as safetensors, with the spec as JSON in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {**(metadata or {}), "format": "pt", SPEC_KEY: json.dumps(model.spec.to_dict())}
    save_file(_cpu_state_dict(model), str(path), metadata=full)
    return path

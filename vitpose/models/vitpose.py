"""ViTPose = plain ViT backbone + heatmap decoder; the model spec, the presets and the builder.

Owns: `ModelSpec` (every architectural choice, stored with checkpoints), the named presets (paper sizes
S/B/L/H, our plain ViT-g, the student ladder t/s/m and tiny CPU sizes, each with a `_simple` decoder variant), `build_model`, and
the model-level helpers the training loop needs (parameter count, analytic FLOPs, spec round trip).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from .attention import AttentionSpec
from .backbone import ViTBackbone, default_patch_padding, token_grid
from .heads import ClassicDecoder, SimpleDecoder
from .moe import route_heads

Decoder = Literal["classic", "simple"]
DECODERS: tuple[str, ...] = ("classic", "simple")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a ViTPose model; `None` fields take the documented default."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int | None = None  # MLP hidden width; None -> 4 * embed_dim
    drop_path_rate: float = 0.0
    layer_decay_rate: float = 0.75  # used by param_groups_layer_decay, not by the modules
    img_size: tuple[int, int] = (256, 192)  # (h, w)
    patch_size: int = 16
    patch_padding: int | None = None  # None -> 2 * patch_size // 16 (2 for the paper's patch 16)
    num_keypoints: int = 17
    decoder: Decoder = "classic"
    deconv_channels: int = 256  # classic decoder only
    num_knowledge_tokens: int = 0  # frozen tokens in the backbone's own width (a distilled student)
    pre_norm: bool = False  # a LayerNorm before the first block (CLIP-style pre-trained ViTs)
    # Which keys each query sees (full, or the paper's window kinds); no parameters of its own.
    attention: AttentionSpec = AttentionSpec()
    # Multi-dataset models (moe.py): (name, keypoint count) per dataset, the first is num_keypoints' (the
    # primary); () is a single-dataset model. moe_part_features > 0: ViTPose+ experts, one per dataset.
    datasets: tuple[tuple[str, int], ...] = ()
    moe_part_features: int = 0

    def __post_init__(self) -> None:
        # Normalise what YAML/JSON hands us (lists, dicts) so specs compare equal after a round trip.
        object.__setattr__(self, "img_size", (int(self.img_size[0]), int(self.img_size[1])))
        object.__setattr__(self, "datasets", tuple((str(n), int(k)) for n, k in self.datasets))
        try:
            object.__setattr__(self, "attention", AttentionSpec.coerce(self.attention))
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid ModelSpec: attention: {e}") from None
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder not in DECODERS:
            problems.append(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0.0 < self.layer_decay_rate <= 1.0:
            problems.append(f"layer_decay_rate must be in (0, 1], got {self.layer_decay_rate}")
        if min(self.img_size) < self.patch_size:
            problems.append(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        elif self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            # Another size gives a token grid that drops the image's last rows/columns of pixels.
            problems.append(f"img_size {list(self.img_size)} is not a multiple of patch_size {self.patch_size}; "
                            f"use e.g. {[self.patch_size * max(1, round(v / self.patch_size)) for v in self.img_size]}")
        bad_blocks = [b for b in self.attention.full_blocks if not 0 <= b < self.depth]
        if bad_blocks:
            problems.append(f"attention.full_blocks {bad_blocks} are not blocks 0-{self.depth - 1}")
        if self.datasets and self.datasets[0][1] != self.num_keypoints:
            problems.append(f"datasets[0] {self.datasets[0]} must have num_keypoints {self.num_keypoints} (the primary)")
        if self.moe_part_features and not 0 < self.moe_part_features < self.embed_dim:
            problems.append(f"moe_part_features {self.moe_part_features} must be in (0, embed_dim {self.embed_dim})")
        if self.num_knowledge_tokens < 0:
            problems.append(f"num_knowledge_tokens must be >= 0, got {self.num_knowledge_tokens}")
        if problems:
            raise ValueError("invalid ModelSpec: " + "; ".join(problems))

    @property
    def mlp_hidden_dim(self) -> int:
        return 4 * self.embed_dim if self.mlp_hidden is None else self.mlp_hidden

    @property
    def padding(self) -> int:
        return default_patch_padding(self.patch_size) if self.patch_padding is None else self.patch_padding

    @property
    def grid_size(self) -> tuple[int, int]:
        return token_grid(self.img_size, self.patch_size, self.padding)

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(h, w) of the heatmaps: both decoders upsample the token grid 4x (H/4 x W/4 for patch 16)."""
        gh, gw = self.grid_size
        return 4 * gh, 4 * gw

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (img_size as a list)."""
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["attention"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["attention"].items()}
        for key in ("datasets", "moe_part_features"):  # single-dataset specs read as before these fields
            if not d[key]:
                del d[key]
        d.update({"datasets": [list(x) for x in self.datasets]} if self.datasets else {})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        if d.pop("knowledge_token_dim", None) is not None:
            raise ValueError("knowledge_token_dim is set: this student was distilled before knowledge tokens had "
                             "a fixed mapping (it carries a trainable projection of teacher-width tokens, which "
                             "the paper's method does not have); distill it again")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelSpec fields {unknown}; valid fields: {sorted(names)}")
        return cls(**d)


_SIZES: dict[str, dict[str, Any]] = {
    # Paper Table / DESIGN.md §3.
    "vitpose_s": dict(embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1, layer_decay_rate=0.8),
    "vitpose_b": dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.3, layer_decay_rate=0.75),
    "vitpose_l": dict(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.5, layer_decay_rate=0.8),
    "vitpose_h": dict(embed_dim=1280, depth=32, num_heads=16, drop_path_rate=0.55, layer_decay_rate=0.85),
    # Our plain ViT-g (the paper's G used an unreleased ViTAE-G backbone).
    "vitpose_g": dict(
        embed_dim=1408, depth=40, num_heads=16, mlp_hidden=6144, drop_path_rate=0.55, layer_decay_rate=0.85
    ),
    # The student ladder at 256x192: sized to where efficient pose models live (RTMPose-t/s/m: 0.36/0.68/1.93
    # GFLOPs, 3.3/5.5/13.6 M params). 64-wide heads (the fused GPU kernels' sweet spot); trained from
    # scratch by distillation, so no layer-wise lr decay (there are no pre-trained lower layers to protect).
    "vitpose_student_t": dict(
        embed_dim=128, depth=6, num_heads=2, drop_path_rate=0.0, layer_decay_rate=1.0, deconv_channels=64
    ),
    # s: 7 blocks with a 3x MLP rather than vitpose_tiny's 6 with 4x (same FLOPs): a shape of its own, so a
    # checkpoint says which preset it is (match_preset).
    "vitpose_student_s": dict(
        embed_dim=192, depth=7, num_heads=3, mlp_hidden=576, drop_path_rate=0.0, layer_decay_rate=1.0,
        deconv_channels=64,
    ),
    "vitpose_student_m": dict(
        embed_dim=256, depth=10, num_heads=4, drop_path_rate=0.1, layer_decay_rate=1.0, deconv_channels=128
    ),
    # CPU sizes for the demo and tests: a teacher and a student a training step of which costs well under
    # a second on two cores; lighter deconvs because at this width the 256-channel head would dominate.
    "vitpose_tiny": dict(
        embed_dim=192, depth=6, num_heads=3, drop_path_rate=0.1, layer_decay_rate=0.75, deconv_channels=96
    ),
    "vitpose_nano": dict(
        embed_dim=96, depth=3, num_heads=3, drop_path_rate=0.0, layer_decay_rate=0.75, deconv_channels=64
    ),
    "vitpose_pico": dict(
        embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.0, layer_decay_rate=0.75, deconv_channels=32
    ),
    # The distillation benchmark's student: small enough that it stops improving well below its teacher
    # (vitpose_pico, trained long enough, catches up with vitpose_nano on the synthetic data: nothing to transfer).
    "vitpose_femto": dict(
        embed_dim=32, depth=2, num_heads=1, drop_path_rate=0.0, layer_decay_rate=0.75, deconv_channels=16
    ),
}

PRESETS: dict[str, ModelSpec] = {}
for _name, _kw in _SIZES.items():
    PRESETS[_name] = ModelSpec(**_kw)
    PRESETS[f"{_name}_simple"] = ModelSpec(**_kw, decoder="simple")


def list_presets() -> list[str]:
    """Names accepted by `build_model`."""
    return list(PRESETS)


_ARCH_FIELDS = ("embed_dim", "depth", "mlp_hidden_dim", "patch_size", "decoder")


def match_preset(spec: ModelSpec) -> str | None:
    """The preset whose weights have the same shapes as `spec`'s backbone and decoder type, if any.

    num_keypoints, deconv_channels (classic head) and knowledge tokens are left as overrides.
    """
    for name, preset in PRESETS.items():
        if all(getattr(preset, f) == getattr(spec, f) for f in _ARCH_FIELDS):
            return name
    return None


# A submodule that exists only while a student trains (feature distillation's projector to the teacher's
# width): trained with the model, kept in its DeepSpeed checkpoints, never in the weights it is served with.
FEATURE_PROJECTOR = "feature_projector"


def exported_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the training-only submodules: what rebuilds the model from its spec."""
    return {k: v for k, v in state.items() if not k.startswith(f"{FEATURE_PROJECTOR}.")}


class ViTPose(nn.Module):
    """Top-down pose model: images (B, 3, H, W) -> heatmaps (B, K, 4*Hp, 4*Wp) (= H/4 x W/4 at patch 16)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self._spec = spec
        self.backbone = ViTBackbone(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_hidden=spec.mlp_hidden_dim,
            drop_path_rate=spec.drop_path_rate,
            patch_padding=spec.patch_padding,
            pre_norm=spec.pre_norm,
            attention=spec.attention,
            moe=(max(len(spec.datasets), 1), spec.moe_part_features) if spec.moe_part_features else None,
        )
        self.keypoint_head = self._head(spec.num_keypoints)
        if len(spec.datasets) > 1:  # ViTPose+'s name for the other datasets' heads
            self.associate_keypoint_heads = nn.ModuleList([self._head(k) for _, k in spec.datasets[1:]])
        if spec.num_knowledge_tokens:
            self.backbone.add_knowledge_tokens(spec.num_knowledge_tokens)

    def _head(self, num_keypoints: int) -> ClassicDecoder | SimpleDecoder:
        s = self._spec
        if s.decoder == "classic":
            return ClassicDecoder(s.embed_dim, num_keypoints, s.deconv_channels)
        return SimpleDecoder(s.embed_dim, num_keypoints)

    @property
    def heads(self) -> list[nn.Module]:
        """The head of each dataset, in ``spec.datasets`` order (one for a single-dataset model)."""
        return [self.keypoint_head, *getattr(self, "associate_keypoint_heads", [])]

    def init_weights(self) -> None:
        """Re-run the initialisation (see ViTBackbone.init_weights for why it is callable again)."""
        self.backbone.init_weights()
        for head in self.heads:
            head.init_weights()

    def forward(self, images: torch.Tensor, dataset_index: int | torch.Tensor | None = None,
                with_features: bool = False) -> Any:
        """Heatmaps (B, K, H, W); for a multi-dataset model see moe.py (a (B,) index gives one per dataset).
        ``with_features``: (heatmaps, the backbone's last tokens as a (B, C, Hp, Wp) map), the tokens through the
        feature projector when the model carries one (feature distillation)."""
        if with_features:
            if dataset_index is not None:
                raise ValueError("with_features is for single-dataset models (dataset_index must be None)")
            tokens = self.backbone(images)
            projector = getattr(self, FEATURE_PROJECTOR, None)
            return self.keypoint_head(tokens), tokens if projector is None else projector(tokens)
        if dataset_index is None:
            return self.keypoint_head(self.backbone(images))
        moe = bool(self._spec.moe_part_features)
        if not isinstance(dataset_index, torch.Tensor) or dataset_index.dim() == 0:  # one dataset for the batch
            d = int(dataset_index)
            return self.heads[d](self.backbone(images, d if moe else None))
        return route_heads(self.heads, self.backbone(images, dataset_index if moe else None), dataset_index)

    def add_feature_projector(self, width: int) -> None:
        """A trainable 1x1 projection of the backbone's tokens to ``width`` channels (a teacher's width), for
        feature distillation. Not part of the spec: ``exported_state`` leaves it out of saved weights."""
        setattr(self, FEATURE_PROJECTOR, nn.Conv2d(self._spec.embed_dim, width, kernel_size=1))

    @property
    def spec(self) -> ModelSpec:
        """The spec that rebuilds this model, including knowledge tokens added after construction."""
        return dataclasses.replace(self._spec, num_knowledge_tokens=self.backbone.num_knowledge_tokens)

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return self._spec.heatmap_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every backbone block (timm's method name)."""
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D parameters (timm's convention)."""
        names = {"backbone.pos_embed"}
        if self.backbone.knowledge_tokens is not None:
            names.add("backbone.knowledge_tokens.tokens")
        return names

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops(self, batch: int = 1) -> int:
        """Analytic forward FLOPs in the paper's convention: multiply-accumulates of convs, linears and
        attention matmuls (one MAC = one FLOP; elementwise ops not counted). See ViTBackbone.flops."""
        return self.backbone.flops(batch) + self.keypoint_head.flops(self.backbone.grid_size, batch)


def build_model(preset: str, *, device: torch.device | str | None = None, **overrides: Any) -> ViTPose:
    """Build a preset, with any ModelSpec field overridden (img_size, num_keypoints, decoder, ...).

    `device="meta"` builds without allocating memory (parameter counts, FLOPs, shape checks).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown model overrides {unknown} for {preset!r}; valid fields: {sorted(names)}")
    spec = dataclasses.replace(PRESETS[preset], **overrides)
    return build_model_from_spec(spec, device=device)


def build_model_from_spec(
    spec: ModelSpec | dict[str, Any], *, device: torch.device | str | None = None
) -> ViTPose:
    """Build from a spec (or its `to_dict()` form, as stored with checkpoints)."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    with torch.device(device) if device is not None else nullcontext():
        return ViTPose(spec)

"""Checks of vitpose.config's ModelConfig against its preset, which need the presets (and so torch): called from
the config's validator only when a config is validated, so importing vitpose.config stays light."""

from __future__ import annotations

from typing import Any


def check_against_preset(m: Any) -> None:
    """ValueError naming the key when a ModelConfig's choices do not fit its preset: an img_size that is not
    a multiple of 4 (heatmaps are 1/4) or of the patch (the token grid would drop the crop's last pixels),
    block indices past the depth."""
    from vitpose.models import PRESETS

    preset = PRESETS[m.preset]
    patch, size = m.patch_size or preset.patch_size, m.img_size or preset.img_size
    if m.img_size is not None and (size[0] % 4 or size[1] % 4 or min(size) < 32):
        raise ValueError(f"model.img_size {list(size)} must be two multiples of 4, each >= 32 (heatmaps are 1/4)")
    if size[0] % patch or size[1] % patch:
        fix = [patch * max(1, round(v / patch)) for v in size]
        raise ValueError(f"model.img_size {list(size)} is not a multiple of the patch size {patch} (model.patch_size or "
                         f"preset {m.preset!r}); use e.g. model.img_size={fix}")
    blocks = {"freeze.attention": m.freeze.attention, "freeze.mlp": m.freeze.mlp,
              "attention.full_blocks": m.attention.full_blocks}
    for key, value in blocks.items():
        bad = [] if value == "all" else [b for b in value if not 0 <= b < preset.depth]
        if bad:
            raise ValueError(f"model.{key}: blocks {bad} do not exist; preset {m.preset!r} has blocks "
                             f"0-{preset.depth - 1}")

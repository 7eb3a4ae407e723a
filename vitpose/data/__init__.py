"""Data side of vitpose: COCO-format top-down datasets (``coco``), crop/augmentation transforms
(``transforms``), the UDP heatmap codec (``codec``) and the synthetic dataset generator (``synthetic``).

The names below are re-exported lazily, so ``python -m vitpose.data.synthetic`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TopDownCocoDataset": "coco",
    "BadSampleError": "files",
    "load_image": "files",
    "AugConfig": "transforms",
    "AugParams": "transforms",
    "sample_aug_params": "transforms",
    "apply_aug": "transforms",
    "ensure_synthetic_dataset": "synthetic",
    "SynthConfig": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

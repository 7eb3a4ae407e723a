"""Reading the files a dataset is made of: images (decoded to RGB as displayed) and annotation JSON, with
the error type a bad sample raises."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps


class BadSampleError(ValueError):
    """An annotation, detection or image that cannot become a training/evaluation sample."""

    def __init__(self, reason: str, message: str | None = None):
        if message is None:  # one argument: how DataLoader workers re-raise it in the main process
            reason, message = "bad_sample", reason
        super().__init__(message)
        self.reason = reason


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3): EXIF orientation applied, grayscale/RGBA/palette -> RGB.

    Raises ``FileNotFoundError`` or ``OSError``/``UnidentifiedImageError`` from Pillow; callers add context.
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # phone pictures store rotation in EXIF; annotations follow display
        if im.mode != "RGB":
            # RGBA/LA/P with transparency: drop alpha (COCO-style annotations never refer to it).
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8).copy()


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export or re-download it") from e

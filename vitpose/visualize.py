"""Pictures people would rather look at: skeletons on crops and images, loss curves.

Limb colours say the side (left blue, right orange, centre green), point size says the keypoint's
confidence, and joints below the score threshold are not drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
SIDE_COLOURS = {"left": (40, 120, 255), "right": (255, 140, 20), "centre": (40, 200, 90)}


def side_of(name: str) -> str:
    return "left" if name.startswith("left") else "right" if name.startswith("right") else "centre"


def limb_colour(names: list[str], a: int, b: int) -> tuple[int, int, int]:
    sides = {side_of(names[a]), side_of(names[b])}
    side = "left" if sides == {"left"} else "right" if sides == {"right"} else "centre"
    return SIDE_COLOURS[side]


def draw_skeleton(
    image: Image.Image,
    keypoints: np.ndarray,
    scores: np.ndarray,
    keypoint_info: dict[str, Any],
    score_thr: float = 0.3,
    width: int = 2,
) -> Image.Image:
    """Draw one person's keypoints (K, 2) with confidences (K,) on ``image`` (modified and returned)."""
    names = keypoint_info["names"]
    draw = ImageDraw.Draw(image)
    for a, b in keypoint_info["skeleton"]:
        # COCO skeletons are 1-based.
        a, b = a - 1, b - 1
        if scores[a] >= score_thr and scores[b] >= score_thr:
            draw.line([tuple(keypoints[a]), tuple(keypoints[b])], fill=limb_colour(names, a, b), width=width)
    for k, (x, y) in enumerate(keypoints):
        if scores[k] < score_thr:
            continue
        r = 1.5 + 3.0 * float(np.clip(scores[k], 0, 1))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=SIDE_COLOURS[side_of(names[k])], outline=(255, 255, 255))
    return image


def denormalise(image: np.ndarray) -> Image.Image:
    """(3, H, W) normalised float → RGB PIL image."""
    rgb = (image.transpose(1, 2, 0) * STD + MEAN).clip(0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def draw_crops_grid(images: Any, heatmaps: np.ndarray, keypoint_info: dict[str, Any], path: Path,
                    max_crops: int = 8, cols: int = 4) -> Path:
    """Predicted skeletons on a batch of model-input crops, in a grid PNG."""
    images = np.asarray(images)[:max_crops]
    heatmaps = np.asarray(heatmaps)[: len(images)]
    n, _, h, w = images.shape
    hh, hw = heatmaps.shape[-2:]
    flat = heatmaps.reshape(n, heatmaps.shape[1], -1)
    idx = flat.argmax(-1)
    scores = flat.max(-1)
    xs = (idx % hw) * (w - 1) / max(hw - 1, 1)
    ys = (idx // hw) * (h - 1) / max(hh - 1, 1)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i in range(n):
        crop = draw_skeleton(denormalise(images[i]), np.stack([xs[i], ys[i]], -1), scores[i], keypoint_info)
        grid.paste(crop, ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Train loss and val AP against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train/loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    evals = [(h["epoch"], h["val/AP"]) for h in history if "val/AP" in h]
    if evals:
        ax2 = ax1.twinx()
        ax2.plot(*zip(*evals, strict=True), "s-", color="tab:orange", label="val AP")
        ax2.set_ylabel("val AP", color="tab:orange")
        ax2.set_ylim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

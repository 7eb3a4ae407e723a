"""Pictures people would rather look at: skeletons on crops and full images, loss curves.

Owns every drawing of predictions: ``draw_skeleton`` (one person), ``draw_persons`` (a full image with the
predictor's output), ``draw_crops_grid`` (model-input crops, logged by training) and ``plot_curves``.
Limb colours say the side (left blue, right orange, centre green); a joint's dot grows with its confidence.
Joints and limbs below the score threshold are drawn faded (the same colours, mostly transparent), so a
prediction the model is unsure of stays visible without being mistaken for a confident one, and
``draw_persons`` writes the threshold on the picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
SIDE_COLOURS = {"left": (40, 120, 255), "right": (255, 140, 20), "centre": (40, 200, 90)}
FADED_ALPHA = 90  # of 255: how much of a below-threshold joint or limb shows over the image


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
    radius: float = 4.5,
) -> Image.Image:
    """Draw one person's keypoints (K, 2) with confidences (K,) on ``image`` (modified and returned).

    Limbs join joints that are both above ``score_thr``; a confident joint's dot has radius
    ``radius * (0.35 + 0.65 * confidence)``. Joints below it, and limbs touching one, are drawn faded.
    """
    names = keypoint_info["names"]
    if len(names) > 30:  # whole-body sets (68 face and 42 hand points): full-size dots would hide the face
        radius, width = radius * 0.4, max(1, width - 1)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    confident = scores >= score_thr
    limbs = [(a - 1, b - 1) for a, b in keypoint_info.get("skeleton", [])]  # COCO skeletons are 1-based
    faded = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw_faded = ImageDraw.Draw(faded)
    for a, b in limbs:
        if not (confident[a] and confident[b]):
            draw_faded.line([tuple(keypoints[a]), tuple(keypoints[b])], fill=(*limb_colour(names, a, b), FADED_ALPHA),
                            width=max(1, width - 1))
    for k in np.flatnonzero(~confident):
        x, y = keypoints[k]
        r = radius * 0.6
        draw_faded.ellipse([x - r, y - r, x + r, y + r], fill=(*SIDE_COLOURS[side_of(names[k])], FADED_ALPHA),
                           outline=(255, 255, 255, FADED_ALPHA))
    image.paste(Image.alpha_composite(image.convert("RGBA"), faded).convert(image.mode))
    draw = ImageDraw.Draw(image)
    for a, b in limbs:
        if confident[a] and confident[b]:
            draw.line([tuple(keypoints[a]), tuple(keypoints[b])], fill=limb_colour(names, a, b), width=width)
    for k in np.flatnonzero(confident):
        x, y = keypoints[k]
        r = radius * (0.35 + 0.65 * float(np.clip(scores[k], 0, 1)))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=SIDE_COLOURS[side_of(names[k])], outline=(255, 255, 255))
    return image


def draw_persons(image: np.ndarray | Image.Image, result: dict[str, Any], keypoint_info: dict[str, Any],
                 score_thr: float = 0.3) -> Image.Image:
    """A full image with every person of a ``PosePredictor`` result: box, instance score, skeleton.

    Line widths and dot sizes follow the image size so small and large pictures read alike; each box is
    labelled with the instance score (and "whole image" when no boxes were given).
    """
    canvas = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB").copy()
    side = min(canvas.size)
    width = max(1, round(side / 250))
    radius = max(2.5, side / 110)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, round(side / 45)))
    for person in result["persons"]:
        x, y, w, h = person["box"]
        draw.rectangle([x, y, x + w, y + h], outline=(255, 255, 255), width=max(1, width // 2))
        label = f"{person['score']:.2f}" + (" (whole image)" if result.get("whole_image_box") else "")
        tx, ty = max(x, 0) + 2, max(y, 0) + 1
        box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
        kps = np.asarray(person["keypoints"], dtype=np.float64)
        draw_skeleton(canvas, kps[:, :2], kps[:, 2], keypoint_info, score_thr, width=width + 1, radius=radius)
        draw = ImageDraw.Draw(canvas)  # draw_skeleton pasted over the canvas
    legend = f"keypoints below confidence {score_thr:.2f} drawn faded"
    box = draw.textbbox((2, canvas.height - 2), legend, font=font, anchor="lb")
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((2, canvas.height - 2), legend, fill=(255, 255, 255), font=font, anchor="lb")
    return canvas


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


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

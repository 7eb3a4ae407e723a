"""Top-down crop geometry and augmentation: box -> centre/scale, UDP affine warp, replayable augmentation.

Owns everything that turns (full image, person box, keypoints) into a network-input crop:

* ``box_to_center_scale``: a COCO ``xywh`` box -> centre and *pixel* scale, fixed to the input aspect ratio
  and padded (1.25 like mmpose; mmpose's ``scale * 200`` kept in pixels here).
* ``udp_warp_matrix`` / ``affine_points``: the unbiased-data-processing (UDP, Huang et al. 2020) affine
  that maps the box onto the ``size - 1`` pixel grid of the crop, the same matrix as mmpose's
  ``get_warp_matrix(r, c * 2, image_size - 1, s * 200)``; optional horizontal mirror about the centre.
* ``AugConfig`` / ``AugParams`` / ``sample_aug_params`` / ``apply_aug``: training augmentation whose random
  choices are *data* (``AugParams``), so a view can be replayed exactly. The distillation view bank stores
  teacher heatmaps per (instance, AugParams) and relies on ``apply_aug`` being a pure function of them.
* ``Photometric``: albumentations colour/blur/noise, seeded per sample from ``AugParams.photometric_seed``.
* ``normalize``: uint8 HWC RGB -> float32 CHW with ImageNet mean/std (always the last step).

Sizes are ``(height, width)`` everywhere in this package (mmpose uses ``(w, h)``; we do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import albumentations

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

def box_to_center_scale(
    box_xywh: np.ndarray | list[float], aspect_ratio: float, padding: float = 1.25
) -> tuple[np.ndarray, np.ndarray]:
    """COCO box -> (centre (2,), scale (2,) = padded box width/height in pixels at ``aspect_ratio`` w/h).

    The shorter side is grown (never shrunk) to the input aspect ratio so the whole box stays in view.
    """
    x, y, w, h = (float(v) for v in box_xywh[:4])
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float64)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w, h], dtype=np.float64) * padding


def udp_warp_matrix(
    center: np.ndarray,
    scale: np.ndarray,
    rotation: float,
    output_size: tuple[int, int],
    flip: bool = False,
) -> np.ndarray:
    """UDP affine (2, 3) mapping image pixels to crop pixels; ``output_size`` is (h, w).

    The box of size ``scale`` centred at ``center`` is mapped onto ``[0, w-1] x [0, h-1]`` (pixel centres,
    the UDP convention), so the centre lands exactly on ``((w-1)/2, (h-1)/2)`` and the mapping commutes
    with the crop -> heatmap resampling ``(hm - 1) / (input - 1)``. ``rotation`` is in degrees and follows
    mmpose's sign. ``flip`` mirrors the crop about its centre (x -> w-1-x), which is the same as flipping
    the image about the box centre.
    """
    out_h, out_w = output_size
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    sx = (out_w - 1.0) / float(scale[0])
    sy = (out_h - 1.0) / float(scale[1])
    cx, cy = float(center[0]), float(center[1])
    m = np.array(
        [
            [cos * sx, -sin * sx, sx * (-cx * cos + cy * sin) + 0.5 * (out_w - 1.0)],
            [sin * sy, cos * sy, sy * (-cx * sin - cy * cos) + 0.5 * (out_h - 1.0)],
        ],
        dtype=np.float64,
    )
    if flip:
        m[0] = -m[0]
        m[0, 2] += out_w - 1.0
    return m


def affine_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to points (..., 2); returns float64."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def warp_crop(image: np.ndarray, matrix: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """One bilinear affine warp of the whole image into the crop; outside the image is black (like mmpose)."""
    out_h, out_w = output_size
    return cv2.warpAffine(
        image, matrix, (int(out_w), int(out_h)), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )


# Per-channel lookup table uint8 -> normalised float32, shaped (1, 256, 3) for cv2.LUT: a table lookup is 4x
# faster than float arithmetic on the crop, and cv2.LUT does all three channels in one call (30 us for a
# 128x96 crop, against 90 us for three numpy fancy-indexing passes; the same values).
_NORM_LUT = np.ascontiguousarray(
    ((np.arange(256, dtype=np.float32)[:, None] / 255.0 - IMAGENET_MEAN[None, :]) / IMAGENET_STD[None, :])[None]
)


def normalize(crop: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W), ImageNet mean/std."""
    return np.ascontiguousarray(cv2.LUT(np.ascontiguousarray(crop), _NORM_LUT).transpose(2, 0, 1))


@dataclass(frozen=True)
class AugConfig:
    """Training augmentation knobs; defaults are ViTPose's (mmpose 0.x) recipe; photometrics optional."""

    scale_factor: float = 0.5  # box scale x N(1, sf) clipped to [1 - sf, 1 + sf]
    rotation_factor: float = (
        40.0  # degrees, N(0, rf) clipped to [-2 rf, 2 rf] (mmpose), applied with rotation_prob
    )
    rotation_prob: float = 0.6
    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8  # half-body only when more than this many joints are labelled
    half_body_padding: float = 1.5
    # Photometric (albumentations). The whole block is applied with photometric_prob; 0 turns it off.
    photometric_prob: float = 0.0  # ViTPose uses none; turn on for robustness
    brightness_contrast: float = 0.2
    # Small on purpose: synthetic data tells left from right by hue family, and a large hue shift would
    # make the labels lie.
    hue_shift: float = 8.0
    saturation_shift: float = 20.0
    blur_prob: float = 0.1
    noise_prob: float = 0.1


@dataclass(frozen=True)
class AugParams:
    """The random choices of one augmented view; ``apply_aug`` is a pure function of these.

    ``half_body`` is ``None`` or the half-body box (cx, cy, w, h) in image pixels (already at the input
    aspect ratio and padded) that replaces the instance box. ``photometric_seed`` < 0 means no photometric
    augmentation.
    """

    scale_factor: float = 1.0
    rotation: float = 0.0
    flip: bool = False
    half_body: tuple[float, float, float, float] | None = None
    photometric_seed: int = -1

    ARRAY_SIZE = 9

    def to_array(self) -> np.ndarray:
        """Fixed-size float64 vector (collates into a tensor; float64 keeps the seed exact)."""
        hb = self.half_body
        return np.array(
            [
                self.scale_factor,
                self.rotation,
                float(self.flip),
                float(hb is not None),
                *(hb or (0.0,) * 4),
                float(self.photometric_seed),
            ],
            dtype=np.float64,
        )

    @classmethod
    def from_array(cls, a: np.ndarray | list[float]) -> AugParams:
        a = [float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]
        if len(a) != cls.ARRAY_SIZE:
            raise ValueError(f"AugParams array must have {cls.ARRAY_SIZE} values, got {len(a)}")
        return cls(
            scale_factor=a[0],
            rotation=a[1],
            flip=bool(a[2]),
            half_body=tuple(a[4:8]) if a[3] else None,  # type: ignore[arg-type]
            photometric_seed=int(a[8]),
        )


IDENTITY = AugParams()


def _half_body_box(
    rng: np.random.Generator,
    keypoints: np.ndarray,
    visible: np.ndarray,
    upper_body_ids: list[int],
    aspect_ratio: float,
    padding: float,
) -> tuple[float, float, float, float] | None:
    """mmpose's TopDownHalfBodyTransform, returning the box instead of mutating a results dict."""
    upper_mask = np.zeros(len(keypoints), dtype=bool)
    upper_mask[upper_body_ids] = True
    upper = keypoints[visible & upper_mask]
    lower = keypoints[visible & ~upper_mask]
    # mmpose compares randn() (not rand()) with 0.5, i.e. picks the upper body ~69% of the time; kept.
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        selected = upper
    elif len(lower) > 2:
        selected = lower
    else:
        selected = upper
    if len(selected) < 2:
        return None
    center = selected.mean(axis=0)
    w, h = selected.max(axis=0) - selected.min(axis=0)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    if w <= 0 or h <= 0:
        return None
    return (float(center[0]), float(center[1]), float(w * padding), float(h * padding))


def sample_aug_params(
    rng: np.random.Generator,
    keypoints: np.ndarray,
    visibility: np.ndarray,
    cfg: AugConfig,
    *,
    upper_body_ids: list[int],
    aspect_ratio: float,
) -> AugParams:
    """Draw one view's parameters (flip, half-body, scale, rotation, photometric seed) like mmpose 0.x.

    ``keypoints`` (K, 2) and ``visibility`` (K,) are in original image coordinates; they only matter for
    the half-body box. The draw order is fixed, so a seeded ``rng`` gives the same params every time.
    """
    flip = bool(rng.random() < cfg.flip_prob)
    visible = np.asarray(visibility) > 0
    half_body = None
    if visible.sum() > cfg.half_body_min_joints and rng.random() < cfg.half_body_prob:
        half_body = _half_body_box(
            rng,
            np.asarray(keypoints, dtype=np.float64)[:, :2],
            visible,
            upper_body_ids,
            aspect_ratio,
            cfg.half_body_padding,
        )
    sf, rf = cfg.scale_factor, cfg.rotation_factor
    scale_factor = float(np.clip(rng.standard_normal() * sf + 1.0, 1.0 - sf, 1.0 + sf))
    rotation = float(np.clip(rng.standard_normal() * rf, -2.0 * rf, 2.0 * rf))
    if rng.random() > cfg.rotation_prob:
        rotation = 0.0
    photometric_seed = int(rng.integers(0, 2**31 - 1)) if rng.random() < cfg.photometric_prob else -1
    return AugParams(scale_factor, rotation, flip, half_body, photometric_seed)


class Photometric:
    """Seeded albumentations pipeline (colour, blur, noise only: geometry is ours, see module docstring)."""

    def __init__(self, cfg: AugConfig):
        import albumentations as A  # imported here: only training needs it

        bc = cfg.brightness_contrast
        self._compose: albumentations.Compose = A.Compose(
            [
                A.RandomBrightnessContrast(brightness_limit=bc, contrast_limit=bc, p=0.8),
                A.HueSaturationValue(
                    hue_shift_limit=cfg.hue_shift,
                    sat_shift_limit=cfg.saturation_shift,
                    val_shift_limit=0,
                    p=0.5,
                ),
                A.OneOf(
                    [A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.MotionBlur(blur_limit=(3, 5), p=1.0)],
                    p=cfg.blur_prob,
                ),
                A.GaussNoise(std_range=(0.02, 0.06), p=cfg.noise_prob),
            ],
            seed=0,
        )

    def __call__(self, crop: np.ndarray, seed: int) -> np.ndarray:
        # Re-seeding per call makes the output a function of (crop, seed) alone, independent of call order,
        # worker, or how many samples this object has seen.
        self._compose.set_random_seed(seed)
        return self._compose(image=crop)["image"]


def apply_aug(
    image: np.ndarray,
    keypoints: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    params: AugParams,
    input_size: tuple[int, int],
    flip_pairs: list[tuple[int, int]],
    photometric: Photometric | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Produce the crop for one view: half-body box, scale, rotation and flip in ONE affine warp, then
    photometrics.

    ``keypoints`` is (K, 2) or (K, C>=2) in image pixels; extra columns (visibility) travel with the row.
    Returns ``(crop uint8 (h, w, 3), keypoints in crop pixels (K, C) with left/right rows swapped when
    flipped, center (2,), scale (2,), matrix (2, 3))`` where center/scale are the box actually used
    (after half-body and scale factor), i.e. what the inverse mapping needs together with rotation/flip.
    """
    if params.half_body is not None:
        hb = params.half_body
        center = np.array(hb[:2], dtype=np.float64)
        scale = np.array(hb[2:], dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64) * params.scale_factor
    center = np.asarray(center, dtype=np.float64)
    matrix = udp_warp_matrix(center, scale, params.rotation, input_size, flip=params.flip)
    crop = warp_crop(image, matrix, input_size)
    kps = np.array(keypoints, dtype=np.float64, copy=True)
    kps[:, :2] = affine_points(kps[:, :2], matrix)
    if params.flip and flip_pairs:
        left, right = np.array(flip_pairs, dtype=np.int64).T
        kps[np.concatenate([left, right])] = kps[np.concatenate([right, left])]
    if photometric is not None and params.photometric_seed >= 0:
        crop = photometric(crop, params.photometric_seed)
    return crop, kps, center, scale, matrix


def val_crop(
    image: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic evaluation transform: the box warped to the input, no augmentation.

    Returns ``(crop uint8 (h, w, 3), matrix (2, 3))``.
    """
    matrix = udp_warp_matrix(center, scale, 0.0, input_size)
    return warp_crop(image, matrix, input_size), matrix

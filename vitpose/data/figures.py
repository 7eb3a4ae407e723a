"""Synthetic people: sampling articulated stick figures and drawing them with their 17 COCO keypoints.

The drawing half of the synthetic dataset (``vitpose.data.synthetic`` writes the files). ``render_image``
draws one image from its own generator and returns it with its COCO annotations; see the synthetic module's
docstring for what the pictures look like and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

_SHIFT = 4  # cv2 sub-pixel drawing: coordinates in 1/16 pixel, so keypoints are exact, not rounded
_ONE = 1 << _SHIFT


# Fraction of its box a COCO person's segmentation covers (typical value): the OKS scale of a figure.
PERSON_BOX_FILL = 0.5


@dataclass(frozen=True)
class SynthConfig:
    """Generation knobs. Defaults aim at: a tiny ViT learns it on CPU in minutes, a smaller one less well.

    clutter: 0..1, background shapes, distractor limbs and pixel noise.
    occlusion_prob: per figure, chance of an occluder shape over one of its joints.
    pose_variety: 0..1, widens joint-angle, body-tilt, body-turn and facing-away distributions.
    """

    image_size: int = 256
    max_figures: int = 2  # 1..max_figures people per image
    min_height: float = 0.35  # figure height range (head top to feet, upright) as a fraction of image_size
    max_height: float = 0.75
    clutter: float = 0.2
    occlusion_prob: float = 0.15
    pose_variety: float = 0.5
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for name in ("clutter", "occlusion_prob", "pose_variety"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SynthConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.min_height <= self.max_height:
            raise ValueError(f"need 0 < min_height <= max_height, got {self.min_height}, {self.max_height}")
        if self.max_figures < 1 or self.image_size < 32:
            raise ValueError("need max_figures >= 1 and image_size >= 32")


# ------------------------------------------------------------------------------------------- drawing
def _pt(p: np.ndarray) -> tuple[int, int]:
    return (int(round(p[0] * _ONE)), int(round(p[1] * _ONE)))


def _hsv(
    rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]
):
    h = rng.uniform(*hue) % 180.0
    px = np.array([[[h, rng.uniform(*sat), rng.uniform(*val)]]], dtype=np.uint8)
    r, g, b = cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0]
    return (int(r), int(g), int(b))


def _warm(rng):  # left side: reds/oranges
    return _hsv(rng, (-10.0, 18.0), (150, 255), (150, 255))


def _cool(rng):  # right side: blues
    return _hsv(rng, (98.0, 125.0), (150, 255), (130, 255))


def _any_colour(rng):
    return _hsv(rng, (0.0, 180.0), (0, 255), (30, 255))


def _darker(c, f=0.55):
    return tuple(int(v * f) for v in c)


def _capsule(img, a, b, colour, thickness, aa=True):
    cv2.line(
        img, _pt(a), _pt(b), colour, max(1, int(round(thickness))), cv2.LINE_AA if aa else cv2.LINE_8, _SHIFT
    )


def _disc(img, c, radius, colour, aa=True):
    cv2.circle(
        img, _pt(c), max(1, int(round(radius * _ONE))), colour, -1, cv2.LINE_AA if aa else cv2.LINE_8, _SHIFT
    )


def _poly(img, pts, colour, aa=True):
    cv2.fillConvexPoly(
        img,
        np.array([_pt(p) for p in pts], dtype=np.int32),
        colour,
        cv2.LINE_AA if aa else cv2.LINE_8,
        _SHIFT,
    )


def _background(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    s = cfg.image_size
    c0, c1 = np.array(_any_colour(rng), np.float32), np.array(_any_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, s, dtype=np.float32)
    t = np.clip(0.5 + ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle), 0, 1)[..., None]
    img = (c0 + (c1 - c0) * t).astype(np.uint8)
    for _ in range(int(round(cfg.clutter * 30))):
        kind = rng.integers(4)
        colour = _any_colour(rng)
        c = rng.uniform(0, s, 2)
        size = rng.uniform(4, s * 0.25)
        if kind == 0:
            _disc(img, c, size / 2, colour)
        elif kind == 1:
            _poly(
                img,
                [c + size * np.array([math.cos(a), math.sin(a)]) for a in np.sort(rng.uniform(0, 6.3, 4))],
                colour,
            )
        elif kind == 2:
            _capsule(img, c, c + rng.uniform(-size, size, 2), colour, rng.uniform(1, 6))
        else:  # texture patch: upscaled noise
            w = int(max(4, size))
            patch = rng.integers(0, 255, (max(1, w // 6), max(1, w // 6), 3), dtype=np.uint8)
            patch = cv2.resize(patch, (w, w), interpolation=cv2.INTER_NEAREST)
            x0, y0 = int(c[0]), int(c[1])
            region = img[y0 : y0 + w, x0 : x0 + w]
            region[:] = patch[: region.shape[0], : region.shape[1]]
    return img


@dataclass
class _Figure:
    keypoints: np.ndarray  # (17, 2) image pixels
    labelled: np.ndarray  # (17,) bool: False for the face of a figure seen from the back
    hidden: np.ndarray  # (17,) bool: self-hidden (far ear/eye of a turned head) -> visibility 1
    parts: list  # drawing recipe: (kind, args) in z-order
    height: float


def _rotate(v: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([v[0] * math.cos(a) - v[1] * math.sin(a), v[0] * math.sin(a) + v[1] * math.cos(a)])


def _sample_figure(rng: np.random.Generator, cfg: SynthConfig, center: np.ndarray, height: float) -> _Figure:
    v = cfg.pose_variety
    L = height / 2.6  # torso length; a standing figure is ~2.6 torso lengths tall
    tilt = rng.normal(0, 8 + 25 * v) if rng.random() > 0.1 * v else rng.uniform(-180, 180)
    up = _rotate(np.array([0.0, -1.0]), tilt)
    right = _rotate(np.array([1.0, 0.0]), tilt)
    down = -up
    facing_away = rng.random() < 0.3 * v
    side = -1.0 if facing_away else 1.0  # the figure's left is at +right*side in the image
    width = rng.uniform(1.0 - 0.5 * v, 1.0)  # body turn narrows shoulders and hips
    jitter = lambda: rng.uniform(0.85, 1.15)  # noqa: E731

    pelvis = center + down * 0.2 * L  # keep the figure roughly centred on `center`
    neck = pelvis + up * L
    kp = np.zeros((17, 2))
    kp[5] = neck + right * side * 0.26 * L * width
    kp[6] = neck - right * side * 0.26 * L * width
    kp[11] = pelvis + right * side * 0.17 * L * width
    kp[12] = pelvis - right * side * 0.17 * L * width
    for sh, el, wr, sign in ((5, 7, 9, side), (6, 8, 10, -side)):
        out = right * sign
        a1 = math.radians(rng.uniform(-30 * v, 30 + 150 * v))
        d1 = math.cos(a1) * down + math.sin(a1) * out
        kp[el] = kp[sh] + d1 * 0.5 * L * jitter()
        d2 = _rotate(d1, sign * rng.uniform(-10 - 140 * v, 10 + 50 * v))
        kp[wr] = kp[el] + d2 * 0.45 * L * jitter()
    for hp, kn, an, sign in ((11, 13, 15, side), (12, 14, 16, -side)):
        out = right * sign
        a1 = math.radians(rng.uniform(-15 - 20 * v, 10 + 60 * v))
        d1 = math.cos(a1) * down + math.sin(a1) * out
        kp[kn] = kp[hp] + d1 * 0.55 * L * jitter()
        d2 = _rotate(d1, sign * rng.uniform(-10 - 100 * v, 10 + 40 * v))
        kp[an] = kp[kn] + d2 * 0.5 * L * jitter()

    head_tilt = rng.normal(0, 15 * v)
    up_h, right_h = _rotate(up, head_tilt), _rotate(right, head_tilt)
    hr = 0.22 * L * jitter()
    head = neck + up_h * (0.18 * L + hr)
    yaw = 0.0 if facing_away else rng.uniform(-0.7 * v, 0.7 * v)
    labelled = np.ones(17, dtype=bool)
    hidden = np.zeros(17, dtype=bool)
    kp[0] = head + right_h * yaw * 0.6 * hr - up_h * 0.15 * hr
    kp[1] = head + right_h * (side * 0.4 + yaw * 0.5) * hr + up_h * 0.22 * hr
    kp[2] = head + right_h * (-side * 0.4 + yaw * 0.5) * hr + up_h * 0.22 * hr
    kp[3] = head + right_h * (side * 0.95 - yaw * 0.25) * hr
    kp[4] = head + right_h * (-side * 0.95 - yaw * 0.25) * hr
    if facing_away:
        labelled[[0, 1, 2]] = False
    elif abs(yaw) > 0.3:
        # Turning the head to image-right hides the ear on that side, far enough also that eye.
        near_side_is_left = (yaw > 0) == (side > 0)
        hidden[3 if near_side_is_left else 4] = True
        if abs(yaw) > 0.55:
            hidden[1 if near_side_is_left else 2] = True

    left_c, right_c = _warm(rng), _cool(rng)
    torso_c = _hsv(rng, (0, 180), (0, 90), (60, 230))
    skin_c = _hsv(rng, (5, 22), (40, 140), (120, 235))
    t_arm, t_leg = 0.17 * L, 0.22 * L
    stripe = max(1.0, 0.035 * L)
    parts: list = []

    def limb(a, b, c, t, left):
        parts.append(("capsule", (kp[a], kp[b], c, t)))
        if left:  # the asymmetric mark: a dark stripe along left limbs
            parts.append(("stripe", (kp[a], kp[b], _darker(c, 0.35), stripe)))
        parts.append(("disc", (kp[b], t * 0.45, _darker(c, 0.8))))  # joint knob: localises elbow/wrist/...

    behind = rng.random(4) < 0.5  # per limb: drawn behind or in front of the torso
    limbs = [
        ((5, 7, 9), left_c, t_arm, True),
        ((6, 8, 10), right_c, t_arm, False),
        ((11, 13, 15), left_c, t_leg, True),
        ((12, 14, 16), right_c, t_leg, False),
    ]
    for i in np.flatnonzero(behind):
        (a, b, c), col, t, left = limbs[i]
        limb(a, b, col, t, left)
        limb(b, c, _darker(col, 0.85), t * 0.85, left)
    torso = [kp[5] + up * 0.05 * L, kp[6] + up * 0.05 * L, kp[12] + down * 0.08 * L, kp[11] + down * 0.08 * L]
    parts.append(("poly", (torso, torso_c)))
    parts.append(("capsule", (neck, head, skin_c, 0.12 * L)))
    parts.append(("disc", (head, hr, skin_c)))
    eye_r = max(0.8, 0.13 * hr)
    if not facing_away:
        parts.append(("disc", (kp[0], eye_r * 1.1, (30, 30, 30))))
        for j, col in ((1, left_c), (2, right_c)):
            if not hidden[j]:
                parts.append(("disc", (kp[j], eye_r, col)))
    for j, col in ((3, left_c), (4, right_c)):
        if not hidden[j]:
            parts.append(("disc", (kp[j], max(1.0, 0.22 * hr), _darker(col, 0.8))))
    for i in range(4):
        if not behind[i]:
            (a, b, c), col, t, left = limbs[i]
            limb(a, b, col, t, left)
            limb(b, c, _darker(col, 0.85), t * 0.85, left)
    return _Figure(kp, labelled, hidden, parts, height)


def _draw(img: np.ndarray, parts: list, aa: bool = True, colour=None) -> None:
    """Draw a figure's recipe; ``colour`` overrides every colour (silhouette masks)."""
    for kind, args in parts:
        if kind == "capsule":
            a, b, c, t = args
            _capsule(img, a, b, colour or c, t, aa)
        elif kind == "stripe":
            if colour is None:
                a, b, c, t = args
                _capsule(img, a, b, c, t, aa)
        elif kind == "disc":
            p, r, c = args
            _disc(img, p, r, colour or c, aa)
        elif kind == "poly":
            pts, c = args
            _poly(img, pts, colour or c, aa)


def render_image(
    rng: np.random.Generator, cfg: SynthConfig, n_figures: int
) -> tuple[np.ndarray, list[dict]]:
    """One canvas with ``n_figures`` people; returns (RGB image, annotation dicts without ids)."""
    s = cfg.image_size
    img = _background(rng, cfg)
    for _ in range(int(round(cfg.clutter * 6))):  # distractor limbs in left/right colours
        a = rng.uniform(0, s, 2)
        b = a + rng.uniform(-0.2, 0.2, 2) * s
        _capsule(img, a, b, (_warm if rng.random() < 0.5 else _cool)(rng), rng.uniform(3, 12))
    owner = np.zeros((s, s), np.uint8)  # top-most figure id per pixel (0 = none, 255 = occluder)
    masks, figures = [], []
    for f in range(n_figures):
        height = rng.uniform(cfg.min_height, cfg.max_height) * s
        center = rng.uniform(0.15 * s, 0.85 * s, 2)
        fig = _sample_figure(rng, cfg, center, height)
        _draw(img, fig.parts)
        mask = np.zeros((s, s), np.uint8)
        _draw(mask, fig.parts, aa=False, colour=1)
        np.copyto(owner, np.uint8(f + 1), where=mask.view(bool))
        masks.append(mask)
        figures.append(fig)
    for fig in figures:  # occluders go on top of everything
        if rng.random() < cfg.occlusion_prob:
            c = fig.keypoints[rng.integers(17)] + rng.normal(0, 3, 2)
            size = rng.uniform(0.08, 0.2) * fig.height
            pts = [c + size * np.array([math.cos(a), math.sin(a)]) for a in np.sort(rng.uniform(0, 6.3, 5))]
            occ = np.zeros((s, s), np.uint8)
            _poly(occ, pts, 1, aa=False)
            _poly(img, pts, _any_colour(rng))
            np.copyto(owner, np.uint8(255), where=occ.view(bool))
    noise = rng.standard_normal(img.shape, dtype=np.float32) * (2 + 8 * cfg.clutter)
    img = cv2.add(img, noise, dtype=cv2.CV_8U)  # saturating add

    anns = []
    for f, (fig, mask) in enumerate(zip(figures, masks, strict=True)):
        if cv2.countNonZero(mask) == 0:
            continue
        kps = np.zeros((17, 3))
        for j, (x, y) in enumerate(fig.keypoints):
            if not fig.labelled[j] or not (0 <= x <= s - 1 and 0 <= y <= s - 1):
                continue  # unlabelled or truncated: (0, 0, 0) like COCO
            covered = owner[int(round(y)), int(round(x))] != f + 1
            kps[j] = (x, y, 1 if (covered or fig.hidden[j]) else 2)
        x0, y0, w, h = cv2.boundingRect(mask)
        # OKS scales its tolerance by sqrt(area). COCO's sigmas were calibrated on real people, whose
        # segment fills about half their box; a stick figure's thin silhouette fills far less and would make
        # OKS much stricter than on COCO for the same keypoint error. Use a person-shaped area instead.
        area = PERSON_BOX_FILL * w * h
        anns.append(
            {
                "bbox": [float(x0), float(y0), float(w), float(h)],
                "area": float(area),
                "keypoints": [
                    round(float(v), 2) if i % 3 != 2 else int(v) for i, v in enumerate(kps.reshape(-1))
                ],
                "num_keypoints": int((kps[:, 2] > 0).sum()),
            }
        )
    return img, anns

"""COCO keypoint AP of the UDP decoder against mmpose's, on the real mini COCO (tests/data/coco_val2017_mini).

    python -m benchmarks.codec_ap [--seeds 10]          # ~1 min on 2 cores

Three decoders read the same heatmaps: ``mmpose`` (the transcription of mmpose 0.x ``_get_max_preds`` +
``post_dark_udp`` in tests/test_codec_reference.py, what ViTPose's published AP was measured with),
``ours`` (``vitpose.data.codec.decode``) and ``previous`` (our decoder before it was matched to mmpose:
the Newton step skipped unless the log-Hessian is negative definite and clipped to +-0.5 heatmap px).
Image coordinates, rescoring, OKS-NMS and COCOeval are the evaluation's own (``to_image_coords``,
``CocoKeypointEvaluator``).

Heatmaps: the GT keypoints encoded in the evaluation crops (``TopDownCocoDataset`` with GT boxes, 14
people; or the 118 detector boxes, a crop getting the GT pose it overlaps with IoU >= 0.5, blank maps
otherwise), for both the crop and its mirror, each with its own seeded noise, merged like the flip test.
Noise: ``white`` (per pixel) or ``smooth`` (Gaussian-filtered, sigma 1.5 px), at a standard deviation of
``level`` (the clean peaks are 1). ``<=0`` scenarios then push a fraction of the merged maps below zero,
either keeping their shape (``shifted``) or blanking them (``zeroed``): the one case where ``ours`` still
differs from ``mmpose`` on purpose (argmax kept instead of mmpose's (-1, -1) plus a step read from the
neighbouring map's memory).

Per row: mean AP over the seeds for each decoder and the per-seed differences to mmpose (mean, min, max).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from tests.conftest import MINI_ANN, MINI_DETS, MINI_IMAGES
from tests.test_codec_reference import det_crop_heatmaps, mmpose_decode
from vitpose.data.coco import TopDownCocoDataset
from vitpose.data.codec import _argmax, _blur, decode, flip_back, to_image_coords
from vitpose.data.transforms import AugParams
from vitpose.evaluation import CocoKeypointEvaluator, decode_batch_to_predictions


def previous_decode(heatmaps: np.ndarray, blur_kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """The decoder as it was before (git history of vitpose/data/codec.py): gated, clipped Newton step."""
    hm = np.asarray(heatmaps, dtype=np.float32)
    n, k, _, _ = hm.shape
    coords, maxvals = _argmax(hm)
    pad = np.pad(
        np.log(np.clip(_blur(hm, blur_kernel), 1e-3, 50.0)), ((0, 0), (0, 0), (1, 1), (1, 1)), "edge"
    )
    px, py = coords[..., 0].astype(np.int64) + 1, coords[..., 1].astype(np.int64) + 1
    bi, ki = np.arange(n)[:, None], np.arange(k)[None, :]

    def at(dx: int, dy: int) -> np.ndarray:
        return pad[bi, ki, py + dy, px + dx].astype(np.float64)

    i0, ix1, ix1_, iy1, iy1_ = at(0, 0), at(1, 0), at(-1, 0), at(0, 1), at(0, -1)
    dx, dy = 0.5 * (ix1 - ix1_), 0.5 * (iy1 - iy1_)
    dxx, dyy = ix1 - 2 * i0 + ix1_, iy1 - 2 * i0 + iy1_
    dxy = 0.5 * (at(1, 1) - ix1 - iy1 + 2 * i0 - ix1_ - iy1_ + at(-1, -1))
    det = dxx * dyy - dxy**2
    ok = (dxx < 0) & (det > 1e-12)
    safe = np.where(ok, det, 1.0)
    offset = np.stack([(dyy * dx - dxy * dy) / safe, (dxx * dy - dxy * dx) / safe], axis=-1)
    return coords - np.where(ok[..., None], np.clip(offset, -0.5, 0.5), 0.0), maxvals


DECODERS = {"mmpose": mmpose_decode, "ours": decode, "previous": previous_decode}


class Scene:
    """One box set: clean heatmaps of the crops and of their mirrors, crop metadata, an evaluator."""

    def __init__(self, name: str, ds: TopDownCocoDataset, hm: np.ndarray, hm_flip: np.ndarray):
        self.name, self.ds, self.hm, self.hm_flip = name, ds, hm, hm_flip
        self.center = np.stack([i.center for i in ds.instances]).astype(np.float64)
        self.scale = np.stack([i.scale for i in ds.instances]).astype(np.float64)
        self.image_id = [int(i.image_id) for i in ds.instances]
        self.bbox_score = [float(i.bbox_score) for i in ds.instances]
        self.evaluator = CocoKeypointEvaluator(MINI_ANN)

    def predictions(self, coords: np.ndarray, scores: np.ndarray) -> list[dict]:
        img = to_image_coords(coords, self.center, self.scale, self.ds.input_size, self.hm.shape[2:])
        return [
            {
                "image_id": self.image_id[i],
                "keypoints": np.concatenate([img[i], scores[i][:, None]], axis=1),
                "bbox_score": self.bbox_score[i],
                "center": self.center[i],
                "scale": self.scale[i],
                "area": float(self.scale[i, 0] * self.scale[i, 1]),
            }
            for i in range(len(img))
        ]

    def ap(self, merged: np.ndarray, decoder) -> float:
        coords, scores = decoder(merged)
        return self.evaluator.evaluate(self.predictions(np.asarray(coords, np.float64), scores))["AP"]


def gt_scene() -> Scene:
    ds = TopDownCocoDataset(MINI_ANN, MINI_IMAGES, train=False)
    hm = torch.stack([ds.load(i)["target"] for i in range(len(ds))]).numpy()
    hm_flip = torch.stack([ds.load(i, AugParams(flip=True))["target"] for i in range(len(ds))]).numpy()
    return Scene("GT boxes (14)", ds, hm, hm_flip)


def det_scene() -> Scene:
    ds = TopDownCocoDataset(MINI_ANN, MINI_IMAGES, train=False, det_file=MINI_DETS)
    hm = det_crop_heatmaps(ds)
    # The mirrored crop's maps in the mirrored frame: flip_back is its own inverse.
    return Scene("detector boxes (118)", ds, hm, flip_back(hm, ds.flip_pairs))


def noise(shape, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    z = rng.normal(0.0, 1.0, shape).astype(np.float32)
    if kind == "smooth":
        flat = z.reshape(-1, *shape[2:])
        z = np.stack([cv2.GaussianBlur(m, (0, 0), 1.5) for m in flat]).reshape(shape)
        z /= z.std()
    return level * z


def merged_heatmaps(scene: Scene, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    a = scene.hm + noise(scene.hm.shape, kind, level, rng)
    b = scene.hm_flip + noise(scene.hm.shape, kind, level, rng)
    return 0.5 * (a + flip_back(b, scene.ds.flip_pairs))


def push_below_zero(hm: np.ndarray, fraction: float, mode: str, rng: np.random.Generator) -> np.ndarray:
    hm = hm.copy()
    pick = rng.random(hm.shape[:2]) < fraction
    if mode == "shifted":
        depth = rng.uniform(0.01, 0.3, hm.shape[:2])
        hm[pick] -= (hm.max((2, 3)) + depth)[pick][:, None, None]
    else:
        hm[pick] = 0.0
    return hm.astype(np.float32)


def run_row(scene: Scene, label: str, seeds: int, make) -> dict[str, np.ndarray]:
    aps = {name: [] for name in DECODERS}
    for seed in range(seeds):
        hm = make(np.random.default_rng(seed)).astype(np.float32)
        for name, f in DECODERS.items():
            aps[name].append(scene.ap(hm, f))
    aps = {k: np.array(v) for k, v in aps.items()}
    d_ours, d_prev = aps["ours"] - aps["mmpose"], aps["previous"] - aps["mmpose"]
    print(
        f"{scene.name:<21} {label:<27} {aps['mmpose'].mean():.4f} {aps['ours'].mean():.4f} "
        f"{aps['previous'].mean():.4f} | {d_ours.mean():+.4f} {d_ours.min():+.4f} {d_ours.max():+.4f} | "
        f"{d_prev.mean():+.4f} {d_prev.min():+.4f} {d_prev.max():+.4f}",
        flush=True,
    )
    return aps


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codec_ap", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="noise seeds per row (default 10)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    args = p.parse_args()
    t0 = time.perf_counter()
    scenes = [gt_scene(), det_scene()]
    # Sanity: our decoder through this script's predictions == the evaluation's own path.
    s = scenes[0]
    metas = {
        "center": s.center,
        "scale": s.scale,
        "image_id": np.array(s.image_id),
        "bbox_score": s.bbox_score,
    }
    ref = decode_batch_to_predictions(
        s.hm, metas, s.hm_flip, flip_pairs=s.ds.flip_pairs, input_size=s.ds.input_size
    )
    mine = s.predictions(*decode(0.5 * (s.hm + flip_back(s.hm_flip, s.ds.flip_pairs))))
    assert all(np.array_equal(a["keypoints"], b["keypoints"]) for a, b in zip(ref, mine, strict=True))

    print(f"{'boxes':<21} {'heatmaps':<27} {'AP: mmpose':>6} {'ours':>6} {'prev':>6} | "
          f"{'ours - mmpose: mean, min, max':<23} | previous - mmpose: mean, min, max")  # fmt: skip
    rows = []
    for scene in scenes:
        levels = args.levels if scene is scenes[0] else [lv for lv in args.levels if lv in (0.0, 0.1, 0.3)]
        for kind in ("white", "smooth"):
            for level in levels:
                if level == 0 and kind == "smooth":
                    continue
                seeds = args.seeds if level > 0 else 1
                label = f"{kind} {level}" if level > 0 else "clean"

                def noisy(r, sc=scene, k=kind, lv=level):
                    return merged_heatmaps(sc, k, lv, r)

                rows.append(run_row(scene, label, seeds, noisy))
    gt = scenes[0]
    for mode in ("shifted", "zeroed"):
        for fraction in (0.1, 0.3):
            for level in (0.0, 0.1):
                label = f"<=0 {mode} {fraction:.0%}, white {level}"

                def make(r, m=mode, f=fraction, lv=level):
                    return push_below_zero(merged_heatmaps(gt, "white", lv, r), f, m, r)

                rows.append(run_row(gt, label, args.seeds, make))
    print()
    d_ours = np.concatenate([r["ours"] - r["mmpose"] for r in rows])
    d_prev = np.concatenate([r["previous"] - r["mmpose"] for r in rows])
    for name, d in (("ours", d_ours), ("previous", d_prev)):
        print(f"{name} - mmpose over all {len(d)} runs: AP difference in [{d.min():+.4f}, {d.max():+.4f}], "
              f"lower in {(d < 0).sum()} runs, higher in {(d > 0).sum()}")  # fmt: skip
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

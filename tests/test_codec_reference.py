"""UDP decoder against a transcription of mmpose 0.x's, the decoder behind ViTPose's published AP.

What the reference does for ViTPose's test config
-------------------------------------------------
ViTPose (github.com/ViTAE-Transformer/ViTPose, which vendors mmpose 0.x) tests every COCO model with
``test_cfg = dict(flip_test=True, post_process='default', shift_heatmap=False,
target_type='GaussianHeatmap', modulate_kernel=11, use_udp=True)``
(configs/body/2d_kpt_sview_rgb_img/topdown_heatmap/coco/ViTPose_*_coco_256x192.py).

* Flip test: ``TopdownHeatmapSimpleHead.inference_model`` (mmpose/models/heads/topdown_heatmap_simple_head.py)
  mirrors the flipped crop's heatmaps back and swaps left/right channels (``flip_back``,
  mmpose/core/post_processing/post_transforms.py); ``shift_heatmap=False`` so no one-pixel shift.
  ``TopDown.forward_test`` (mmpose/models/detectors/top_down.py) averages both views, (a + b) / 2, before
  decoding. ``vitpose.evaluation.decode_batch_to_predictions`` does the same.
* ``TopdownHeatmapBaseHead.decode`` calls ``keypoints_from_heatmaps``
  (mmpose/core/evaluation/top_down_eval.py) with ``unbiased=False, post_process='default', kernel=11,
  use_udp=True, target_type='GaussianHeatmap'``.
* In ``keypoints_from_heatmaps`` the ``use_udp`` branch is taken before ``post_process`` is looked at: for
  a Gaussian heatmap it is ``_get_max_preds`` followed by ``post_dark_udp(preds, heatmaps, kernel=11)``,
  whatever ``post_process`` says. The +-0.25 quarter-pixel shift (``post_process='default'``) and the
  ``_taylor``/``_gaussian_blur`` DARK variant (``'unbiased'``) live only in the non-UDP branch, so neither
  applies to ViTPose. ``'megvii'`` is rejected with UDP.
* ``_get_max_preds``: first flat argmax per map, x = idx % W, y = idx // W; the score is the raw maximum;
  both coordinates become -1 where that maximum is <= 0.
* ``post_dark_udp``: every map is blurred in place with ``cv2.GaussianBlur`` (kernel 11, sigma derived from
  the kernel, OpenCV's default reflect-101 border), clipped to [0.001, 50] and log'ed (all float32). The
  batch is padded by one edge-replicated pixel and flattened; the argmax and six neighbours (left, right,
  up, down, up-left, down-right) are read by flat index ``x+1 + (y+1)(W+2) + map*(H+2)(W+2)`` plus a fixed
  offset. Gradient by central differences; Hessian ``dxx, dyy`` (second differences) and ``dxy`` from the
  two diagonal neighbours; ``np.linalg.inv(H + eps32 * I)``; ``coords -= H^-1 g``. No bound on the step,
  no test of the Hessian's sign. With the -1 sentinel the flat index lands on the map's padded top-left
  corner, so the left/up/up-left reads fall into the previous map's last padded row (for the batch's first
  map: wrap around to the end of the whole array).
* ``transform_preds(coords, center, scale, [W, H], use_udp=True)`` (post_transforms.py): with the box size
  ``s = scale * 200``, image x = x * s_w / (W - 1) + c_x - s_w / 2 (y alike); the result keeps the dtype of
  the coords (float32 there).

Our ``decode`` follows this to float32 rounding (tolerances per test below), with one asserted exception:
a map whose maximum is <= 0 keeps its argmax instead of mmpose's batch-dependent (-1, -1)-plus-step
(``python -m benchmarks.codec_ap`` measures the AP effect). Heatmap coordinates are in heatmap pixels
(64 x 48 here: one heatmap pixel is ~4 input pixels).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import torch

from tests.conftest import MINI_ANN, MINI_DETS, MINI_IMAGES
from vitpose.data.coco import TopDownCocoDataset
from vitpose.data.codec import decode, encode, flip_back, to_image_coords
from vitpose.data.transforms import AugParams, affine_points, udp_warp_matrix
from vitpose.evaluation import decode_batch_to_predictions

INPUT, HEATMAP = (256, 192), (64, 48)
H, W = HEATMAP
STRIDE = np.array([(INPUT[1] - 1) / (W - 1), (INPUT[0] - 1) / (H - 1)])

# Where the refinement is well conditioned (Gaussian-like peaks) the two agree to the float32 rounding of
# mmpose's float32 result (measured <= 3e-6 heatmap px); 2e-5 heatmap px (~1e-4 input px) is the bound.
ATOL = 2e-5
# Random maps also have near-singular Hessians, where both take steps of hundreds of pixels; there the
# float32 rounding grows with the step: allow ATOL + 1e-5 x the step length (measured: <= 2e-6 x).
RTOL_STEP = 1e-5


# ----------------------------------------------------------------------------------------------------------
# The reference, transcribed (mmpose 0.x, mmpose/core/evaluation/top_down_eval.py and post_transforms.py).


def mmpose_get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_get_max_preds``: float32 argmax coords (N, K, 2), -1 where the maximum is <= 0; maxima (N, K, 1)."""
    n, k, _, w = heatmaps.shape
    flat = heatmaps.reshape((n, k, -1))
    idx = np.argmax(flat, 2).reshape((n, k, 1))
    maxvals = np.amax(flat, 2).reshape((n, k, 1))
    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)
    preds[:, :, 0] = preds[:, :, 0] % w
    preds[:, :, 1] = preds[:, :, 1] // w
    preds = np.where(np.tile(maxvals, (1, 1, 2)) > 0.0, preds, -1)
    return preds, maxvals


def mmpose_post_dark_udp(coords: np.ndarray, batch_heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """``post_dark_udp`` for the top-down case (one heatmap set per instance); modifies its inputs."""
    b, k, h, w = batch_heatmaps.shape
    n = coords.shape[0]
    for maps in batch_heatmaps:
        for m in maps:
            cv2.GaussianBlur(m, (kernel, kernel), 0, m)  # in place, default border
    np.clip(batch_heatmaps, 0.001, 50, batch_heatmaps)
    np.log(batch_heatmaps, batch_heatmaps)
    flat = np.pad(batch_heatmaps, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge").flatten()
    index = coords[..., 0] + 1 + (coords[..., 1] + 1) * (w + 2)
    index += (w + 2) * (h + 2) * np.arange(0, b * k).reshape(-1, k)
    index = index.astype(int).reshape(-1, 1)
    i_ = flat[index]
    ix1, ix1_ = flat[index + 1], flat[index - 1]
    iy1, iy1_ = flat[index + w + 2], flat[index - 2 - w]
    ix1y1, ix1_y1_ = flat[index + w + 3], flat[index - w - 3]
    dx = 0.5 * (ix1 - ix1_)
    dy = 0.5 * (iy1 - iy1_)
    derivative = np.concatenate([dx, dy], axis=1).reshape(n, k, 2, 1)
    dxx = ix1 - 2 * i_ + ix1_
    dyy = iy1 - 2 * i_ + iy1_
    dxy = 0.5 * (ix1y1 - ix1 - iy1 + i_ + i_ - ix1_ - iy1_ + ix1_y1_)
    hessian = np.concatenate([dxx, dxy, dxy, dyy], axis=1).reshape(n, k, 2, 2)
    hessian = np.linalg.inv(hessian + np.finfo(np.float32).eps * np.eye(2))
    # mmpose squeezes the (N, K, 2, 1) step; reshape is the same for every shape that squeeze handles.
    coords -= np.einsum("ijmn,ijnk->ijmk", hessian, derivative).reshape(n, k, 2)
    return coords


def mmpose_decode(heatmaps, kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """The ``use_udp`` + GaussianHeatmap branch of ``keypoints_from_heatmaps``, before ``transform_preds``."""
    hm = np.array(heatmaps, dtype=np.float32, copy=True)  # keypoints_from_heatmaps copies its input
    preds, maxvals = mmpose_get_max_preds(hm)
    return mmpose_post_dark_udp(preds, hm, kernel), maxvals[..., 0]


def mmpose_transform_preds(coords, center, scale, output_size_wh) -> np.ndarray:
    """``transform_preds(..., use_udp=True)``; ``scale`` in mmpose's units of 200 px. Computed in float64."""
    s = np.asarray(scale, dtype=np.float64) * 200.0
    out = np.array(coords, dtype=np.float64, copy=True)
    out[:, 0] = coords[:, 0] * (s[0] / (output_size_wh[0] - 1.0)) + center[0] - s[0] * 0.5
    out[:, 1] = coords[:, 1] * (s[1] / (output_size_wh[1] - 1.0)) + center[1] - s[1] * 0.5
    return out


def mmpose_keypoints_from_heatmaps(heatmaps, center, scale_px) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps -> image coordinates, mmpose's way; ``scale_px`` is our pixel box size (mmpose's x 200)."""
    coords, maxvals = mmpose_decode(heatmaps)
    n, _, h, w = np.shape(heatmaps)
    return np.stack(
        [mmpose_transform_preds(coords[i], center[i], scale_px[i] / 200.0, [w, h]) for i in range(n)]
    ), maxvals


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _argmax_xy(hm: np.ndarray) -> np.ndarray:
    n, k, h, w = hm.shape
    idx = hm.reshape(n, k, -1).argmax(-1)
    return np.stack([idx % w, idx // w], axis=-1).astype(np.float64)


def _assert_matches(hm: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """decode == reference where the maximum is > 0 (tolerance ATOL + RTOL_STEP x step), identical scores.

    Returns both coordinate arrays for further checks."""
    ours, scores = decode(hm)
    ref, ref_scores = mmpose_decode(hm)
    np.testing.assert_array_equal(scores, ref_scores)
    pos = ref_scores > 0
    step = np.abs(ref - _argmax_xy(hm)).max(-1)
    err = np.abs(ours - ref).max(-1)
    bound = ATOL + RTOL_STEP * step
    worst = np.unravel_index(np.argmax(np.where(pos, err / bound, 0)), err.shape)
    print(
        f"\n{what}: {pos.sum()} maps with max > 0, max |ours - mmpose| {err[pos].max():.2e} heatmap px, "
        f"largest step {step[pos].max():.3g} px"
    )
    assert (err[pos] <= bound[pos]).all(), f"{what}: {err[worst]:.3e} > {bound[worst]:.3e} at {worst}"
    return ours, ref


# ----------------------------------------------------------------------------------------------------------
# (a) random heatmaps


def test_random_heatmaps_match_reference():
    rng = np.random.default_rng(10)
    shape = (24, 17, H, W)
    cases = {
        "uniform [0, 1)": rng.random(shape),
        "normal(0.5, 1), some pixels < 0": rng.normal(0.5, 1.0, shape),
        "lognormal, wide dynamic range": np.exp(rng.normal(0.0, 2.0, shape)),
        "uniform [0, 0.01), below the 1e-3 log clip in places": 0.01 * rng.random(shape),
    }
    long_steps = 0
    for what, hm in cases.items():
        hm = hm.astype(np.float32)
        _, ref = _assert_matches(hm, what)
        long_steps += int((np.abs(ref - _argmax_xy(hm)) > 0.5).any(-1).sum())
    # The mix covers what the previous guards changed: steps longer than half a pixel (it clipped them).
    assert long_steps > 1000


# ----------------------------------------------------------------------------------------------------------
# (b) real-looking Gaussians from our encoder


def test_encoded_gaussians_match_reference():
    """Targets at random sub-pixel positions over the whole crop and beyond it, random peak heights."""
    rng = np.random.default_rng(11)
    kps = rng.uniform([-12, -12], [203, 267], (96, 17, 2))  # the outermost ones sit off the heatmap
    t, w = encode(kps, np.ones((96, 17)), INPUT, HEATMAP)
    t *= rng.uniform(0.05, 1.0, (96, 17, 1, 1)).astype(np.float32)  # a model's peaks are not all 1
    ours, ref = _assert_matches(t, "encoded targets")
    # The reference is the unguarded step: near the edge it moves the argmax by more than half a pixel.
    mu = kps / STRIDE
    edge = ((mu < 3) | (mu > np.array([W - 4, H - 4]))).any(-1) & (w > 0)
    assert (np.abs(ref - _argmax_xy(t)).max(-1)[edge] > 0.5).any()
    # ... and in the interior both sit on the encoded sub-pixel location.
    inner = ((mu > 6) & (mu < np.array([W - 7, H - 7]))).all(-1)
    assert np.abs(ours - mu)[inner].max() < 1e-3


def test_noisy_encoded_gaussians_match_reference():
    """What a model's merged output looks like: a peak plus smooth and per-pixel errors."""
    rng = np.random.default_rng(12)
    kps = rng.uniform(0, [191, 255], (64, 17, 2))
    t, _ = encode(kps, np.ones((64, 17)), INPUT, HEATMAP)
    smooth = rng.normal(0, 1, t.shape).astype(np.float32)
    smooth = np.stack([[cv2.GaussianBlur(m, (0, 0), 1.5) for m in b] for b in smooth])
    for level in (0.02, 0.1, 0.3):
        hm = t + level * rng.normal(0, 1, t.shape).astype(np.float32) + level * smooth / smooth.std()
        _assert_matches(hm.astype(np.float32), f"encoded + noise {level}")


# ----------------------------------------------------------------------------------------------------------
# (c) flat maps, (d) maxima on the border, (e) maxima <= 0


def test_flat_maps():
    zeros = np.zeros((2, 17, H, W), np.float32)
    const = np.full((2, 17, H, W), 0.37, np.float32)
    # Positive constant: argmax is the first pixel, blurred log-map flat -> no step, in both.
    ours, ref = _assert_matches(const, "constant 0.37")
    np.testing.assert_array_equal(ours, 0.0)
    np.testing.assert_array_equal(ref, 0.0)
    for hm, what in ((zeros, "all zeros"), (np.full_like(zeros, -0.2), "constant -0.2")):
        ours, scores = decode(hm)
        ref, _ = mmpose_decode(hm)
        np.testing.assert_array_equal(scores, hm.max((2, 3)))
        np.testing.assert_array_equal(ours, 0.0)  # ours: the argmax, the first pixel
        np.testing.assert_array_equal(ref, -1.0)  # mmpose: its sentinel; every map flat, so no step
        # The whole difference: one heatmap pixel diagonally, i.e. ~4 input px, on a joint scored <= 0.
        print(f"{what}: ours (0, 0), mmpose (-1, -1)")


def _peak(x: float, y: float, sigma: float = 2.0) -> np.ndarray:
    xs, ys = np.arange(W), np.arange(H)[:, None]
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_border_and_corner_maxima_match_reference():
    rng = np.random.default_rng(13)
    border = [(x, 0) for x in range(W)] + [(x, H - 1) for x in range(W)]
    border += [(0, y) for y in range(1, H - 1)] + [(W - 1, y) for y in range(1, H - 1)]
    maps = []
    for x, y in border:
        dx, dy = rng.uniform(-0.7, 0.7, 2)  # peaks just inside and just outside the edge
        maps.append(_peak(x + dx, y + dy))
        spike = np.zeros((H, W), np.float32)
        spike[y, x] = rng.uniform(0.01, 1.0)  # a lone hot pixel
        maps.append(spike)
    for x, y in ((0, 0), (W - 1, 0), (0, H - 1), (W - 1, H - 1)):  # corners, with a far-off outer peak
        maps.append(_peak(x + np.sign(W / 2 - x) * -3, y + np.sign(H / 2 - y) * -3, sigma=3.0))
    # Ties: a plateau along the top row and down the right column (argmax: first pixel in raster order).
    plateau = np.zeros((H, W), np.float32)
    plateau[0, 10:30] = 0.8
    maps.append(plateau)
    plateau = np.zeros((H, W), np.float32)
    plateau[20:40, W - 1] = 0.8
    maps.append(plateau)
    maps += [np.zeros((H, W), np.float32)] * (-len(maps) % 17)
    hm = np.stack(maps).reshape(-1, 17, H, W)
    ours, _ = _assert_matches(hm, "border, corner and plateau maxima")
    assert (np.abs(ours - _argmax_xy(hm)) > 0.5).any()  # unbounded steps really happen here


def test_nonpositive_maxima_keep_their_argmax_where_mmpose_uses_the_neighbouring_memory():
    rng = np.random.default_rng(14)
    kps = rng.uniform(0, [191, 255], (8, 17, 2))
    t, _ = encode(kps, np.ones((8, 17)), INPUT, HEATMAP)
    # A shape-preserving shift below zero for half of the maps: their maxima are -0.01 .. -0.5.
    down = rng.random((8, 17)) < 0.5
    shift = np.where(down, t.max((2, 3)) + rng.uniform(0.01, 0.5, (8, 17)), 0.0).astype(np.float32)
    hm = t - shift[..., None, None]
    ours, scores = decode(hm)
    ref, _ = mmpose_decode(hm)
    argmax = _argmax_xy(hm)
    np.testing.assert_array_equal(scores <= 0, down)
    np.testing.assert_array_equal(ours[down], argmax[down])  # exactly the argmax, no step
    # mmpose: the -1 sentinel, then a step computed from the previous map's (or, for the first map of the
    # batch, the last map's) bottom-row values. Those maps are positive Gaussians or shifted-down ones.
    assert np.abs(ref[down] - (-1.0)).max() > 0  # for some maps that stray step moves it off (-1, -1)
    # Where the map before it is flat at the log clip in its bottom row (true for most maps here), the
    # step is exactly 0 and mmpose's answer is the sentinel.
    prev = np.roll(hm.reshape(-1, H, W), 1, axis=0).reshape(hm.shape)  # in mmpose's flat memory order
    prev_flat = (cv2_blur_row(prev) <= 1e-3).all(-1)
    quiet = down & prev_flat
    assert quiet.sum() >= 10
    np.testing.assert_array_equal(ref[quiet], -1.0)
    # Distance between the two answers, in heatmap px (the argmax is the encoded peak's nearest pixel).
    print(
        f"\nmaxima <= 0: {down.sum()} maps; ours = argmax; mmpose = (-1, -1) for {quiet.sum()} of them; "
        f"max |ours - mmpose| {np.abs(ours - ref)[down].max():.1f} heatmap px"
    )
    # The maps with a positive maximum still match.
    assert (np.abs(ours - ref).max(-1)[~down] <= ATOL + RTOL_STEP * np.abs(ref - argmax).max(-1)[~down]).all()

    # mmpose's answer for a map depends on the map stored before it; ours does not (per-crop == batched).
    hm2 = hm.copy()
    first = np.argwhere(down)[0]
    before = (first[0], first[1] - 1) if first[1] > 0 else (first[0] - 1, 16)
    hm2[before] = _peak(W - 1, H - 1)  # a peak in the bottom-right corner of the map before it
    ref2, _ = mmpose_decode(hm2)
    assert np.abs(ref2[tuple(first)] - ref[tuple(first)]).max() > 0.1
    ours2, _ = decode(hm2)
    np.testing.assert_array_equal(ours2[tuple(first)], ours[tuple(first)])
    per_crop = np.concatenate([decode(hm[i : i + 1])[0] for i in range(len(hm))])
    np.testing.assert_array_equal(per_crop, ours)


def cv2_blur_row(maps: np.ndarray) -> np.ndarray:
    """Bottom row of each map after the reference's blur (kernel 11): what mmpose's stray reads see."""
    flat = maps.reshape(-1, H, W).astype(np.float32)
    return np.stack([cv2.GaussianBlur(m, (11, 11), 0)[-1] for m in flat]).reshape(*maps.shape[:2], W)


# ----------------------------------------------------------------------------------------------------------
# (f) real heatmaps: mini COCO val2017 ground truth through the evaluation crop, flip test merged


def det_crop_heatmaps(ds: TopDownCocoDataset) -> np.ndarray:
    """Detector crops (118): the GT pose with the best box IoU >= 0.5 encoded in the crop, else blank maps."""
    gt = json.loads(MINI_ANN.read_text())
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        if a["num_keypoints"] > 0:
            by_image.setdefault(a["image_id"], []).append(a)

    def iou(a, b):
        iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)

    out = []
    for inst in ds.instances:
        best = max(((iou(inst.bbox, a["bbox"]), a) for a in by_image.get(inst.image_id, [])),
                   key=lambda c: c[0], default=(0.0, None))  # fmt: skip
        if best[0] >= 0.5:
            kps = np.asarray(best[1]["keypoints"], dtype=np.float64).reshape(-1, 3)
            m = udp_warp_matrix(inst.center, inst.scale, 0.0, ds.input_size)
            out.append(encode(affine_points(kps[:, :2], m), kps[:, 2], ds.input_size, ds.heatmap_size)[0])
        else:
            out.append(np.zeros((ds.num_keypoints, *ds.heatmap_size), np.float32))
    return np.stack(out)


def test_real_coco_heatmaps_match_reference_in_image_coordinates():
    """GT boxes (14 people, flip test merged, clean and noisy) and detector boxes (118 crops, most blank):
    our evaluation path (``decode_batch_to_predictions``) against mmpose's, in original image pixels."""
    gt_ds = TopDownCocoDataset(MINI_ANN, MINI_IMAGES, train=False)
    items = [gt_ds.load(i) for i in range(len(gt_ds))]
    t = torch.stack([it["target"] for it in items]).numpy()
    tf = torch.stack([gt_ds.load(i, AugParams(flip=True))["target"] for i in range(len(gt_ds))]).numpy()
    det_ds = TopDownCocoDataset(MINI_ANN, MINI_IMAGES, train=False, det_file=MINI_DETS)
    det = det_crop_heatmaps(det_ds)
    rng = np.random.default_rng(15)

    def noisy(x, level):
        return (x + level * rng.normal(0, 1, x.shape)).astype(np.float32)

    cases = [
        ("GT boxes, flip merged", gt_ds, t, tf),
        ("GT boxes, flip merged, noise 0.1", gt_ds, noisy(t, 0.1), noisy(tf, 0.1)),
        ("detector boxes", det_ds, det, None),
    ]
    for what, ds, hm, hm_flip in cases:
        metas = {
            "center": np.stack([i.center for i in ds.instances]),
            "scale": np.stack([i.scale for i in ds.instances]),
            "image_id": np.array([i.image_id for i in ds.instances]),
            "bbox_score": np.array([i.bbox_score for i in ds.instances]),
        }
        preds = decode_batch_to_predictions(
            hm, metas, hm_flip, flip_pairs=ds.flip_pairs, input_size=ds.input_size
        )
        ours = np.stack([p["keypoints"] for p in preds])
        merged = hm if hm_flip is None else 0.5 * (hm + flip_back(hm_flip, ds.flip_pairs))
        ref, ref_scores = mmpose_keypoints_from_heatmaps(merged, metas["center"], metas["scale"])
        np.testing.assert_array_equal(ours[..., 2], ref_scores)
        pos = ref_scores > 0
        px_per_hm = (metas["scale"] / np.array([W - 1, H - 1])).max()  # image px per heatmap px, largest box
        err = np.abs(ours[..., :2] - ref).max(-1)
        print(
            f"\n{what}: {pos.sum()} joints with max > 0 agree to {err[pos].max():.1e} image px "
            f"(bound {ATOL * px_per_hm:.1e}); {(~pos).sum()} with max <= 0 differ by up to "
            f"{err[~pos].max() if (~pos).any() else 0:.1f} image px"
        )
        assert (err[pos] <= ATOL * px_per_hm).all()
        # The rest are joints whose maps are all zero (unlabelled joints, blank detector crops).
        assert (merged.max((2, 3))[~pos] == 0).all()
        ours_hm, _ = decode(merged)
        np.testing.assert_array_equal(ours_hm[~pos], 0.0)  # argmax of a blank map: the first pixel
        if what == "detector boxes":
            assert (~pos).sum() > 1000  # the blank crops really are in there


def test_to_image_coords_matches_transform_preds():
    rng = np.random.default_rng(16)
    n = 32
    coords = rng.uniform(-5, [W + 4, H + 4], (n, 17, 2))
    center = rng.uniform(0, 640, (n, 2))
    scale = rng.uniform(20, 900, (n, 2))
    ours = to_image_coords(coords, center, scale, INPUT, HEATMAP)
    ref = np.stack([mmpose_transform_preds(coords[i], center[i], scale[i] / 200.0, [W, H]) for i in range(n)])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)  # both float64 here; mmpose's own is float32

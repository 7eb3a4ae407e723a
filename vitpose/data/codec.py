"""UDP Gaussian heatmap codec: keypoints <-> heatmaps, flip-test merge, heatmap -> image coordinates.

* ``encode``: mmpose's ``_udp_generate_target`` (GaussianHeatmap): a Gaussian (sigma 2 by default) centred
  at the exact sub-pixel location ``kp_input * (hm - 1) / (input - 1)``, cut to the 3-sigma window around
  the rounded location; weight 0 for unlabelled joints and for joints whose window misses the heatmap.
* ``decode``: argmax, then mmpose's ``post_dark_udp`` refinement (Gaussian blur kernel 11, log, one
  Newton/Taylor step), vectorised over the batch; returns heatmap-space coords and the raw maxima. It is
  the path of ViTPose's test config (``use_udp=True``, ``target_type='GaussianHeatmap'``; ``post_process``
  plays no part there) and matches mmpose to float32 rounding except for maxima <= 0
  (``tests/test_codec_reference.py``).
* ``flip_back``: heatmaps of a horizontally mirrored crop -> heatmaps of the original crop. Under UDP the
  mirror of crop pixel x is ``w_in - 1 - x`` and of heatmap pixel u is ``w_hm - 1 - u``, and the two grids
  are aligned at both ends, so mirroring the heatmap's W axis is exact: no one-pixel shift is needed
  (mmpose sets ``shift_heatmap=False`` for UDP; ``tests/test_codec.py`` checks it).
* ``to_image_coords``: heatmap coords -> input pixels ``* (input - 1) / (hm - 1)`` -> inverse UDP affine.

Heatmap arrays are batch-first (N, K, h, w); numpy or torch in, numpy out.
"""

from __future__ import annotations

import cv2
import numpy as np

from vitpose.data.transforms import udp_warp_matrix


def as_numpy(x) -> np.ndarray:
    """numpy view of a numpy array or (CPU/GPU, any dtype) torch tensor; float tensors become float32."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def encode(
    keypoints: np.ndarray,
    visibility: np.ndarray,
    input_size: tuple[int, int],
    heatmap_size: tuple[int, int],
    sigma: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints in input-crop pixels (..., K, 2) + visibility (..., K) -> targets (..., K, h, w), weights (..., K).

    Leading batch dimensions are allowed. Both outputs are float32.
    """
    kps = np.asarray(keypoints, dtype=np.float64)[..., :2]
    vis = np.asarray(visibility)
    in_h, in_w = input_size
    hm_h, hm_w = heatmap_size
    stride = np.array([(in_w - 1.0) / (hm_w - 1.0), (in_h - 1.0) / (hm_h - 1.0)])
    mu = kps / stride  # exact sub-pixel centre in heatmap pixels
    # mmpose's int(x + 0.5), truncation toward zero included: it only moves the window edge for joints
    # left of/above the heatmap, where the Gaussian tail is ~1e-3, and keeps weights identical to mmpose.
    mu_int = np.trunc(mu + 0.5)
    radius = 3.0 * sigma
    # Weight 0 when the (2*radius+1)^2 window misses the heatmap (mmpose's test is off by one at the
    # low edge and keeps weight 1 for an all-zero target there).
    inside = (
        (mu_int[..., 0] + radius >= 0)
        & (mu_int[..., 1] + radius >= 0)
        & (mu_int[..., 0] - radius < hm_w)
        & (mu_int[..., 1] - radius < hm_h)
    )
    weight = ((vis > 0) & inside & np.isfinite(mu).all(-1)).astype(np.float32)
    # Both axes' 1-D Gaussians in one pass over a shared grid (..., K, 2, L): an item's encoding is a few
    # dozen numpy calls on tiny arrays, so fewer calls is what makes it cheaper (57-60 -> 41-43 us per item).
    grid = np.arange(max(hm_h, hm_w), dtype=np.float64)
    d = grid - mu[..., None]
    g = np.exp(-(d * d) / (2 * sigma**2))
    g *= np.abs(grid - mu_int[..., None]) <= radius
    g[..., 0, :] *= weight[..., None]
    # The 2-D Gaussian is separable, and so is mmpose's square window: an outer product is exact.
    target = g[..., 1, :hm_h, None] * g[..., 0, None, :hm_w]
    return target.astype(np.float32), weight


def _argmax(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float64)
    return coords, maxvals


_CV_MAX_CHANNELS = 128


def _blur(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    n, k, h, w = heatmaps.shape
    # cv2 blurs many channels in one call: (h, w, C) layout, chunked (OpenCV 5 allows at most 128).
    chans = np.ascontiguousarray(heatmaps.reshape(n * k, h, w).transpose(1, 2, 0), dtype=np.float32)
    out = np.empty_like(chans)
    for s in range(0, n * k, _CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(chans[..., s : s + _CV_MAX_CHANNELS])
        out[..., s : s + _CV_MAX_CHANNELS] = cv2.GaussianBlur(chunk, (kernel, kernel), 0).reshape(h, w, -1)
    return out.transpose(2, 0, 1).reshape(n, k, h, w)


def decode(heatmaps, blur_kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, K, h, w) -> (coords (N, K, 2) as heatmap-pixel x, y; scores (N, K) = raw maxima).

    mmpose 0.x ``post_dark_udp`` (``mmpose/core/evaluation/top_down_eval.py``, what ViTPose's
    ``keypoints_from_heatmaps`` runs with ``use_udp=True``): argmax, blur (kernel 11, OpenCV's default
    reflected border), clip to [1e-3, 50], log, then one Newton step ``x - (H + eps I)^-1 g`` with
    central differences around the argmax (edge-replicated border, ``eps`` = float32 epsilon), applied
    whatever its length and whatever the Hessian's sign, like mmpose. ``blur_kernel <= 0``: argmax only.

    One deliberate difference: a joint whose maximum is <= 0 keeps its argmax (refining it would be a
    no-op anyway: its blurred map is clipped flat). mmpose puts it at (-1, -1), then refines that with
    values read past the start of the heatmap, from the previous joint's or crop's memory (for the batch's
    first joint, the last one's), so its answer depends on the rest of the batch; in
    ``python -m benchmarks.codec_ap`` the argmax never scores lower than mmpose. A singular ``H + eps I`` (where
    mmpose's matrix inverse raises) leaves the argmax unrefined.
    """
    hm = as_numpy(heatmaps).astype(np.float32)
    if hm.ndim != 4:
        raise ValueError(f"decode expects heatmaps of shape (N, K, h, w), got {hm.shape}")
    n, k, h, w = hm.shape
    coords, maxvals = _argmax(hm)
    if blur_kernel <= 0:
        return coords, maxvals
    logh = np.log(np.clip(_blur(hm, blur_kernel), 1e-3, 50.0))
    pad = np.pad(logh, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")  # (N, K, h+2, w+2)
    px = coords[..., 0].astype(np.int64) + 1
    py = coords[..., 1].astype(np.int64) + 1
    bi = np.arange(n)[:, None]
    ki = np.arange(k)[None, :]

    def at(dx: int, dy: int) -> np.ndarray:
        return pad[bi, ki, py + dy, px + dx]

    i0 = at(0, 0)
    ix1, ix1_ = at(1, 0), at(-1, 0)
    iy1, iy1_ = at(0, 1), at(0, -1)
    ix1y1, ix1_y1_ = at(1, 1), at(-1, -1)
    # The reference's arithmetic: differences of the float32 log-heatmap taken in float32, then the 2x2 solve
    # in float64 with float32's epsilon on the diagonal (mmpose's guard against a singular Hessian).
    dx = 0.5 * (ix1 - ix1_)
    dy = 0.5 * (iy1 - iy1_)
    dxx = ix1 - 2 * i0 + ix1_
    dyy = iy1 - 2 * i0 + iy1_
    dxy = 0.5 * (ix1y1 - ix1 - iy1 + i0 + i0 - ix1_ - iy1_ + ix1_y1_)
    eps = float(np.finfo(np.float32).eps)
    dx, dy, dxy = (v.astype(np.float64) for v in (dx, dy, dxy))
    dxx, dyy = (v.astype(np.float64) + eps for v in (dxx, dyy))
    det = dxx * dyy - dxy**2
    ok = (det != 0) & np.isfinite(det) & (maxvals > 0)  # maxima <= 0 keep their argmax, see above
    safe_det = np.where(ok, det, 1.0)
    # (H + eps I)^-1 g for a 2x2 Hessian, written out.
    off_x = (dyy * dx - dxy * dy) / safe_det
    off_y = (dxx * dy - dxy * dx) / safe_det
    offset = np.where(ok[..., None], np.stack([off_x, off_y], axis=-1), 0.0)
    return coords - offset, maxvals


def flip_back(heatmaps, flip_pairs: list[tuple[int, int]]):
    """Heatmaps predicted on a mirrored crop (N, K, h, w) -> the original crop's frame.

    Mirrors the W axis and swaps left/right channels. Works for numpy arrays and torch tensors alike.
    """
    order = list(range(heatmaps.shape[1]))
    for a, b in flip_pairs:
        order[a], order[b] = order[b], order[a]
    if hasattr(heatmaps, "flip"):  # torch
        return heatmaps[:, order].flip(-1)
    return np.ascontiguousarray(np.asarray(heatmaps)[:, order, :, ::-1])


def to_image_coords(
    coords: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    input_size: tuple[int, int],
    heatmap_size: tuple[int, int],
    rotation: np.ndarray | None = None,
    flipped: np.ndarray | None = None,
) -> np.ndarray:
    """Heatmap-pixel coords (N, K, 2) -> original image pixels, inverting the crop's UDP affine.

    ``center``/``scale`` (N, 2) describe the crop box (pixel scale); ``rotation`` (degrees) and ``flipped``
    (N,) default to 0 / False, the evaluation transform.
    """
    coords = as_numpy(coords).astype(np.float64)
    center = as_numpy(center).astype(np.float64).reshape(-1, 2)
    scale = as_numpy(scale).astype(np.float64).reshape(-1, 2)
    n = coords.shape[0]
    in_h, in_w = input_size
    hm_h, hm_w = heatmap_size
    pts = coords * np.array([(in_w - 1.0) / (hm_w - 1.0), (in_h - 1.0) / (hm_h - 1.0)])
    rot = np.zeros(n) if rotation is None else as_numpy(rotation).astype(np.float64).reshape(n)
    flip = np.zeros(n, dtype=bool) if flipped is None else as_numpy(flipped).astype(bool).reshape(n)
    out = np.empty_like(pts)
    for i in range(n):
        inv = cv2.invertAffineTransform(
            udp_warp_matrix(center[i], scale[i], rot[i], input_size, bool(flip[i]))
        )
        out[i] = pts[i] @ inv[:, :2].T + inv[:, 2]
    return out

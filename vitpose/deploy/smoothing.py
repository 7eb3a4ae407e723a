"""Keypoint smoothing for video: a One-Euro filter per tracked person (Casiez, Roussel & Vogel, CHI 2012).

The filter is a first-order low-pass whose cutoff rises with the signal's speed: a still joint is smoothed hard
(its frame-to-frame jitter is what the pose model adds), a moving one follows with little lag. Per coordinate:

    alpha(fc) = 1 / (1 + tau / dt),   tau = 1 / (2 pi fc)
    dx_hat    = alpha(d_cutoff) * (x - x_hat_prev) / dt + (1 - alpha(d_cutoff)) * dx_hat_prev
    fc        = min_cutoff + beta * |dx_hat|
    x_hat     = alpha(fc) * x + (1 - alpha(fc)) * x_hat_prev

Units: cutoffs in Hz, ``dt`` in seconds, positions in image pixels, so ``beta`` is per pixel/s. ``KeypointSmoother``
keeps one filter state per track id and forgets tracks not seen for ``forget_after`` frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OneEuroParams:
    min_cutoff: float = 1.0  # Hz: the cutoff of a still joint (lower: smoother, more lag when it starts to move)
    beta: float = 0.05  # per pixel/s: how fast the cutoff rises with speed (higher: less lag on fast motion)
    d_cutoff: float = 1.0  # Hz: the cutoff of the speed estimate

    def __post_init__(self) -> None:
        for name in ("min_cutoff", "d_cutoff"):
            if not getattr(self, name) > 0:
                raise ValueError(f"One-Euro {name} must be > 0 Hz, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"One-Euro beta must be >= 0, got {self.beta}")


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter of an array of coordinates (any shape, e.g. (K, 2) keypoints), all filtered independently."""

    def __init__(self, params: OneEuroParams = OneEuroParams()):
        self.params = params
        self.x_hat: np.ndarray | None = None
        self.dx_hat: np.ndarray | None = None

    def __call__(self, x: np.ndarray, dt: float) -> np.ndarray:
        if dt <= 0:
            raise ValueError(f"dt must be > 0 seconds, got {dt}")
        x = np.asarray(x, dtype=np.float64)
        if self.x_hat is None or self.x_hat.shape != x.shape:
            self.x_hat, self.dx_hat = x.copy(), np.zeros_like(x)
            return x.copy()
        p = self.params
        a_d = _alpha(p.d_cutoff, dt)
        self.dx_hat = a_d * (x - self.x_hat) / dt + (1.0 - a_d) * self.dx_hat
        a = _alpha(p.min_cutoff + p.beta * np.abs(self.dx_hat), dt)
        self.x_hat = a * x + (1.0 - a) * self.x_hat
        return self.x_hat.copy()


class KeypointSmoother:
    """One ``OneEuroFilter`` per track id: ``smooth(track_id, keypoints_xy, dt)`` returns the smoothed (K, 2)."""

    def __init__(self, params: OneEuroParams = OneEuroParams(), forget_after: int = 30):
        self.params, self.forget_after = params, forget_after
        self.filters: dict[int, OneEuroFilter] = {}
        self.last_seen: dict[int, int] = {}
        self.frame = 0

    def next_frame(self) -> None:
        """Call once per frame, before its people: tracks unseen for ``forget_after`` frames start afresh."""
        self.frame += 1
        for track in [t for t, seen in self.last_seen.items() if self.frame - seen > self.forget_after]:
            del self.filters[track], self.last_seen[track]

    def smooth(self, track_id: int, keypoints_xy: np.ndarray, dt: float) -> np.ndarray:
        if track_id not in self.filters:
            self.filters[track_id] = OneEuroFilter(self.params)
        self.last_seen[track_id] = self.frame
        return self.filters[track_id](keypoints_xy, dt)


def jitter(track: np.ndarray) -> float:
    """Mean frame-to-frame keypoint motion (pixels) of a (T, K, 2) track: for a still person, pure jitter."""
    track = np.asarray(track, dtype=np.float64)
    if track.shape[0] < 2:
        raise ValueError("jitter needs at least two frames")
    return float(np.linalg.norm(np.diff(track, axis=0), axis=-1).mean())

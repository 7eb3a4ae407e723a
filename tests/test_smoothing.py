"""The One-Euro keypoint filter: a still person's jitter falls, a moving one is followed with little lag."""

from __future__ import annotations

import numpy as np
import pytest

from vitpose.deploy.smoothing import KeypointSmoother, OneEuroFilter, OneEuroParams, jitter

FPS = 30.0


def test_a_still_persons_jitter_falls_and_a_walking_one_is_followed():
    rng = np.random.default_rng(0)
    still = np.array([[100.0, 50.0], [120.0, 90.0], [80.0, 140.0]])  # three joints
    noisy = still + rng.normal(0.0, 2.0, size=(300, 3, 2))  # a pose model's ~2 px frame-to-frame noise
    f = OneEuroFilter(OneEuroParams())
    smoothed = np.stack([f(frame, 1 / FPS) for frame in noisy])
    assert jitter(noisy) > 2.0
    assert jitter(smoothed[30:]) < 0.3 * jitter(noisy[30:])
    assert np.abs(smoothed[30:] - still).mean() < 1.0  # and stays on the joint

    # Walking at 120 px/s: the smoothed joint trails the true one by a few pixels, not by the still cutoff's lag.
    t = np.arange(300) / FPS
    walking = still[None] + np.stack([120.0 * t, np.zeros_like(t)], axis=-1)[:, None, :]
    g = OneEuroFilter(OneEuroParams())
    followed = np.stack([g(frame, 1 / FPS) for frame in walking + rng.normal(0.0, 2.0, size=walking.shape)])
    lag = np.abs(followed[60:, :, 0] - walking[60:, :, 0]).mean()
    no_speed_term = OneEuroFilter(OneEuroParams(beta=0.0))
    slow = np.stack([no_speed_term(frame, 1 / FPS) for frame in walking])
    assert lag < 0.25 * np.abs(slow[60:, :, 0] - walking[60:, :, 0]).mean()  # the speed term is what follows
    assert lag < 10.0


def test_tracks_are_filtered_apart_and_forgotten_when_gone():
    smoother = KeypointSmoother(forget_after=2)
    a, b = np.array([[0.0, 0.0]]), np.array([[500.0, 500.0]])
    smoother.next_frame()
    assert np.array_equal(smoother.smooth(1, a, 1 / FPS), a) and np.array_equal(smoother.smooth(2, b, 1 / FPS), b)
    smoother.next_frame()
    moved = smoother.smooth(1, a + 10.0, 1 / FPS)
    assert 0 < moved[0, 0] < 10.0  # smoothed towards the new position, not jumped, and never pulled towards b
    for _ in range(3):
        smoother.next_frame()
        smoother.smooth(1, a, 1 / FPS)
    assert 2 not in smoother.filters  # track 2 unseen for 3 frames: a new person with that id starts afresh
    with pytest.raises(ValueError, match="min_cutoff must be > 0 Hz"):
        OneEuroParams(min_cutoff=0.0)

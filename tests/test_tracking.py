"""People tracked across frames: ids survive crossings, misses and half-hidden frames; new people get new ids."""

from __future__ import annotations

import numpy as np
import pytest

from vitpose.deploy.tracking import PeopleTracker, iou_matrix


def walk(x0: float, speed: float, frames: int) -> np.ndarray:
    """A 60x160 person walking along x, one [x, y, w, h] per frame."""
    return np.array([[x0 + speed * t, 100.0, 60.0, 160.0] for t in range(frames)])


def test_two_people_crossing_keep_their_ids_through_misses_and_low_scores():
    # a runs (25 px a frame: two missed frames put it past its old box), b walks; they cross around frame 15.
    a, b = walk(0.0, 25.0, 60), walk(480.0, -8.0, 60)
    tracker = PeopleTracker()
    seen = {"a": set(), "b": set()}
    for t in range(60):
        boxes, scores, who = [], [], []
        if t not in (20, 21):  # the detector misses a for two frames
            boxes.append(a[t]), scores.append(0.9), who.append("a")
        boxes.append(b[t]), scores.append(0.3 if 12 <= t <= 17 else 0.9), who.append("b")  # b half hidden
        ids = tracker.update(np.array(boxes), np.array(scores))
        for name, track in zip(who, ids, strict=True):
            seen[name].add(int(track))
    assert seen == {"a": {1}, "b": {2}}  # one id each from start to end
    # Someone new gets a new id; a low-score box with no track starts none.
    ids = tracker.update(np.array([[900.0, 100, 60, 160], [1200.0, 100, 60, 160]]), np.array([0.8, 0.2]))
    assert list(ids) == [3, -1]


def test_tracks_end_after_lost_frames_and_ids_are_never_reused():
    tracker = PeopleTracker(lost_frames=2)
    assert list(tracker.update(walk(0, 0, 1), [0.9])) == [1]
    for _ in range(3):
        tracker.update(np.zeros((0, 4)), np.zeros(0))
    assert tracker.tracks == [] and list(tracker.update(walk(0, 0, 1), [0.9])) == [2]
    with pytest.raises(ValueError, match="0 <= low <= high <= 1"):
        PeopleTracker(high=0.2, low=0.5)


def test_iou_of_boxes():
    a = np.array([[0.0, 0, 10, 10]])
    np.testing.assert_allclose(iou_matrix(a, np.array([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [20.0, 0, 30, 10]])),
                               [[1.0, 1 / 3, 0.0]])

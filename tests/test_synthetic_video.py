"""The synthetic video: its ground truth follows what is drawn (a walker's box and keypoints move together, a
still person's never move), frame by frame."""

from __future__ import annotations

import json

import numpy as np

from vitpose.data.synthetic_video import make_video
from vitpose.deploy.video import read_video


def test_the_ground_truth_moves_with_the_people_drawn(tmp_path):
    meta = json.loads(make_video(tmp_path / "people.mp4", frames=12, fps=10, walking=1, still=1).read_text())
    frames = list(read_video(tmp_path / "people.mp4"))
    assert len(frames) == len(meta["frames"]) == 12 and meta["fps"] == 10
    walker = [next(p for p in f["people"] if p["track_id"] == 1) for f in meta["frames"]]
    still = [next(p for p in f["people"] if p["track_id"] == 2) for f in meta["frames"]]
    assert all(p["keypoints"] == still[0]["keypoints"] and p["still"] for p in still)
    kp = np.array([p["keypoints"] for p in walker]).reshape(12, 17, 3)
    steps = np.diff(kp[:, :, 0], axis=0)[:, (kp[:, :, 2] > 0).all(axis=0)]
    assert np.allclose(steps, steps[0, 0], atol=0.02) and steps[0, 0] > 1  # every joint moves right by one speed
    shift = walker[-1]["bbox"][0] - walker[0]["bbox"][0]
    assert abs(shift - 11 * steps[0, 0]) <= 3  # the drawn silhouette moved with its keypoints
    # In the pixels: the frame-to-frame change is where the walker is, not around the still person.
    diff = np.abs(frames[11].rgb.astype(int) - frames[0].rgb.astype(int)).sum(axis=2) > 60
    x, y, w, h = (int(v) for v in walker[0]["bbox"])
    assert diff[y:y + h, x:x + w].mean() > 0.05

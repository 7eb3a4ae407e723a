"""People tracked across video frames: ByteTrack's two-round association (Zhang et al., ECCV 2022) on box IoU.

Each frame, every live track predicts its box by its last velocity; confident detections (score >= ``high``)
are matched to the tracks first (Hungarian assignment on IoU, scipy), then the low-score ones (>= ``low``: often
a person half hidden) to the tracks still unmatched; confident detections left over start new tracks; a track
unmatched for more than ``lost_frames`` frames ends. A track id is never reused.

Written here rather than taken from a library: supervision dropped its ByteTrack in 0.30 (PyPI has 0.31),
roboflow's ``trackers`` imports OpenCV's GUI build (``opencv-python``, which clashes with the
``opencv-python-headless`` that albumentations installs), norfair needs numpy < 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), boxes as x1, y1, x2, y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]).clip(0) * (x[:, 3] - x[:, 1]).clip(0)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


@dataclass
class Track:
    track_id: int
    box: np.ndarray  # x1, y1, x2, y2 at its last match
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # per frame
    missed: int = 0  # frames since its last match

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.missed + 1)


class PeopleTracker:
    """``update(boxes_xywh, scores) -> track ids`` (one per detection; -1 for one that starts no track)."""

    def __init__(self, high: float = 0.5, low: float = 0.1, match_iou: float = 0.3, lost_frames: int = 30):
        if not 0 <= low <= high <= 1:
            raise ValueError(f"tracker thresholds need 0 <= low <= high <= 1, got low={low}, high={high}")
        self.high, self.low, self.match_iou, self.lost_frames = high, low, match_iou, lost_frames
        self.tracks: list[Track] = []
        self.next_id = 1

    def update(self, boxes_xywh: np.ndarray, scores: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4).copy()
        boxes[:, 2:] += boxes[:, :2]
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        ids = np.full(len(boxes), -1, dtype=np.int64)
        unmatched = list(range(len(self.tracks)))
        for candidates in (np.flatnonzero(scores >= self.high),
                           np.flatnonzero((scores >= self.low) & (scores < self.high))):
            unmatched = self._match(candidates, unmatched, boxes, ids)
        for i in unmatched:
            self.tracks[i].missed += 1
        for d in np.flatnonzero((ids < 0) & (scores >= self.high)):
            self.tracks.append(Track(self.next_id, boxes[d]))
            ids[d], self.next_id = self.next_id, self.next_id + 1
        self.tracks = [t for t in self.tracks if t.missed <= self.lost_frames]
        return ids

    def _match(self, detections: np.ndarray, track_indices: list[int], boxes: np.ndarray, ids: np.ndarray) -> list[int]:
        """Assign ``detections`` to the tracks of ``track_indices``; returns the tracks left unmatched."""
        if len(detections) == 0 or not track_indices:
            return track_indices
        predicted = np.stack([self.tracks[i].predicted() for i in track_indices])
        iou = iou_matrix(predicted, boxes[detections])
        rows, cols = linear_sum_assignment(-iou)
        matched = set()
        for r, c in zip(rows, cols, strict=True):
            if iou[r, c] < self.match_iou:
                continue
            track, d = self.tracks[track_indices[r]], detections[c]
            track.velocity = (boxes[d] - track.box) / (track.missed + 1)
            track.box, track.missed = boxes[d], 0
            ids[d] = track.track_id
            matched.add(track_indices[r])
        return [i for i in track_indices if i not in matched]

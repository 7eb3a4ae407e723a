"""Everyone's pose in a video: per frame, person boxes (a detector's, else the whole frame), keypoints from the
``PosePredictor``, a track id per person (``PeopleTracker``), keypoints smoothed per track (One-Euro), the frame
drawn into an annotated video, and one record per frame for the JSON.

A frame the decoder cannot read ends the video there (the frames before it are written, and the result says
where it stopped); a frame with nobody in it is an empty list of people.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitpose.deploy.smoothing import KeypointSmoother, OneEuroParams
from vitpose.deploy.tracking import PeopleTracker
from vitpose.deploy.video import VideoWriter, read_video

DEFAULT_SMOOTHING = OneEuroParams()


@dataclass
class VideoResult:
    frames: list[dict[str, Any]]  # per frame: index, seconds, people (track_id, box, box_score, score, keypoints)
    fps: float
    stopped: str | None  # why decoding ended before the end of the file, if it did
    tracks: int  # distinct track ids


def poses_in_video(predictor: Any, path: str | Path, out_video: str | Path | None, *,
                   detector: Callable[[np.ndarray], np.ndarray] | None = None,
                   smoothing: OneEuroParams | None = DEFAULT_SMOOTHING, tracker: PeopleTracker | None = None,
                   draw: Callable[[np.ndarray, dict[str, Any]], np.ndarray] | None = None,
                   say: Callable[[str], None] = print) -> VideoResult:
    """Poses of every frame of ``path``; ``out_video`` gets each frame drawn with ``draw`` (None: no video).
    Without a detector each frame is taken whole as one person (track 1)."""
    reader = read_video(path)
    tracker = tracker or PeopleTracker()
    smoother = KeypointSmoother(smoothing) if smoothing is not None else None
    writer = VideoWriter(out_video, reader.fps) if out_video is not None else None
    frames: list[dict[str, Any]] = []
    seen: set[int] = set()
    dt = 1.0 / reader.fps
    try:
        for frame in reader:
            if detector is not None:
                found = detector(frame.rgb)
                ids = tracker.update(found[:, :4], found[:, 4])
                keep = ids >= 0  # a low-score box that matched no track is no one we follow
                boxes, ids = [list(map(float, b)) for b in found[keep]], ids[keep]
            else:
                boxes, ids = None, np.array([1])
            result = predictor.predict_batch([(frame.rgb, boxes)])[0]
            if smoother is not None:
                smoother.next_frame()
            for person, track in zip(result["persons"], ids, strict=True):
                person["track_id"] = int(track)
                seen.add(int(track))
                if smoother is not None:
                    kp = np.asarray(person["keypoints"], dtype=np.float64)
                    kp[:, :2] = smoother.smooth(int(track), kp[:, :2], dt)
                    person["keypoints"] = [[round(x, 2), round(y, 2), s] for x, y, s in kp.tolist()]
            frames.append({"frame": frame.index, "seconds": round(frame.seconds, 4), "people": result["persons"]})
            if writer is not None:
                writer.write(draw(frame.rgb, result) if draw is not None else frame.rgb)
            if frame.index % 100 == 99:
                say(f"  {path}: {frame.index + 1} frames, {len(seen)} track(s)")
    finally:
        if writer is not None:
            writer.close()
    return VideoResult(frames, reader.fps, reader.error, len(seen))

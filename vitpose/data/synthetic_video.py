"""A synthetic video with its ground truth: the synthetic data's stick people, some walking across the frame and
some standing still, on one cluttered background with fresh sensor noise every frame.

``make_video(path, ...)`` writes the video (H.264 mp4, ``vitpose.deploy.video``) and ``<path>.json``: the frame
rate and, per frame, every person's ``track_id``, ``bbox`` (tight box of its silhouette) and 17 COCO
``keypoints`` (x, y, v; as the still images' annotations). A still person's true keypoints never move, so the
frame-to-frame motion of its predicted keypoints is pure jitter (``vitpose.deploy.smoothing.jitter``).

CLI: ``python -m vitpose.data.synthetic_video --out runs/data/synthetic-video/people.mp4 --frames 90``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vitpose.data.figures import SynthConfig, _background, _draw, _sample_figure


def _moved(parts: list, offset: np.ndarray) -> list:
    """A figure's drawing recipe shifted by ``offset``: every point in it, colours and sizes as they were."""

    def shift(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.shape == (2,):
            return value + offset
        if isinstance(value, list):
            return [shift(v) for v in value]
        return value

    return [(kind, tuple(shift(a) for a in args)) for kind, args in parts]


def make_video(path: str | Path, frames: int = 90, fps: float = 15.0, walking: int = 1, still: int = 1,
               seed: int = 0, size: int = 256) -> Path:
    """Write the video and its ground truth (``<path>.json``); returns the json's path."""
    from vitpose.deploy.video import VideoWriter

    rng = np.random.default_rng([seed, 4242])
    cfg = SynthConfig(image_size=size, clutter=0.2, occlusion_prob=0.0)
    background = _background(rng, cfg)
    people = []
    for i in range(walking + still):
        height = rng.uniform(0.5, 0.6) * size
        # Walkers start on the left and cross the still people, who stand on the right.
        x = rng.uniform(0.15, 0.25) * size if i < walking else (0.72 - 0.25 * (i - walking) / max(still, 1)) * size
        figure = _sample_figure(rng, cfg, np.array([x, size / 2]), height)
        speed = np.array([rng.uniform(0.6, 1.0) * size / frames * 0.8, 0.0]) if i < walking else np.zeros(2)
        people.append((figure, speed))
    truth = []
    path = Path(path)
    with VideoWriter(path, fps) as out:
        for t in range(frames):
            img = background.copy()
            annotations = []
            for track, (figure, speed) in enumerate(people, start=1):
                offset = speed * t
                _draw(img, _moved(figure.parts, offset))
                mask = np.zeros((size, size), np.uint8)
                _draw(mask, _moved(figure.parts, offset), aa=False, colour=1)
                x0, y0, w, h = cv2.boundingRect(mask)
                kps = [[round(float(x), 2), round(float(y), 2), 2] if figure.labelled[j] and 0 <= x < size
                       and 0 <= y < size else [0.0, 0.0, 0]  # unlabelled or out of the frame, as COCO
                       for j, (x, y) in enumerate(figure.keypoints + offset)]
                annotations.append({"track_id": track, "bbox": [float(x0), float(y0), float(w), float(h)],
                                    "keypoints": [v for kp in kps for v in kp], "still": not speed.any()})
            noise = rng.standard_normal(img.shape, dtype=np.float32) * 4.0
            out.write(cv2.add(img, noise, dtype=cv2.CV_8U))
            truth.append({"frame": t, "people": annotations})
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps({"video": path.name, "fps": fps, "size": size, "frames": truth}))
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/data/synthetic-video/people.mp4"))
    p.add_argument("--frames", type=int, default=90)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--walking", type=int, default=1)
    p.add_argument("--still", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    meta = make_video(a.out, a.frames, a.fps, a.walking, a.still, a.seed)
    print(f"wrote {a.out} ({a.frames} frames at {a.fps:g} fps) and its ground truth {meta}")


if __name__ == "__main__":
    main()

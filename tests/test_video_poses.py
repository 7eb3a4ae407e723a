"""A video through the whole path: an ONNX detector's boxes, a trained pose model, a track per person, One-Euro
smoothing, an annotated video out. A still figure under sensor noise: one track, and its keypoints jitter far
less smoothed than raw."""

from __future__ import annotations

import json

import numpy as np

from tests.test_detector import fixed_output_model
from vitpose.deploy.detector import OnnxPersonDetector
from vitpose.deploy.inference import PosePredictor
from vitpose.deploy.smoothing import jitter
from vitpose.deploy.video import VideoWriter, read_video
from vitpose.deploy.video_poses import poses_in_video


def test_a_still_figure_is_one_track_whose_keypoints_stop_jittering(trained_teacher, tmp_path):
    teacher, cfg, (_, val_ds) = trained_teacher
    val = json.loads(val_ds.ann_file.read_text())
    ann = max(val["annotations"], key=lambda a: a["bbox"][2] * a["bbox"][3])  # the largest person
    image_info = next(i for i in val["images"] if i["id"] == ann["image_id"])
    from PIL import Image

    still = np.asarray(Image.open(val_ds.image_dir / image_info["file_name"]).convert("RGB"))
    rng = np.random.default_rng(0)
    with VideoWriter(tmp_path / "still.mp4", fps=25) as out:
        for _ in range(30):  # the same scene, each frame with its own sensor noise
            out.write(np.clip(still + rng.normal(0, 12, still.shape), 0, 255).astype(np.uint8))
    # A detector file in mmdeploy's layout that sees this person (the letterbox into 640 scales by 640/side).
    x, y, w, h = ann["bbox"]
    ratio = 640 / max(still.shape[:2])
    dets = np.array([[[x * ratio, y * ratio, (x + w) * ratio, (y + h) * ratio, 0.9]]], dtype=np.float32)
    fixed_output_model(tmp_path / "end2end.onnx", "input", 640, {"dets": dets, "labels": np.zeros((1, 1), np.int64)})
    detector = OnnxPersonDetector(tmp_path / "end2end.onnx", format="yolox")
    predictor = PosePredictor(teacher, flip_test=False)

    raw = poses_in_video(predictor, tmp_path / "still.mp4", None, detector=detector, smoothing=None, say=lambda _: None)
    smoothed = poses_in_video(predictor, tmp_path / "still.mp4", tmp_path / "poses.mp4", detector=detector,
                              say=lambda _: None)
    assert raw.tracks == smoothed.tracks == 1 and len(smoothed.frames) == 30 and smoothed.stopped is None
    assert {p["track_id"] for f in smoothed.frames for p in f["people"]} == {1}
    track = {name: np.array([[kp[:2] for kp in f["people"][0]["keypoints"]] for f in r.frames])
             for name, r in (("raw", raw), ("smoothed", smoothed))}
    confident = np.array(raw.frames[0]["people"][0]["keypoints"])[:, 2] > 0.3  # joints the model sees
    assert confident.sum() >= 5
    before, after = jitter(track["raw"][:, confident]), jitter(track["smoothed"][:, confident])
    assert before > 0.15 and after < 0.5 * before, (before, after)  # 0.37 -> 0.09 px when written
    assert len(list(read_video(tmp_path / "poses.mp4"))) == 30
    json.dumps(smoothed.frames)  # what the JSON file will hold

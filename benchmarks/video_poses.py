"""Poses from a video on CPUs: frames per second of the shipped path and the jitter its smoothing removes.

    python -m benchmarks.video_poses [--model models:/vitpose-student@champion] [--frames 60] [--people 1 2 4]
                                     [--detector models:/vitpose-detector@current] [--networks fp32 int8]

The video is the synthetic one (``vitpose.data.synthetic_video``: walkers crossing still people, fresh noise
each frame). The path timed is ``vitpose.deploy.video_poses.poses_in_video`` as ``pipelines/predict.py`` runs it:
decoding, the pose model on every person's crop (flip test on), tracking, One-Euro smoothing; without writing
the annotated video ("poses") and with it ("poses + video": drawing and H.264 encoding). The person boxes are the
video's ground truth handed over as the detector's output, so the detector's own time is NOT in these figures;
``--detector FILE_OR_URI`` runs a real ONNX detector instead (e.g. ``models:/vitpose-detector@current``, the
synthetic one ``pipelines/detector.py`` trains), its time included, and reports how its people match the true
ones (recall and precision at IoU 0.5, tracks found). Threads: torch's and onnxruntime's intra-op threads, 1 and 2.
Networks: ``fp32`` the model in PyTorch, as predict runs it; ``int8`` its int8 ONNX network in onnxruntime, as
``pipelines/export.py --int8`` makes it and the served model runs it (QDQ, calibrated on 64 crops of the
synthetic training set).

Jitter: the mean frame-to-frame motion of a still person's confident keypoints (pure noise: the person does not
move), raw and smoothed, with the One-Euro defaults of predict.py.
Results: ``runs/bench/video_poses.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, machine


def ground_truth_detector(truth: dict) -> object:
    """A callable answering each frame in turn with the video's true boxes (score 0.9), as a detector would."""
    frames = iter(truth["frames"])

    def detect(_rgb: np.ndarray) -> np.ndarray:
        people = next(frames)["people"]
        return np.array([[*p["bbox"], 0.9] for p in people], dtype=np.float64).reshape(-1, 5)

    return detect


def int8_network(predictor, work: Path) -> Path:
    """The model's int8 ONNX file, made the way ``export.py --int8`` makes it (calibrated on training crops)."""
    from vitpose.build import build_datasets
    from vitpose.config import StudentConfig, load_config
    from vitpose.deploy.int8 import calibration_crops, quantize_int8
    from vitpose.deploy.onnx import export_onnx

    h, w = predictor.input_size
    cfg = load_config(REPO / "configs" / "distill" / "synthetic_tiny.yaml", [f"model.img_size=[{h}, {w}]"],
                      schema=StudentConfig)
    train, _ = build_datasets(cfg, is_local_leader=True)
    fp32 = export_onnx(predictor.model, work / "network.onnx")
    return quantize_int8(fp32, work / "network.int8.onnx", calibration_crops(train))


def match_people(result, truth: dict) -> dict[str, float]:
    """How the people found in each frame match the true ones one to one (IoU >= 0.5): recall, precision, and the
    number of tracks against the true number (more: a person's track broke or a ghost was tracked)."""
    from scipy.optimize import linear_sum_assignment

    from vitpose.deploy.tracking import iou_matrix

    def xyxy(boxes: list) -> np.ndarray:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)

    hits = found = real = 0
    for frame, true in zip(result.frames, truth["frames"], strict=True):
        iou = iou_matrix(xyxy([p["box"][:4] for p in frame["people"]]), xyxy([p["bbox"] for p in true["people"]]))
        found, real = found + iou.shape[0], real + iou.shape[1]
        rows, cols = linear_sum_assignment(-iou)
        hits += int((iou[rows, cols] >= 0.5).sum())
    true_tracks = len({p["track_id"] for f in truth["frames"] for p in f["people"]})
    return {"recall": hits / max(real, 1), "precision": hits / max(found, 1), "tracks": result.tracks,
            "true_tracks": true_tracks}


def still_jitter(result, truth: dict) -> float:
    """Jitter of the still person's keypoints that the model sees (confidence > 0.3 in the first frame): its
    track's frame-to-frame motion over the frames where it was found in consecutive frames (a real detector can
    lose a person for a frame when a walker covers it)."""
    from vitpose.deploy.smoothing import jitter

    still_box = next(p["bbox"] for p in truth["frames"][0]["people"] if p["still"])
    first = min(result.frames[0]["people"], key=lambda p: np.abs(np.subtract(p["box"], still_box)).sum())
    track = first["track_id"]
    found = {i: np.array(p["keypoints"]) for i, f in enumerate(result.frames) for p in f["people"]
             if p["track_id"] == track}  # frame -> (K, 3)
    seen = found[0][:, 2] > 0.3
    pairs = [np.stack([found[i][seen, :2], found[i + 1][seen, :2]]) for i in found if i + 1 in found]
    return float(np.mean([jitter(pair) for pair in pairs]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/vitpose-student@champion")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--people", type=int, nargs="+", default=[1, 2, 4], help="people per video (half of them still)")
    p.add_argument("--detector", help="an ONNX person detector (file or MLflow model URI) instead of the true boxes")
    p.add_argument("--detector-format", default="auto")
    p.add_argument("--networks", nargs="+", choices=["fp32", "int8"], default=["fp32"],
                   help="the pose network: PyTorch fp32, or its int8 ONNX in onnxruntime")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "video_poses.json")
    a = p.parse_args()
    import torch

    from vitpose.data.synthetic_video import make_video
    from vitpose.deploy.detector import OnnxPersonDetector, detector_file
    from vitpose.deploy.inference import PosePredictor
    from vitpose.deploy.smoothing import OneEuroParams
    from vitpose.deploy.video_poses import poses_in_video
    from vitpose.run.tracking import resolve_tracking_uri

    predictor = PosePredictor.from_uri(a.model, resolve_tracking_uri())
    work = a.out.parent / "video_poses"
    work.mkdir(parents=True, exist_ok=True)
    int8_file = int8_network(predictor, work) if "int8" in a.networks else None

    def network(name: str, threads: int) -> PosePredictor:
        if name == "fp32":
            return predictor
        from vitpose.deploy.runtime import OrtNetwork

        return PosePredictor(OrtNetwork(int8_file, predictor.model.spec, threads), predictor.meta)
    detector_path = detector_file(a.detector) if a.detector else None

    def detector_for(truth: dict, threads: int) -> object:
        if detector_path is None:
            return ground_truth_detector(truth)
        return OnnxPersonDetector(detector_path, a.detector_format, threads=threads)

    rows = []
    for people in a.people:
        still = max(1, people // 2)
        video = work / f"people{people}.mp4"
        truth = json.loads(make_video(video, a.frames, walking=people - still, still=still).read_text())
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name in a.networks:
                poser = network(name, threads)
                for label, out in (("poses", None), ("poses + video", work / f"out{people}.mp4")):
                    detector = detector_for(truth, threads)
                    t0 = time.perf_counter()
                    result = poses_in_video(poser, video, out, detector=detector, say=lambda _: None)
                    fps = len(result.frames) / (time.perf_counter() - t0)
                    rows.append({"people": people, "threads": threads, "network": name, "path": label,
                                 "fps": round(fps, 2)})
                    print(f"{people} people, {threads} thread(s), {name}, {label}: {fps:.1f} frames/s", flush=True)
        raw = poses_in_video(predictor, video, None, detector=detector_for(truth, 2), smoothing=None,
                             say=lambda _: None)
        smooth = poses_in_video(predictor, video, None, detector=detector_for(truth, 2),
                                smoothing=OneEuroParams(), say=lambda _: None)
        if detector_path is not None:
            matched = match_people(raw, truth)
            rows.append({"people": people, **{k: round(v, 3) for k, v in matched.items()}})
            print(f"{people} people: the detector's people match the true ones with recall {matched['recall']:.3f}, "
                  f"precision {matched['precision']:.3f}; {matched['tracks']} tracks for {matched['true_tracks']} "
                  "people", flush=True)
        before, after = still_jitter(raw, truth), still_jitter(smooth, truth)
        rows.append({"people": people, "jitter_raw_px": round(before, 3), "jitter_smoothed_px": round(after, 3)})
        print(f"{people} people: a still person's keypoint jitter {before:.2f} px raw, {after:.2f} px smoothed "
              f"({after / before:.2f}x)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "detector": a.detector or "true boxes", "frames": a.frames, "machine": machine(), "rows": rows}, indent=1))
    print(f"results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Keypoints and pictures for images and videos: a model, images / folders / videos, person boxes → PNGs, videos
and JSON.

    python pipelines/predict.py --model models:/vitpose-student@champion photo.jpg
    python pipelines/predict.py --model runs/ray/.../checkpoint_000007 images/ --boxes dets.json --box-score-thr 0.5
    python pipelines/predict.py --model models:/vitpose-student@champion walk.mp4 --detector yolox_m.onnx \
        --detector-format yolox

A video gives ``OUT/<name>_pose.mp4`` (every frame drawn) and ``OUT/<name>_poses.json``: per frame, every person
as a COCO keypoint result (``bbox``, ``keypoints`` flat x, y, score, ``score``) with its ``track_id`` (people are
tracked across frames, and their keypoints smoothed by a One-Euro filter unless --no-smooth). --detector is an
ONNX person detector (vitpose.deploy.detector: mmdeploy's YOLOX / RTMDet as rtmlib ships them, ultralytics
YOLO exports); it finds the people of every video frame and of every image --boxes does not cover.

For each image it writes ``OUT/<name>_pose.png`` (skeletons drawn: limb colours by side, dot size by
keypoint confidence, joints and limbs below --score-thr faded, the threshold written on the picture, each box
labelled with the instance score) and one ``OUT/keypoints.json`` with every person's keypoints in image pixels.
An image that cannot be read is reported and skipped; the others go on. Exit code: 0 all written, 1 some
skipped (listed at the end), 2 nothing written or a usage error.

--boxes takes a JSON file in one of three shapes:
  * ``[[x, y, w, h(, score)], ...]``: the boxes of the single image given;
  * ``{"<file name or stem>": [[x, y, w, h(, score)], ...], ...}``: boxes per image;
  * a COCO detection results list ``[{"image_id": 785, "bbox": [...], "score": s, "category_id": 1}, ...]``,
    matched to images whose file stem is the id (000000000785.jpg).
An image without boxes (no --boxes, or not in the file) and no --detector is taken whole as one person, and the
JSON says so (``whole_image_box``); an explicit empty list means nobody is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from vitpose.cli import UsageError, guarded
from vitpose.deploy.detector import FORMATS as DETECTOR_FORMATS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
CHUNK = 8  # images whose crops share forward passes; bounds memory on folders of large photos


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="image files, folders of images, video files")
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a checkpoint folder or weights file")
    p.add_argument("--boxes", type=Path, help="person boxes JSON (see above); default: each whole image is one person")
    p.add_argument("--box-score-thr", type=float, default=0.0, help="drop boxes scored below this (default 0)")
    p.add_argument("--score-thr", type=float, default=0.3,
                   help="keypoints below this confidence, and limbs to them, are drawn faded (default 0.3)")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default ./predictions)")
    p.add_argument("--no-flip-test", action="store_true", help="one pass per box instead of two (faster, less accurate)")
    p.add_argument("--device", help="torch device, e.g. cuda:0 (default: cuda when available, else cpu)")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ URIs (default MLFLOW_TRACKING_URI)")
    p.add_argument("--config", help="YAML with detector: and smoothing: sections (configs/predict/, "
                   "vitpose.deploy.predict_config); the flags below win over it")
    p.add_argument("--detector", help="ONNX person detector for videos and images without --boxes: a file, or an "
                   "MLflow model URI (models:/vitpose-detector@current, from pipelines/detector.py)")
    p.add_argument("--detector-format", choices=DETECTOR_FORMATS,
                   help="the detector file's layout (default auto: tells ultralytics, mmdeploy's and ours apart)")
    p.add_argument("--detector-score-thr", type=float,
                   help="person boxes below this are dropped (default: the threshold the file recommends, else 0.3)")
    p.add_argument("--no-smooth", action="store_true", help="videos: raw keypoints, no One-Euro smoothing")
    p.add_argument("--smooth-min-cutoff", type=float, help="One-Euro cutoff of a still joint, Hz (default 1)")
    p.add_argument("--smooth-beta", type=float, help="One-Euro speed coefficient, per pixel/s (default 0.05)")
    args = p.parse_args(argv)
    from vitpose.config import ConfigError
    from vitpose.deploy.predict_config import fill_from_config

    try:
        fill_from_config(args)
    except ConfigError as err:
        p.error(f"--config {err}")
    if not args.no_smooth:  # checked here: a bad value is a usage error, not a video skipped later
        from vitpose.deploy.smoothing import OneEuroParams

        try:
            OneEuroParams(args.smooth_min_cutoff, args.smooth_beta)
        except ValueError as err:
            p.error(f"--smooth-min-cutoff / --smooth-beta: {err}")
    return args


def collect_images(inputs: list[Path]) -> list[Path]:
    """Every image or video to predict: files as given, folders contribute their image files, sorted."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files = sorted(f for f in item.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise UsageError(f"{item}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            found += files
        elif item.is_file():
            found.append(item)
        else:
            raise UsageError(f"{item}: no such file or folder")
    return found


def load_boxes(path: Path, images: list[Path]) -> dict[Path, Any]:
    """Boxes per image from a --boxes file; images it does not mention are absent from the result."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--boxes {path}: file not found") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--boxes {path}: not valid JSON ({err})") from None
    if isinstance(data, dict):
        out = {}
        for image in images:
            for key in (str(image), image.name, image.stem):
                if key in data:
                    out[image] = data[key]
                    break
        unused = set(data) - {k for im in out for k in (str(im), im.name, im.stem)}
        if unused:
            print(f"note: --boxes {path}: no image given for {sorted(unused)[:5]}", file=sys.stderr)
        return out
    if not isinstance(data, list):
        raise UsageError(f"--boxes {path}: expected a list or an object, got {type(data).__name__}")
    if data and all(isinstance(d, dict) and "image_id" in d for d in data):
        by_id: dict[int, list] = {}
        for d in data:
            if int(d.get("category_id", 1)) == 1:  # COCO's person
                by_id.setdefault(int(d["image_id"]), []).append({"bbox": d["bbox"], "score": d.get("score", 1.0)})
        out = {}
        for image in images:
            if image.stem.isdigit() and int(image.stem) in by_id:
                out[image] = by_id[int(image.stem)]
        if not out:
            raise UsageError(f"--boxes {path}: a COCO results list, but no image id matches an image file stem "
                             f"(ids like {sorted(by_id)[:3]}, files like {images[0].name}); name files by their id "
                             "or use the {\"file name\": [[x, y, w, h, score], ...]} form")
        return out
    if len(images) != 1:
        raise UsageError(f"--boxes {path}: a plain list of boxes fits one image, but {len(images)} were given; use "
                         "the {\"file name\": [[x, y, w, h, score], ...]} form")
    return {images[0]: data}


def _filter(boxes: Any, thr: float) -> Any:
    if thr <= 0 or not isinstance(boxes, list):
        return boxes
    kept = []
    for b in boxes:
        score = b.get("score", 1.0) if isinstance(b, dict) else (b[4] if isinstance(b, (list, tuple)) and len(b) == 5 else 1.0)
        if not isinstance(score, (int, float)) or score >= thr:
            kept.append(b)
    return kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from vitpose.deploy.inference import BadRequest, PosePredictor, decode_image, parse_boxes, resolve_device
    from vitpose.deploy.video import VIDEO_SUFFIXES

    t0 = time.perf_counter()
    found = collect_images(args.inputs)
    videos = [f for f in found if f.suffix.lower() in VIDEO_SUFFIXES]
    images = [f for f in found if f.suffix.lower() not in VIDEO_SUFFIXES]
    boxes = load_boxes(args.boxes, images) if args.boxes and images else {}
    detector = open_detector(args) if args.detector else None
    predictor = PosePredictor.from_uri(args.model, args.tracking_uri, flip_test=not args.no_flip_test,
                                       device=resolve_device(args.device))
    from PIL import Image

    from vitpose.visualize import draw_persons

    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    used_names: set[str] = set()
    for video in videos:
        try:
            records.append(predict_video(args, predictor, detector, video))
        except (ValueError, OSError) as err:  # VideoError is a ValueError: one bad video does not stop the rest
            print(f"warning: skipping {video}: {err}", file=sys.stderr)
            skipped.append((video, str(err)))
    for start in range(0, len(images), CHUNK):
        chunk = []
        for path in images[start : start + CHUNK]:
            try:
                image = decode_image(path.read_bytes())
                # Parsed here, not inside the batch, so an error names the image its boxes belong to.
                given = boxes.get(path)
                if given is None and detector is not None:  # boxes given by the caller win over the detector's
                    given = detector(image).tolist()
                parsed = parse_boxes(_filter(given, args.box_score_thr), image.shape[1], image.shape[0])
            except (BadRequest, OSError) as err:  # one bad file does not stop the others
                print(f"warning: skipping {path}: {err}", file=sys.stderr)
                skipped.append((path, str(err).split(";")[0]))
                continue
            chunk.append((path, image, parsed))
        if not chunk:
            continue
        results = predictor.predict_batch([(image, b) for _, image, b in chunk])
        for (path, image, _), result in zip(chunk, results, strict=True):
            name = f"{path.stem}_pose.png"
            n = 1
            while name in used_names:  # same stem from two folders
                n += 1
                name = f"{path.stem}_{n}_pose.png"
            used_names.add(name)
            draw_persons(Image.fromarray(image), result, predictor.keypoint_info, args.score_thr).save(args.out / name)
            records.append({"file": str(path), "png": name, **{k: v for k, v in result.items() if k != "keypoint_names"}})
            note = " (whole image as one person)" if result["whole_image_box"] else ""
            print(f"{path}: {result['num_persons']} person(s){note} -> {args.out / name}")
    out_json = args.out / "keypoints.json"
    out_json.write_text(json.dumps({
        "model": args.model, "flip_test": predictor.flip_test, "keypoint_names": predictor.names,
        "skeleton": predictor.keypoint_info.get("skeleton", []), "images": records,
    }, indent=1))
    print(f"wrote {len(records)} picture(s) / video(s) and {out_json} in {time.perf_counter() - t0:.1f}s; threshold "
          f"--score-thr {args.score_thr:g} (keypoints below it drawn faded)")
    if skipped:
        print(f"skipped {len(skipped)} of {len(found)} input(s):", file=sys.stderr)
        for path, why in skipped:
            print(f"  {path}: {why}", file=sys.stderr)
    if not records:
        print(f"error: nothing written: all {len(found)} input(s) were skipped (reasons above)", file=sys.stderr)
        return 2
    return 1 if skipped else 0


def open_detector(args: argparse.Namespace) -> Any:
    from vitpose.deploy.detector import OnnxPersonDetector, detector_file

    try:
        return OnnxPersonDetector(detector_file(args.detector, args.tracking_uri), args.detector_format,
                                  score_thr=args.detector_score_thr)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--detector {err}") from None


def predict_video(args: argparse.Namespace, predictor: Any, detector: Any, video: Path) -> dict[str, Any]:
    """``OUT/<stem>_pose.mp4`` and ``OUT/<stem>_poses.json`` for one video; returns its record for keypoints.json."""
    import numpy as np
    from PIL import Image

    from vitpose.deploy.smoothing import OneEuroParams
    from vitpose.deploy.video_poses import poses_in_video
    from vitpose.visualize import draw_persons

    smoothing = None if args.no_smooth else OneEuroParams(args.smooth_min_cutoff, args.smooth_beta)

    def draw(rgb: np.ndarray, result: dict[str, Any]) -> np.ndarray:
        return np.asarray(draw_persons(Image.fromarray(rgb), result, predictor.keypoint_info, args.score_thr))

    out_video, out_json = args.out / f"{video.stem}_pose.mp4", args.out / f"{video.stem}_poses.json"
    result = poses_in_video(predictor, video, out_video, detector=detector, smoothing=smoothing, draw=draw)
    results = [{"image_id": f["frame"], "category_id": 1, "track_id": p["track_id"], "bbox": p["box"],
                "score": p["score"], "keypoints": [v for kp in p["keypoints"] for v in kp]}
               for f in result.frames for p in f["people"]]
    out_json.write_text(json.dumps({"video": str(video), "fps": result.fps, "frames": len(result.frames),
                                    "stopped": result.stopped, "keypoint_names": predictor.names,
                                    "smoothing": None if smoothing is None else dataclasses.asdict(smoothing),
                                    "results": results}, indent=1))
    note = f"; {result.stopped}" if result.stopped else ""
    whole = "" if detector is not None else " (no --detector: each frame whole as one person)"
    print(f"{video}: {len(result.frames)} frames, {result.tracks} track(s){whole}{note} -> {out_video}, {out_json}")
    return {"file": str(video), "video": out_video.name, "json": out_json.name, "frames": len(result.frames),
            "tracks": result.tracks}


if __name__ == "__main__":
    sys.exit(main())

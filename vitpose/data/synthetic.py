"""A learnable, deterministic COCO-format synthetic person-keypoint dataset (JPEGs + json) for CPU runs.

Owns the generator behind the demo and the tests. Each image holds a few articulated "stick people"
(capsule limbs, a torso quad, a head disc with eyes/nose/ears) with the 17 COCO keypoints, drawn in varied
poses, sizes and rotations on a cluttered background:

* left/right are distinguishable: left limbs and left facial marks take a warm hue (reds/oranges) with a
  dark centre stripe, right ones a cool hue (blues) without; some figures face away, so image side alone
  does not tell left from right,
* occlusion: other figures and occluder shapes hide joints (visibility 1, still labelled); the far ear/eye
  of a turned head is visibility 1; the face of a figure seen from the back is unlabelled (0),
* truncation: joints outside the canvas are unlabelled (0, x = y = 0, as COCO),
* clutter: background gradient, random shapes, lone "limb" capsules in the figures' colours, noise.

Annotations carry ``bbox`` (tight box of the figure's own silhouette, clipped to the canvas), ``area``
(``PERSON_BOX_FILL`` of the box: what a real person's segment of that box would cover), ``keypoints``, ``num_keypoints``, ``iscrowd`` 0 and COCO's ``categories`` entry, so COCO's
OKS sigmas apply. The same (seed, config) gives byte-identical json and JPEGs: every image draws from its
own ``numpy`` generator keyed by (seed, split, image index).

Layout under ``root``: ``images/{train,val}/*.jpg``, ``annotations/person_keypoints_{train,val}.json``
and ``synthetic.json`` (the generation parameters, the marker ``ensure_synthetic_dataset`` compares). With
``unlabeled_instances`` > 0 also an unlabelled split as a detector would leave it: ``images/unlabeled/*.jpg``
(files named by image id, as COCO's) and ``annotations/person_detections_unlabeled.json``, COCO
detection results whose boxes are the people's boxes with a detector's errors (jitter, misses, false boxes);
no keypoints anywhere.

CLI: ``python -m vitpose.data.synthetic --out DIR --train-instances 2000 --val-instances 400 --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from vitpose.data.figures import SynthConfig, render_image
from vitpose.data.keypoints import COCO_KEYPOINTS, COCO_SKELETON

# Bump when the drawing changes, so ensure_synthetic_dataset regenerates old folders.
GENERATOR_VERSION = 2  # 2: person-shaped OKS area

CATEGORIES = [
    {
        "supercategory": "person",
        "id": 1,
        "name": "person",
        "keypoints": COCO_KEYPOINTS,
        "skeleton": COCO_SKELETON,
    }
]
MARKER = "synthetic.json"
UNLABELED_IMAGES = "images/unlabeled"
UNLABELED_BOXES = "annotations/person_detections_unlabeled.json"
# A detector's errors on the unlabelled split: box jitter (share of the box size), missed people, false boxes.
DETECTOR_JITTER, DETECTOR_MISS_RATE, DETECTOR_FALSE_RATE = 0.08, 0.05, 0.05
# ---------------------------------------------------------------------------------------------- files
def generate_split(
    out_dir: str | os.PathLike, split: str, num_instances: int, seed: int, cfg: SynthConfig
) -> Path:
    """Write ``images/<split>/*.jpg`` and ``annotations/person_keypoints_<split>.json``; returns the json path.

    Images are added until ``num_instances`` annotated people (``num_keypoints > 0``) exist; the last image
    gets only as many figures as still needed, so the count is exact.
    """
    out = Path(out_dir)
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    split_key = {"train": 0, "val": 1}.get(split, sum(map(ord, split)))
    images, annotations = [], []
    count, index = 0, 0
    while count < num_instances:
        index += 1
        rng = np.random.default_rng([seed, split_key, index])
        n = min(int(rng.integers(1, cfg.max_figures + 1)), num_instances - count)
        img, anns = render_image(rng, cfg, n)
        name = f"{index:08d}.jpg"
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
        )
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {img_dir / name}")
        (img_dir / name).write_bytes(buf.tobytes())
        images.append({"id": index, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for a in anns:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index, "category_id": 1, "iscrowd": 0, **a}
            )
            count += a["num_keypoints"] > 0
    data = {
        "info": {
            "description": f"vitpose synthetic {split}",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "config": asdict(cfg),
        },
        "licenses": [],
        "categories": CATEGORIES,
        "images": images,
        "annotations": annotations,
    }
    ann_file = out / "annotations" / f"person_keypoints_{split}.json"
    ann_file.write_text(json.dumps(data, separators=(",", ":")))
    return ann_file


def generate_unlabeled_split(out_dir: str | os.PathLike, num_instances: int, seed: int, cfg: SynthConfig) -> Path:
    """Write the unlabelled split (see the module docstring); returns the detection file's path."""
    out = Path(out_dir)
    ann_file = generate_split(out, "unlabeled", num_instances, seed, cfg)
    data = json.loads(ann_file.read_text())
    ann_file.unlink()  # the keypoints stay unknown: only what a detector would say is kept
    rng = np.random.default_rng([seed, 2, 0])
    size = cfg.image_size
    detections = []
    for ann in data["annotations"]:
        if ann["num_keypoints"] == 0 or rng.random() < DETECTOR_MISS_RATE:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.normal(0, DETECTOR_JITTER, 2) * (w, h)
        sw, sh = np.exp(rng.normal(0, DETECTOR_JITTER, 2))
        box = [x + dx + w * (1 - sw) / 2, y + dy + h * (1 - sh) / 2, w * sw, h * sh]
        detections.append({"image_id": ann["image_id"], "category_id": 1, "bbox": [round(float(v), 2) for v in box],
                           "score": round(float(rng.uniform(0.5, 1.0)), 3)})
    for im in data["images"]:
        if rng.random() < DETECTOR_FALSE_RATE * 2:  # about one false box per ten people (two per image)
            w, h = rng.uniform(0.1, 0.4, 2) * size
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            detections.append({"image_id": im["id"], "category_id": 1,
                               "bbox": [round(float(v), 2) for v in (x, y, w, h)],
                               "score": round(float(rng.uniform(0.3, 0.7)), 3)})
    boxes = out / UNLABELED_BOXES
    boxes.write_text(json.dumps(detections, separators=(",", ":")))
    return boxes


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def _paths(root: Path) -> SyntheticPaths:
    return SyntheticPaths(
        root=root,
        train_ann=root / "annotations" / "person_keypoints_train.json",
        train_images=root / "images" / "train",
        val_ann=root / "annotations" / "person_keypoints_val.json",
        val_images=root / "images" / "val",
    )


def generate_dataset(
    root: str | os.PathLike,
    *,
    train_instances: int,
    val_instances: int,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    unlabeled_instances: int = 0,
) -> SyntheticPaths:
    """Write the splits and the parameter marker under ``root`` (which may exist; files are overwritten)."""
    cfg = cfg or SynthConfig()
    root = Path(root)
    generate_split(root, "train", train_instances, seed, cfg)
    generate_split(root, "val", val_instances, seed, cfg)
    if unlabeled_instances:
        generate_unlabeled_split(root, unlabeled_instances, seed, cfg)
    params = _params(train_instances, val_instances, seed, cfg, unlabeled_instances)
    (root / MARKER).write_text(json.dumps(params, indent=1))
    return _paths(root)


def _params(train_instances: int, val_instances: int, seed: int, cfg: SynthConfig, unlabeled_instances: int = 0
            ) -> dict:
    params = {
        "generator_version": GENERATOR_VERSION,
        "train_instances": train_instances,
        "val_instances": val_instances,
        "seed": seed,
        "config": asdict(cfg),
    }
    if unlabeled_instances:  # absent when 0, so folders written before the split existed stay current
        params["unlabeled_instances"] = unlabeled_instances
    return params


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    *,
    train_instances: int = 2000,
    val_instances: int = 400,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    unlabeled_instances: int = 0,
) -> SyntheticPaths:
    """Generate the dataset at ``root`` unless it is already there with exactly these parameters.

    Generation happens in a temporary sibling folder that is renamed into place, so concurrent callers
    (Ray workers, parallel tests) never see a half-written dataset. A different existing synthetic
    dataset is replaced; a non-empty folder without the marker is refused rather than deleted.
    """
    cfg = cfg or SynthConfig()
    root = Path(root)
    wanted = _params(train_instances, val_instances, seed, cfg, unlabeled_instances)

    def current() -> dict | None:
        try:
            return json.loads((root / MARKER).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    if current() == wanted:
        return _paths(root)
    if root.exists() and any(root.iterdir()) and current() is None:
        raise FileExistsError(
            f"{root} exists, is not empty and has no {MARKER}; it is not a synthetic dataset this code wrote. "
            "Pick another folder or empty it."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_dataset(tmp, train_instances=train_instances, val_instances=val_instances, seed=seed, cfg=cfg,
                         unlabeled_instances=unlabeled_instances)
        if root.exists():
            if current() == wanted:  # someone else finished first
                return _paths(root)
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
            os.replace(root, old / "d")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if current() != wanted:  # lost a race against a writer of other parameters
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitpose.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-instances", type=int, default=2000)
    p.add_argument("--val-instances", type=int, default=400)
    p.add_argument("--unlabeled-instances", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    d = SynthConfig()
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--max-figures", type=int, default=d.max_figures)
    p.add_argument("--clutter", type=float, default=d.clutter)
    p.add_argument("--occlusion-prob", type=float, default=d.occlusion_prob)
    p.add_argument("--pose-variety", type=float, default=d.pose_variety)
    a = p.parse_args(argv)
    cfg = SynthConfig(
        image_size=a.image_size,
        max_figures=a.max_figures,
        clutter=a.clutter,
        occlusion_prob=a.occlusion_prob,
        pose_variety=a.pose_variety,
    )
    t0 = time.perf_counter()
    paths = generate_dataset(
        a.out, train_instances=a.train_instances, val_instances=a.val_instances, seed=a.seed, cfg=cfg,
        unlabeled_instances=a.unlabeled_instances,
    )
    print(
        f"wrote {a.train_instances} train + {a.val_instances} val instances to {paths.root} "
        f"in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()

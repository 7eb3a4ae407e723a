"""Keypoint annotation files as their publishers ship them, read into one COCO-shaped dict.

Every built-in set's files are read unchanged; what a layout leaves out is derived here, once, the way its
reference toolkit derives it, so that the dataset, the evaluator and COCOeval all see the same values:

* ``iscrowd`` missing: 0 (OneHand10K, AP-10K converters omit it).
* ``num_keypoints`` missing: the count of labelled joints (visibility > 0) in ``keypoints``, as COCO defines it.
* ``area`` missing (CrowdPose, AIC, MPII): the box area x 0.53, the value xtcocotools' COCOeval uses for files
  without ``area`` (``use_area=False``): a person fills about half of its box.
* MPII's own layout (mmpose's ``mpii_train.json``: a list of people with ``joints``, ``joints_vis``,
  ``center``, ``scale``, ``image``): one image per file name, the box of side ``scale`` x 200 px around
  ``center`` moved down 15 / 200 of it (mmpose's adjustment so the feet stay in the crop), coordinates from
  MATLAB's 1-based pixels to 0-based. ``headbox`` / ``head_size`` of a person, when present, are kept for PCKh.
  MPII's head boxes ship apart, in ``mpii_gt_val.mat`` beside ``mpii_val.json`` (``headboxes_src`` 2 x 2 x N,
  ``pos_gt_src`` 16 x 2 x N, ``jnt_missing`` 16 x N, one column per person in the json's order): when that file
  lies beside the json and holds as many people, each person's box is read from it, after checking that its
  joints are the json's, so PCKh is normalised as MPII's own evaluation does.
* AI Challenger's own layout (``keypoint_validation_annotations_20170911.json``: a list of images with
  ``image_id``, ``keypoint_annotations`` and ``human_annotations`` per human): boxes from x1, y1, x2, y2,
  visibility 1 (visible) -> 2, 2 (occluded) -> 1, 3 (not labelled) -> 0, images ``<image_id>.jpg``.

A problem is one ``ValueError`` line naming the file, the entry, the field and the fix, never a KeyError from
inside a library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitpose.data.files import read_json

MPII_GT_FILE = "mpii_gt_val.mat"  # where mmpose's layout keeps the val head boxes
MPII_PIXEL_STD = 200.0  # MPII's scale is the person's height / 200 px
CROWD_AREA_FACTOR = 0.53  # xtcocotools: area of a person ~ 0.53 x its box, for files without 'area'
_MPII_NAMES = ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis",
               "thorax", "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder",
               "left_shoulder", "left_elbow", "left_wrist")  # fmt: skip


def load_keypoint_file(path: str | Path) -> dict[str, Any]:
    """The annotation file at ``path`` as a COCO keypoint dict with every field the readers need (see the
    module docstring). Read afresh each time: COCOeval writes into the annotations it is given."""
    return normalise(read_json(Path(path)), path)


def normalise(data: Any, path: Any) -> dict[str, Any]:
    """``data`` (a parsed file) as a COCO keypoint dict; see ``load_keypoint_file``."""
    if isinstance(data, list) and data and isinstance(data[0], dict) and "joints" in data[0]:
        data = mpii_to_coco(data, path)
    elif isinstance(data, list) and data and isinstance(data[0], dict) and "keypoint_annotations" in data[0]:
        data = aic_to_coco(data, path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{path}: not a keypoint annotation file: expected COCO json ('images', 'annotations', "
                         "'categories' with 'keypoints') or MPII's list of people ('joints', 'joints_vis', 'center', "
                         "'scale', 'image'); give the file the dataset's publisher ships")
    for i, im in enumerate(data["images"]):
        missing = [f for f in ("id", "file_name") if f not in im]
        if missing:
            raise ValueError(f"{path}: images[{i}] has no {' or '.join(map(repr, missing))}; every image needs its "
                             "'id' and 'file_name' (relative to the image folder)")
    anns = []
    for i, ann in enumerate(data["annotations"]):
        anns.append(_fill(ann, i, path))
    return {**data, "annotations": anns}


def _fill(ann: dict[str, Any], i: int, path: Any) -> dict[str, Any]:
    where = f"{path}: annotation id {ann.get('id', f'#{i}')}"
    for field, fix in (("image_id", "the id of its image"), ("bbox", "its person box [x, y, w, h]"),
                       ("keypoints", "its keypoints [x, y, v, ...]")):
        if field not in ann:
            raise ValueError(f"{where} has no '{field}'; add {fix}")
    box = ann["bbox"]
    if not (isinstance(box, list | tuple) and len(box) == 4):
        raise ValueError(f"{where}: 'bbox' is {box!r}; give [x, y, width, height]")
    out = dict(ann)
    out.setdefault("id", i + 1)
    out.setdefault("iscrowd", 0)
    if "num_keypoints" not in out:
        kps = out["keypoints"]
        out["num_keypoints"] = sum(1 for v in kps[2::3] if isinstance(v, int | float) and v > 0)
    if "area" not in out:
        out["area"] = float(box[2]) * float(box[3]) * CROWD_AREA_FACTOR
    return out


_AIC_NAMES = ("right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
              "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "head_top", "neck")
_AIC_VISIBILITY = {1: 2, 2: 1, 3: 0}  # AI Challenger: 1 visible, 2 occluded, 3 not labelled


def aic_to_coco(entries: list[dict[str, Any]], path: Any) -> dict[str, Any]:
    """AI Challenger's layout (see the module docstring) as a COCO keypoint dict with the ``aic`` names."""
    images, anns = [], []
    for i, entry in enumerate(entries):
        kps_by_human, boxes = entry.get("keypoint_annotations") or {}, entry.get("human_annotations") or {}
        if "image_id" not in entry:
            raise ValueError(f"{path}: entry #{i} has no 'image_id'; AI Challenger's json names each image by it")
        images.append({"id": i + 1, "file_name": f"{entry['image_id']}.jpg"})
        for human, kps in sorted(kps_by_human.items()):
            if human not in boxes or len(kps) != 3 * len(_AIC_NAMES):
                raise ValueError(f"{path}: image {entry['image_id']} {human}: needs a box in 'human_annotations' and "
                                 f"{3 * len(_AIC_NAMES)} keypoint values, has {len(kps)}")
            x1, y1, x2, y2 = (float(v) for v in boxes[human])
            flat: list[float] = []
            for x, y, v in zip(kps[0::3], kps[1::3], kps[2::3], strict=True):
                vis = _AIC_VISIBILITY.get(int(v), 0)
                flat += [float(x), float(y), float(vis)] if vis else [0.0, 0.0, 0.0]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "keypoints": flat})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": list(_AIC_NAMES)}], "layout": "aic"}


def mpii_to_coco(people: list[dict[str, Any]], path: Any) -> dict[str, Any]:
    """MPII's layout (see the module docstring) as a COCO keypoint dict with the ``mpii`` names."""
    images: dict[str, int] = {}
    anns = []
    for i, p in enumerate(people):
        missing = [f for f in ("joints", "joints_vis", "center", "scale", "image") if f not in p]
        if missing:
            raise ValueError(f"{path}: person #{i} has no {', '.join(map(repr, missing))}; MPII's json gives each "
                             "person 'joints' (16 [x, y]), 'joints_vis', 'center', 'scale' and 'image'")
        if len(p["joints"]) != len(_MPII_NAMES) or len(p["joints_vis"]) != len(_MPII_NAMES):
            raise ValueError(f"{path}: person #{i} has {len(p['joints'])} joints and {len(p['joints_vis'])} "
                             f"joints_vis; MPII has {len(_MPII_NAMES)}")
        image = str(p["image"])
        if image not in images:
            stem = image.rsplit(".", 1)[0]
            images[image] = int(stem) if stem.isdigit() and int(stem) not in images.values() else len(images) + 1
        side = float(p["scale"]) * MPII_PIXEL_STD
        cx, cy = float(p["center"][0]) - 1, float(p["center"][1]) + 15 / MPII_PIXEL_STD * side - 1
        kps: list[float] = []
        for (x, y), v in zip(p["joints"], p["joints_vis"], strict=True):
            labelled = float(v) > 0 and (x, y) != (-1, -1)
            kps += [float(x) - 1, float(y) - 1, 2.0] if labelled else [0.0, 0.0, 0.0]
        ann = {"id": i + 1, "image_id": images[image], "category_id": 1, "iscrowd": 0,
               "bbox": [cx - side / 2, cy - side / 2, side, side], "keypoints": kps}
        ann.update({k: p[k] for k in ("headbox", "head_size") if k in p})
        anns.append(ann)
    for ann, box in zip(anns, _mpii_head_boxes(path, anns), strict=False):
        ann["headbox"] = box
    return {
        "images": [{"id": iid, "file_name": name} for name, iid in images.items()],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": list(_MPII_NAMES)}],
        "layout": "mpii",
    }



def _mpii_head_boxes(path: Any, anns: list[dict[str, Any]]) -> list[list[list[float]]]:
    """0-based head boxes [[x1, y1], [x2, y2]] per person from the ``mpii_gt_val.mat`` beside ``path``, or []
    when there is none or it describes another split (a train json beside the val file)."""
    gt_file = Path(str(path)).parent / MPII_GT_FILE
    if not isinstance(path, str | Path) or not gt_file.is_file():
        return []
    from scipy.io import loadmat  # only MPII's val file needs it

    try:
        gt = loadmat(str(gt_file))
        boxes, joints, missing = (np.asarray(gt[k], dtype=np.float64) for k in ("headboxes_src", "pos_gt_src",
                                                                               "jnt_missing"))
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{gt_file}: not MPII's ground-truth file ({e}); it needs 'headboxes_src' (2 x 2 x N), "
                         "'pos_gt_src' (16 x 2 x N) and 'jnt_missing' (16 x N); use the mpii_gt_val.mat mmpose "
                         "ships, or remove it to normalise PCKh by the neck-head segment") from None
    n = boxes.shape[-1] if boxes.ndim == 3 else -1
    if boxes.shape[:2] != (2, 2) or joints.shape != (len(_MPII_NAMES), 2, n) or missing.shape != (len(_MPII_NAMES), n):
        raise ValueError(f"{gt_file}: headboxes_src {boxes.shape}, pos_gt_src {joints.shape}, jnt_missing "
                         f"{missing.shape}; MPII's file has 2 x 2 x N, 16 x 2 x N and 16 x N")
    if n != len(anns):
        if "val" in Path(str(path)).stem:
            raise ValueError(f"{gt_file} holds {n} people and {path} {len(anns)}; the head boxes are matched to "
                             "people by order, so both must be the same split (mmpose's mpii_val.json and "
                             "mpii_gt_val.mat)")
        return []
    for i, ann in enumerate(anns):
        kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        both = (kps[:, 2] > 0) & (missing[:, i] == 0)
        if np.abs(kps[both, :2] + 1 - joints[both, :, i]).max(initial=0.0) > 1.0:
            raise ValueError(f"{gt_file}: person #{i}'s joints differ from {path}'s by more than a pixel; the head "
                             "boxes are matched by order, so the two files must list the same people in the same order")
    return [[[float(boxes[0, 0, i]) - 1, float(boxes[0, 1, i]) - 1], [float(boxes[1, 0, i]) - 1,
                                                                     float(boxes[1, 1, i]) - 1]] for i in range(n)]

"""Reading a COCO keypoint file into person instances: categories, ground-truth boxes, detector boxes.

``AnnotationIndex`` is the index-building half of ``TopDownCocoDataset`` (``vitpose.data.coco``), kept apart so
each module stays readable: the keypoint set and names from ``categories``, one ``Instance`` per usable
annotation (crowd and keypoint-less ones filtered, boxes clipped to the image as mmpose does) or per detection
of a COCO results file, and the bad-sample checks (missing image, zero-area or outside box, wrong keypoint
count or values), each a ``BadSampleError`` naming the fix or, with ``on_bad_sample='skip'``, a count.
The dataset sets the attributes the methods read (``ann_file``, ``image_dir``, ``det_file``, ``aspect_ratio``,
``padding``, ``on_bad_sample``, ``bad_sample_counts``, ``filtered_counts``) before calling them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitpose.config import one_line
from vitpose.data.files import BadSampleError, read_json
from vitpose.data.keypoints import join_keypoint_fields, note_read_with, read_categories
from vitpose.data.keypoints import upper_body_ids_from_names as upper_body_ids
from vitpose.data.keypoints.set import KeypointSet
from vitpose.data.transforms import box_to_center_scale


@dataclass(frozen=True)
class Instance:
    """One person box of the index (all coordinates in original image pixels)."""

    image_id: int
    file_name: str
    width: int  # from the annotation file; 0 when unknown
    height: int
    ann_id: int  # -1 for detections
    bbox: tuple[float, float, float, float]  # x, y, w, h as given (ground truth: clipped to the image)
    center: np.ndarray  # (2,)
    scale: np.ndarray  # (2,) padded box size in pixels
    keypoints: np.ndarray  # (K, 3) x, y, visibility; zeros for detections
    bbox_score: float
    area: float  # annotation area (GT) or box area (detections)
    category_id: int = 1  # the annotation's (AP-10K: its species) or the detection's category


class AnnotationIndex:
    """Builds the instance index of a COCO keypoint file; mixed into ``TopDownCocoDataset``."""

    ann_file: Path
    image_dir: Path
    det_file: Path | None
    aspect_ratio: float
    padding: float
    on_bad_sample: str
    bad_sample_counts: Counter[str]
    filtered_counts: Counter[str]

    def _read_categories(self, data: dict, chosen: KeypointSet | None) -> None:
        kset, self.category_id, self.category_ids = read_categories(data, chosen, self.ann_file)
        self._use_keypoint_set(kset)
        note_read_with(self.ann_file, kset)  # so an evaluator built from this path alone scores it with kset

    def _use_keypoint_set(self, kset: KeypointSet) -> None:
        self.keypoint_set = kset
        self.keypoint_names: list[str] = list(kset.names)
        self.num_keypoints = kset.num_keypoints
        self.flip_pairs = [tuple(p) for p in kset.flip_pairs]
        self.upper_body_ids = upper_body_ids(self.keypoint_names)
        self.skeleton = [tuple(link) for link in kset.skeleton]  # 0-based

    def _bad(self, reason: str, message: str) -> None:
        if self.on_bad_sample == "error":
            raise BadSampleError(reason, message + self._skip_hint())
        self.bad_sample_counts[reason] += 1

    def _image_list(self) -> str:
        """Where the image ids that detections name are listed, for messages."""
        return f"the images of {self.ann_file}"

    def _skip_hint(self) -> str:
        """How to go on without such samples, in the form a user types; said only when it would change things."""
        return "; or skip such samples: --set data.on_bad_sample=skip" if self.on_bad_sample == "error" else ""

    def _image_path_ok(self, im: dict, checked: dict[int, bool], where: str) -> bool:
        image_id = int(im["id"])
        if image_id not in checked:
            checked[image_id] = (self.image_dir / im["file_name"]).is_file()
        if not checked[image_id]:
            self._bad(
                "missing_image",
                f"image file {self.image_dir / im['file_name']} not found ({where}); "
                "restore the file or remove its image/annotations from the json",
            )
        return checked[image_id]

    def _box_ok(self, box: list[float], im: dict, where: str) -> bool:
        x, y, w, h = box
        if not (np.isfinite(box).all() and w > 0 and h > 0):
            self._bad(
                "zero_area_box",
                f"{where}: box {box} has zero area in {self.ann_file}; fix or drop the annotation",
            )
            return False
        width, height = im.get("width", 0), im.get("height", 0)
        if width and height and (min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0)):
            self._bad(
                "box_outside_image",
                f"{where}: box {box} lies outside image {im['file_name']} ({width}x{height}); fix or drop the "
                "annotation",
            )
            return False
        return True

    def _gt_instances(self, data: dict, images: dict[int, dict]) -> list[Instance]:
        k = self.num_keypoints
        checked: dict[int, bool] = {}
        out = []
        for ann in data.get("annotations", []):
            if int(ann.get("category_id", self.category_id)) not in self.category_ids:
                continue
            ann_id = int(ann["id"])
            where = f"annotation id {ann_id} (image id {ann.get('image_id')}) in {self.ann_file}"
            if ann.get("iscrowd", 0):
                self.filtered_counts["crowd"] += 1
                continue
            kps, problem = join_keypoint_fields(ann, self.keypoint_set)  # COCO-WholeBody: body, feet, face, hands
            if problem:
                self._bad("bad_keypoint_count", f"{where}: {problem}")
                continue
            try:
                kps = np.asarray(kps, dtype=np.float64).reshape(k, 3)
            except (TypeError, ValueError):
                kps = None
            if kps is None or not np.isfinite(kps).all():
                # NaN/inf (JSON allows them) would become NaN targets and a NaN loss, far from the cause.
                self._bad(
                    "bad_keypoint_values",
                    f"{where}: keypoints must be finite numbers (x, y, visibility); fix the annotation",
                )
                continue
            # num_keypoints counts the 'keypoints' field only (WholeBody: body), so it decides only for one-field sets.
            single = len(self.keypoint_set.parts) == 1
            if not (kps[:, 2] > 0).any() or (single and ann.get("num_keypoints", 1) == 0):
                self.filtered_counts["no_keypoints"] += 1
                continue
            im = images.get(int(ann["image_id"]))
            if im is None:
                self._bad(
                    "unknown_image_id",
                    f"{where}: image id {ann['image_id']} is not in 'images'; fix the json",
                )
                continue
            if not self._image_path_ok(im, checked, where) or not self._box_ok(list(ann["bbox"]), im, where):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            width, height = im.get("width", 0), im.get("height", 0)
            if width and height:  # mmpose clips ground-truth boxes to the image
                x1, y1 = max(x, 0.0), max(y, 0.0)
                x2, y2 = min(x + w, float(width)), min(y + h, float(height))
                x, y, w, h = x1, y1, x2 - x1, y2 - y1
            center, scale = box_to_center_scale([x, y, w, h], self.aspect_ratio, self.padding)
            out.append(
                Instance(
                    image_id=int(im["id"]),
                    file_name=im["file_name"],
                    width=int(width),
                    height=int(height),
                    ann_id=ann_id,
                    bbox=(x, y, w, h),
                    center=center,
                    scale=scale,
                    keypoints=kps,
                    bbox_score=1.0,
                    area=float(ann["area"]),  # derived when the file has none (keypoint_files)
                    category_id=int(ann.get("category_id", self.category_id)),
                )  # fmt: skip
            )
        return out

    def _det_instances(self, images: dict[int, dict], score_thr: float) -> list[Instance]:
        assert self.det_file is not None
        dets = read_json(self.det_file)
        if not isinstance(dets, list):
            raise ValueError(
                f"{self.det_file}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]"
            )
        checked: dict[int, bool] = {}
        zeros = np.zeros((self.num_keypoints, 3))
        out = []
        for i, det in enumerate(dets):
            where = f"detection #{i} in {self.det_file}"
            try:
                category, score = int(det.get("category_id", self.category_id)), float(det.get("score", 1.0))
                image_id, box = int(det["image_id"]), [float(v) for v in det["bbox"]]
                if len(box) != 4:
                    raise ValueError(f"bbox has {len(box)} numbers, not x, y, w, h")
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                self._bad("bad_detection", f"{where}: {one_line(err)}; each detection needs image_id, "
                          "bbox [x, y, w, h] and score (COCO's detection-results format)")
                continue
            if category not in self.category_ids or score < score_thr:
                continue
            where = f"detection #{i} (image id {image_id}) in {self.det_file}"
            im = images.get(image_id)
            if im is None:
                self._bad("unknown_image_id", f"{where}: image id {image_id} is not among {self._image_list()}; "
                          "detections must come from the same image set")
                continue
            if not self._image_path_ok(im, checked, where) or not self._box_ok(box, im, where):
                continue
            center, scale = box_to_center_scale(box, self.aspect_ratio, self.padding)
            out.append(
                Instance(
                    image_id=int(im["id"]),
                    file_name=im["file_name"],
                    width=int(im.get("width", 0)),
                    height=int(im.get("height", 0)),
                    ann_id=-1,
                    bbox=tuple(box),
                    center=center,
                    scale=scale,
                    keypoints=zeros,
                    bbox_score=score,
                    area=box[2] * box[3],
                    category_id=category,
                )  # fmt: skip
            )
        return out

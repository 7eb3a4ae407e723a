"""Person crops without keypoints: a folder of images and a detector's person boxes, for the teacher to label.

The boxes come in COCO's detection-results format, the json list a detector writes for COCO (``[{"image_id",
"category_id", "bbox": [x, y, w, h], "score"}, ...]``). Such a file names images by id only; as in COCO's own
folders (``000000397133.jpg``, ``COCO_val2014_000000397133.jpg``) the id is the number that ends the file's name.
Bad input is never fatal here: a detection that is malformed, names no image of the folder, or has an empty
box, and an image that cannot be decoded, is skipped and counted (``bad_sample_counts``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vitpose.data.annotations import Instance
from vitpose.data.coco import TopDownCocoDataset
from vitpose.data.keypoints.set import KeypointSet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def images_by_id(folder: Path) -> dict[int, dict[str, Any]]:
    """``{image id: {"id", "file_name"}}`` for the image files of ``folder`` whose names end in a number."""
    images = {}
    for path in sorted(folder.iterdir()):
        match = _TRAILING_NUMBER.search(path.stem)
        if path.suffix.lower() in IMAGE_SUFFIXES and match:
            images[int(match.group(1))] = {"id": int(match.group(1)), "file_name": path.name}
    return images


class UnlabeledBoxes(TopDownCocoDataset):
    """One training item per person box of ``boxes`` (score >= ``score_thr``, category ``category_id``) on the
    images of ``images``; keypoints all unlabelled, so the ground-truth loss of these items is zero.

    ``keypoints`` is the labelled set's keypoint set (the teacher's heatmaps follow it); other keyword arguments
    are ``TopDownCocoDataset``'s (crop and heatmap size, augmentation, ``aug_seed``)."""

    def __init__(self, images: str | os.PathLike, boxes: str | os.PathLike, *, keypoints: KeypointSet,
                 score_thr: float = 0.0, category_id: int = 1, **kwargs: Any):
        self._category = int(category_id)
        super().__init__(boxes, images, train=True, keypoints=keypoints, det_score_thr=score_thr,
                         on_bad_sample="skip", **kwargs)

    def _index(self, keypoints: KeypointSet | None, det_score_thr: float) -> list[Instance]:
        assert keypoints is not None
        self._use_keypoint_set(keypoints)
        self.category_id, self.category_ids = self._category, {self._category}
        images = images_by_id(self.image_dir)
        if not images:
            raise ValueError(f"{self.image_dir}: no image files named by a number (e.g. 000000397133.jpg) in the "
                             "unlabelled image folder; check distill.unlabeled.images")
        self.det_file = self.ann_file
        return self._det_instances(images, det_score_thr)

    def _image_list(self) -> str:
        return f"the files of {self.image_dir} (the number ending a file's name is its image id)"

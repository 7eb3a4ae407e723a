"""COCO-17 annotation files rewritten in another keypoint set's layout, for synthetic multi-dataset runs.

The synthetic generator draws COCO people; a second dataset with another keypoint set (so a
multi-dataset run has two synthetic datasets with different sets) is the generator's output remapped, written beside the COCO files as
``person_keypoints_<split>.<set>.json``. CrowdPose (14): its 12 limb joints, the nose standing in for the top
of the head, the shoulders' midpoint for the neck (labelled when both shoulders are). Written to a temporary
file and renamed, so concurrent writers never leave a half file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitpose.data.keypoints import get_keypoint_set


def _crowdpose(k: np.ndarray) -> np.ndarray:
    neck = (k[5] + k[6]) / 2 if k[5, 2] > 0 and k[6, 2] > 0 else np.zeros(3)
    if neck[2]:
        neck[2] = min(k[5, 2], k[6, 2])
    return np.concatenate([k[5:17], k[:1], neck[None]])


FROM_COCO: dict[str, Callable[[np.ndarray], np.ndarray]] = {"crowdpose": _crowdpose}


def remap_coco_file(src: Path, dst: Path, set_name: str) -> Path:
    """``src`` (COCO-17 keypoints) rewritten into ``set_name``'s layout at ``dst``; returns ``dst``."""
    if set_name not in FROM_COCO:
        raise ValueError(f"synthetic data exists in the keypoint sets coco and {', '.join(FROM_COCO)}, not "
                         f"{set_name!r}; use data.kind=coco with your own files")
    kset = get_keypoint_set(set_name)
    data = json.loads(Path(src).read_text())
    for ann in data["annotations"]:
        kps = FROM_COCO[set_name](np.asarray(ann["keypoints"], float).reshape(17, 3))
        ann["keypoints"], ann["num_keypoints"] = kps.round(2).ravel().tolist(), int((kps[:, 2] > 0).sum())
    data["categories"] = [{"id": 1, "name": "person", "supercategory": "person",
                           "keypoints": kset.expected_file_names(),
                           "skeleton": [[a + 1, b + 1] for a, b in kset.skeleton]}]
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(dst).name}-", dir=Path(dst).parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, dst)
    return Path(dst)


def ensure_remapped(root: Path, set_name: str) -> None:
    """The remapped train/val files of the synthetic dataset at ``root``, written when missing or older."""
    for split in ("train", "val"):
        src = root / "annotations" / f"person_keypoints_{split}.json"
        dst = root / "annotations" / f"person_keypoints_{split}.{set_name}.json"
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            remap_coco_file(src, dst, set_name)

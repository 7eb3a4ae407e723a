"""Keypoint definitions: names, left/right flip pairs, skeleton, and the plain-list form stored with a model.

One place for what a keypoint set is, used by the datasets (flip augmentation, half-body), the synthetic
generator, checkpoints and registered models (``keypoint_info``), and inference for weights that came
without a definition (``default_keypoint_info``).
"""

from __future__ import annotations

from typing import Any

COCO_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
# 1-based joint index pairs, as in COCO's annotation files.
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10],
    [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip

# Names that make a joint "lower body" for the half-body augmentation; everything else is upper body.
# Derived from names rather than COCO indices so other keypoint sets (e.g. with feet) work too.
_LOWER_BODY_WORDS = ("hip", "knee", "ankle", "foot", "heel", "toe")


def flip_pairs_from_names(names: list[str]) -> list[tuple[int, int]]:
    """Index pairs (left, right) of keypoints named ``left_X`` / ``right_X``."""
    index = {name: i for i, name in enumerate(names)}
    return [
        (i, index["right_" + name[5:]])
        for i, name in enumerate(names)
        if name.startswith("left_") and "right_" + name[5:] in index
    ]


def upper_body_ids_from_names(names: list[str]) -> list[int]:
    return [i for i, n in enumerate(names) if not any(w in n.lower() for w in _LOWER_BODY_WORDS)]


def keypoint_info(dataset: Any) -> dict[str, Any]:
    """Names, flip pairs and (1-based, COCO-style) skeleton of a dataset's keypoints, as plain lists: the
    form stored in checkpoints and registered models."""
    return {
        "names": list(dataset.keypoint_names),
        "flip_pairs": [list(p) for p in dataset.flip_pairs],
        "skeleton": [[a + 1, b + 1] for a, b in dataset.skeleton],
    }


def default_keypoint_info(num_keypoints: int) -> dict[str, Any]:
    """COCO's definition for a 17-keypoint model that came without one; generic names (and no flip pairs,
    so no flip test) otherwise."""
    if num_keypoints == 17:
        return {"names": list(COCO_KEYPOINTS),
                "flip_pairs": [list(p) for p in flip_pairs_from_names(COCO_KEYPOINTS)],
                "skeleton": [list(s) for s in COCO_SKELETON]}
    return {"names": [f"kp{i}" for i in range(num_keypoints)], "flip_pairs": [], "skeleton": []}

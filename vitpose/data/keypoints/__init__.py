"""Choosing a keypoint set (``data.keypoints``), custom sets, and the plain-list form stored with a model.

One place for which keypoints a run has, used by the datasets (targets, flip augmentation, half-body), the
evaluator (OKS sigmas), checkpoints and registered models (``keypoint_info``: names, flip pairs, skeleton,
sigmas, joint weights), inference, serving and ONNX export (output names), and pictures (skeleton).

    python -m vitpose.data.keypoints --list           # one line per built-in set: name and count
    python -m vitpose.data.keypoints --show crowdpose  # its names, flip pairs, skeleton, sigmas as JSON
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitpose.data.keypoints.builtin import BUILTIN_SETS, COCO, COCO_KEYPOINTS, COCO_SKELETON
from vitpose.data.keypoints.names import likeness, name_differences, overlap
from vitpose.data.keypoints.set import FROM_FILE, KeypointSet, KeypointSetError, mirror_pairs, pairs_by_name

__all__ = [
    "BUILTIN_SETS", "COCO_KEYPOINTS", "COCO_SKELETON", "CUSTOM", "KeypointSet", "KeypointSetError",
    "custom_keypoint_set", "default_keypoint_info", "file_keypoint_set", "flip_pairs_from_names",
    "get_keypoint_set", "join_keypoint_fields", "keypoint_info", "read_categories", "recognise_set", "set_read_with",
    "upper_body_ids_from_names",
]  # fmt: skip

CUSTOM = "custom"  # data.keypoints=custom: the set is data.custom_keypoints

# Names that make a joint "lower body" for the half-body augmentation; everything else is upper body.
# Derived from names rather than indices so every set works (feet, animals' back paws and tail).
_LOWER_BODY_WORDS = ("hip", "knee", "ankle", "foot", "heel", "toe", "pelvis", "back_paw", "tail")


def flip_pairs_from_names(names: list[str]) -> list[tuple[int, int]]:
    """Index pairs (left, right) of keypoints named ``left_X`` / ``right_X``."""
    return list(mirror_pairs(names))


def upper_body_ids_from_names(names: Sequence[str]) -> list[int]:
    return [i for i, n in enumerate(names) if not any(w in n.lower() for w in _LOWER_BODY_WORDS)]


def get_keypoint_set(name: str, custom: Mapping[str, Any] | None = None) -> KeypointSet:
    """The built-in set ``name``, or with ``name='custom'`` the set ``custom`` describes (see
    ``custom_keypoint_set``). An unknown name is an error listing the choices."""
    if name == CUSTOM:
        if custom is None:
            raise KeypointSetError("data.keypoints is 'custom' but data.custom_keypoints is not given; describe "
                                   "the set there (names, flip_pairs, skeleton, sigmas)")
        return custom_keypoint_set(custom)
    if name not in BUILTIN_SETS:
        raise KeypointSetError(f"unknown keypoint set {name!r}; choose one of {', '.join([*BUILTIN_SETS, CUSTOM])}")
    return BUILTIN_SETS[name]


def custom_keypoint_set(spec: Mapping[str, Any]) -> KeypointSet:
    """A set given in YAML (``data.custom_keypoints``): ``names``, ``sigmas`` (one per keypoint: OKS needs
    them), optional ``flip_pairs`` and ``skeleton`` as name pairs (``[left_eye, right_eye]``: easier to check
    than indices), ``joint_weights``, ``name`` (default ``custom``) and ``parts`` (annotation fields and
    counts, default all in ``keypoints``)."""
    names = [str(n) for n in spec["names"]]
    where = "data.custom_keypoints"
    return KeypointSet(
        name=str(spec.get("name") or CUSTOM), names=tuple(names),
        flip_pairs=pairs_by_name(names, spec.get("flip_pairs") or [], f"{where}.flip_pairs entry"),
        skeleton=pairs_by_name(names, spec.get("skeleton") or [], f"{where}.skeleton entry"),
        sigmas=tuple(float(s) for s in spec["sigmas"]),
        joint_weights=tuple(float(w) for w in spec.get("joint_weights") or ()),
        parts=tuple((str(f), int(n)) for f, n in spec.get("parts") or ()),
        source="given in the config (data.custom_keypoints)",
    )  # fmt: skip


def file_keypoint_set(category: Mapping[str, Any], path: Any = "the file") -> KeypointSet:
    """The set of a file loaded without a chosen one: the built-in whose names the file's category lists (by
    meaning: ``Right Shoulder`` is ``right_shoulder``). A file close to a built-in set (half its joints or
    more in common) but not equal is an error naming that set and the names that differ; a file unlike every
    set is read with its own definition (names, left_/right_ flip pairs, skeleton, ``sigmas`` if it has them)."""
    names = [str(n) for n in category["keypoints"]]
    for kset in BUILTIN_SETS.values():
        if len(kset.parts) == 1 and kset.matches_file(names):
            return kset
    closest = max(BUILTIN_SETS.values(), key=lambda s: likeness(names, s.expected_file_names()))
    if overlap(names, closest.expected_file_names()) >= 0.5 and not category.get("sigmas"):
        raise KeypointSetError(
            f"{path}: its keypoint names match no built-in set; closest is {closest.name!r} "
            f"({name_differences(names, closest.expected_file_names())}); rename them in 'categories[].keypoints', "
            "or name the set with data.keypoints, or describe the file's own with data.keypoints=custom")
    return KeypointSet(
        name=FROM_FILE, names=tuple(names), flip_pairs=mirror_pairs(names),
        skeleton=tuple((int(a) - 1, int(b) - 1) for a, b in category.get("skeleton", [])),
        sigmas=tuple(float(s) for s in category.get("sigmas") or ()), joint_weights=(),
        source="the file's categories entry",
    )  # fmt: skip


def recognise_set(data: Mapping[str, Any], category: Mapping[str, Any], path: Any) -> KeypointSet:
    """The set of a file loaded without a chosen one: a built-in set with several annotation fields
    (COCO-WholeBody) when the annotations carry all of them, else ``file_keypoint_set``."""
    anns = data.get("annotations") or [{}]
    for kset in BUILTIN_SETS.values():
        if len(kset.parts) > 1 and all(f in anns[0] for f, _ in kset.parts) and kset.matches_file(category["keypoints"]):
            return kset
    return file_keypoint_set(category, path)


def read_categories(data: Mapping[str, Any], chosen: KeypointSet | None, path: Any) -> tuple[KeypointSet, int, set[int]]:
    """(set, category id, ids of every category with the same keypoints) of a COCO-format json, checked
    against ``chosen`` (None: ``file_keypoint_set``). AP-10K has one category per species, all read."""
    cats = [c for c in data.get("categories", []) if c.get("keypoints")]
    if not cats:
        raise ValueError(f"{path}: no category with a 'keypoints' list in 'categories'")
    person = next((c for c in cats if c.get("name") == "person"), cats[0])
    kset = chosen if chosen is not None else recognise_set(data, person, path)
    kset.check_file(person["keypoints"], path)  # the error names the file, the set and the names that differ
    ids = {int(c["id"]) for c in cats if kset.matches_file(c["keypoints"])}
    return kset, int(person["id"]), ids


def join_keypoint_fields(ann: Mapping[str, Any], kset: KeypointSet) -> tuple[list[Any], str]:
    """(flat x, y, v list of the set's keypoints joined from its annotation fields in order, problem or "").
    COCO-WholeBody: ``keypoints`` (body) then ``foot_kpts``, ``face_kpts``, ``lefthand_kpts``, ``righthand_kpts``."""
    out: list[Any] = []
    for field, n in kset.parts:
        values = ann.get(field)
        if values is None or len(values) != 3 * n:
            got = "no values" if values is None else f"{len(values)} keypoint values"
            return [], (f"'{field}' has {got}, expected {3 * n} ({n} keypoints x 3) for keypoint set {kset.name!r}; "
                        "fix the annotation, or choose the set the file was made for (data.keypoints)")
        out.extend(values)
    return out, ""


# Which set each annotation file was read with in this process. The training loop builds its evaluator from
# the val file's path alone (``CocoKeypointEvaluator(val_ds.ann_file)``); this is how that evaluator scores
# the file with the set (sigmas, WholeBody fields) the dataset read it with.
_READ_WITH: dict[str, KeypointSet] = {}


def note_read_with(ann_file: str | Path, kset: KeypointSet) -> None:
    _READ_WITH[str(Path(ann_file).resolve())] = kset


def set_read_with(ann_file: str | Path) -> KeypointSet | None:
    """The set a dataset of this process read ``ann_file`` with, if any."""
    return _READ_WITH.get(str(Path(ann_file).resolve()))


def keypoint_info(dataset: Any) -> dict[str, Any]:
    """Names, flip pairs, (1-based, COCO-style) skeleton, OKS sigmas and joint weights of a dataset's
    keypoint set, as plain lists: the form stored in checkpoints and registered models."""
    kset = getattr(dataset, "keypoint_set", None)
    if kset is not None:
        info = kset.to_info()
        if hasattr(dataset, "keypoint_sets"):  # several datasets (data/multi_dataset.py): the primary's, and each one's
            info["datasets"] = [{"name": n, **s.to_info()} for n, s in dataset.keypoint_sets]
        return info
    return {  # a dataset-like object without a set (tests' stand-ins)
        "names": list(dataset.keypoint_names),
        "flip_pairs": [list(p) for p in dataset.flip_pairs],
        "skeleton": [[a + 1, b + 1] for a, b in dataset.skeleton],
    }


def default_keypoint_info(num_keypoints: int) -> dict[str, Any]:
    """COCO's definition for a 17-keypoint model that came without one; generic names (and no flip pairs,
    so no flip test) otherwise."""
    if num_keypoints == 17:
        return COCO.to_info()
    return {"names": [f"kp{i}" for i in range(num_keypoints)], "flip_pairs": [], "skeleton": []}


def flip_test_allowed(info: Mapping[str, Any]) -> bool:
    """Whether a mirrored pass can be mapped back: with the set's left/right pairs, or with none for a declared
    set (built-in or custom) that has no sides at all (one hand). Names with sides but no pairs, or a set
    guessed from a file's names, may have partners the pairs do not say: no flip test there."""
    if info.get("flip_pairs"):
        return True
    return info.get("set", FROM_FILE) != FROM_FILE and not mirror_pairs(list(info["names"]))

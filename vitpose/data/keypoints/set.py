"""What a keypoint set is: ``KeypointSet`` (names, flip pairs, skeleton, OKS sigmas, joint weights, and the
annotation fields its keypoints are read from), checked when it is made.

The built-in sets are in ``vitpose.data.keypoints.builtin``; choosing one (``data.keypoints``), custom sets and
the plain-list form stored with a model are in ``vitpose.data.keypoints``. This module only knows the shape
of a set, so every other module can import it without pulling the definitions in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vitpose.data.keypoints.names import name_differences, same_names

# A set read from a file's own ``categories`` entry, for a file that matches no built-in set and was loaded
# without one (``TopDownCocoDataset(keypoints=None)``): flip pairs are then guessed from left_/right_ names.
FROM_FILE = "from_file"


class KeypointSetError(ValueError):
    """A keypoint set that cannot be used, or a file or model that does not match the chosen set."""


@dataclass(frozen=True)
class KeypointSet:
    """One keypoint definition. Indices are 0-based; ``skeleton`` pairs too (``to_info`` writes COCO's 1-based).

    ``parts`` lists the annotation fields the keypoints are read from, in order, with their counts: COCO and
    most datasets keep all of them in ``keypoints``; COCO-WholeBody keeps the body there and the feet, face
    and hands in ``foot_kpts``, ``face_kpts``, ``lefthand_kpts``, ``righthand_kpts``. ``file_names`` are the
    names a dataset's own json lists in ``categories[].keypoints`` (for the ``keypoints`` field only) when
    they differ from ours: CrowdPose's json says ``head`` where mmpose says ``top_head``.
    """

    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    joint_weights: tuple[float, ...]
    parts: tuple[tuple[str, int], ...] = ()
    file_names: tuple[str, ...] = ()
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        k = len(self.names)
        where = f"keypoint set {self.name!r}"
        if k == 0:
            raise KeypointSetError(f"{where}: no keypoint names")
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise KeypointSetError(f"{where}: names {dup} appear more than once; each keypoint needs its own name")
        if not self.parts:
            object.__setattr__(self, "parts", (("keypoints", k),))
        if sum(n for _, n in self.parts) != k:
            raise KeypointSetError(f"{where}: its annotation fields {list(self.parts)} hold "
                                   f"{sum(n for _, n in self.parts)} keypoints, not {k}")
        # An empty sigma list is allowed only for a set read from a file: it trains, but OKS cannot score it.
        if self.sigmas and len(self.sigmas) != k:
            raise KeypointSetError(f"{where}: {len(self.sigmas)} OKS sigmas for {k} keypoints; give one per keypoint")
        if any(s <= 0 for s in self.sigmas):
            raise KeypointSetError(f"{where}: OKS sigmas must be > 0, got {list(self.sigmas)}")
        if not self.joint_weights:
            object.__setattr__(self, "joint_weights", (1.0,) * k)
        if len(self.joint_weights) != k or any(w < 0 for w in self.joint_weights):
            raise KeypointSetError(f"{where}: joint_weights must be {k} numbers >= 0, got {list(self.joint_weights)}")
        _check_pairs(self.flip_pairs, k, f"{where}: flip pair")
        _check_pairs(self.skeleton, k, f"{where}: skeleton link")
        seen: dict[int, int] = {}
        for a, b in self.flip_pairs:
            if a == b or a in seen or b in seen:
                # A keypoint swapped with two others (or itself) makes flipping twice not the identity.
                raise KeypointSetError(f"{where}: flip pair ({a}, {b}) reuses a keypoint; each keypoint has at "
                                       "most one mirror partner")
            seen[a], seen[b] = b, a
        if self.file_names and len(self.file_names) != self.parts[0][1]:
            raise KeypointSetError(f"{where}: file_names must list the {self.parts[0][1]} keypoints of "
                                   f"'{self.parts[0][0]}'")

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def flip_index(self) -> list[int]:
        """``flip_index()[i]``: the keypoint that ``i`` becomes in the mirrored image."""
        index = list(range(self.num_keypoints))
        for a, b in self.flip_pairs:
            index[a], index[b] = b, a
        return index

    def expected_file_names(self) -> list[str]:
        """What the file's ``categories[].keypoints`` must list: the keypoints of the first annotation field."""
        return list(self.file_names or self.names[: self.parts[0][1]])

    def matches_file(self, file_names: Sequence[str]) -> bool:
        """Whether a file's ``categories[].keypoints`` are this set's, written any way people write them
        (case, spaces, ``-``/``_``, the publishers' synonyms: see ``vitpose.data.keypoints.names``)."""
        return same_names(file_names, self.expected_file_names()) or same_names(file_names, self.names[: self.parts[0][1]])

    def check_file(self, file_names: Sequence[str], path: Any) -> None:
        """Raise ``KeypointSetError`` naming the file, the set and the names that differ when ``file_names``
        (the file's ``categories[].keypoints``) are not the set's."""
        if self.matches_file(file_names):
            return
        expected, got = self.expected_file_names(), list(file_names)
        fix = ("choose the set the file was made for with data.keypoints (python -m vitpose.data.keypoints "
               "--list), or describe the file's keypoints with data.keypoints=custom")
        if len(got) != len(expected):
            raise KeypointSetError(f"{path} has {len(got)} keypoints in its 'categories' ({_short(got)}) but "
                                   f"keypoint set {self.name!r} expects {len(expected)} there ({_short(expected)}): "
                                   f"{name_differences(got, expected)}; {fix}")
        raise KeypointSetError(f"{path}: 'categories[].keypoints' do not match keypoint set {self.name!r}: "
                               f"{name_differences(got, expected)}; {fix}")

    def to_info(self) -> dict[str, Any]:
        """The plain-list form stored in checkpoints, registered models and ONNX files."""
        return {
            "set": self.name,
            "names": list(self.names),
            "flip_pairs": [list(p) for p in self.flip_pairs],
            "skeleton": [[a + 1, b + 1] for a, b in self.skeleton],  # COCO's convention: 1-based
            "sigmas": list(self.sigmas),
            "joint_weights": list(self.joint_weights),
            "parts": [list(p) for p in self.parts],
            **({"file_names": list(self.file_names)} if self.file_names else {}),  # so a stored model reads them too
        }

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> KeypointSet:
        """Back from ``to_info`` (older metas without ``set``/``sigmas`` give a set read "from_file")."""
        names = tuple(info["names"])
        return cls(
            name=str(info.get("set", FROM_FILE)), names=names,
            flip_pairs=tuple((int(a), int(b)) for a, b in info.get("flip_pairs", [])),
            skeleton=tuple((int(a) - 1, int(b) - 1) for a, b in info.get("skeleton", [])),
            sigmas=tuple(float(s) for s in info.get("sigmas") or ()),
            joint_weights=tuple(float(w) for w in info.get("joint_weights") or ()),
            parts=tuple((str(f), int(n)) for f, n in info.get("parts") or [("keypoints", len(names))]),
            file_names=tuple(info.get("file_names") or ()),
        )  # fmt: skip


def _check_pairs(pairs: Iterable[tuple[int, int]], k: int, what: str) -> None:
    for a, b in pairs:
        if not (0 <= a < k and 0 <= b < k):
            raise KeypointSetError(f"{what} ({a}, {b}) is out of range for {k} keypoints (0-based)")


def _short(names: Sequence[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)})" if len(names) > 6 else "")


def pairs_by_name(names: Sequence[str], links: Iterable[tuple[str, str]], what: str = "link") -> tuple[tuple[int, int], ...]:
    """Name pairs -> index pairs; an unknown name is an error naming it (definitions read by name)."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for a, b in links:
        missing = [n for n in (a, b) if n not in index]
        if missing:
            raise KeypointSetError(f"{what} ({a!r}, {b!r}) names {missing} which is not a keypoint; "
                                   f"the keypoints are {_short(list(names))}")
        out.append((index[a], index[b]))
    return tuple(out)


def mirror_pairs(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Index pairs (left, right) of keypoints named ``left_X`` / ``right_X``."""
    index = {name: i for i, name in enumerate(names)}
    return tuple(
        (i, index["right_" + name[5:]])
        for i, name in enumerate(names)
        if name.startswith("left_") and "right_" + name[5:] in index
    )

"""Matching the keypoint names a file lists against the built-in sets, the way people write them.

Publishers and converters spell the same joint many ways: ``left_shoulder``, ``Left Shoulder``,
``L_Shoulder``, ``left-shoulder``; AP-10K's ``Root of tail`` or ``L_F_Paw``; CrowdPose's ``head`` for
mmpose's ``top_head``; hand points as ``index1`` or ``forefinger1``. ``canonical`` reduces a name to one
spelling (case, spaces, ``-``/``_``, side and finger abbreviations, the publishers' synonyms) so that a file
is compared with a set by meaning, not by typography. ``name_differences`` says what differs, for the one
error a file that matches no set gets; ``closest_set`` finds the set that error names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Single tokens: side and paw abbreviations (AP-10K: L_F_Paw), finger names used by hand datasets.
_TOKENS = {"l": "left", "r": "right", "lt": "left", "rt": "right", "f": "front", "fr": "front", "b": "back",
           "index": "forefinger", "little": "pinky", "pinkie": "pinky", "sho": "shoulder", "elb": "elbow",
           "wri": "wrist", "ank": "ankle", "kne": "knee"}  # fmt: skip
# Whole names (after tokens are joined) that publishers use for the same middle-of-body joint.
_SYNONYMS = {
    "head": "headtop", "tophead": "headtop", "topofhead": "headtop", "headtop": "headtop",
    "tailroot": "rootoftail", "tailbase": "rootoftail", "baseoftail": "rootoftail", "tail": "rootoftail",
    "neckupper": "upperneck", "chest": "thorax", "hip": "pelvis", "midhip": "pelvis",
}  # fmt: skip
_FINGER = re.compile(r"(thumb|fore|middle|ring|pinky)(finger)?")


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name).strip())  # camelCase -> camel Case
    spaced = re.sub(r"([A-Za-z])(\d)|(\d)([A-Za-z])", lambda m: " ".join(g for g in m.groups() if g), spaced)
    return [t for t in re.split(r"[\s_\-./]+", spaced.lower()) if t]


def canonical(name: str) -> str:
    """One spelling per joint: ``Right Shoulder``, ``R_Shoulder`` and ``right-shoulder`` -> ``rightshoulder``."""
    joined = "".join(_TOKENS.get(t, t) for t in _tokens(name))
    joined = _FINGER.sub(lambda m: m.group(1) + ("" if m.group(1) == "thumb" else "finger"), joined)
    joined = joined.replace("forefingerfinger", "forefinger")
    return _SYNONYMS.get(joined, joined)  # whole names only: "left_hip" is not "pelvis"


def canonical_list(names: Iterable[str]) -> list[str]:
    return [canonical(n) for n in names]


def same_names(file_names: Sequence[str], set_names: Sequence[str]) -> bool:
    """Whether two name lists mean the same joints in the same order."""
    return len(file_names) == len(set_names) and canonical_list(file_names) == canonical_list(set_names)


def name_differences(file_names: Sequence[str], set_names: Sequence[str], limit: int = 6) -> str:
    """What differs, for an error message: names only one side has, or, when both hold the same names, where
    the order differs."""
    got, want = canonical_list(file_names), canonical_list(set_names)
    extra = [n for n, c in zip(file_names, got, strict=True) if c not in want]
    missing = [n for n, c in zip(set_names, want, strict=True) if c not in got]
    if not extra and not missing:
        moved = [f"#{i} {f!r} where the set has {s!r}" for i, (f, s, a, b)
                 in enumerate(zip(file_names, set_names, got, want, strict=False)) if a != b]
        return "the same names in another order: " + ", ".join(moved[:limit]) + (" ..." if len(moved) > limit else "")
    parts = []
    if extra:
        parts.append(f"file only: {', '.join(map(repr, extra[:limit]))}{' ...' if len(extra) > limit else ''}")
    if missing:
        parts.append(f"set only: {', '.join(map(repr, missing[:limit]))}{' ...' if len(missing) > limit else ''}")
    return "; ".join(parts)


def overlap(file_names: Sequence[str], set_names: Sequence[str]) -> float:
    """Share of joints two lists have in common (0..1), by meaning."""
    a, b = set(canonical_list(file_names)), set(canonical_list(set_names))
    return len(a & b) / max(len(a), len(b), 1)


def likeness(file_names: Sequence[str], set_names: Sequence[str]) -> tuple[float, int]:
    """How close a file's names are to a set's: (``overlap``, joints at the same place); AIC and CrowdPose
    share their 14 names in different orders, so the place decides between them."""
    same_place = sum(a == b for a, b in zip(canonical_list(file_names), canonical_list(set_names), strict=False))
    return overlap(file_names, set_names), same_place

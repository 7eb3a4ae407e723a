"""Distance metrics of one prediction per ground-truth person: PCK, PCKh (MPII), AUC and EPE.

These follow mmpose's definitions (``mmpose.evaluation.functional.keypoint_pck_accuracy``, ``keypoint_auc``,
``keypoint_epe``) and MPII's own evaluation (mmpose's ``MpiiPCKAccuracy``, after the MATLAB ``evalPCKh``):

* PCK@t: per joint, the share of labelled joints whose distance / norm is below t; the mean over joints that
  have any labelled instance. Hands (OneHand10K): norm = the larger side of the person's box, t = 0.2.
* AUC: the mean of PCK over thresholds 0, 1/20, ..., 19/20 with a fixed 30 px norm.
* EPE: mean distance in pixels over labelled joints.
* PCKh@t (MPII): norm = head size (0.6 x the head box diagonal, or the ``head_size`` given); per joint with
  ``<= t``; the total weights each joint by its labelled count and leaves out pelvis and thorax.

Values are fractions (0..1), as AP is; MPII's tables print them x100.
"""

from __future__ import annotations

import numpy as np

AUC_NORM_PX = 30.0
AUC_STEPS = 20
MPII_HEAD_BIAS = 0.6  # MPII's SC_BIAS: head size = 0.6 x head box diagonal


def joint_distances(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """(N, K) distance / norm of labelled joints, -1 elsewhere (and for people whose norm is 0)."""
    norm = np.asarray(norm, dtype=np.float64).reshape(-1)
    ok = mask.astype(bool) & (norm > 0)[:, None]
    dist = np.full(mask.shape, -1.0)
    d = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1) / np.where(norm > 0, norm, 1.0)[:, None]
    dist[ok] = d[ok]
    return dist


def pck(dist: np.ndarray, thr: float) -> tuple[np.ndarray, float]:
    """(per-joint PCK with -1 for joints never labelled, mean over the others) of ``joint_distances``."""
    valid = dist >= 0
    hits = ((dist < thr) & valid).sum(0)
    count = valid.sum(0)
    per_joint = np.where(count > 0, hits / np.maximum(count, 1), -1.0)
    labelled = per_joint[per_joint >= 0]
    return per_joint, float(labelled.mean()) if labelled.size else 0.0


def auc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    dist = joint_distances(pred, gt, mask, np.full(len(pred), AUC_NORM_PX))
    return float(np.mean([pck(dist, i / AUC_STEPS)[1] for i in range(AUC_STEPS)]))


def epe(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    d = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1)[mask.astype(bool)]
    return float(d.mean()) if d.size else float("nan")


def hand_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """PCK@0.2 normalised by the box's larger side, AUC (30 px), EPE (px): the hand sets' protocol."""
    norm = np.max(np.asarray(boxes, dtype=np.float64)[:, 2:4], axis=1)
    return {"PCK": pck(joint_distances(pred, gt, mask, norm), 0.2)[1], "AUC": auc(pred, gt, mask),
            "EPE": epe(pred, gt, mask)}


# MPII joint groups (0-based, MPII's order) reported beside the total; pelvis (6) and thorax (7) are left out.
_MPII_GROUPS = {"head": (9,), "shoulder": (12, 13), "elbow": (11, 14), "wrist": (10, 15), "hip": (2, 3),
                "knee": (1, 4), "ankle": (0, 5)}  # fmt: skip


def pckh_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, head_size: np.ndarray) -> dict[str, float]:
    """PCKh@0.5 (``PCKh``), PCKh@0.1 and PCKh@0.5 per joint group, MPII's way (see module docstring)."""
    head_size = np.asarray(head_size, dtype=np.float64)
    ok = mask.astype(bool) & (head_size > 0)[:, None]
    err = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1) / np.where(head_size > 0, head_size, 1.0)[:, None]
    count = ok.sum(0).astype(np.float64)
    keep = np.ones(pred.shape[1], bool)
    keep[6:8] = False
    ratio = np.where(keep, count, 0.0) / max(float(np.where(keep, count, 0.0).sum()), 1.0)

    def per_joint(thr: float) -> np.ndarray:
        return ((err <= thr) & ok).sum(0) / np.maximum(count, 1)

    at5, at1 = per_joint(0.5), per_joint(0.1)
    out = {"PCKh": float((at5 * ratio).sum()), "PCKh_0.1": float((at1 * ratio).sum())}
    out.update({f"PCKh_{g}": float(np.mean(at5[list(j)])) for g, j in _MPII_GROUPS.items()})
    return out


def mpii_head_size(ann: dict, kps: np.ndarray) -> float:
    """Head size of one MPII person: ``head_size`` if given, else 0.6 x the ``headbox`` diagonal
    ([[x1, y1], [x2, y2]] as MPII's gt file has it), else the upper_neck-head_top distance when both are
    labelled (mmpose's json carries no head boxes; that segment is what the box spans), else 0 (not scored)."""
    if ann.get("head_size"):
        return float(ann["head_size"])
    box = ann.get("headbox")
    if box is not None:
        box = np.asarray(box, dtype=np.float64).reshape(2, 2)
        return float(np.linalg.norm(box[1] - box[0]) * MPII_HEAD_BIAS)
    if kps[8, 2] > 0 and kps[9, 2] > 0:
        return float(np.linalg.norm(kps[9, :2] - kps[8, :2]))
    return 0.0

"""The metric each keypoint set's community reports, and the default protocol of each built-in set.

* ``coco``: pycocotools' keypoint AP/AR (COCO, AIC, AP-10K: mean over species).
* ``crowdpose``: CrowdPose's evaluation as xtcocotools runs it (``iouType='keypoints_crowd'``,
  ``use_area=False``): OKS on 0.53 x the box area, at most 20 people per image, AP / AP50 / AP75 / AR /
  AR50 / AR75, and AP_easy / AP_medium / AP_hard over the images whose ``crowdIndex`` is < 0.2, < 0.8, the
  rest (each the mean of the precision table over thresholds and recalls, as the toolkit computes it).
  xtcocotools' wheels do not import with numpy 2 (built against numpy 1's ABI, and ``np.float``), so this
  is pycocotools' COCOeval with the two differences (area, image split) put in.
* ``wholebody``: COCO-WholeBody's ``myeval_wholebody``: AP of the body, foot, face, left and right hand each
  with its own sigmas and its own labelled joints, and the whole body (all 133); ``AP`` is the whole body's.
* ``pckh``: MPII's PCKh@0.5 (``PCKh``), PCKh@0.1 and per joint group; ``pck``: the hand sets' PCK@0.2 (box
  norm), AUC and EPE. Both score one prediction per ground-truth person (ground-truth boxes) and keep the
  OKS AP/AR beside them, which training selects checkpoints by.

Metric names are MLflow-safe (``PCKh_0.1``, not ``PCKh@0.1``); the evaluate CLI logs them as ``eval/NAME``
and training as ``val/NAME``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from vitpose.data.keypoints.layouts import CROWD_AREA_FACTOR
from vitpose.data.keypoints.set import KeypointSet
from vitpose.evaluation.cocoeval import STAT_NAMES, coco_of, run_cocoeval
from vitpose.evaluation.pck import hand_metrics, mpii_head_size, pckh_metrics

DEFAULT_PROTOCOL = {"coco": "coco", "crowdpose": "crowdpose", "mpii": "pckh", "aic": "coco",
                    "coco_wholebody": "wholebody", "ap10k": "coco", "onehand10k": "pck"}  # fmt: skip
WHOLEBODY_PARTS = ("body", "foot", "face", "lefthand", "righthand")
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "coco": STAT_NAMES,
    "crowdpose": (*STAT_NAMES, "AP_easy", "AP_medium", "AP_hard"),
    "wholebody": (*STAT_NAMES, *(f"{p}_{m}" for p in (*WHOLEBODY_PARTS, "wholebody") for m in ("AP", "AP50", "AP75",
                                                                                               "AR"))),
    "pckh": (*STAT_NAMES, "PCKh", "PCKh_0.1", "PCKh_head", "PCKh_shoulder", "PCKh_elbow", "PCKh_wrist", "PCKh_hip",
             "PCKh_knee", "PCKh_ankle"),
    "pck": (*STAT_NAMES, "PCK", "AUC", "EPE"),
}
PROTOCOLS = tuple(PROTOCOL_METRICS)
HEADLINE = {"coco": "AP", "crowdpose": "AP", "wholebody": "wholebody_AP", "pckh": "PCKh", "pck": "PCK"}


def default_protocol(kset: KeypointSet) -> str:
    """The protocol a set's community reports; COCO AP for sets without one (custom, read from a file)."""
    return DEFAULT_PROTOCOL.get(kset.name, "coco")


def check_protocol(protocol: str | None, kset: KeypointSet) -> str:
    """``protocol`` (None: the set's default), refused in one line when the set cannot be scored with it."""
    protocol = protocol or default_protocol(kset)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "wholebody" and len(kset.parts) != len(WHOLEBODY_PARTS):
        raise ValueError(f"protocol 'wholebody' scores COCO-WholeBody's five parts; keypoint set {kset.name!r} has "
                         f"{len(kset.parts)} field(s); use --protocol {default_protocol(kset)}")
    if protocol == "pckh" and kset.name != "mpii":
        raise ValueError(f"protocol 'pckh' needs MPII's head and joint order; keypoint set {kset.name!r} is not "
                         f"MPII; use --protocol {default_protocol(kset)}")
    return protocol


def protocol_metrics(ev: Any, predictions: list, results: list[dict[str, Any]], image_ids: Any, *,
                     base: dict[str, float] | None = None, zero: bool = False) -> dict[str, float]:
    """The metrics of ``ev.protocol`` (``ev``: a ``CocoKeypointEvaluator`` that has scored COCO AP into
    ``base``); with ``zero`` (no predictions) every metric is 0 (EPE: nan)."""
    names = PROTOCOL_METRICS[ev.protocol]
    if zero:
        return {n: (float("nan") if n == "EPE" else 0.0) for n in names}
    out = dict(base or {})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if ev.protocol == "crowdpose":
            out.update(crowdpose_metrics(ev, results, image_ids))
        elif ev.protocol == "wholebody":
            out.update(wholebody_metrics(ev, results, image_ids, out))
        elif ev.protocol in ("pckh", "pck"):
            out.update(distance_metrics(ev, predictions, image_ids))
    if ev.protocol == "crowdpose":  # its AP/AR replace COCO's: so does its COCOeval summary
        ev.summary = buf.getvalue()
    lines = [f" {n:<16} = {out[n]:.4f}" for n in names if n not in STAT_NAMES]
    if lines:
        ev.summary += f"{ev.protocol} protocol:\n" + "\n".join(lines) + "\n"
    return {n: float(out[n]) for n in names}


def crowdpose_metrics(ev: Any, results: list[dict[str, Any]], image_ids: Any) -> dict[str, float]:
    images = ev.coco.dataset.get("images", [])
    missing = next((im for im in images if "crowdIndex" not in im), None)
    if missing is not None and ev.protocol_chosen:
        raise ValueError(f"image id {missing['id']} has no 'crowdIndex': the crowdpose protocol splits images by it "
                         "(CrowdPose's json gives every image one); evaluate with --protocol coco")
    if not hasattr(ev, "_crowd_gt"):  # the toolkit's use_area=False: OKS and area ranges on 0.53 x the box
        data = dict(ev.coco.dataset)
        data["annotations"] = [{**a, "area": float(a["bbox"][2]) * float(a["bbox"][3]) * CROWD_AREA_FACTOR}
                               for a in data.get("annotations", [])]
        ev._crowd_gt = coco_of(data)
    coco_eval = run_cocoeval(ev._crowd_gt, results, ev.sigmas, ev.category_ids, image_ids)
    out = {n: float(v) for n, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}
    if missing is not None:  # the set's default protocol on a file without crowd indices (remapped COCO)
        return {**out, **{f"AP_{n}": float("nan") for n in ("easy", "medium", "hard")}}
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    for name, lo, hi in (("easy", -np.inf, 0.2), ("medium", 0.2, 0.8), ("hard", 0.8, np.inf)):
        ids = [im["id"] for im in images if lo <= float(im["crowdIndex"]) < hi and (wanted is None or im["id"] in wanted)]
        if not ids:
            out[f"AP_{name}"] = -1.0  # as COCOeval reports a split without people
            continue
        coco_eval.params.imgIds = ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        out[f"AP_{name}"] = float(np.mean(coco_eval.eval["precision"][:, :, :, 0, :]))
    return out


def wholebody_metrics(ev: Any, results: list[dict[str, Any]], image_ids: Any, whole: dict[str, float]) -> dict[str, float]:
    """Each part scored alone: its field as the ground truth, its labelled joints deciding which people count;
    ``whole``: COCO AP of all 133 (the evaluator's own), reported as ``wholebody_*``."""
    kset: KeypointSet = ev.keypoint_set
    out: dict[str, float] = {}
    start = 0
    for part, (field, n) in zip(WHOLEBODY_PARTS, kset.parts, strict=True):
        data = dict(ev.data)
        anns = []
        for a in ev.data.get("annotations", []):
            kp = list(a.get(field) or [0.0] * (3 * n))
            anns.append({**a, "keypoints": kp, "num_keypoints": int(sum(v > 0 for v in kp[2::3]))})
        data["annotations"] = anns
        data["categories"] = [{**c, "keypoints": list(kset.names[start:start + n])} for c in data["categories"]]
        part_results = [{**r, "keypoints": r["keypoints"][3 * start:3 * (start + n)]} for r in results]
        stats = run_cocoeval(coco_of(data), part_results, ev.sigmas[start:start + n], ev.category_ids,
                             image_ids).stats
        out.update({f"{part}_AP": stats[0], f"{part}_AP50": stats[1], f"{part}_AP75": stats[2], f"{part}_AR": stats[5]})
        start += n
    out.update({f"wholebody_{m}": whole[m] for m in ("AP", "AP50", "AP75", "AR")})
    return {k: float(v) for k, v in out.items()}


def distance_metrics(ev: Any, predictions: list, image_ids: Any) -> dict[str, float]:
    """PCKh (MPII) or PCK/AUC/EPE (hands) of the predictions made on ground-truth boxes."""
    anns = ev.coco.anns
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    rows = [p for p in predictions if wanted is None or int(p["image_id"]) in wanted]
    stray = next((p for p in rows if int(p.get("ann_id", -1)) not in anns), None)
    if stray is not None:
        raise ValueError(f"protocol {ev.protocol!r} scores one prediction per ground-truth person; a prediction of "
                         f"image {stray['image_id']} has no ground-truth annotation id (made on detector boxes?); "
                         "evaluate with ground-truth boxes, or with --protocol coco")
    if not rows:
        return {n: 0.0 for n in PROTOCOL_METRICS[ev.protocol] if n not in STAT_NAMES}
    k = ev.keypoint_set.num_keypoints
    pred = np.stack([np.asarray(p["keypoints"], dtype=np.float64)[:, :2] for p in rows])
    gt = np.stack([np.asarray(anns[int(p["ann_id"])]["keypoints"], dtype=np.float64).reshape(k, 3) for p in rows])
    mask = gt[..., 2] > 0
    if ev.protocol == "pck":
        boxes = np.asarray([anns[int(p["ann_id"])]["bbox"] for p in rows], dtype=np.float64)
        return hand_metrics(pred, gt, mask, boxes)
    heads = np.asarray([mpii_head_size(anns[int(p["ann_id"])], g) for p, g in zip(rows, gt, strict=True)])
    return pckh_metrics(pred, gt, mask, heads)

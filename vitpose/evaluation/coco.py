"""Keypoint evaluation: model heatmaps -> per-instance predictions -> rescoring -> OKS-NMS -> the set's protocol.

Owns the path from network output to COCO keypoint AP, shared by the training loop (vitpose.train.loop) and the evaluate CLI:

* ``decode_batch_to_predictions``: a batch of heatmaps (optionally merged with flip-test heatmaps) plus
  the batch's meta (``center``, ``scale``, ``image_id``, ``bbox_score``) -> prediction dicts in image
  coordinates (UDP decode, see ``vitpose.data.codec``).
* ``CocoKeypointEvaluator``: mmpose's ``TopDownCocoDataset.evaluate`` recipe: instance score = box score x
  mean keypoint confidence over joints above 0.2, OKS-NMS per image at 0.9, COCO results json, then
  pycocotools ``COCOeval(iouType='keypoints')``. The metric itself is pycocotools', not re-implemented.
  The keypoint set gives the OKS sigmas (NMS and COCOeval) and, for COCO-WholeBody, the annotation fields
  whose keypoints are joined into the ground truth that COCOeval scores (all 133, the "wholebody" AP).
  ``evaluate`` then adds the metrics of the set's protocol (``vitpose.evaluation.protocols``: CrowdPose's
  crowd-index AP, COCO-WholeBody per part, PCKh, PCK/AUC/EPE); ``protocol='coco'`` gives COCO's alone.
  Files are read as their publishers ship them (``vitpose.data.keypoints.layouts``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from vitpose.data.codec import as_numpy, decode, flip_back, to_image_coords
from vitpose.data.keypoints import join_keypoint_fields, recognise_set, set_read_with
from vitpose.data.keypoints.builtin import COCO as COCO_SET
from vitpose.data.keypoints.layouts import load_keypoint_file
from vitpose.data.keypoints.set import KeypointSet
from vitpose.evaluation.cocoeval import STAT_NAMES, coco_of, run_cocoeval
from vitpose.evaluation.protocols import check_protocol, protocol_metrics

# COCO's per-keypoint OKS sigmas (pycocotools' default, the 17 COCO keypoints in order).
COCO_SIGMAS = np.asarray(COCO_SET.sigmas)



def decode_batch_to_predictions(
    heatmaps,
    metas: Mapping[str, Any],
    flip_heatmaps=None,
    *,
    flip_pairs: Sequence[tuple[int, int]] | None = None,
    input_size: tuple[int, int],
    blur_kernel: int = 11,
) -> list[dict[str, Any]]:
    """Heatmaps (N, K, h, w) of evaluation crops + collated meta -> one prediction dict per instance.

    ``flip_heatmaps`` are the model's heatmaps for the horizontally mirrored crops; they are flipped back
    (``flip_pairs`` required; an empty list for a set without pairs, e.g. one hand) and averaged with
    ``heatmaps`` (the ViTPose flip test). ``metas`` needs
    ``center`` and ``scale`` (N, 2), ``image_id`` and ``bbox_score`` (N,); ``area`` is taken from the crop
    box like mmpose. Each prediction: ``image_id``, ``keypoints`` (K, 3) image x, y, score,
    ``bbox_score``, ``center``, ``scale``, ``area``; ``ann_id``/``category_id``/``index`` are passed through
    when present (AP-10K: the category is the animal's species, scored per species).
    """
    hm = as_numpy(heatmaps).astype(np.float32)
    if flip_heatmaps is not None:
        if flip_pairs is None:
            raise ValueError("flip_heatmaps given without flip_pairs (take them from dataset.flip_pairs)")
        hm = 0.5 * (hm + flip_back(as_numpy(flip_heatmaps).astype(np.float32), list(flip_pairs)))
    coords, scores = decode(hm, blur_kernel=blur_kernel)
    center = as_numpy(metas["center"]).astype(np.float64).reshape(-1, 2)
    scale = as_numpy(metas["scale"]).astype(np.float64).reshape(-1, 2)
    image_coords = to_image_coords(coords, center, scale, input_size, hm.shape[2:])
    image_ids = as_numpy(metas["image_id"]).reshape(-1)
    bbox_scores = as_numpy(metas["bbox_score"]).astype(np.float64).reshape(-1)
    extra = {k: as_numpy(metas[k]).reshape(-1) for k in ("ann_id", "category_id", "index") if k in metas}
    preds = []
    for i in range(hm.shape[0]):
        pred = {
            "image_id": int(image_ids[i]),
            "keypoints": np.concatenate([image_coords[i], scores[i][:, None]], axis=1),
            "bbox_score": float(bbox_scores[i]),
            "center": center[i],
            "scale": scale[i],
            "area": float(scale[i, 0] * scale[i, 1]),
        }
        pred.update({k: int(v[i]) for k, v in extra.items()})
        preds.append(pred)
    return preds


def oks_iou(
    g: np.ndarray, d: np.ndarray, area_g: float, area_d: np.ndarray, sigmas: np.ndarray
) -> np.ndarray:
    """OKS of one pose ``g`` (K, 2+) against poses ``d`` (M, K, 2+) as mmpose's ``oks_iou`` (no visibility)."""
    var = (sigmas * 2) ** 2
    dist2 = ((d[..., :2] - g[None, :, :2]) ** 2).sum(-1)  # (M, K)
    e = dist2 / var / ((area_g + np.asarray(area_d))[:, None] / 2 + np.spacing(1)) / 2
    return np.exp(-e).mean(axis=1)


def oks_nms(
    keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, thr: float, sigmas: np.ndarray
) -> list[int]:
    """Greedy OKS-NMS: indices kept, best first; drops poses with OKS > ``thr`` to a kept one."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        ovr = oks_iou(keypoints[i], keypoints[rest], areas[i], areas[rest], sigmas)
        order = rest[ovr <= thr]
    return keep


class CocoKeypointEvaluator:
    """COCO keypoint AP of top-down predictions against a ground-truth file (see module docstring).

    Args:
        ann_file: ground-truth COCO keypoint json, or a loaded ``pycocotools.coco.COCO``.
        sigmas: per-keypoint OKS sigmas; default the keypoint set's.
        keypoints: the keypoint set the predictions are in (``data.keypoints``; the model's own); default the
            set a dataset of this process read ``ann_file`` with, else the built-in set the file's names
            match, else the file's own (its category's ``sigmas``, if any; other sets must pass ``sigmas``).
        oks_nms_thr: OKS-NMS threshold per image (0.9 like ViTPose); None disables NMS.
        keypoint_score_thr: joints above it count in the rescoring mean (0.2 like mmpose).
        protocol: ``vitpose.evaluation.protocols.PROTOCOLS`` name; default the keypoint set's.

    After ``evaluate``, ``summary`` holds the text COCOeval printed and the protocol's lines.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike | COCO,
        sigmas: Sequence[float] | np.ndarray | None = None,
        *,
        keypoints: KeypointSet | None = None,
        oks_nms_thr: float | None = 0.9,
        keypoint_score_thr: float = 0.2,
        protocol: str | None = None,
    ):
        if isinstance(ann_file, COCO):
            data = ann_file.dataset
        else:
            path = Path(ann_file)
            if not path.is_file():
                raise FileNotFoundError(f"ground-truth annotation file not found: {path}")
            data = load_keypoint_file(path)  # publishers' layouts; missing area / num_keypoints derived
            keypoints = keypoints or set_read_with(path)
        cats = [c for c in data.get("categories", []) if c.get("keypoints")]
        if not cats:
            raise ValueError("ground truth has no category with 'keypoints'")
        person = next((c for c in cats if c.get("name") == "person"), cats[0])
        where = ann_file if not isinstance(ann_file, COCO) else "ground truth"
        self.keypoint_set = keypoints or recognise_set(data, person, where)
        self.keypoint_set.check_file(person["keypoints"], where)
        self.category_id = int(person["id"])
        # AP-10K: one category per species, all with the same keypoints: all of them are scored.
        self.category_ids = sorted(int(c["id"]) for c in cats if self.keypoint_set.matches_file(c["keypoints"]))
        self.data = data
        self.protocol = check_protocol(protocol, self.keypoint_set)
        self.protocol_chosen = protocol is not None  # a default protocol leaves out what the file cannot give
        if isinstance(ann_file, COCO) and len(self.keypoint_set.parts) == 1:
            self.coco = ann_file
        else:
            self.coco = _ground_truth(data, self.keypoint_set, self.category_ids)
        num_keypoints = self.keypoint_set.num_keypoints
        if sigmas is None:
            sigmas = self.keypoint_set.sigmas or None
        if sigmas is None:
            raise ValueError(f"ground truth has {num_keypoints} keypoints ({', '.join(self.keypoint_set.names[:4])}, "
                             "...) and no OKS sigmas: choose its keypoint set (data.keypoints / --keypoints), or pass "
                             "sigmas, or add a 'sigmas' list to its category")
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        if len(self.sigmas) != num_keypoints:
            raise ValueError(f"{len(self.sigmas)} sigmas given for {num_keypoints} keypoints")
        self.oks_nms_thr = oks_nms_thr
        self.keypoint_score_thr = keypoint_score_thr
        self.summary = ""

    def rescore_and_nms(self, predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """mmpose rescoring (box score x mean confident-joint score) then OKS-NMS per image -> COCO results."""
        by_image: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
        for p in predictions:
            by_image[int(p["image_id"])].append(p)
        results = []
        for image_id in sorted(by_image):
            preds = by_image[image_id]
            kps = np.stack([np.asarray(p["keypoints"], dtype=np.float64) for p in preds])  # (M, K, 3)
            conf = kps[..., 2]
            mask = conf > self.keypoint_score_thr
            kpt_score = np.where(mask.any(1), (conf * mask).sum(1) / np.maximum(mask.sum(1), 1), 0.0)
            scores = kpt_score * np.array([float(p["bbox_score"]) for p in preds])
            areas = np.array([float(p["area"]) for p in preds])
            keep = (
                oks_nms(kps, scores, areas, self.oks_nms_thr, self.sigmas) if self.oks_nms_thr is not None
                else range(len(preds))
            )  # fmt: skip
            for i in keep:
                cat = int(preds[i].get("category_id", self.category_id))  # each animal's own species
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": cat if cat in self.category_ids else self.category_id,
                        "keypoints": [round(float(v), 3) for v in kps[i].reshape(-1)],
                        "score": float(scores[i]),
                    }
                )
        return results

    def evaluate(
        self,
        predictions: Sequence[Mapping[str, Any]],
        results_file: str | os.PathLike | None = None,
        image_ids: Sequence[int] | None = None,
    ) -> dict[str, float]:
        """AP/AR dict (``STAT_NAMES``) of ``predictions`` (see ``decode_batch_to_predictions``) and the
        metrics of the protocol (``vitpose.evaluation.protocols.PROTOCOL_METRICS``).

        ``results_file`` receives the COCO results json. ``image_ids`` restricts the evaluation to those
        images (e.g. a validation subset); default all images of the ground truth.
        """
        k = self.keypoint_set.num_keypoints
        wrong = next((p for p in predictions if len(p["keypoints"]) != k), None)
        if wrong is not None:
            raise ValueError(f"predictions have {len(wrong['keypoints'])} keypoints but the ground truth is scored "
                             f"with keypoint set {self.keypoint_set.name!r} ({k}); evaluate with the model's set")
        results = self.rescore_and_nms(predictions)
        unknown = {r["image_id"] for r in results} - set(self.coco.getImgIds())
        if unknown:
            raise ValueError(
                f"predictions for image ids {sorted(unknown)[:10]} that the ground truth does not have; "
                "evaluate against the annotation file the dataset was built from"
            )
        if results_file is not None:
            Path(results_file).parent.mkdir(parents=True, exist_ok=True)
            with open(results_file, "w") as f:
                json.dump(results, f)
        if not results:
            self.summary = "no predictions: every metric is 0"
            return protocol_metrics(self, [], results, image_ids, zero=True)
        # Every prediction names its category: score per category as AP-10K does (mean over species). A
        # caller's predictions without categories are scored as one class, against ground truth relabelled so:
        # pycocotools' useCats=0 does not work for keypoints (computeOks looks up category -1: AP 0).
        if len(self.category_ids) > 1 and not all("category_id" in p for p in predictions):
            self.coco, self.category_ids = _one_class(self.coco, self.category_ids, self.category_id), [self.category_id]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_eval = run_cocoeval(self.coco, results, self.sigmas, self.category_ids, image_ids)
        self.summary = buf.getvalue()
        metrics = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}
        return protocol_metrics(self, predictions, results, image_ids, base=metrics)


def _one_class(coco: COCO, category_ids: Sequence[int], category_id: int) -> COCO:
    """``coco`` with every annotation of ``category_ids`` relabelled ``category_id``."""
    data = dict(coco.dataset)
    data["annotations"] = [{**a, "category_id": category_id} if a.get("category_id") in category_ids else a
                           for a in data.get("annotations", [])]
    return coco_of(data)


def _ground_truth(data: dict[str, Any], kset: KeypointSet, category_ids: Sequence[int]) -> COCO:
    """A pycocotools ``COCO`` of ``data`` whose ``keypoints`` are the set's: for COCO-WholeBody the body,
    feet, face and hands joined (COCOeval reads only ``keypoints``), ``num_keypoints`` counted over all of
    them (COCOeval ignores people with 0)."""
    if len(kset.parts) > 1:
        data = dict(data)
        anns = []
        for ann in data.get("annotations", []):
            if int(ann.get("category_id", -1)) in category_ids and not ann.get("iscrowd", 0):
                joined, problem = join_keypoint_fields(ann, kset)
                if problem:
                    raise ValueError(f"annotation id {ann.get('id')}: {problem}")
                ann = {**ann, "keypoints": joined, "num_keypoints": int(sum(v > 0 for v in joined[2::3]))}
            anns.append(ann)
        data["annotations"] = anns
        data["categories"] = [{**c, "keypoints": list(kset.names)} if int(c["id"]) in category_ids else c
                              for c in data["categories"]]
    return coco_of(data)

"""How good the detector is on val: its detections in COCO results format, pycocotools' bbox AP, and the score
threshold that counts people best (the one the exported file recommends to predict and serving)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitpose.deploy.tracking import iou_matrix
from vitpose.detection.data import PersonBoxes
from vitpose.detection.model import PERSON_LABEL

MATCH_IOU = 0.5


@torch.no_grad()
def detect_split(model: torch.nn.Module, data: PersonBoxes, device: torch.device, batch_size: int
                 ) -> list[dict[str, Any]]:
    """Person detections of every image of ``data`` (not augmented) in COCO results format, in image pixels."""
    model.eval()
    results = []
    for start in range(0, len(data), batch_size):
        indices = range(start, min(start + batch_size, len(data)))
        images = [data[i][0].to(device) for i in indices]
        for i, found in zip(indices, model(images), strict=True):
            info = data.image_info(i)
            ratio = data.size / max(info["height"], info["width"])  # eval letterbox: top-left, no zoom
            person = found["labels"] == PERSON_LABEL
            xyxy, scores = found["boxes"][person].cpu().numpy() / ratio, found["scores"][person].cpu().numpy()
            for (x1, y1, x2, y2), s in zip(xyxy.tolist(), scores.tolist(), strict=True):
                results.append({"image_id": info["id"], "category_id": 1, "score": round(s, 5),
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]})
    return results


def box_ap(ann_file: Path, results: list[dict[str, Any]]) -> dict[str, float]:
    """pycocotools' bbox COCOeval on the person category: AP, AP50, AP75, AR (its printout goes to the log)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR": 0.0}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")  # loadRes adds keys
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    print(printed.getvalue())  # into the log file, not on the console
    return {"AP": ev.stats[0], "AP50": ev.stats[1], "AP75": ev.stats[2], "AR": ev.stats[8]}


def pick_score_threshold(data: PersonBoxes, results: list[dict[str, Any]]) -> tuple[float, float]:
    """(threshold, F1): the score cut, in steps of 0.05, whose kept boxes best match the people one to one
    (greedy by score at IoU >= 0.5): what a user of predict wants, every person once and no ghosts."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    best = (0.5, -1.0)
    for thr in np.arange(0.05, 1.0, 0.05):
        hits = kept = 0
        for info in data.images:
            dets = sorted((r for r in by_image.get(info["id"], []) if r["score"] >= thr), key=lambda r: -r["score"])
            gt = data.boxes[info["id"]]
            kept += len(dets)
            if not dets or not len(gt):
                continue
            xywh = np.array([r["bbox"] for r in dets], dtype=np.float64)
            iou = iou_matrix(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), gt)
            free = np.ones(len(gt), dtype=bool)
            for row in iou:  # best-scored detection first
                j = int(np.argmax(np.where(free, row, -1.0)))
                if free[j] and row[j] >= MATCH_IOU:
                    free[j], hits = False, hits + 1
        people = sum(len(v) for v in data.boxes.values())
        f1 = 2 * hits / (kept + people) if kept + people else 0.0
        if f1 > best[1]:
            best = (round(float(thr), 2), f1)
    return best

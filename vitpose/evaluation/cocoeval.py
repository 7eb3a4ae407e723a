"""pycocotools, called the way every protocol here calls it: a ``COCO`` index of data already in memory, and
keypoint ``COCOeval`` run to its summary. Shared by the COCO evaluator and the protocols built on COCOeval."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def run_cocoeval(coco: COCO, results: list[dict[str, Any]], sigmas: np.ndarray, category_ids: Sequence[int],
                 image_ids: Sequence[int] | None) -> COCOeval:
    """pycocotools' keypoint COCOeval of ``results`` against ``coco``: evaluated, accumulated, summarised."""
    coco_eval = COCOeval(coco, coco.loadRes(results), iouType="keypoints")
    coco_eval.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
    coco_eval.params.catIds = list(category_ids)
    if image_ids is not None:
        coco_eval.params.imgIds = sorted({int(i) for i in image_ids})
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def coco_of(data: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` indexing ``data`` (already loaded), without its progress lines."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco

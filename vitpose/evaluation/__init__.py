"""Keypoint evaluation: model heatmaps -> predictions -> the keypoint set's protocol.

``coco``: decoding batches, rescoring, OKS-NMS and pycocotools' COCOeval (``CocoKeypointEvaluator``);
``cocoeval``: pycocotools' index and keypoint COCOeval, as every protocol calls them;
``protocols``: the metrics each set's community reports (CrowdPose, COCO-WholeBody per part, PCKh, PCK);
``pck``: the distance metrics. ``from vitpose.evaluation import ...`` gives the names below.
"""

from vitpose.evaluation.coco import (
    COCO_SIGMAS,
    CocoKeypointEvaluator,
    decode_batch_to_predictions,
    oks_iou,
    oks_nms,
)
from vitpose.evaluation.cocoeval import STAT_NAMES, run_cocoeval
from vitpose.evaluation.protocols import (
    DEFAULT_PROTOCOL,
    HEADLINE,
    PROTOCOL_METRICS,
    PROTOCOLS,
    default_protocol,
)

__all__ = [
    "COCO_SIGMAS", "DEFAULT_PROTOCOL", "HEADLINE", "PROTOCOLS", "PROTOCOL_METRICS", "STAT_NAMES",
    "CocoKeypointEvaluator", "decode_batch_to_predictions", "default_protocol", "oks_iou", "oks_nms",
    "run_cocoeval",
]  # fmt: skip

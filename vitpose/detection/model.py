"""The detector network: torchvision's FCOS (anchor-free, one box per location, its own losses, NMS and
box coding) on a small convolutional backbone with torchvision's feature pyramid, sized for 2 CPU cores.

FCOS rather than a two-stage or SSD model: it trains from random weights in a few epochs on large, simple
objects, and exports to ONNX whole (resize, normalisation, decoding and NMS inside the graph)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

PERSON_LABEL = 1  # torchvision detection models keep 0 for the background; COCO's person is category 1
# The synthetic images' pixel statistics are not ImageNet's; the network sees inputs roughly centred instead.
IMAGE_MEAN, IMAGE_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Halves the resolution: a strided 3x3 convolution then a 3x3 one, each with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SmallBackbone(nn.Module):
    """Strides 8, 16, 32 (widths 2w, 4w, 4w) into a feature pyramid of ``fpn_channels``, plus FCOS's P6 and P7."""

    def __init__(self, width: int, fpn_channels: int):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        self.stem = nn.Sequential(_stage(3, width // 2), _stage(width // 2, width))  # stride 4
        self.c3, self.c4, self.c5 = _stage(width, 2 * width), _stage(2 * width, 4 * width), _stage(4 * width, 4 * width)
        self.fpn = FeaturePyramidNetwork([2 * width, 4 * width, 4 * width], fpn_channels,
                                         extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        self.out_channels = fpn_channels  # what torchvision's detection heads read

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        return self.fpn(OrderedDict([("p3", c3), ("p4", c4), ("p5", self.c5(c4))]))


def build_detector(spec: dict[str, Any]) -> nn.Module:
    """An FCOS person detector from ``spec`` (``DetectorModelSection`` as a dict, stored with every checkpoint)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.fcos import FCOSHead

    backbone = SmallBackbone(spec["width"], spec["fpn_channels"])
    head = FCOSHead(backbone.out_channels, num_anchors=1, num_classes=2, num_convs=spec["head_convs"])
    size = spec["input_size"]
    return FCOS(backbone, num_classes=2, head=head, min_size=size, max_size=size, image_mean=list(IMAGE_MEAN),
                image_std=list(IMAGE_STD), score_thresh=0.05, nms_thresh=0.6, detections_per_img=50)


class OnnxExport(nn.Module):
    """What the ONNX file holds: (1, 3, S, S) RGB in 0..255, letterboxed at the top-left with grey 114 (as
    mmdeploy's exports take it), to ``dets`` (1, N, 5) = x1, y1, x2, y2, score in input pixels and ``labels``
    (1, N) with the person as 0 (COCO order, like every other layout ``vitpose.deploy.detector`` reads)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.detector([image[0] / 255.0])[0]
        dets = torch.cat([found["boxes"], found["scores"][:, None]], dim=1)
        return dets[None], (found["labels"] - PERSON_LABEL)[None]


def export_onnx(detector: nn.Module, size: int, path: str, score_thr: float) -> None:
    """The detector as an ONNX file in the ``torchvision`` layout (``OnnxExport``), tagged with its format and
    its score threshold."""
    import warnings

    import onnx

    from vitpose.deploy.detector import ONNX_FORMAT_KEY, ONNX_SCORE_THR_KEY

    with warnings.catch_warnings():  # the tracer's notes on shape-dependent Python in torchvision's NMS
        warnings.simplefilter("ignore")
        torch.onnx.export(OnnxExport(detector), (torch.full((1, 3, size, size), 114.0),), path, opset_version=17,
                          dynamo=False, input_names=["input"], output_names=["dets", "labels"],
                          dynamic_axes={"dets": {1: "detections"}, "labels": {1: "detections"}})
    model = onnx.load(path)
    model.metadata_props.add(key=ONNX_FORMAT_KEY, value="torchvision")
    model.metadata_props.add(key=ONNX_SCORE_THR_KEY, value=f"{score_thr:g}")
    onnx.save(model, path)

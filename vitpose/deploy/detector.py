"""Person detectors exported to ONNX, run with onnxruntime, in the export layouts people already have.

``OnnxPersonDetector(path, format)`` takes an RGB image and returns person boxes ``[x, y, w, h, score]`` in image
pixels (what ``inference.parse_boxes`` takes). The formats:

* ``yolox`` / ``rtmdet``: mmdeploy's end2end export, the files rtmlib downloads (``end2end.onnx``): input
  ``input`` (1, 3, H, W) float32, BGR, the image resized by one ratio and padded with 114 at the bottom and right;
  RTMDet's input is normalised with mmdet's BGR mean and std first, YOLOX's is raw 0-255. Outputs ``dets``
  (1, N, 5) = x1, y1, x2, y2, score after NMS, and ``labels`` (1, N).
* ``ultralytics``: YOLOv8 / YOLO11 ``export(format="onnx")``: input ``images`` (1, 3, H, W) RGB / 255, the resized
  image centred and padded with 114; one output (1, 4 + classes, anchors) = cx, cy, w, h and per-class scores,
  without NMS (done here); or, for YOLOv10 / YOLO26 / ``export(nms=True)``, (1, max_det, 6) = x1, y1, x2, y2,
  score, class, rows not filtered by score.

* ``torchvision``: what ``pipelines/detector.py`` exports (``vitpose.detection``, the embedded default's detector):
  input ``input`` (1, 3, S, S) float32 RGB 0-255, letterboxed at the top-left with 114 (normalised inside the
  graph); outputs ``dets`` and ``labels`` as mmdeploy's, the person as label 0.

``format="auto"`` tells ``ultralytics`` from the mmdeploy layout by the outputs, and our own export by the tag in
its ONNX metadata; between ``yolox`` and ``rtmdet`` (same outputs, different input scaling) it cannot choose and
asks. The person class is 0 in all of them (COCO
order); ``person_class`` changes it for detectors of other label sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("auto", "yolox", "rtmdet", "ultralytics", "torchvision")
DEFAULT_SCORE_THR = 0.3  # for files that do not recommend their own
# ONNX metadata our own export writes: its layout (for format 'auto') and the score cut chosen on val.
ONNX_FORMAT_KEY, ONNX_SCORE_THR_KEY = "vitpose_detector_format", "vitpose_detector_score_thr"
PAD_VALUE = 114.0  # the grey every one of these exports was trained with around the resized image
RTMDET_MEAN_BGR = np.array([103.53, 116.28, 123.675], dtype=np.float32)
RTMDET_STD_BGR = np.array([57.375, 57.12, 58.395], dtype=np.float32)


class DetectorFormatError(ValueError):
    """A detector file whose layout is not one of ``FORMATS``, or does not match the format asked for."""


@dataclass(frozen=True)
class Letterbox:
    """How an image was put into the network's input: scaled by ``ratio``, its top-left corner at ``offset``."""

    ratio: float
    offset: tuple[float, float]  # (x, y) in network pixels

    def to_image(self, xyxy: np.ndarray) -> np.ndarray:
        out = xyxy.astype(np.float64).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.offset[0]) / self.ratio
        out[:, [1, 3]] = (out[:, [1, 3]] - self.offset[1]) / self.ratio
        return out


def paste(image: np.ndarray, size: tuple[int, int], ratio: float, offset: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W, 3) scaled by ``ratio`` onto a (size[0], size[1], 3) float32 canvas of ``PAD_VALUE``, its
    top-left corner at ``offset`` (x, y); what does not fit is cut off."""
    from PIL import Image

    h, w = image.shape[:2]
    new_w, new_h = max(1, int(round(w * ratio))), max(1, int(round(h * ratio)))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR),
                         dtype=np.float32)
    canvas = np.full((size[0], size[1], 3), PAD_VALUE, dtype=np.float32)
    x0, y0 = offset
    canvas[y0:y0 + new_h, x0:x0 + new_w] = resized[: size[0] - y0, : size[1] - x0]
    return canvas


def letterbox(image: np.ndarray, size: tuple[int, int], centred: bool) -> tuple[np.ndarray, Letterbox]:
    """``image`` (H, W, 3) resized by one ratio into a (size[0], size[1], 3) float32 canvas of ``PAD_VALUE``:
    at the top-left (mmdeploy's YOLOX and RTMDet, ours) or centred (ultralytics)."""
    h, w = image.shape[:2]
    out_h, out_w = size
    ratio = min(out_h / h, out_w / w)
    new_w, new_h = max(1, int(round(w * ratio))), max(1, int(round(h * ratio)))
    x0, y0 = ((out_w - new_w) // 2, (out_h - new_h) // 2) if centred else (0, 0)
    return paste(image, size, ratio, (x0, y0)), Letterbox(ratio, (float(x0), float(y0)))


def detector_file(ref: str | Path, tracking_uri: str | None = None) -> Path:
    """The ONNX file ``ref`` names: a path, or an MLflow model URI (``models:/vitpose-detector@current``, ``runs:/``)
    of an ONNX model, as ``pipelines/detector.py`` registers it, downloaded from the tracking server."""
    text = str(ref)
    if not text.startswith(("models:/", "runs:/")):
        return Path(text)
    from vitpose.models.loading import download_model

    folder = download_model(text, tracking_uri)
    found = sorted(folder.rglob("*.onnx"))
    if not found:
        raise DetectorFormatError(f"{text}: the model holds no .onnx file; register an ONNX person detector "
                                  "(pipelines/detector.py does)")
    return found[0]


def nms(xyxy: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by non-maximum suppression (torchvision's), best first."""
    import torch
    from torchvision.ops import nms as tv_nms

    if len(xyxy) == 0:
        return np.zeros(0, dtype=np.int64)
    return tv_nms(torch.from_numpy(xyxy).float(), torch.from_numpy(scores).float(), iou).numpy()


class OnnxPersonDetector:
    """An ONNX person detector (see the module doc for ``format``): ``detector(rgb) -> (N, 5)`` boxes
    ``[x, y, w, h, score]`` in image pixels, best first, scores >= ``score_thr`` (None: the one the file
    recommends in its metadata, as ``pipelines/detector.py`` writes it, else ``DEFAULT_SCORE_THR``)."""

    def __init__(self, path: str | Path, format: str = "auto", score_thr: float | None = None, nms_iou: float = 0.45,
                 person_class: int = 0, threads: int | None = None):

        if format not in FORMATS:
            raise DetectorFormatError(f"detector format {format!r}: choose one of {', '.join(FORMATS)}")
        self.path, self.score_thr, self.nms_iou, self.person_class = Path(path), score_thr, nms_iou, person_class
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no detector file there")
        from vitpose.deploy.runtime import onnx_session

        try:  # the pose network's session settings: no spinning threads between frames (runtime.py)
            self.session = onnx_session(self.path, threads)
        except Exception as err:  # onnxruntime's own error types are not part of its API
            raise DetectorFormatError(f"{self.path}: not a readable ONNX model ({str(err).splitlines()[0]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = inputs[0].name
        height, width = inputs[0].shape[2:4]
        if not (isinstance(height, int) and isinstance(width, int)):
            raise DetectorFormatError(f"{self.path}: input {inputs[0].name} has no fixed size ({inputs[0].shape}); "
                                      "export the detector with a fixed input size, e.g. 640x640")
        self.size = (height, width)
        self.format = self._check_format(format, [o.name for o in outputs], [o.shape for o in outputs])
        if score_thr is None:
            score_thr = float(self.session.get_modelmeta().custom_metadata_map.get(ONNX_SCORE_THR_KEY,
                                                                                   DEFAULT_SCORE_THR))
        self.score_thr = score_thr

    def _check_format(self, asked: str, names: list[str], shapes: list[Any]) -> str:
        mmdeploy = "dets" in names and "labels" in names
        seen = ", ".join(f"{n} {list(s)}" for n, s in zip(names, shapes, strict=True))
        tagged = self.session.get_modelmeta().custom_metadata_map.get(ONNX_FORMAT_KEY)
        if asked == "auto" and tagged in FORMATS:
            asked = tagged
        if asked == "auto":
            if mmdeploy:
                raise DetectorFormatError(f"{self.path}: an mmdeploy end2end detector (outputs {seen}); say which "
                                          "model it is, format 'yolox' or 'rtmdet': their inputs are scaled differently")
            asked = "ultralytics"
        if (asked in ("yolox", "rtmdet", "torchvision")) != mmdeploy or (asked == "ultralytics" and len(names) != 1):
            raise DetectorFormatError(f"{self.path}: outputs {seen} are not the {asked!r} layout; yolox / rtmdet "
                                      "(mmdeploy end2end) and torchvision have 'dets' (1, N, 5) and 'labels' (1, N), "
                                      "ultralytics one "
                                      "output (1, 4 + classes, anchors) or (1, N, 6)")
        return asked

    def _input(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        canvas, box = letterbox(image, self.size, centred=self.format == "ultralytics")
        if self.format == "ultralytics":
            x = canvas / 255.0
        elif self.format == "torchvision":
            x = canvas
        else:
            x = canvas[..., ::-1]  # the mmdet models were trained on BGR frames
            if self.format == "rtmdet":
                x = (x - RTMDET_MEAN_BGR) / RTMDET_STD_BGR
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32), box

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x, box = self._input(image)
        outputs = self.session.run(None, {self.input_name: x})
        xyxy, scores = self._decode(outputs)
        keep = scores >= self.score_thr
        xyxy, scores = box.to_image(xyxy[keep]), scores[keep]
        h, w = image.shape[:2]
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
        order = np.argsort(-scores, kind="stable")
        xyxy, scores = xyxy[order], scores[order]
        wh = xyxy[:, 2:4] - xyxy[:, 0:2]
        real = (wh > 1).all(axis=1)  # a box clipped to nothing is no person
        return np.concatenate([xyxy[real, :2], wh[real], scores[real, None]], axis=1)

    def _decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(x1, y1, x2, y2) in network pixels and scores of the person detections."""
        if self.format in ("yolox", "rtmdet", "torchvision"):
            names = [o.name for o in self.session.get_outputs()]
            dets, labels = outputs[names.index("dets")][0], outputs[names.index("labels")][0]
            person = labels == self.person_class
            return dets[person, :4], dets[person, 4]
        out = outputs[0][0]
        if out.shape[1] == 6:  # (N, 6): NMS inside the model
            person = out[:, 5].round() == self.person_class
            return out[person, :4], out[person, 4]
        if out.shape[0] < 5:
            raise DetectorFormatError(f"{self.path}: output of shape {list(outputs[0].shape)} is not an "
                                      "ultralytics layout (1, 4 + classes, anchors)")
        boxes, scores = out[:4].T, out[4 + self.person_class]
        cx, cy, bw, bh = boxes.T
        xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        candidates = scores >= self.score_thr
        xyxy, scores = xyxy[candidates], scores[candidates]
        kept = nms(xyxy, scores, self.nms_iou)
        return xyxy[kept], scores[kept]

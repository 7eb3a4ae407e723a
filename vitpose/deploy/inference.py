"""Top-down inference: images and person boxes → keypoints in original image coordinates.

Owns the one path from (image, boxes) to keypoints, shared by the MLflow pyfunc (``vitpose.deploy.serving``),
the predict and evaluate CLIs and the benchmarks:

* ``decode_image``: encoded bytes, base64 text or an array → uint8 RGB; anything else is a ``BadRequest``.
* ``parse_boxes``: person boxes ``[x, y, w, h]`` / ``[x, y, w, h, score]`` (or COCO ``{"bbox", "score"}``
  dicts, or their JSON text) checked against the image; ``None`` means "none given" (the whole image is
  then taken as one person), ``[]`` means "no person" (a detector that found nobody).
* ``PosePredictor``: crops every box with the evaluation transform, runs the crops of *all* images of a
  call through the model in shared batches (the flip-test pass rides in the same forward), decodes with
  UDP and maps back to the image; ``predict_dataset`` does the same for a ``TopDownCocoDataset`` so the
  evaluate CLI measures exactly what the training loop measures.

This module knows nothing about MLflow; errors a caller can fix are ``BadRequest`` with the field, the
value and what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vitpose.data.keypoints import default_keypoint_info, flip_test_allowed, keypoint_info
from vitpose.data.keypoints.set import KeypointSet
from vitpose.data.transforms import box_to_center_scale, normalize, udp_warp_matrix, warp_crop

# More boxes than this in one image is almost certainly a client bug (unfiltered detector output), and
# would make one request hold the server for minutes.
MAX_BOXES_PER_IMAGE = 1000
# Joints above this confidence count in the instance score (mmpose's rescoring, as in the evaluator).
KEYPOINT_SCORE_THR = 0.2


class BadRequest(ValueError):
    """The caller's input cannot be used; the message says which field, the value, and what to send."""


# ------------------------------------------------------------------------------------------------ input
def decode_image(data: Any) -> np.ndarray:
    """Encoded JPEG/PNG/... bytes, base64 text (or a ``data:`` URL) or an array → uint8 RGB (H, W, 3).

    EXIF orientation is applied (phone pictures); grayscale, RGBA, palette and 16-bit images become 8-bit
    RGB. Arrays may be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with values in 0..255.
    """
    if isinstance(data, (np.ndarray, list)):
        try:
            arr = np.asarray(data)
        except ValueError:  # ragged nested lists
            raise BadRequest("image: nested lists of uneven lengths; send rows of equal width (H, W, 3)") from None
        return _array_to_rgb(arr)
    if isinstance(data, str):
        data = _b64decode(data)
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise BadRequest(f"image: got a {type(data).__name__}; send the image file's bytes (base64 text in JSON) "
                         "or an (H, W, 3) uint8 array")
    if not data:
        raise BadRequest("image: empty; send the bytes of a JPEG or PNG file")
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        why = "no known image format" if isinstance(err, UnidentifiedImageError) else f"{type(err).__name__}: {err}"
        raise BadRequest(f"image: the {len(data)} bytes (starting {data[:12]!r}) are not a decodable image "
                         f"({why}); send a JPEG or PNG file") from None


def _b64decode(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # data URL as browsers produce: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        # Whitespace is dropped first: `base64` tools wrap lines, which strict validation would refuse.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"image: {text[:24]!r}... is not valid base64; send base64 of the JPEG/PNG file bytes "
                         "(e.g. base64.b64encode(open(path, 'rb').read()).decode())") from None


def _pil_to_rgb(im: Any) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: PIL's convert('RGB') clips instead of scaling; rescale to 0..255.
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        gray = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadRequest(f"image array has shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4) RGB(A)")
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iu" or arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadRequest(f"image array has dtype {arr.dtype}"
                             + (f" and values {arr.min()}..{arr.max()}" if arr.size and arr.dtype.kind in "iuf" else "")
                             + "; send uint8 RGB in 0..255 (e.g. (x * 255).astype(np.uint8) for floats in 0..1)")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def is_missing(value: Any) -> bool:
    """None, NaN or blank text: how a missing optional field arrives (pandas makes None or NaN of it,
    depending on the request format)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def parse_boxes(boxes: Any, width: int, height: int) -> list[list[float]] | None:
    """Validate person boxes against a ``width`` x ``height`` image → ``[[x, y, w, h, score], ...]``.

    Accepts a list (or array) of ``[x, y, w, h]`` / ``[x, y, w, h, score]`` or of COCO detection dicts
    ``{"bbox": [x, y, w, h], "score": s}``, or that as JSON text. Missing score = 1. Returns None when no
    boxes were given (None, NaN, empty text) and ``[]`` for an explicit empty list.
    """
    if is_missing(boxes):
        return None
    if isinstance(boxes, str):
        try:
            boxes = json.loads(boxes)
        except json.JSONDecodeError:
            raise BadRequest(f"boxes: {boxes[:40]!r} is not valid JSON; send a list like "
                             "[[x, y, w, h, score], ...]") from None
    if isinstance(boxes, np.ndarray):
        boxes = boxes.tolist()
    if isinstance(boxes, dict):
        boxes = [boxes]
    if not isinstance(boxes, (list, tuple)):
        raise BadRequest(f"boxes: got {type(boxes).__name__} {boxes!r:.60}; send a list like [[x, y, w, h, score], ...]")
    if len(boxes) > MAX_BOXES_PER_IMAGE:
        raise BadRequest(f"boxes: {len(boxes)} boxes for one image, more than {MAX_BOXES_PER_IMAGE}; "
                         "filter the detections by score first")
    out = []
    for i, box in enumerate(boxes):
        if isinstance(box, dict):
            if "bbox" not in box:
                raise BadRequest(f"boxes[{i}] = {box!r:.80}: a dict needs 'bbox' ([x, y, w, h]) and optionally 'score'")
            box = [*box["bbox"], box["score"]] if "score" in box else list(box["bbox"])
        if isinstance(box, np.ndarray):
            box = box.tolist()
        if not isinstance(box, (list, tuple)) or len(box) not in (4, 5):
            raise BadRequest(f"boxes[{i}] = {box!r:.80}: expected [x, y, w, h] or [x, y, w, h, score]")
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            raise BadRequest(f"boxes[{i}] = {list(box)!r:.80}: every value must be a number") from None
        if not all(math.isfinite(v) for v in values):
            raise BadRequest(f"boxes[{i}] = {values}: values must be finite numbers")
        x, y, w, h = values[:4]
        score = values[4] if len(values) == 5 else 1.0
        if not (w > 0 and h > 0):
            raise BadRequest(f"boxes[{i}] = {values}: width and height must be > 0 (boxes are [x, y, w, h], "
                             "not [x1, y1, x2, y2])")
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise BadRequest(f"boxes[{i}] = {values}: lies entirely outside the {width}x{height} image "
                             "(boxes are [x, y, w, h] in pixels of the image sent)")
        out.append([x, y, w, h, score])
    return out


# -------------------------------------------------------------------------------------------- predictor
def resolve_device(requested: str | None = None) -> str:
    """``requested`` if torch can allocate on it, else a ``ConfigError`` saying so; None: cuda when available."""
    from vitpose.config import ConfigError

    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=requested)
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"device {requested!r} is not usable here ({str(err).splitlines()[0]}); leave it unset "
                          "to use cuda when available, else cpu") from None
    return requested


class PosePredictor:
    """A loaded ViTPose and its keypoint metadata, ready for (image, boxes) → keypoints.

    ``meta`` (default: ``model.meta``, as ``vitpose.models.create`` sets it): ``spec`` and ``keypoints`` (the keypoint
    set as ``KeypointSet.to_info`` writes it: ``set``, ``names``, ``flip_pairs``, 1-based ``skeleton``,
    ``sigmas``; older metas lack ``set`` and ``sigmas``). ``batch_size`` counts crops per forward pass (the flip-test
    pass doubles the tensor, not the number of passes).
    """

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any] | None = None, *, flip_test: bool = True,
                 batch_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(self.device, self.dtype).eval()
        self.meta = dict(meta or getattr(model, "meta", None) or {})
        self.input_size: tuple[int, int] = tuple(model.spec.img_size)  # type: ignore[assignment]
        self.num_keypoints: int = int(model.spec.num_keypoints)
        kp = self.meta.get("keypoints") or default_keypoint_info(self.num_keypoints)
        if len(kp["names"]) != self.num_keypoints:
            raise ValueError(f"model meta names {len(kp['names'])} keypoints but the model predicts "
                             f"{self.num_keypoints}; the meta does not belong to these weights")
        self.keypoint_info: dict[str, Any] = kp
        self.keypoint_set: KeypointSet = KeypointSet.from_info(kp)  # what the evaluator scores predictions with
        self.names: list[str] = list(kp["names"])
        self.flip_pairs: list[tuple[int, int]] = [(int(a), int(b)) for a, b in kp.get("flip_pairs", [])]
        # A mirrored pass is mapped back with the set's pairs; a set guessed from names without any pair
        # might have partners under other names, so the flip test is off there.
        self._flip_ok = flip_test_allowed(kp)
        self.flip_test = bool(flip_test and self._flip_ok)
        self._flip_requested = bool(flip_test)
        self.batch_size = int(batch_size)

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None, **kwargs: Any) -> PosePredictor:
        """Load from ``models:/...``, ``runs:/...``, a checkpoint folder or a weights file (``create``)."""
        from vitpose.models import create

        return cls(create(uri, tracking_uri=tracking_uri), **kwargs)

    # ----------------------------------------------------------------------------------- network
    @torch.inference_mode()
    def heatmaps(self, crops: torch.Tensor, flip: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised crops (N, 3, h, w) → heatmaps (N, K, h/4, w/4) and, with the flip test (default
        ``self.flip_test``), the heatmaps of the mirrored crops, still mirrored (the decode flips them back)."""
        flip = self.flip_test if flip is None else flip
        outs, flips = [], []
        for i in range(0, len(crops), self.batch_size):
            x = crops[i : i + self.batch_size].to(self.device, self.dtype)
            n = len(x)
            if flip:
                # One forward for both views: half the per-call overhead, same arithmetic per sample.
                y = self.model(torch.cat([x, x.flip(3)])).float().cpu().numpy()
                outs.append(y[:n])
                flips.append(y[n:])
            else:
                outs.append(self.model(x).float().cpu().numpy())
        if not outs:
            k, (h, w) = self.num_keypoints, self.model.spec.heatmap_size
            empty = np.zeros((0, k, h, w), np.float32)
            return empty, (empty if flip else None)
        return np.concatenate(outs), (np.concatenate(flips) if flips else None)

    # -------------------------------------------------------------------------------- image + boxes
    def predict(self, image: Any, boxes: Any = None) -> dict[str, Any]:
        """One image (uint8 RGB (H, W, 3)) and its boxes → ``{"persons", "whole_image_box", ...}``; see
        ``predict_batch``."""
        return self.predict_batch([(image, boxes)])[0]

    def predict_batch(self, items: Sequence[tuple[Any, Any]], flip: bool | None = None) -> list[dict[str, Any]]:
        """Many (image, boxes) pairs; the crops of all of them share forward passes.

        Images are uint8 RGB arrays or anything ``decode_image`` takes; boxes as ``parse_boxes`` takes them.
        ``flip`` overrides the predictor's flip-test setting for this call.

        Returns per image: ``persons`` (list of ``{"box": [x, y, w, h], "box_score", "score", "keypoints":
        [[x, y, confidence] x K]}``, image pixel coordinates), ``num_persons``, ``whole_image_box`` (True when
        no boxes were given and the whole image was taken as one person), ``keypoint_names``, ``width``,
        ``height``. ``score`` is the box score times the mean confidence of the joints above 0.2.
        """
        from vitpose.evaluation import decode_batch_to_predictions

        aspect = self.input_size[1] / self.input_size[0]
        crops, centers, scales, scores, per_image = [], [], [], [], []
        for image, boxes in items:
            if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
                image = decode_image(image)
            height, width = image.shape[:2]
            parsed = parse_boxes(boxes, width, height)
            whole = parsed is None
            if parsed is None:
                parsed = [[0.0, 0.0, float(width), float(height), 1.0]]
            per_image.append((parsed, whole, width, height))
            for box in parsed:
                # The whole image is the person's extent already; the 1.25 context padding is for tight boxes.
                center, scale = box_to_center_scale(box[:4], aspect, padding=1.0 if whole else 1.25)
                matrix = udp_warp_matrix(center, scale, 0.0, self.input_size)
                crops.append(normalize(warp_crop(image, matrix, self.input_size)))
                centers.append(center)
                scales.append(scale)
                scores.append(box[4])
        preds: list[dict[str, Any]] = []
        if crops:
            flip = self.flip_test if flip is None else bool(flip and self._flip_ok)
            hm, flipped = self.heatmaps(torch.from_numpy(np.stack(crops)), flip=flip)
            metas = {"center": np.stack(centers), "scale": np.stack(scales), "image_id": np.zeros(len(crops)),
                     "bbox_score": np.asarray(scores)}
            preds = decode_batch_to_predictions(hm, metas, flipped, flip_pairs=self.flip_pairs,
                                                input_size=self.input_size)
        results, j = [], 0
        for parsed, whole, width, height in per_image:
            persons = [_person(box, preds[j + i]["keypoints"]) for i, box in enumerate(parsed)]
            j += len(parsed)
            results.append({"persons": persons, "num_persons": len(persons), "whole_image_box": whole,
                            "keypoint_names": self.names, "width": width, "height": height})
        return results

    # ------------------------------------------------------------------------------------- datasets
    def predict_dataset(self, dataset: Any, *, num_workers: int = 0) -> list[dict[str, Any]]:
        """Every instance of a ``TopDownCocoDataset`` (``train=False``) → prediction dicts for
        ``CocoKeypointEvaluator.evaluate``; the same crops, decode and flip merge as the training loop."""
        from torch.utils.data import DataLoader

        from vitpose.evaluation import decode_batch_to_predictions

        if tuple(dataset.input_size) != self.input_size:
            raise ValueError(f"dataset crops are {dataset.input_size} but the model takes {self.input_size}; "
                             "build the dataset with input_size=model.spec.img_size")
        if list(dataset.keypoint_names) != self.names:
            theirs = getattr(getattr(dataset, "keypoint_set", None), "name", "?")
            raise ValueError(f"{dataset.ann_file} was read as keypoint set {theirs!r} ({dataset.num_keypoints}: "
                             f"{', '.join(dataset.keypoint_names[:4])}, ...) but the model predicts set "
                             f"{self.keypoint_set.name!r} ({self.num_keypoints}: {', '.join(self.names[:4])}, ...); "
                             "evaluate on a dataset with the model's keypoints")
        # The dataset's pairs, like the training loop: they are the ground truth's definition of left and right.
        flip_pairs = [tuple(p) for p in dataset.flip_pairs]
        flip = self._flip_requested and flip_test_allowed(keypoint_info(dataset))
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=num_workers)
        preds: list[dict[str, Any]] = []
        for batch in loader:
            hm, flipped = self.heatmaps(batch["image"], flip=flip)
            preds.extend(decode_batch_to_predictions(hm, batch, flipped, flip_pairs=flip_pairs,
                                                     input_size=self.input_size))
        return preds

def _person(box: list[float], keypoints: np.ndarray) -> dict[str, Any]:
    conf = keypoints[:, 2]
    confident = conf > KEYPOINT_SCORE_THR
    mean_conf = float(conf[confident].mean()) if confident.any() else 0.0
    return {
        "box": [round(float(v), 2) for v in box[:4]],
        "box_score": round(float(box[4]), 6),
        "score": round(float(box[4]) * mean_conf, 6),
        "keypoints": [[round(float(x), 2), round(float(y), 2), round(float(s), 4)] for x, y, s in keypoints],
    }

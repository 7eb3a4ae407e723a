"""Top-down inference: an image and person boxes → keypoints in image coordinates.

``PosePredictor`` is the one place that turns (image, boxes) into keypoints: it crops every box with the
evaluation transform, runs all crops in batches (flip test on by default), decodes with UDP and maps
back to the image. The MLflow pyfunc (``VitPosePyfunc``), the predict CLI and the server all use it.

Pyfunc input: a DataFrame with ``image`` (base64 of an encoded JPEG/PNG, or raw bytes) and optional
``boxes`` (JSON list of ``[x, y, w, h]`` or ``[x, y, w, h, score]``). Output: one row per image with
``persons`` (JSON list of {box, score, keypoints: [[x, y, confidence], ...]}), ``num_persons``,
``whole_image_box`` (true when no boxes were given and the whole image was taken as one person) and
``keypoint_names`` (JSON list).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np
import torch

from vitpose.data.transforms import box_to_center_scale, normalize, udp_warp_matrix, warp_crop


class BadRequest(ValueError):
    """The caller's input cannot be used; the message says which field and why."""


def decode_image(data: bytes | str | np.ndarray) -> np.ndarray:
    """Encoded bytes, base64 text or an array → uint8 RGB (H, W, 3), EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(data, np.ndarray):
        arr = data
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise BadRequest(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
        return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image: not valid base64 (send base64 of the JPEG/PNG file bytes)") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadRequest(f"image: the bytes are not a decodable image ({err.__class__.__name__}); "
                         "send a JPEG or PNG") from None


def parse_boxes(boxes: Any, width: int, height: int) -> list[list[float]]:
    """Validate person boxes (xywh[, score]) against the image; [] means 'none given'."""
    if boxes is None or (isinstance(boxes, float) and np.isnan(boxes)) or boxes == "":
        return []
    if isinstance(boxes, str):
        try:
            boxes = json.loads(boxes)
        except json.JSONDecodeError:
            raise BadRequest("boxes: not valid JSON; send a list like [[x, y, w, h, score], ...]") from None
    out = []
    for i, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or len(box) not in (4, 5):
            raise BadRequest(f"boxes[{i}] = {box!r}: expected [x, y, w, h] or [x, y, w, h, score]")
        x, y, w, h = (float(v) for v in box[:4])
        score = float(box[4]) if len(box) == 5 else 1.0
        if not (w > 0 and h > 0):
            raise BadRequest(f"boxes[{i}] = {list(box)}: width and height must be > 0")
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise BadRequest(f"boxes[{i}] = {list(box)}: lies outside the {width}x{height} image")
        out.append([x, y, w, h, score])
    return out


class PosePredictor:
    """A loaded ViTPose and its keypoint metadata, ready for (image, boxes) → keypoints."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], *, flip_test: bool = True,
                 batch_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device).eval()
        self.meta = meta
        self.device, self.dtype = torch.device(device), dtype
        self.input_size = tuple(model.spec.img_size)
        self.flip_test, self.batch_size = flip_test, batch_size
        kp = meta.get("keypoints") or {}
        self.names: list[str] = kp.get("names") or [f"kp{i}" for i in range(model.spec.num_keypoints)]
        self.flip_pairs = [tuple(p) for p in kp.get("flip_pairs", [])]

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None, **kwargs: Any) -> PosePredictor:
        from vitpose.serving import load_vitpose

        model, meta = load_vitpose(uri, tracking_uri)
        return cls(model, meta, **kwargs)

    @torch.no_grad()
    def heatmaps(self, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        outs, flips = [], []
        for i in range(0, len(crops), self.batch_size):
            x = crops[i : i + self.batch_size].to(self.device, self.dtype)
            outs.append(self.model(x).float().cpu().numpy())
            if self.flip_test and self.flip_pairs:
                flips.append(self.model(x.flip(3)).float().cpu().numpy())
        return np.concatenate(outs), (np.concatenate(flips) if flips else None)

    def predict(self, image: np.ndarray, boxes: list[list[float]] | None = None) -> dict[str, Any]:
        from vitpose.evaluation import decode_batch_to_predictions

        height, width = image.shape[:2]
        boxes = parse_boxes(boxes, width, height)
        whole = not boxes
        if whole:
            boxes = [[0.0, 0.0, float(width), float(height), 1.0]]
        aspect = self.input_size[1] / self.input_size[0]
        crops, centers, scales = [], [], []
        for box in boxes:
            center, scale = box_to_center_scale(box[:4], aspect, padding=1.0 if whole else 1.25)
            matrix = udp_warp_matrix(center, scale, 0.0, self.input_size)
            crops.append(normalize(warp_crop(image, matrix, self.input_size)))
            centers.append(center)
            scales.append(scale)
        hm, flipped = self.heatmaps(torch.from_numpy(np.stack(crops)))
        metas = {"center": np.stack(centers), "scale": np.stack(scales), "image_id": np.zeros(len(boxes)),
                 "bbox_score": np.array([b[4] for b in boxes])}
        preds = decode_batch_to_predictions(hm, metas, flipped, flip_pairs=self.flip_pairs,
                                            input_size=self.input_size)
        persons = []
        for box, pred in zip(boxes, preds, strict=True):
            kps = pred["keypoints"]
            confident = kps[:, 2] > 0.2
            mean_conf = float(kps[confident, 2].mean()) if confident.any() else 0.0
            persons.append({"box": [round(v, 2) for v in box[:4]], "box_score": box[4],
                            "score": box[4] * mean_conf,
                            "keypoints": [[round(float(x), 2), round(float(y), 2), round(float(s), 4)]
                                          for x, y, s in kps]})
        return {"persons": persons, "whole_image_box": whole, "keypoint_names": self.names}


# ------------------------------------------------------------------------------------------- pyfunc
def _pyfunc_base() -> type:
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class VitPosePyfunc(_pyfunc_base()):  # type: ignore[misc]
    """MLflow pyfunc wrapper around ``PosePredictor`` (artifacts: ``weights`` and ``meta``)."""

    def load_context(self, context: Any) -> None:
        from vitpose.models import build_model_from_spec, read_checkpoint

        meta = json.loads(open(context.artifacts["meta"]).read())
        state, _ = read_checkpoint(context.artifacts["weights"])
        model = build_model_from_spec(meta["spec"])
        model.load_state_dict(state, strict=True)
        self.predictor = PosePredictor(model, meta)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise MlflowException("input needs an 'image' column (base64 JPEG/PNG)", error_code=BAD_REQUEST)
        rows = []
        for i, row in enumerate(frame.to_dict("records")):
            try:
                image = decode_image(row["image"])
                result = self.predictor.predict(image, row.get("boxes"))
            except BadRequest as err:
                raise MlflowException(f"row {i}: {err}", error_code=BAD_REQUEST) from None
            rows.append({"persons": json.dumps(result["persons"]), "num_persons": len(result["persons"]),
                         "whole_image_box": result["whole_image_box"],
                         "keypoint_names": json.dumps(result["keypoint_names"])})
        return pd.DataFrame(rows)


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "boxes", required=False)]),
        outputs=Schema([ColSpec("string", "persons"), ColSpec("long", "num_persons"),
                        ColSpec("boolean", "whole_image_box"), ColSpec("string", "keypoint_names")]),
    )


def input_example() -> Any:
    """A tiny real example: a 64x48 grey JPEG and one box."""
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 64), (128, 128, 128)).save(buf, format="JPEG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()], "boxes": [json.dumps([[4, 4, 40, 56, 0.9]])]})

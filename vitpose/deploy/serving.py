"""Registered models: how a trained ViTPose is logged to MLflow, loaded back, and served as a pyfunc.

Owns the MLflow side of a pose model. A logged model is an MLflow pyfunc ("models from code": the
behaviour lives in the installed ``vitpose`` package and nothing is unpickled on load) with two artifacts,
the weights (``model.safetensors``) and ``vitpose_meta.json`` (the resolved ``ModelSpec`` plus the keypoint
names, flip pairs and skeleton), an input/output signature and an input example. Teacher and student
registrations are the same kind of model, so ``mlflow.pyfunc.load_model("models:/vitpose-student@champion")``
and ``mlflow models serve -m models:/vitpose-student@champion --env-manager local`` work for both. A model
logged with a third artifact, ``network`` (an ONNX file of the same weights, e.g. the int8 one
``pipelines/export.py --int8 --register`` writes), runs its network in onnxruntime; nothing else changes. A
model logged with a ``detector`` artifact (an ONNX person detector, ``vitpose.deploy.detector``; its format and
score threshold in the meta's ``detector``) finds the people of every image sent without boxes.

Pyfunc input, one row per image (a DataFrame, a list of dicts, or JSON ``dataframe_records`` /
``dataframe_split`` / ``inputs`` when served):

* ``image``: the encoded image file (bytes in Python; base64 text in JSON), or an (H, W, 3) uint8 array.
* ``boxes`` (optional): person boxes ``[[x, y, w, h], ...]`` or ``[[x, y, w, h, score], ...]`` in image
  pixels (or COCO ``{"bbox": ..., "score": ...}`` dicts, or JSON text of either). Missing/null: the model's
  detector finds them, or, for a model without one, the whole image is taken as one person and
  ``whole_image_box`` says so; ``[]``: no person, nothing predicted.

Output, one row per image: ``persons`` (list of ``{"box", "box_score", "score", "keypoints": [[x, y,
confidence] x K]}`` in original image pixels), ``num_persons``, ``whole_image_box``, ``keypoint_names``,
``width``, ``height``. Params: ``flip_test`` (default true). Bad input is an ``MlflowException`` with
``BAD_REQUEST`` (HTTP 400 from the server) naming the row, the field and the fix.

``mlflow models serve`` starts ``uvicorn`` by name: run it from the activated venv (or with the venv's
``bin/`` on ``PATH``).

Both columns are typed ``Any`` in the signature on purpose: MLflow's typed columns refuse integer box
coordinates for a ``double`` array and bytes for a ``string``; ``vitpose.deploy.inference`` validates them instead,
with messages that say what to send.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from vitpose.models.loading import META, WEIGHTS

PYFUNC_PATH = "model"

# The models-from-code entry point logged with every model. It only names the class in the installed package,
# so loading a model runs our code, never code unpickled from the artifact store.
_MODEL_CODE = '''"""vitpose pose model (models from code): see vitpose/deploy/serving.py for inputs and outputs."""
from mlflow.models import set_model

from vitpose.deploy.serving import VitPosePyfunc

set_model(VitPosePyfunc())
'''


class BadInput(MlflowException):
    """HTTP 400 whose body is our reason alone.

    The scoring server rewrites the message of any ``MlflowException`` a model raises to
    ``Failed to predict data '<the whole request>'. Error: <reason>``, which puts kilobytes of base64 before
    the one line that says what to fix; assignments that only add such a prefix are ignored here.
    """

    def __init__(self, reason: str):
        self._reason = reason
        super().__init__(reason, error_code=BAD_REQUEST)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not value.endswith(self._reason):
            self._reason = value


# --------------------------------------------------------------------------------------------- pyfunc
class VitPosePyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc around ``vitpose.deploy.inference.PosePredictor`` (artifacts ``weights`` and ``meta``)."""

    def load_context(self, context: Any) -> None:
        from vitpose.deploy.inference import PosePredictor, resolve_device
        from vitpose.models import create

        model = create(Path(context.artifacts["weights"]).parent)  # the weights and their meta, logged side by side
        meta = model.meta
        device = resolve_device()
        if "network" in context.artifacts:  # logged with an ONNX network (export --int8): run it in onnxruntime
            from vitpose.deploy.runtime import OrtNetwork

            model, device = OrtNetwork(context.artifacts["network"], model.spec), "cpu"
        self.predictor = PosePredictor(model, meta, device=device)
        self.detector = None
        if "detector" in context.artifacts:  # people found here for images sent without boxes
            from vitpose.deploy.detector import OnnxPersonDetector

            d = meta.get("detector") or {}
            self.detector = OnnxPersonDetector(context.artifacts["detector"], d.get("format", "auto"),
                                               score_thr=float(d.get("score_thr", 0.3)))
        # The server runs each request in its own thread. Concurrent forwards would each claim every core's
        # intra-op threads and oversubscribe the cores, slowing every one of them down many times, so forwards
        # take turns; decoding images happens outside the lock.
        self._forward_lock = threading.Lock()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from vitpose.deploy.inference import BadRequest, decode_image, is_missing, parse_boxes

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise BadInput("input has no 'image' column; send one row per image with 'image' (base64 of "
                           "the JPEG/PNG bytes) and optional 'boxes'")
        items = []
        for i, row in enumerate(_rows(frame)):
            try:
                image = decode_image(row["image"])
                boxes = row.get("boxes")
                if self.detector is not None and is_missing(boxes):
                    boxes = self.detector(image).tolist()  # boxes a client sends win over the detector's
                items.append((image, boxes))
                # Boxes are checked now, so a bad row fails before any model time is spent on the others.
                parse_boxes(boxes, image.shape[1], image.shape[0])
            except BadRequest as err:
                raise BadInput(f"row {i}: {err}") from None
        flip = (params or {}).get("flip_test")
        with self._forward_lock:
            results = self.predictor.predict_batch(items, flip=None if flip is None else bool(flip))
        return pd.DataFrame(results, columns=list(OUTPUT_COLUMNS))


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per image. MLflow hands a single-column columnar request ({"inputs": {"image": [a, b]}}) over
    as ONE row whose cell is the list of images; those are split back into rows here."""
    from vitpose.deploy.inference import is_missing

    rows = []
    for row in frame.to_dict("records"):
        image = row["image"]
        encoded = isinstance(image, (list, tuple, np.ndarray)) and len(image) > 0 and all(
            isinstance(v, (str, bytes)) for v in image)
        if encoded and is_missing(row.get("boxes")):
            rows += [{"image": v, "boxes": None} for v in image]
        else:
            rows.append(row)
    return rows


OUTPUT_COLUMNS = ("persons", "num_persons", "whole_image_box", "keypoint_names", "width", "height")


def signature() -> Any:
    """Input (``image``, optional ``boxes``), output (see the module docstring) and the ``flip_test`` param."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType, Array, Object, Property

    person = Object([
        Property("box", Array(DataType.double)),
        Property("box_score", DataType.double),
        Property("score", DataType.double),
        Property("keypoints", Array(Array(DataType.double))),
    ])
    return ModelSignature(
        # "image" is required in fact; predict() checks it, so a request without it gets our reason, first,
        # instead of MLflow's schema error after a dump of the request.
        inputs=Schema([ColSpec(AnyType(), "image", required=False), ColSpec(AnyType(), "boxes", required=False)]),
        outputs=Schema([
            ColSpec(Array(person), "persons"),
            ColSpec(DataType.long, "num_persons"),
            ColSpec(DataType.boolean, "whole_image_box"),
            ColSpec(Array(DataType.string), "keypoint_names"),
            ColSpec(DataType.long, "width"),
            ColSpec(DataType.long, "height"),
        ]),
        params=ParamSchema([ParamSpec("flip_test", DataType.boolean, True)]),
    )


def input_example() -> pd.DataFrame:
    """Two rows a reader can copy: an image with one scored box, and one without boxes (whole image)."""
    import base64
    import io

    from PIL import Image, ImageDraw

    im = Image.new("RGB", (96, 128), (90, 110, 130))
    ImageDraw.Draw(im).ellipse([36, 8, 60, 32], fill=(220, 190, 160))  # a head, so the picture is not blank
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    b64 = base64.b64encode(buf.getvalue()).decode()
    return pd.DataFrame({"image": [b64, b64], "boxes": [[[20, 4, 56, 120, 0.9]], None]})


def pip_requirements(dists: tuple[str, ...] = ("vitpose-distill", "torch", "mlflow", "safetensors", "numpy",
                                                "pandas", "pillow", "opencv-python-headless")) -> list[str]:
    """What a fresh environment needs, at the versions logged with (this package carries the model code)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in dists:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def register_alias(tracking_uri: str, info: Any, registered_name: str | None, alias: str | None) -> str | None:
    """The version a ``log_model(..., registered_model_name=...)`` created, with ``alias`` pointed at it."""
    import mlflow

    if not registered_name:
        return None
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient(tracking_uri).set_registered_model_alias(registered_name, alias, version)
    return version


# ------------------------------------------------------------------------------------------ log/load
def log_vitpose_model(
    tracking_uri: str,
    run_id: str,
    weights: Path,
    meta: dict[str, Any],
    registered_name: str | None = None,
    alias: str | None = None,
    network: Path | None = None,
    detector: Path | None = None,
) -> str | None:
    """Log the pyfunc model under ``run_id``; register it (and point ``alias`` at it) when a name is given.

    ``network``: an ONNX file of these weights (``pipelines/export.py --int8`` writes one) logged as the
    ``network`` artifact; the served model then runs it in onnxruntime instead of the eager network. Input,
    output, cropping and decoding are the same; the weights stay in the model for ``vitpose.models.create``.

    ``detector``: an ONNX person detector logged as the ``detector`` artifact, its ``format`` and ``score_thr``
    in ``meta["detector"]``; it is opened here first, so a file that is no known detector is refused now.

    ``meta`` needs ``spec`` (``ModelSpec.to_dict()``) and should carry ``keypoints`` (the keypoint set: names,
    flip pairs, 1-based skeleton, sigmas, as ``vitpose.data.keypoints.keypoint_info`` makes them; COCO's are
    assumed for 17 keypoints otherwise). Returns the registered version, or None when not registering.
    """
    import mlflow

    if "spec" not in meta:
        raise ValueError("meta has no 'spec'; pass {'spec': model.spec.to_dict(), 'keypoints': ...}")
    names = (meta.get("keypoints") or {}).get("names")
    k = meta["spec"].get("num_keypoints")
    if names is not None and k is not None and len(names) != k:  # served names label the heatmap channels
        raise ValueError(f"meta keypoints name {len(names)} keypoints ({meta['keypoints'].get('set', 'no set')}) but "
                         f"the model predicts {k}; pass the keypoint set the model was trained on")
    _check_weights(Path(weights), meta["spec"])
    if network is not None and not Path(network).is_file():
        raise FileNotFoundError(f"ONNX network not found: {network}; write it with pipelines/export.py --int8")
    if detector is not None:
        from vitpose.deploy.detector import OnnxPersonDetector

        d = meta.get("detector") or {}
        OnnxPersonDetector(detector, d.get("format", "auto"), score_thr=float(d.get("score_thr", 0.3)))
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / META
        meta_path.write_text(json.dumps(meta, indent=1))
        code_path = Path(tmp) / "vitpose_pose_model.py"
        code_path.write_text(_MODEL_CODE)
        # Logged under the name every loader looks for, whatever the file was called (MLflow refuses links).
        named = Path(weights)
        if named.name != WEIGHTS:
            named = Path(shutil.copyfile(weights, Path(tmp) / WEIGHTS))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=PYFUNC_PATH,
                python_model=str(code_path),
                artifacts={"weights": str(named), "meta": str(meta_path),
                           **({"network": str(network)} if network else {}),
                           **({"detector": str(detector)} if detector else {})},
                signature=signature(),
                input_example=input_example(),
                pip_requirements=pip_requirements() + (pip_requirements(("onnxruntime",))
                                                       if network or detector else []),
                registered_model_name=registered_name,
            )
    return register_alias(tracking_uri, info, registered_name, alias)


def register_checkpoint(tracking_uri: str, run_id: str, checkpoint: Any, registered_name: str, alias: str,
                        lineage: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                        description: str | None = None) -> str | None:
    """Log the weights of a training checkpoint (a Ray ``Checkpoint``) as the run's model, register it and
    point ``alias`` at the new version. ``lineage`` (teacher, trial parameters, ...) is kept in the meta;
    ``tags`` and ``description`` go on the version, beside the run, keypoint set and input size, so the
    registry tells what a model is without opening its run."""
    from vitpose.train.run_folder import MODEL_FILE, verify_checkpoint

    with checkpoint.as_directory() as folder:
        meta = verify_checkpoint(Path(folder))
        model_meta = {"spec": meta["spec"], "keypoints": meta["keypoints"], "source_checkpoint": checkpoint.path,
                      **(lineage or {})}
        version = log_vitpose_model(tracking_uri, run_id, Path(folder) / MODEL_FILE, model_meta, registered_name,
                                    alias)
    if version is not None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        spec = meta["spec"]
        described = {"run": run_id, "keypoint set": str((meta.get("keypoints") or {}).get("set", "?")),
                     "input size": "x".join(str(v) for v in spec.get("img_size", [])),
                     **({"GFLOPs": f"{gflops:.3f}"} if (gflops := model_gflops(spec)) is not None else {}),
                     **(tags or {})}
        for key, value in described.items():
            client.set_model_version_tag(registered_name, version, key, str(value))
        if description:
            client.update_model_version(registered_name, version, description=description)
    return version


def model_gflops(spec: dict[str, Any]) -> float | None:
    """GFLOPs of one crop through the model (one MAC = one FLOP, the paper's convention), from its spec alone;
    None for a model that does not count them."""
    from vitpose.models import build_model_from_spec

    model = build_model_from_spec(spec, device="meta")
    return model.flops() / 1e9 if hasattr(model, "flops") else None


def _check_weights(weights: Path, spec: dict[str, Any]) -> None:
    """Refuse to register weights that do not load into the declared model, before anything is logged.

    Compares names and shapes only (the model is built on the meta device, the file's header is read), so
    checking a 1B-parameter teacher costs no memory.
    """
    from safetensors import safe_open

    from vitpose.models import CheckpointMismatchError, build_model_from_spec

    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    want = {k: tuple(v.shape) for k, v in build_model_from_spec(spec, device="meta").state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if want != have:
        raise CheckpointMismatchError(
            weights, sorted(set(want) - set(have)), sorted(set(have) - set(want)),
            [(k, have[k], want[k]) for k in sorted(set(want) & set(have)) if want[k] != have[k]],
            "the meta's 'spec' does not describe these weights; pass the spec the model was trained with",
        )



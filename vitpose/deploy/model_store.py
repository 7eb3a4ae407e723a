"""Any model reference -> a ViTPose in eval mode plus its metadata (spec, keypoint definition, lineage).

One place that knows every form a trained model comes in: a registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``), a run URI (``runs:/RUN_ID/model``), a training checkpoint folder, a downloaded
MLflow model folder, a ``.safetensors`` file we wrote, or an official ViTPose ``.pth``. Used by inference,
serving, evaluation, export and distillation (the teacher).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitpose.config import ConfigError
from vitpose.train.run_folder import META_FILE as CHECKPOINT_META
from vitpose.train.run_folder import MODEL_FILE

WEIGHTS = MODEL_FILE  # the same name in a registered model's artifacts and in a checkpoint folder
META = "vitpose_meta.json"  # a registered model's spec, keypoint definition and lineage


class ModelNotFoundError(ConfigError):
    """A model URI that names nothing loadable; the message says what was tried."""


def load_vitpose(uri: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``ViTPose`` (eval mode, CPU) and its meta from a registry / run URI, a folder or a weights file.

    Accepted: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``, a training checkpoint
    folder (``model.safetensors`` + ``meta.json``, ours or Ray's), a downloaded MLflow model folder, a
    ``.safetensors`` file we wrote, an official ``.pth`` file.
    """
    from vitpose.models import load_model

    if uri.startswith(("models:/", "runs:/")):
        folder = _download(uri, tracking_uri)
        return build_from_files(folder / "artifacts" / WEIGHTS, json.loads((folder / "artifacts" / META).read_text()))
    path = Path(uri).expanduser()
    if path.is_dir():
        for folder in (path, path / "artifacts"):  # a checkpoint folder, or an MLflow model folder
            if (folder / WEIGHTS).is_file():
                meta_file = next((f for f in (folder / META, folder / CHECKPOINT_META) if f.is_file()), None)
                meta = json.loads(meta_file.read_text()) if meta_file else {}
                return build_from_files(folder / WEIGHTS, meta)
        raise ModelNotFoundError(f"model folder {path} has no {WEIGHTS} (nor artifacts/{WEIGHTS}); give a training "
                                 "checkpoint folder, an MLflow model folder, or the weights file itself")
    if path.is_file():
        model = load_model(path)
        return model.eval(), _with_keypoints({"spec": model.spec.to_dict()}, model.spec.num_keypoints)
    raise ModelNotFoundError(
        f"model {uri!r} not found: give models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a checkpoint "
        f"folder with {WEIGHTS}, or a .safetensors/.pth file"
    )


def build_from_files(weights: Path, meta: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    from vitpose.models import build_model_from_spec, read_checkpoint

    state, file_spec = read_checkpoint(weights)
    spec = meta.get("spec") or (file_spec.to_dict() if file_spec else None)
    if spec is None:
        raise ModelNotFoundError(f"{weights}: no model spec stored with the weights (no 'spec' in the meta, none in "
                                 "the file); save it with vitpose.models.save_safetensors or keep meta.json beside it")
    model = build_model_from_spec(spec)
    model.load_state_dict(state, strict=True)
    keep = {k: v for k, v in meta.items() if k != "spec"}  # keypoints, lineage (source, teacher, trial)
    return model.eval(), _with_keypoints({"spec": spec, **keep}, model.spec.num_keypoints)


def _with_keypoints(meta: dict[str, Any], num_keypoints: int) -> dict[str, Any]:
    # Weights saved without their dataset's keypoint definition (an official .pth, a bare .safetensors) get
    # COCO's for 17 keypoints; the meta records that it was assumed.
    if "keypoints" not in meta:
        from vitpose.data.keypoints import default_keypoint_info

        meta["keypoints"] = default_keypoint_info(num_keypoints)
        meta["keypoints_assumed"] = True
    return meta


def _download(uri: str, tracking_uri: str | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from vitpose.run.tracking import check_tracking_uri, resolve_tracking_uri

    resolved = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(resolved)  # an unreachable server is a clear error here, not a "model not found"
    mlflow.set_tracking_uri(resolved)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as err:
        first = (err.message.splitlines()[0] if err.message else str(err)).rstrip(".")
        raise ModelNotFoundError(f"model {uri!r} not found in the MLflow store {resolved}: {first}. Check the name, alias or "
                                 f"version (mlflow ui --backend-store-uri {resolved}), or point MLFLOW_TRACKING_URI "
                                 "at the store that holds the model") from None
    folder = Path(local)
    if not (folder / "artifacts" / META).is_file():
        raise ModelNotFoundError(f"{uri} is not a vitpose pose model (no artifacts/{META}); ONNX exports are served "
                                 "by onnxruntime, not loaded here; register with vitpose.deploy.serving.log_vitpose_model")
    return folder

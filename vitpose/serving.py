"""Registered models: how a trained ViTPose is logged to MLflow, loaded back, and served as a pyfunc.

A registered model holds two artifacts: the weights (``model.safetensors``) and ``vitpose_meta.json``
(the model spec and the keypoint names, flip pairs and skeleton). Teacher and student registrations
are the same kind of model, so anything that loads one loads the other.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitpose.config import ConfigError

WEIGHTS = "model.safetensors"
META = "vitpose_meta.json"
PYFUNC_PATH = "model"


class ModelNotFoundError(ConfigError):
    """A model URI that names nothing loadable; the message says what was tried."""


def log_vitpose_model(
    tracking_uri: str,
    run_id: str,
    weights: Path,
    meta: dict[str, Any],
    registered_name: str | None = None,
    alias: str | None = None,
) -> str | None:
    """Log the pyfunc model under ``run_id``; register it (and point ``alias`` at it) when a name is given.

    Returns the registered version, or None when not registering.
    """
    import mlflow

    from vitpose.predict import VitPosePyfunc, input_example, signature

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / META
        meta_path.write_text(json.dumps(meta, indent=1))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=PYFUNC_PATH,
                python_model=VitPosePyfunc(),
                artifacts={"weights": str(weights), "meta": str(meta_path)},
                signature=signature(),
                input_example=input_example(),
                registered_model_name=registered_name,
            )
    if not registered_name:
        return None
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient(tracking_uri).set_registered_model_alias(registered_name, alias, version)
    return version


def load_vitpose(uri: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``ViTPose`` (eval mode, CPU) and its meta from a registry / run URI, a checkpoint folder or a file.

    Accepted: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``, a Ray/our checkpoint
    folder (``model.safetensors`` + ``meta.json``), a ``.safetensors`` file, an official ``.pth`` file.
    """
    from vitpose.models import build_model_from_spec, load_model, read_checkpoint

    if uri.startswith(("models:/", "runs:/")):
        folder = _download(uri, tracking_uri)
        weights, meta = folder / "artifacts" / WEIGHTS, json.loads((folder / "artifacts" / META).read_text())
    else:
        path = Path(uri)
        if path.is_dir() and (path / WEIGHTS).is_file():
            weights = path / WEIGHTS
            meta_file = path / META if (path / META).is_file() else path / "meta.json"
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        elif path.is_file():
            model = load_model(path)
            return model.eval(), {"spec": model.spec.to_dict()}
        else:
            raise ModelNotFoundError(
                f"model {uri!r} not found: give models:/NAME@ALIAS, runs:/RUN_ID/model, a checkpoint folder with "
                f"{WEIGHTS}, or a .safetensors/.pth file"
            )
    state, file_spec = read_checkpoint(weights)
    spec = meta.get("spec") or (file_spec.to_dict() if file_spec else None)
    if spec is None:
        raise ModelNotFoundError(f"{weights}: no model spec stored with the weights; cannot rebuild the model")
    model = build_model_from_spec(spec)
    model.load_state_dict(state, strict=True)
    meta["spec"] = spec
    return model.eval(), meta


def _download(uri: str, tracking_uri: str | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from vitpose.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as err:
        raise ModelNotFoundError(f"model {uri!r} not found in the MLflow registry/runs: {err.message}") from None
    folder = Path(local)
    if not (folder / "artifacts" / META).is_file():
        raise ModelNotFoundError(f"{uri} is not a vitpose model (no artifacts/{META}); register it with vitpose")
    return folder

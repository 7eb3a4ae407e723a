"""The one way to get a model: ``create(source, **overrides)``, whatever form the model comes in.

``source`` is any of:

* a preset name (``vitpose_b``): a fresh model, optionally started from ``pretrained=`` (a weights file of
  any format ``python -m vitpose.models inspect`` reads: official ViTPose, MAE, timm, DINOv2, transformers);
* a weights file: ``.safetensors`` we wrote (its spec is stored in it) or an official ``.pth`` (spec inferred);
* a folder: a training checkpoint (``model.safetensors`` + ``meta.json``) or a downloaded MLflow model;
* an MLflow URI: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``.

The model comes back with ``model.meta``: its ``spec``, its ``keypoints`` definition (COCO's assumed for a
bare 17-keypoint file, with ``keypoints_assumed``) and, for trained models, their lineage (source run,
teacher, trial). A loaded model is in eval mode; a fresh preset is as built (training mode).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .vitpose import PRESETS, ViTPose, build_model, build_model_from_spec
from .weights import CheckpointError, infer_spec_from_state_dict, load_checkpoint, read_checkpoint

WEIGHTS = "model.safetensors"  # the weights' name in a checkpoint folder and in a registered model's artifacts
CHECKPOINT_META = "meta.json"  # a checkpoint folder's spec, keypoints and training state
META = "vitpose_meta.json"  # a registered model's spec, keypoint definition and lineage
URI_SCHEMES = ("models:/", "runs:/")


class ModelNotFoundError(CheckpointError):
    """A model source that names nothing loadable; the message says what was tried."""


def create(source: str | Path, *, pretrained: str | Path | None = None, tracking_uri: str | None = None,
           device: torch.device | str | None = None, **overrides: Any) -> ViTPose:
    """The model ``source`` names (see the module docstring). ``overrides`` change spec fields before the
    model is built (``img_size=(384, 288)`` resizes a file's position embedding, ``num_keypoints=14`` gives a
    preset another head); ``tracking_uri`` is the MLflow store of a ``models:/`` or ``runs:/`` URI (default:
    MLFLOW_TRACKING_URI, else the project's); ``pretrained`` starts a preset from a weights file."""
    text = str(source)
    if pretrained is not None and text not in PRESETS:
        raise ModelNotFoundError(f"pretrained= starts a fresh preset; {text!r} is not one ({', '.join(PRESETS)}): "
                                 "a weights file, folder or URI already holds its weights")
    if text in PRESETS:
        return _from_preset(text, pretrained, device, overrides)
    if text.startswith(URI_SCHEMES):
        folder = _download(text, tracking_uri) / "artifacts"
        return _from_files(folder / WEIGHTS, json.loads((folder / META).read_text()), device, overrides)
    path = Path(text).expanduser()
    if path.is_dir():
        for folder in (path, path / "artifacts"):  # a checkpoint folder, or an MLflow model folder
            if (folder / WEIGHTS).is_file():
                meta_file = next((f for f in (folder / META, folder / CHECKPOINT_META) if f.is_file()), None)
                meta = json.loads(meta_file.read_text()) if meta_file else {}
                return _from_files(folder / WEIGHTS, meta, device, overrides)
        raise ModelNotFoundError(f"model folder {path} has no {WEIGHTS} (nor artifacts/{WEIGHTS}); give a training "
                                 "checkpoint folder, an MLflow model folder, or the weights file itself")
    if path.is_file():
        return _from_files(path, {}, device, overrides, official=True)
    raise ModelNotFoundError(
        f"model {text!r} not found: give a preset ({', '.join(PRESETS)}), models:/NAME@ALIAS, models:/NAME/VERSION, "
        f"runs:/RUN_ID/model, a checkpoint folder with {WEIGHTS}, or a .safetensors/.pth file")


def _from_preset(name: str, pretrained: str | Path | None, device: Any, overrides: dict[str, Any]) -> ViTPose:
    from .pretrained import build_overrides, load_pretrained

    model = build_model(name, device=device, **{**(build_overrides(pretrained) if pretrained else {}), **overrides})
    if pretrained is not None:  # the report rides on the model (the Trainer logs it to the run)
        model.init_report = load_pretrained(model, pretrained, echo=True)
    model.meta = _with_keypoints({"spec": model.spec.to_dict()}, model.spec.num_keypoints)
    return model


def _from_files(weights: Path, meta: dict[str, Any], device: Any, overrides: dict[str, Any],
                official: bool = False) -> ViTPose:
    """A trained model from its weights file and the meta stored beside it (spec, keypoints, lineage)."""
    state, file_spec = read_checkpoint(weights)
    spec = meta.get("spec") or (file_spec.to_dict() if file_spec else infer_spec_from_state_dict(state).to_dict())
    model = build_model_from_spec({**spec, **overrides}, device=device)
    if official or overrides:  # a file from elsewhere, or a changed input size: resized where it can be, and said
        load_checkpoint(model, weights)
    else:
        model.load_state_dict(state, strict=True)
    keep = {k: v for k, v in meta.items() if k != "spec"}  # keypoints, lineage (source, teacher, trial)
    model.meta = _with_keypoints({"spec": model.spec.to_dict(), **keep}, model.spec.num_keypoints)
    return model.eval()


def _with_keypoints(meta: dict[str, Any], num_keypoints: int) -> dict[str, Any]:
    # Weights saved without their dataset's keypoint definition (an official .pth, a bare .safetensors) get
    # COCO's for 17 keypoints; the meta records that it was assumed.
    if "keypoints" not in meta:
        from vitpose.data.keypoints import default_keypoint_info

        meta["keypoints"] = default_keypoint_info(num_keypoints)
        meta["keypoints_assumed"] = True
    return meta


def download_model(uri: str, tracking_uri: str | None) -> Path:
    """The local folder of an MLflow model URI (``models:/NAME@ALIAS``, ``runs:/...``) from the store
    ``tracking_uri`` resolves to; a store that cannot be reached or a model it lacks is a ``ModelNotFoundError``
    that names both."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from vitpose.run.tracking import check_tracking_uri, resolve_tracking_uri

    resolved = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(resolved)  # an unreachable server is a clear error here, not a "model not found"
    mlflow.set_tracking_uri(resolved)  # the registry of a models:/ URI is the global tracking store's
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        first = (err.message.splitlines()[0] if err.message else str(err)).rstrip(".")
        raise ModelNotFoundError(f"model {uri!r} not found in the MLflow store {resolved}: {first}. Check the name, "
                                 f"alias or version (mlflow ui --backend-store-uri {resolved}), or point "
                                 "MLFLOW_TRACKING_URI at the store that holds the model") from None


def _download(uri: str, tracking_uri: str | None) -> Path:
    folder = download_model(uri, tracking_uri)
    if not (folder / "artifacts" / META).is_file():
        raise ModelNotFoundError(f"{uri} is not a vitpose pose model (no artifacts/{META}); ONNX exports are served "
                                 "by onnxruntime, not loaded here; register with vitpose.deploy.serving.log_vitpose_model")
    return folder

"""The teacher side of distillation: the teacher read by ``vitpose.models.create``, narrowed to the student's
dataset when it is a multi-dataset (ViTPose+) model, so the rest of distillation (tokens, bank, online teacher)
sees a plain single-dataset teacher; its keypoints checked against the student's; frozen.
"""

from __future__ import annotations

from typing import Any

import torch

from vitpose.config import ConfigError


def check_same_keypoints(teacher_meta: dict[str, Any], dataset: Any, teacher_uri: str) -> None:
    """The student learns the teacher's heatmaps channel by channel, so both must be the same keypoint set (same
    names in the same order): a COCO teacher cannot teach a CrowdPose student, even with 14 of its joints."""
    info = teacher_meta.get("keypoints") or {}
    names = info.get("names")
    theirs = list(dataset.keypoint_names)
    if names is not None and list(names) != theirs:
        ours = getattr(getattr(dataset, "keypoint_set", None), "name", "?")
        pairs = zip(names, theirs, strict=False)  # lists of different lengths differ where the shorter ends
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(names), len(theirs)))
        raise ConfigError(
            f"teacher {teacher_uri} predicts keypoint set {info.get('set', '?')!r} ({len(names)} keypoints: "
            f"{', '.join(names[:4])}, ...) but the student's data {dataset.ann_file} is read as set {ours!r} "
            f"({len(theirs)}: {', '.join(theirs[:4])}, ...), first difference at keypoint #{first}; teacher and "
            f"student must share a set: set data.keypoints={info.get('set', ours)} on data with the teacher's keypoints"
        )


def teacher_for_student(teacher: torch.nn.Module, keypoints: str, teacher_uri: str) -> torch.nn.Module:
    """The single-dataset teacher (``create``'s model, its ``meta`` with it) of the dataset whose keypoint set is
    ``keypoints`` (the student's data.keypoints): its head and expert. A single-dataset teacher is returned as
    it is."""
    from vitpose.models.multi_dataset import dataset_meta, export_dataset

    spec, meta = teacher.spec, teacher.meta
    if not spec.datasets:
        return teacher
    per = (meta.get("keypoints") or {}).get("datasets") or []
    sets = [info.get("set") for info in per]
    if len(sets) != len(spec.datasets):
        raise ConfigError(f"teacher {teacher_uri} is a multi-dataset model without the keypoint set of each dataset "
                          "in its meta (keypoints.datasets): it cannot say which head teaches a student")
    matches = [d for d, s in enumerate(sets) if s == keypoints]
    listed = ", ".join(f"{n} ({s})" for (n, _), s in zip(spec.datasets, sets, strict=True))
    if len(matches) != 1:
        why = "none has" if not matches else "several have"
        raise ConfigError(f"teacher {teacher_uri} has datasets {listed}: {why} the student's keypoint set "
                          f"{keypoints!r} (data.keypoints); set data.keypoints to one dataset's set")
    narrowed = export_dataset(teacher, matches[0])
    narrowed.meta = dataset_meta(meta, spec, matches[0])
    return narrowed


def load_teacher(cfg: Any, tracking_uri: str | None, uri: str | None = None) -> torch.nn.Module:
    """The teacher of ``uri`` (default ``cfg.distill.teacher_uri``; ``model.meta`` with it), for the student's
    keypoint set."""
    from vitpose.models import create

    uri = uri or cfg.distill.teacher_uri
    return teacher_for_student(create(uri, tracking_uri=tracking_uri), cfg.data.keypoint_set().name, uri)


def pinned(uri: str, tracking_uri: str) -> str:
    """``models:/NAME@ALIAS`` as the version the alias points at now (``models:/NAME/VERSION``), so a sweep
    and what it registers name the teacher it used even after the alias moves; other URIs as they are."""
    import re

    import mlflow
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if match is None:
        return uri
    try:
        version = mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(*match.groups()).version
    except MlflowException:
        return uri  # loading it names what is missing, with the fix
    return f"models:/{match.group(1)}/{version}"


def teacher_identity(pinned_uri: str, weights: bytes | torch.nn.Module) -> str:
    """``<pinned uri>#<digest of the weights' safetensors bytes>``: names exactly the weights token files and
    view banks were made with (``weights``: those bytes, or the model to serialise)."""
    import hashlib

    if isinstance(weights, torch.nn.Module):
        from safetensors.torch import save

        weights = save({k: v.contiguous() for k, v in weights.state_dict().items()})
    return f"{pinned_uri}#{hashlib.sha256(weights).hexdigest()[:12]}"


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BatchNorm statistics and drop path fixed) and no gradients anywhere."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

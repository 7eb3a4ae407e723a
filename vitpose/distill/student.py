"""The student side of distillation: a frozen teacher, a student carrying knowledge tokens, and the loss.

``build_student`` puts stored knowledge tokens into a student (frozen); ``distill_loss`` is the ground-truth
heatmap MSE plus a weighted MSE to the teacher's heatmaps, read from the view bank
(``batch["teacher_heatmaps"]``) or computed online by the teacher. ``load_teacher`` reads the teacher; a
multi-dataset (ViTPose+) teacher is narrowed to the student's dataset first (``teacher_for_student``), so the
rest of distillation (tokens, bank, online teacher) sees a plain single-dataset teacher.
"""

from __future__ import annotations

from typing import Any

import torch

from vitpose.build import build_model_from_config
from vitpose.config import ConfigError
from vitpose.losses import heatmap_distill_mse, keypoint_mse


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


def teacher_for_student(teacher: torch.nn.Module, meta: dict[str, Any], keypoints: str,
                        teacher_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The single-dataset teacher of the dataset whose keypoint set is ``keypoints`` (the student's
    data.keypoints): its head and expert (models/multi.py). A single-dataset teacher is returned as it is."""
    from vitpose.models.multi_dataset import dataset_meta, export_dataset

    spec = teacher.spec
    if not spec.datasets:
        return teacher, meta
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
    return export_dataset(teacher, matches[0]), dataset_meta(meta, spec, matches[0])


def load_teacher(cfg: Any, tracking_uri: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher of ``cfg.distill.teacher_uri`` and its meta, for the student's keypoint set."""
    from vitpose.deploy.model_store import load_vitpose

    teacher, meta = load_vitpose(cfg.distill.teacher_uri, tracking_uri)
    return teacher_for_student(teacher, meta, cfg.data.keypoint_set().name, cfg.distill.teacher_uri)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BatchNorm statistics and drop path fixed) and no gradients anywhere."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_student(cfg: Any, tokens: torch.Tensor | None) -> torch.nn.Module:
    """The student of ``cfg.model`` with frozen knowledge tokens (in its own width) when given."""
    if tokens is None:
        return build_model_from_config(cfg)
    model = build_model_from_config(cfg, num_knowledge_tokens=tokens.shape[0])
    model.backbone.set_knowledge_tokens(tokens, trainable=False)
    return model


def distill_loss(output_weight: float, teacher: torch.nn.Module | None = None):
    """GT loss + ``output_weight`` x MSE to teacher heatmaps (from the batch, else ``teacher`` online)."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        heatmaps = model(batch["image"])
        gt = keypoint_mse(heatmaps, batch["target"], batch["target_weight"])
        if output_weight <= 0:
            return gt, {"gt_loss": float(gt.detach())}
        if "teacher_heatmaps" in batch:
            target = batch["teacher_heatmaps"]
        elif teacher is not None:
            images = batch["image"]
            if next(teacher.parameters()).device != images.device:
                teacher.to(images.device)  # once: the trial's device (a GPU share under tune.gpus_per_trial)
            with torch.no_grad():
                target = teacher(images.float())
        else:
            raise RuntimeError("output distillation needs a view bank or an online teacher")
        kd = heatmap_distill_mse(heatmaps, target, output_weight)
        return gt + kd, {"gt_loss": float(gt.detach()), "kd_loss": float(kd.detach())}

    return loss_fn

"""The student side of distillation: a frozen teacher, a student carrying knowledge tokens, and the loss.

``build_student`` puts stored knowledge tokens into a student (frozen); ``distill_loss`` is the ground-truth
heatmap MSE plus a weighted MSE to the teacher's heatmaps, read from the view bank
(``batch["teacher_heatmaps"]``) or computed online by the teacher.
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

"""The student side of distillation: a student carrying knowledge tokens, and the loss.

``build_student`` puts stored knowledge tokens into a student (frozen); ``distill_loss`` is the ground-truth
heatmap MSE plus a weighted MSE to the teacher's heatmaps, read from the view bank
(``batch["teacher_heatmaps"]``) or computed online by the teacher (``vitpose.distill.teacher``).
"""

from __future__ import annotations

from typing import Any

import torch

from vitpose.build import build_model_from_config
from vitpose.losses import heatmap_distill_mse, keypoint_mse


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
                teacher.to(images.device)  # once: the trial's device (a GPU share under tune.gpus_per_worker)
            with torch.no_grad():
                target = teacher(images.float())
        else:
            raise RuntimeError("output distillation needs a view bank or an online teacher")
        kd = heatmap_distill_mse(heatmaps, target, output_weight)
        return gt + kd, {"gt_loss": float(gt.detach()), "kd_loss": float(kd.detach())}

    return loss_fn

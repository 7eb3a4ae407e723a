"""The student side of distillation: a student carrying knowledge tokens, and the loss.

``build_student`` puts stored knowledge tokens into a student (frozen); ``distill_loss`` is the ground-truth
heatmap MSE plus a weighted MSE to the teacher's heatmaps, read from the view bank
(``batch["teacher_heatmaps"]``) or computed online by the teacher (``vitpose.distill.teacher``), optionally
over confident joints only and with a weight that decays over training.
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


def distill_loss(output_weight: float, teacher: torch.nn.Module | None = None, *, schedule: str = "constant",
                 min_confidence: float = 0.0) -> DistillLoss:
    """GT loss + ``output_weight`` x MSE to teacher heatmaps (from the batch, else ``teacher`` online)."""
    return DistillLoss(output_weight, teacher, schedule, min_confidence)


class DistillLoss:
    """``(model, batch) -> (loss, parts)``: the ground-truth heatmap MSE plus the weighted MSE to the teacher's
    heatmaps over the joints whose teacher peak reaches ``min_confidence`` (0: all joints). ``schedule``
    ``linear_decay`` lowers the weight linearly from ``output_weight`` in the first epoch towards 0 after the last
    (DWPose's weight decay); the trainer calls ``set_progress`` before every epoch."""

    def __init__(self, output_weight: float, teacher: torch.nn.Module | None, schedule: str, min_confidence: float):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.output_weight, self.teacher, self.schedule = output_weight, teacher, schedule
        self.min_confidence = min_confidence
        self.weight = output_weight  # this epoch's

    def set_progress(self, epoch: int, epochs: int) -> None:
        if self.schedule == "linear_decay":
            self.weight = self.output_weight * (1.0 - epoch / max(epochs, 1))

    def teacher_targets(self, batch: dict[str, Any]) -> torch.Tensor:
        if "teacher_heatmaps" in batch:
            return batch["teacher_heatmaps"]
        if self.teacher is None:
            raise RuntimeError("output distillation needs a view bank or an online teacher")
        images = batch["image"]
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)  # once: the trial's device (a GPU share under tune.gpus_per_worker)
        with torch.no_grad():
            return self.teacher(images.float())

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        heatmaps = model(batch["image"])
        gt = keypoint_mse(heatmaps, batch["target"], batch["target_weight"])
        if self.output_weight <= 0:
            return gt, {"gt_loss": float(gt.detach())}
        target = self.teacher_targets(batch)
        if self.min_confidence > 0:
            # A joint the teacher hardly sees (hidden, or a detector's false box) teaches nothing but noise.
            keep = target.detach().float().amax(dim=(2, 3), keepdim=True) >= self.min_confidence
            heatmaps, target = heatmaps * keep, target * keep
        kd = heatmap_distill_mse(heatmaps, target, self.weight)
        return gt + kd, {"gt_loss": float(gt.detach()), "kd_loss": float(kd.detach())}


SCHEDULES = ("constant", "linear_decay")

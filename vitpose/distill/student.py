"""The student side of distillation: a student carrying knowledge tokens, and the loss.

``build_student`` puts stored knowledge tokens into a student (frozen) and, for feature distillation, a projector
to the teacher's width; ``distill_loss`` is the ground-truth heatmap MSE plus weighted MSEs to the teacher's
heatmaps and last tokens, read from the view bank (``batch["teacher_heatmaps"]``, ``batch["teacher_features"]``)
or computed online by the teacher (``vitpose.distill.teacher``), optionally over confident joints only and with
weights that decay over training.
"""

from __future__ import annotations

from typing import Any

import torch

from vitpose.build import build_model_from_config
from vitpose.losses import feature_distill_mse, heatmap_distill_mse, keypoint_mse


def build_student(cfg: Any, tokens: torch.Tensor | None, teacher_width: int = 0) -> torch.nn.Module:
    """The student of ``cfg.model`` with frozen knowledge tokens (in its own width) when given, and a feature
    projector to ``teacher_width`` when ``distill.feature.weight`` is on."""
    if tokens is None:
        model = build_model_from_config(cfg)
    else:
        model = build_model_from_config(cfg, num_knowledge_tokens=tokens.shape[0])
        model.backbone.set_knowledge_tokens(tokens, trainable=False)
    if cfg.distill.feature.weight > 0:
        if teacher_width <= 0:
            raise ValueError("feature distillation needs the teacher's width (teacher_width)")
        model.add_feature_projector(teacher_width)
    return model


def distill_loss(output_weight: float, teacher: torch.nn.Module | None = None, *, schedule: str = "constant",
                 min_confidence: float = 0.0, feature_weight: float = 0.0,
                 second_stage: tuple[int, float] = (0, 0.0)) -> DistillLoss:
    """GT loss + ``output_weight`` x MSE to teacher heatmaps (from the batch, else ``teacher`` online) +
    ``feature_weight`` x MSE of the student's projected tokens to the teacher's; ``second_stage`` (epochs,
    weight): the last epochs train the head on GT + weight x MSE to the student's own heatmaps."""
    return DistillLoss(output_weight, teacher, schedule, min_confidence, feature_weight, second_stage)


class DistillLoss:
    """``(model, batch) -> (loss, parts)``: the ground-truth heatmap MSE, plus the weighted MSE to the teacher's
    heatmaps over the joints whose teacher peak reaches ``min_confidence`` (0: all joints), plus the weighted MSE
    of the student's tokens (through its feature projector) to the teacher's last tokens. ``schedule``
    ``linear_decay`` lowers both teacher weights linearly from their value in the first epoch towards 0 after
    the last (DWPose's weight decay); the trainer calls ``set_progress`` before every epoch.

    In the last ``second_stage_epochs`` epochs (DWPose's second stage) the loss is the GT MSE plus ``self_weight``
    x the MSE to the heatmaps of ``own``, the student as it was when the stage began, which the trainer hands
    over (``begin_second_stage``) when ``frozen_backbone`` turns true; it then also freezes the backbone."""

    def __init__(self, output_weight: float, teacher: torch.nn.Module | None, schedule: str, min_confidence: float,
                 feature_weight: float = 0.0, second_stage: tuple[int, float] = (0, 0.0)):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.output_weight, self.feature_weight = output_weight, feature_weight
        self.teacher, self.schedule, self.min_confidence = teacher, schedule, min_confidence
        self.second_stage_epochs, self.self_weight = second_stage
        self.factor = 1.0  # this epoch's share of the weights
        self.frozen_backbone = False  # in the second stage
        self.own: torch.nn.Module | None = None

    @property
    def weight(self) -> float:
        """This epoch's output-distillation weight."""
        return self.output_weight * self.factor

    def set_progress(self, epoch: int, epochs: int) -> None:
        if self.schedule == "linear_decay":
            self.factor = 1.0 - epoch / max(epochs, 1)
        self.frozen_backbone = self.second_stage_epochs > 0 and epoch >= epochs - self.second_stage_epochs

    def begin_second_stage(self, own: torch.nn.Module) -> None:
        """The student as the second stage found it (frozen): its heatmaps are the stage's targets."""
        self.own = own

    def teacher_targets(self, batch: dict[str, Any], features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's heatmaps and, when ``features``, its last tokens: the bank's, else the online teacher's."""
        if "teacher_heatmaps" in batch and (not features or "teacher_features" in batch):
            return batch["teacher_heatmaps"], batch.get("teacher_features") if features else None
        if self.teacher is None:
            what = "tokens (a bank built with distill.feature.weight > 0)" if features else "heatmaps"
            raise RuntimeError(f"distillation needs the teacher's {what}: from a view bank or an online teacher")
        images = batch["image"]
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)  # once: the trial's device (a GPU share under tune.gpus_per_worker)
        with torch.no_grad():
            if features:
                return self.teacher(images.float(), with_features=True)
            return self.teacher(images.float()), None

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.frozen_backbone:
            return self.second_stage_loss(model, batch)
        features = self.feature_weight > 0
        if features:
            heatmaps, tokens = model(batch["image"], with_features=True)
        else:
            heatmaps = model(batch["image"])
        gt = keypoint_mse(heatmaps, batch["target"], batch["target_weight"])
        parts = {"gt_loss": float(gt.detach())}
        if self.output_weight <= 0 and not features:
            return gt, parts
        target, teacher_tokens = self.teacher_targets(batch, features)
        loss = gt
        if self.output_weight > 0:
            if self.min_confidence > 0:
                # A joint the teacher hardly sees (hidden, or a detector's false box) teaches nothing but noise.
                keep = target.detach().float().amax(dim=(2, 3), keepdim=True) >= self.min_confidence
                heatmaps, target = heatmaps * keep, target * keep
            kd = heatmap_distill_mse(heatmaps, target, self.weight)
            loss, parts["kd_loss"] = loss + kd, float(kd.detach())
        if features:
            fd = feature_distill_mse(tokens, teacher_tokens, self.feature_weight * self.factor)
            loss, parts["feature_loss"] = loss + fd, float(fd.detach())
        return loss, parts

    def second_stage_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.own is None:
            raise RuntimeError("the second stage began without the student's own copy (begin_second_stage)")
        heatmaps = model(batch["image"])
        gt = keypoint_mse(heatmaps, batch["target"], batch["target_weight"])
        with torch.no_grad():
            own = self.own(batch["image"].float())
        self_kd = heatmap_distill_mse(heatmaps, own, self.self_weight)
        return gt + self_kd, {"gt_loss": float(gt.detach()), "self_kd_loss": float(self_kd.detach())}


SCHEDULES = ("constant", "linear_decay")

"""Training losses: keypoint heatmap MSE with target weights, and heatmap distillation.

Shapes: heatmaps (B, K, h, w), target weights (B, K). Losses are computed in float32 whatever the
model's precision, so bf16 training does not lose the small per-pixel differences.
"""

from __future__ import annotations

import torch


def keypoint_mse(pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """The paper's loss: MSE of (pred·w, gt·w), averaged over pixels, joints and the batch.

    Equals mmpose's JointsMSELoss(use_target_weight=True): per-joint MSE, then the mean over joints.
    """
    if pred.shape != target.shape:
        raise ValueError(f"heatmap shapes differ: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
    w = target_weight.float()[:, :, None, None]
    return ((pred.float() - target.float()) * w).pow(2).mean()


def heatmap_distill_mse(student: torch.Tensor, teacher: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Output distillation: MSE between student and (detached) teacher heatmaps over all joints."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student heatmaps {tuple(student.shape)} and teacher heatmaps {tuple(teacher.shape)} differ: "
            "teacher and student need the same input size and keypoint set"
        )
    return weight * (student.float() - teacher.detach().float()).pow(2).mean()


def feature_distill_mse(student: torch.Tensor, teacher: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Feature distillation: MSE between the student's projected tokens and the (detached) teacher's last tokens,
    both (B, C, Hp, Wp); a student token grid of another size is resized to the teacher's (bilinear)."""
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
                         "differ in batch or channels: the student's projector must map to the teacher's width")
    if student.shape[2:] != teacher.shape[2:]:
        student = torch.nn.functional.interpolate(student.float(), size=teacher.shape[2:], mode="bilinear",
                                                  align_corners=False)
    return weight * (student.float() - teacher.detach().float()).pow(2).mean()

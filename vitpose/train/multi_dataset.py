"""The training loop's multi-dataset parts: the per-dataset loss and per-dataset evaluation (the mixed loaders
are ``train/loaders.py``'s).

Used by ``Trainer`` when its training set is a ``MixedTrainSet`` (data/multi_dataset.py). The loss of each sample
goes through its own dataset's head (and expert): the model's per-sample routing returns one heatmap tensor
per dataset; each dataset's keypoint MSE over its own K joints is weighted by its share of the batch, so the
total is the mean per-sample loss. Evaluation runs every val set through its own head and reports
``val/<name>/<metric>``, and the primary (first) dataset's metrics again as ``val/<metric>`` (model selection,
ASHA and the progress line keep reading ``val/AP``).
"""

from __future__ import annotations

from typing import Any

import torch

from vitpose.losses import keypoint_mse


def is_mixed(train_ds: Any) -> bool:
    return hasattr(train_ds, "batch_sampler") and hasattr(train_ds, "keypoint_sets")


def mixed_loss(names: list[str]):
    """``(model, batch) -> (loss, parts)`` of a mixed batch; parts ``<name>/loss`` per dataset."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        index = batch["dataset_index"]
        per_dataset = model(batch["image"], index)
        total = torch.zeros((), device=batch["image"].device)
        parts = {}
        for d, heatmaps in enumerate(per_dataset):
            rows = index == d
            k = heatmaps.shape[1]
            loss = keypoint_mse(heatmaps, batch["target"][rows][:, :k], batch["target_weight"][rows][:, :k])
            total = total + loss * (rows.sum() / len(index))
            parts[f"{names[d]}/loss"] = float(loss.detach())
        return total, parts

    return loss_fn


def evaluate_datasets(trainer: Any, epoch: int) -> dict[str, float]:
    """``val/<name>/...`` per dataset through its own head; ``val/...`` the primary's (see the module doc)."""
    metrics: dict[str, float] = {}
    val = trainer.val_ds
    for d, (name, ds, loader) in enumerate(zip(val.names, val.datasets, trainer.loaders.val, strict=True)):
        got = trainer.evaluate_one(loader, ds, d, epoch, draw=d == 0)
        metrics.update({f"val/{name}/{k[len('val/'):]}": v for k, v in got.items()})
        if d == 0:
            metrics.update(got)
    return metrics

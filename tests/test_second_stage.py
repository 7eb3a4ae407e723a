"""DWPose's second stage, inside a student's training: for its last epochs the backbone stays where the first
stage left it and the head trains on the ground truth plus the student's own heatmaps from the stage's start."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_config
from vitpose.config import ConfigError, StudentConfig, load_config
from vitpose.distill.student import distill_loss
from vitpose.train.loop import Trainer
from vitpose.train.session import LocalSession


def split(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the frozen part's weights: patch and position embeddings and blocks, the rest's), copied."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    frozen = ("backbone.patch_embed.", "backbone.pos_embed", "backbone.blocks.")
    return ({k: v for k, v in state.items() if k.startswith(frozen)},
            {k: v for k, v in state.items() if not k.startswith(frozen)})


@pytest.mark.parametrize("zero", [0, 2])  # ZeRO-2's optimizer holds flat partitions: the groups' lr must reach them
def test_the_second_stage_trains_the_head_towards_the_students_own_heatmaps(trained_teacher, tmp_path, zero):
    teacher, teacher_cfg, (train_ds, _) = trained_teacher
    cfg = tiny_config(teacher_cfg.data.root, "train.precision=fp32", f"deepspeed.zero_stage={zero}", "train.epochs=2",
                      "train.lr=2e-3", "train.warmup_iters=0", "distill.second_stage.epochs=1", student=True)
    student = copy.deepcopy(teacher).train().requires_grad_(True)  # a trained model: its heatmaps mean something
    loss_fn = distill_loss(0.0, second_stage=(1, 0.5))
    trainer = Trainer(cfg, LocalSession(tmp_path / "run"), model=student, loss_fn=loss_fn,
                      datasets=(train_ds, train_ds))
    trainer.train_epoch(0, 2, max_steps=2)  # the first stage: everything learns
    assert not loss_fn.frozen_backbone and loss_fn.own is None
    backbone, rest = split(trainer.engine.module)
    trainer.train_epoch(1, 2, max_steps=4)
    assert loss_fn.frozen_backbone
    own_backbone, own_rest = split(loss_fn.own)  # the student as the stage found it
    assert all(torch.equal(own_backbone[k], v) for k, v in backbone.items())
    assert all(torch.equal(own_rest[k], v) for k, v in rest.items())
    after_backbone, after_rest = split(trainer.engine.module)
    assert all(torch.equal(after_backbone[k], v) for k, v in backbone.items()), "the backbone moved"
    moved = [k for k, v in rest.items() if not torch.equal(after_rest[k], v)]
    assert "keypoint_head.final_layer.weight" in moved and "backbone.last_norm.weight" in moved

    # The stage's loss: GT + 0.5 x MSE to the stage-start heatmaps, far from zero once the head has moved.
    items = [train_ds[i] for i in range(8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "target", "target_weight")}
    model = trainer.engine.module.eval()
    loss, parts = loss_fn(model, batch)
    with torch.no_grad():
        heatmaps, own = model(batch["image"]), loss_fn.own(batch["image"])
        gt = ((heatmaps - batch["target"]) * batch["target_weight"][:, :, None, None]).pow(2).mean()
        self_kd = 0.5 * (heatmaps - own).pow(2).mean()
    assert set(parts) == {"gt_loss", "self_kd_loss"}
    assert parts["self_kd_loss"] == pytest.approx(self_kd.item(), rel=1e-4)
    assert loss.item() == pytest.approx(gt.item() + self_kd.item(), rel=1e-4)
    assert own.amax() > 0.3 and self_kd > 1e-5  # a trained model's heatmaps; the head moved from them (5.7e-4 measured)


def test_a_second_stage_longer_than_training_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="distill.second_stage.epochs=6 must be below train.epochs=6"):
        load_config(None, ["train.epochs=6", "distill.second_stage.epochs=6"], StudentConfig)

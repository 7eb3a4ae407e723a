"""Feature distillation against a trained teacher: the loss term, what it teaches, the teacher's tokens in the
view bank, and the projector's life (trained and checkpointed with the student, never in its exported weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import tiny_config
from vitpose.distill.bank import BankedViews, ViewBank
from vitpose.distill.student import build_student, distill_loss
from vitpose.models import build_model, create
from vitpose.models.vitpose import FEATURE_PROJECTOR
from vitpose.train.loop import Trainer
from vitpose.train.run_folder import MODEL_FILE
from vitpose.train.session import LocalSession

QUIET = {"say": lambda _: None}


def student_with_projector(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("vitpose_pico", img_size=(64, 48), patch_size=8)  # width 64: the projector maps 64 -> 96
    model.add_feature_projector(width)
    return model


def crops(dataset, indices) -> dict[str, torch.Tensor]:
    items = [dataset[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "target", "target_weight")}


def test_the_feature_term_is_the_mse_of_projected_student_tokens_to_the_teachers(trained_teacher):
    teacher, _, (train_ds, _) = trained_teacher
    student = student_with_projector(teacher.spec.embed_dim).eval()
    batch = crops(train_ds, range(8))
    gt_only = distill_loss(0.0)(student, batch)[0]
    online, parts = distill_loss(0.0, teacher, feature_weight=0.5)(student, batch)
    with torch.no_grad():
        heatmaps, teacher_tokens = teacher(batch["image"], with_features=True)
        own = student.feature_projector(student.backbone(batch["image"]))
    assert teacher_tokens.shape == (8, 96, 8, 6) and own.shape == teacher_tokens.shape
    by_hand = 0.5 * (own - teacher_tokens).pow(2).mean()
    assert by_hand > 10 * gt_only  # the term is far above the ground-truth loss: dropping it shows below
    assert parts["feature_loss"] == pytest.approx(by_hand.item(), rel=1e-4)
    assert online.item() == pytest.approx(gt_only.item() + by_hand.item(), rel=1e-4)
    banked, _ = distill_loss(0.0, feature_weight=0.5)(student, {**batch, "teacher_heatmaps": heatmaps,
                                                                  "teacher_features": teacher_tokens})
    assert banked.item() == pytest.approx(online.item(), rel=1e-4)
    with pytest.raises(RuntimeError, match=r"needs the teacher.s tokens \(a bank built with distill.feature.weight > 0"):
        distill_loss(0.0, feature_weight=0.5)(student, {**batch, "teacher_heatmaps": heatmaps})


def test_feature_distillation_teaches_the_students_tokens_what_the_teacher_sees_in_each_crop(trained_teacher):
    """Trained on the feature term alone, the student's projected tokens of unseen crops come far closer to the
    teacher's than the best crop-independent guess (the teacher's mean tokens): it learned per-crop content."""
    teacher, _, (train_ds, val_ds) = trained_teacher
    student = student_with_projector(teacher.spec.embed_dim)
    loss_fn = distill_loss(0.0, teacher, feature_weight=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    val = crops(val_ds, range(48))
    with torch.no_grad():
        target = teacher(val["image"], with_features=True)[1]
    mean_guess = (target - target.mean(dim=0, keepdim=True)).pow(2).mean().item()

    def val_mse() -> float:
        with torch.no_grad():
            return (student(val["image"], with_features=True)[1] - target).pow(2).mean().item()

    before = val_mse()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = crops(train_ds, torch.randint(len(train_ds), (16,), generator=g).tolist())
        loss, parts = loss_fn(student, {**batch, "target_weight": torch.zeros_like(batch["target_weight"])})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = val_mse()
    assert set(parts) == {"gt_loss", "feature_loss"} and parts["gt_loss"] == 0
    assert after < 0.5 * mean_guess < before, (before, mean_guess, after)
    # Only the backbone and the projector learn from it: the head gets no gradient from the teacher's tokens.
    assert all(p.grad is None or not p.grad.any() for p in student.keypoint_head.parameters())


def test_the_bank_stores_the_teachers_tokens_of_each_view_when_asked(trained_teacher, tmp_path):
    teacher, _, (train_ds, _) = trained_teacher
    plain = ViewBank.build(teacher, train_ds, 2, 3, tmp_path / "bank", "t", **QUIET)
    assert plain.features is None
    with pytest.raises(ValueError, match="holds no teacher tokens"):
        BankedViews(train_ds, plain, seed=0, features=True)
    bank = ViewBank.build(teacher, train_ds, 2, 3, tmp_path / "bank", "t", features=True, **QUIET)  # rebuilt
    assert bank.features.shape == (len(train_ds), 2, 96, 8, 6) and bank.info["features"] is True
    assert ViewBank.build(teacher, train_ds, 2, 3, tmp_path / "bank", "t", **QUIET).features is not None  # reused
    banked = BankedViews(train_ds, bank, seed=0, features=True)
    for index in (0, 7):
        item = banked[index]
        with torch.no_grad():
            tokens = teacher(item["image"][None], with_features=True)[1][0]
        torch.testing.assert_close(item["teacher_features"], tokens, atol=2e-2, rtol=1e-2)  # float16 storage
        other = bank.features[index, 1 - item["view"]].astype(np.float32)
        assert np.abs(other - tokens.numpy()).max() > 0.5  # the other view's tokens: a mix-up would fail above
    assert "teacher_features" not in BankedViews(train_ds, bank, seed=0)[0]  # only for the arms that read them


def test_the_projector_trains_with_the_student_and_stays_out_of_its_weights(trained_teacher, tmp_path):
    teacher, teacher_cfg, (train_ds, _) = trained_teacher
    cfg = tiny_config(teacher_cfg.data.root, "model.preset=vitpose_pico", "train.precision=fp32",
                      "deepspeed.zero_stage=0", "distill.feature.weight=1.0", student=True)
    student = build_student(cfg, None, teacher.spec.embed_dim)
    start = student.feature_projector.weight.detach().clone()
    trainer = Trainer(cfg, LocalSession(tmp_path / "run"), model=student,
                      loss_fn=distill_loss(0.0, teacher, feature_weight=1.0), datasets=(train_ds, train_ds))
    trainer.train_epoch(0, 1, max_steps=3)
    assert not torch.equal(trainer.engine.module.feature_projector.weight.detach(), start)  # it is optimised
    trainer.save_checkpoint(tmp_path / "ckpt", 0, {})
    with safe_open(str(tmp_path / "ckpt" / MODEL_FILE), "pt") as f:
        keys = list(f.keys())
    assert "keypoint_head.final_layer.weight" in keys and not any(k.startswith(FEATURE_PROJECTOR) for k in keys)
    served = create(tmp_path / "ckpt")  # the weights alone rebuild the student, as serving and export do
    assert not hasattr(served, FEATURE_PROJECTOR) and served.spec.embed_dim == 64
    with pytest.raises(ValueError, match="teacher's width"):
        build_student(cfg, None)

"""Knowledge tokens, students with projected tokens, the view bank, and the sweep's search space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vitpose.build import build_datasets
from vitpose.config import ConfigError
from vitpose.distill.bank import BankedViews, ViewBank
from vitpose.distill.space import apply_params, search_space, token_settings
from vitpose.distill.student import build_student, distill_loss
from vitpose.distill.tokens import TokenSetting, ensure_knowledge_tokens, learn_knowledge_tokens, load_tokens
from vitpose.models import build_model
from vitpose.train.loop import Trainer
from vitpose.train.session import LocalSession


@pytest.fixture(scope="module")
def datasets(synthetic_root):
    return build_datasets(tiny_config(synthetic_root), is_local_leader=True)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("vitpose_tiny", img_size=(64, 48), patch_size=8).eval()  # the tests' data: patch 8


def test_token_learning_changes_only_the_tokens(teacher, datasets, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    setting = TokenSetting(num_tokens=2, epochs=1, lr=5e-2, batch_size=16)
    torch.manual_seed(1)
    learned = learn_knowledge_tokens(teacher, datasets[0], setting, say=lambda _: None)
    torch.manual_seed(1)
    untrained = learn_knowledge_tokens(teacher, datasets[0], TokenSetting(2, 1, 1e-12, batch_size=16),
                                       say=lambda _: None)
    assert learned.shape == (2, teacher.spec.embed_dim)
    assert not torch.allclose(learned, untrained), "tokens did not move"
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    path = ensure_knowledge_tokens(teacher, "teacher-a", datasets[0], setting, tmp_path, say=lambda _: None)
    assert torch.equal(load_tokens(path), load_tokens(
        ensure_knowledge_tokens(teacher, "teacher-a", datasets[0], setting, tmp_path, say=lambda _: None)))


def test_student_with_projected_tokens_trains(synthetic_root, datasets, tmp_path):
    tokens = torch.randn(2, 192)  # a wider teacher's tokens: the student (96 wide) projects them
    cfg = tiny_config(synthetic_root, "deepspeed.zero_stage=0", "train.epochs=2", student=True)
    student = build_student(cfg, tokens)
    proj_before = student.backbone.knowledge_tokens.proj.weight.detach().clone()
    session = LocalSession(tmp_path)
    trainer = Trainer(cfg, session, model=student, loss_fn=distill_loss(0.0), datasets=datasets)
    trainer.fit()
    module = trainer.engine.module
    assert torch.equal(module.backbone.knowledge_tokens.tokens.detach(), tokens), "frozen tokens moved"
    assert not torch.equal(module.backbone.knowledge_tokens.proj.weight.detach(), proj_before)
    assert session.reports[-1]["train/loss"] < session.reports[0]["train/loss"]


def test_view_bank_equals_online_teacher(teacher, datasets, tmp_path):
    train_ds = datasets[0]
    bank = ViewBank.build(teacher, train_ds, views=2, seed=3, folder=tmp_path / "bank", teacher_id="t",
                          batch_size=16, say=lambda _: None)
    assert bank.heatmaps.shape == (len(train_ds), 2, 17, *train_ds.heatmap_size)
    assert bank.info["teacher_forwards"] == 2 * len(train_ds)
    for index, view in [(0, 0), (5, 1), (len(train_ds) - 1, 1)]:
        params = ViewBank.view_params(train_ds, index, view, seed=3)
        with torch.no_grad():
            online = teacher(train_ds.load(index, params)["image"][None])[0].numpy()
        np.testing.assert_allclose(bank.heatmaps[index, view].astype(np.float32), online, atol=2e-3, rtol=1e-2)

    banked = BankedViews(train_ds, bank, seed=0)
    item = banked[5]
    again = banked[5]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["teacher_heatmaps"], again["teacher_heatmaps"])
    with torch.no_grad():
        online = teacher(item["image"][None])[0]
    torch.testing.assert_close(item["teacher_heatmaps"], online, atol=2e-3, rtol=1e-2)
    assert banked.keypoint_names == train_ds.keypoint_names
    # A second build with the same inputs reuses the bank instead of paying for the teacher again.
    assert ViewBank.build(teacher, train_ds, 2, 3, tmp_path / "bank", "t", say=lambda _: None).info == bank.info


def test_distill_loss_adds_weighted_heatmap_term(teacher):
    model = build_model("vitpose_nano", img_size=(64, 48), patch_size=8).eval()
    batch = {"image": torch.randn(2, 3, 64, 48), "target": torch.rand(2, 17, 32, 24),
             "target_weight": torch.ones(2, 17)}
    gt_only, parts = distill_loss(0.0)(model, batch)
    assert set(parts) == {"gt_loss"}
    online, parts = distill_loss(2.0, teacher)(model, batch)
    with torch.no_grad():
        kd = (model(batch["image"]) - teacher(batch["image"])).pow(2).mean() * 2.0
    assert online.item() == pytest.approx(gt_only.item() + kd.item(), rel=1e-5)
    banked, _ = distill_loss(2.0)(model, {**batch, "teacher_heatmaps": teacher(batch["image"]).detach()})
    assert banked.item() == pytest.approx(online.item(), rel=1e-5)


def test_search_space_and_trial_configs(synthetic_root):
    cfg = tiny_config(synthetic_root, student=True)
    space = search_space(cfg)
    assert space["distill.parts"] == {"grid_search": ["none", "token", "output", "both"]}
    trial = apply_params(cfg, {"distill.parts": "output", "train.lr": 1e-3})
    assert (trial.distill.token.enabled, trial.distill.output.enabled, trial.train.lr) == (False, True, 1e-3)
    assert len(token_settings(cfg)) == 1

    empty = tiny_config(synthetic_root, "tune.search_space={}", student=True)
    with pytest.raises(ConfigError, match="search_space is empty"):
        search_space(empty)
    bad_key = tiny_config(synthetic_root, "tune.search_space={train.lrr: {choice: [1]}}", student=True)
    with pytest.raises(ConfigError, match="'train.lrr' is not a config key"):
        search_space(bad_key)
    sampled_tokens = tiny_config(synthetic_root, "tune.search_space={distill.token.num_tokens: {uniform: [1, 4]}}",
                                 student=True)
    with pytest.raises(ConfigError, match="token settings must be grid or choice"):
        search_space(sampled_tokens)
    grid = tiny_config(synthetic_root, "tune.search_space={distill.token.num_tokens: {grid: [1, 2]}}", student=True)
    assert [s.num_tokens for s in token_settings(grid)] == [1, 2]


def test_sweep_plot_follows_each_trial_and_marks_stopped_ones(tmp_path):
    from types import SimpleNamespace

    import pandas as pd
    from PIL import Image

    from vitpose.distill.sweep import plot_sweep, trial_curves

    def result(parts: str, aps: list[float]) -> SimpleNamespace:
        frame = pd.DataFrame({"epoch": range(1, len(aps) + 1), "val/AP": aps})
        return SimpleNamespace(metrics_dataframe=frame, config={"distill.parts": parts}, metrics={})

    curves = trial_curves([result("both", [0.1, 0.2, 0.3, 0.4]), result("token", [0.1, 0.15])], "val/AP")
    assert curves == {"parts=both": [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)], "parts=token": [(1, 0.1), (2, 0.15)]}
    table = pd.DataFrame({"config/distill.parts": ["both", "token"], "val/AP": [0.4, 0.15], "epoch": [4, 2]})
    path = plot_sweep(table, "val/AP", tmp_path / "sweep.png", curves, epochs=4)
    with Image.open(path) as im:
        assert im.size[0] > 2 * im.size[1]  # the per-epoch panel beside the per-setting one


def test_student_initialisation_follows_train_seed(synthetic_root):
    """Arms of one comparison start from the same weights for a seed, and seeds differ: the initialisation is
    part of what a seed reproduces, whatever the process drew from the RNG before."""
    cfg = tiny_config(synthetic_root, student=True)
    first = build_student(cfg, None).state_dict()
    torch.randn(1000)  # other work in between must not matter
    again = build_student(cfg, None).state_dict()
    other = build_student(tiny_config(synthetic_root, "train.seed=1", student=True), None).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    weights = [k for k in first if k.endswith("weight") and first[k].ndim > 1]
    assert all(not torch.equal(first[k], other[k]) for k in weights)

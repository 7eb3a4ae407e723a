"""Knowledge tokens (fixed mapping, control tokens), frozen-token students, the view bank against the trained
teacher it stores, the distillation loss, and the sweep's search space and preparations."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.conftest import REPO, tiny_config
from vitpose.build import build_datasets
from vitpose.config import ConfigError
from vitpose.distill.bank import BankedViews, ViewBank, view_stream
from vitpose.distill.space import apply_params, arm_configs, preparation, search_space, trial_preparations
from vitpose.distill.student import build_student, distill_loss
from vitpose.distill.tokens import (
    TokenSetting,
    ensure_knowledge_tokens,
    learn_knowledge_tokens,
    load_tokens,
    random_tokens,
    token_effect,
)
from vitpose.models import build_model
from vitpose.train.loop import Trainer
from vitpose.train.session import LocalSession


@pytest.fixture(scope="module")
def datasets(synthetic_root):
    return build_datasets(tiny_config(synthetic_root), is_local_leader=True)


class Untouchable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        raise AssertionError("the tokens were learned again instead of read from their file")

    def __getitem__(self, i: int) -> None:
        raise AssertionError("the tokens were learned again instead of read from their file")


def test_token_learning_changes_only_the_tokens(trained_teacher, tmp_path):
    teacher, _, datasets = trained_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    setting = TokenSetting(num_tokens=2, epochs=1, lr=5e-2, batch_size=16)
    learned = learn_knowledge_tokens(teacher, datasets[0], setting, say=lambda _: None)
    assert learned.shape == (2, teacher.spec.embed_dim)
    # Learning starts from the control arm's tokens and moves far from them.
    start = random_tokens(setting, teacher.spec.embed_dim)
    assert (learned - start).abs().max() > 0.02, "tokens did not move"
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # What --plan reports: the frozen teacher's val loss with the learned tokens against the random control.
    effect = token_effect(teacher, datasets[1], setting, learned)
    assert effect["learned"] < effect["random"] and effect["change"] == effect["learned"] / effect["random"] - 1
    assert token_effect(teacher, datasets[1], setting, start)["change"] == 0.0

    path = ensure_knowledge_tokens(teacher, "teacher-a", datasets[0], setting, tmp_path, say=lambda _: None)
    first, stamp = load_tokens(path), path.stat().st_mtime_ns
    # Reused, not learned again: the second call has no data it could learn from, and the file stays as it was.
    again = ensure_knowledge_tokens(teacher, "teacher-a", Untouchable(), setting, tmp_path, say=lambda _: None)
    assert again == path and path.stat().st_mtime_ns == stamp and torch.equal(load_tokens(again), first)


def test_tokens_for_a_narrower_student_are_learned_in_its_width(trained_teacher):
    """A 64-wide student's tokens are learned as 64-wide tokens entering the 96-wide teacher through the fixed
    lift: what the student receives is what was optimised."""
    teacher, _, datasets = trained_teacher
    setting = TokenSetting(num_tokens=1, epochs=1, lr=5e-2, batch_size=16, width=64)
    learned = learn_knowledge_tokens(teacher, datasets[0], setting, say=lambda _: None)
    assert learned.shape == (1, 64)
    assert (learned - random_tokens(setting, 64)).abs().max() > 0.02


def test_student_with_frozen_tokens_trains_and_keeps_them(synthetic_root, datasets, tmp_path):
    cfg = tiny_config(synthetic_root, "deepspeed.zero_stage=0", "train.epochs=2", student=True)
    tokens = torch.randn(2, 96)
    student = build_student(cfg, tokens)
    kt = student.backbone.knowledge_tokens
    assert sum(p.numel() for p in kt.parameters() if p.requires_grad) == 0  # nothing trainable on the way in
    session = LocalSession(tmp_path)
    trainer = Trainer(cfg, session, model=student, loss_fn=distill_loss(0.0), datasets=datasets)
    trainer.fit()
    assert torch.equal(trainer.engine.module.backbone.knowledge_tokens.tokens.detach().float(), tokens)
    assert session.reports[-1]["train/loss"] < session.reports[0]["train/loss"]
    with pytest.raises(ValueError, match="do not fit this backbone"):
        build_student(cfg, torch.randn(2, 192))  # teacher-width tokens: refused, never silently projected


def test_view_bank_stores_the_trained_teachers_heatmaps_of_each_view(trained_teacher, tmp_path):
    teacher, _, (train_ds, _) = trained_teacher
    bank = ViewBank.build(teacher, train_ds, views=2, seed=3, folder=tmp_path / "bank", teacher_id="t",
                          batch_size=16, say=lambda _: None)
    assert bank.heatmaps.shape == (len(train_ds), 2, 17, *train_ds.heatmap_size)
    assert bank.info["teacher_forwards"] == 2 * len(train_ds)
    tol = 2e-3  # float16 storage of values <= 1: at most ~5e-4
    for index in (0, 5, len(train_ds) - 1):
        online = []
        for view in (0, 1):
            params = ViewBank.view_params(train_ds, index, view, seed=3)
            with torch.no_grad():
                online.append(teacher(train_ds.load(index, params)["image"][None])[0].numpy())
            stored = bank.heatmaps[index, view].astype(np.float32)
            np.testing.assert_allclose(stored, online[view], atol=tol, rtol=0)
        assert online[0].max() > 100 * tol  # heatmaps of a trained teacher, far above the tolerance
        # The other view's heatmaps miss by far more than the tolerance: a view mix-up would fail above.
        assert np.abs(bank.heatmaps[index, 0].astype(np.float32) - online[1]).max() > 20 * tol

    banked = BankedViews(train_ds, bank, seed=0)
    item, again = banked[5], banked[5]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["teacher_heatmaps"], again["teacher_heatmaps"])
    with torch.no_grad():
        online = teacher(item["image"][None])[0]
    torch.testing.assert_close(item["teacher_heatmaps"], online, atol=tol, rtol=0)
    assert banked.keypoint_names == train_ds.keypoint_names
    # A second build with the same inputs reuses the bank instead of paying for the teacher again.
    assert ViewBank.build(teacher, train_ds, 2, 3, tmp_path / "bank", "t", say=lambda _: None).info == bank.info


def test_distill_loss_adds_the_weighted_heatmap_term(trained_teacher):
    teacher, cfg, (train_ds, _) = trained_teacher
    torch.manual_seed(0)
    student = build_model("vitpose_nano", img_size=(64, 48), patch_size=8).eval()
    items = [train_ds[i] for i in range(8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "target", "target_weight")}
    gt_only, parts = distill_loss(0.0)(student, batch)
    assert set(parts) == {"gt_loss"}
    online, parts = distill_loss(2.0, teacher)(student, batch)
    with torch.no_grad():
        kd = (student(batch["image"]) - teacher(batch["image"])).pow(2).mean() * 2.0
    assert kd > 0.5 * gt_only  # a term of the loss's own size: dropping or mis-weighting it shows below
    assert online.item() == pytest.approx(gt_only.item() + kd.item(), rel=1e-4)
    assert parts["kd_loss"] == pytest.approx(kd.item(), rel=1e-4)
    banked, _ = distill_loss(2.0)(student, {**batch, "teacher_heatmaps": teacher(batch["image"]).detach()})
    assert banked.item() == pytest.approx(online.item(), rel=1e-4)


class _Heatmaps(torch.nn.Module):
    """A 'student' whose heatmaps are one leaf tensor: the gradient the loss sends to each joint is read off it."""

    def __init__(self, heatmaps: torch.Tensor):
        super().__init__()
        self.heatmaps = torch.nn.Parameter(heatmaps.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heatmaps


def test_only_the_joints_the_teacher_sees_teach(trained_teacher):
    """min_confidence: a joint whose teacher peak is below it sends the student no gradient; the others do."""
    teacher, _, (train_ds, _) = trained_teacher
    items = [train_ds[i] for i in range(16)]
    images = torch.stack([it["image"] for it in items])
    with torch.no_grad():
        target = teacher(images)
        start = build_model("vitpose_nano", img_size=(64, 48), patch_size=8).eval()(images)
    peaks = target.amax(dim=(2, 3))
    threshold = float(peaks.median())  # about half the joints of these crops
    batch = {"image": images, "target": torch.zeros_like(target), "target_weight": torch.zeros(peaks.shape),
             "teacher_heatmaps": target}  # no ground truth: what moves the student is the teacher's term alone
    student = _Heatmaps(start)
    loss, _ = distill_loss(1.0, min_confidence=threshold)(student, batch)
    loss.backward()
    pushed = student.heatmaps.grad.abs().sum(dim=(2, 3)) > 0
    assert torch.equal(pushed, peaks >= threshold)
    assert 0.3 < pushed.float().mean() < 0.7 and peaks.max() > 0.3  # a trained teacher: peaks far above noise


def test_a_decaying_distillation_weight_follows_the_trainers_epochs(trained_teacher, tmp_path):
    teacher, cfg, (train_ds, _) = trained_teacher
    items = [train_ds[i] for i in range(8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "target", "target_weight")}
    student = build_model("vitpose_nano", img_size=(64, 48), patch_size=8).eval()
    constant, decaying = distill_loss(2.0, teacher), distill_loss(2.0, teacher, schedule="linear_decay")
    kd = constant(student, batch)[1]["kd_loss"]
    for epoch, share in ((0, 1.0), (2, 0.5), (3, 0.25)):
        decaying.set_progress(epoch, 4)
        assert decaying(student, batch)[1]["kd_loss"] == pytest.approx(share * kd, rel=1e-5)
    assert kd > 1e-4  # a trained teacher's heatmaps against an untrained student's: far from zero
    trainer = Trainer(cfg, LocalSession(tmp_path), model=student, loss_fn=decaying, datasets=(train_ds, train_ds))
    trainer.train_epoch(3, 8, max_steps=1)
    assert decaying.weight == pytest.approx(2.0 * (1 - 3 / 8))


def test_search_space_arms_and_trial_configs(synthetic_root):
    cfg = tiny_config(synthetic_root, student=True)
    space = search_space(cfg)
    assert space["distill.parts"] == {"grid_search": ["none", "token", "output", "both", "unlabeled"]}
    trial = apply_params(cfg, {"distill.parts": "output", "train.lr": 1e-3})
    assert (trial.distill.token.enabled, trial.distill.output.enabled, trial.train.lr) == (False, True, 1e-3)
    control = apply_params(cfg, {"distill.parts": "random_token"})
    assert (control.distill.token.enabled, control.distill.token.random, control.distill.output.enabled) == (
        True, True, False)
    assert list(arm_configs(cfg)) == ["none", "token", "output", "both", "unlabeled"]
    # The demo's unlabeled arm has its own settings (tune.arm_settings): the unlabelled split and feature
    # distillation; the paper's arms keep to the labelled crops and the heatmaps.
    arms = arm_configs(cfg)
    assert [(a.distill.unlabeled.ratio, a.distill.feature.weight) for a in arms.values()] == [(0.0, 0.0)] * 4 + [
        (0.6, 0.001)]
    assert json.loads(preparation(arms["unlabeled"])[1])["features"] is True
    # A sweep that does not search the arms runs the base config's: tokens and heatmaps of labelled crops only.
    lr_only = tiny_config(synthetic_root, "tune.search_space={train.lr: {grid: [0.001]}}", student=True)
    assert list(arm_configs(lr_only)) == ["both"]
    # Every arm trains on the same views: bank mode gives them all the same bank.
    assert len({json.dumps(view_stream(c), sort_keys=True) for c in arm_configs(cfg).values()}) == 1
    # Feature distillation on in the base config: every arm but none (the student alone) learns the teacher's
    # tokens, whatever order the trial's values come in; its arms need banks that also hold them.
    featured = tiny_config(synthetic_root, "distill.feature.weight=0.001", student=True)
    weights = {arm: c.distill.feature.weight for arm, c in arm_configs(featured).items()}
    assert weights == {"none": 0.0, "token": 0.001, "output": 0.001, "both": 0.001, "unlabeled": 0.001}
    assert apply_params(featured, {"distill.feature.weight": 0.01, "distill.parts": "none"}).distill.feature.weight == 0
    assert json.loads(preparation(arm_configs(featured)["output"])[1])["features"] is True
    assert "features" not in json.loads(preparation(arm_configs(featured)["none"])[1])
    # The unlabeled arm: output distillation plus the unlabeled crops; every other arm keeps to the labelled ones,
    # a searched ratio notwithstanding; without an unlabeled set it is refused by name.
    both_sets = tiny_config(synthetic_root, "distill.unlabeled.images=frames", "distill.unlabeled.boxes=boxes.json",
                            "distill.unlabeled.ratio=0.4", "tune.arm_settings={}", student=True)
    assert apply_params(both_sets, {"distill.parts": "unlabeled"}).distill.unlabeled.ratio == 0.4
    assert apply_params(both_sets, {"distill.unlabeled.ratio": 0.7, "distill.parts": "output"}).distill.unlabeled.ratio == 0
    with pytest.raises(ConfigError, match="'unlabeled' arm needs an unlabeled set: set distill.unlabeled.images"):
        apply_params(tiny_config(synthetic_root, "distill.unlabeled={}", student=True), {"distill.parts": "unlabeled"})
    # An arm's settings: a typo in the arm or the key is named; a key both searched and set by an arm is refused.
    for sets, message in ((["tune.arm_settings={unlabelled: {train.lr: 0.1}}"], "arm_settings.unlabelled: not an arm"),
                          (["tune.arm_settings={output: {train.lrr: 0.1}}"], "arm_settings.output: 'train.lrr' is not"),
                          (["tune.search_space={distill.parts: {grid: [none, unlabeled]}, distill.feature.weight: "
                            "{grid: [0, 0.01]}}"], "arm_settings.unlabeled.distill.feature.weight: the sweep also")):
        with pytest.raises(ConfigError, match=message):
            search_space(tiny_config(synthetic_root, *sets, student=True))
    lr_arm = tiny_config(synthetic_root, "tune.arm_settings={output: {train.lr: 0.1}}", student=True)
    assert apply_params(lr_arm, {"distill.parts": "output", "train.batch_size": 4}).train.lr == 0.1
    assert apply_params(lr_arm, {"distill.parts": "both"}).train.lr == lr_arm.train.lr

    empty = tiny_config(synthetic_root, "tune.search_space={}", student=True)
    with pytest.raises(ConfigError, match="search_space is empty"):
        search_space(empty)
    bad_key = tiny_config(synthetic_root, "tune.search_space={train.lrr: {choice: [1]}}", student=True)
    with pytest.raises(ConfigError, match="'train.lrr' is not a config key"):
        search_space(bad_key)


def test_preparations_follow_every_searched_key_that_changes_tokens_or_bank(synthetic_root):
    """One learned-token file and one bank per distinct (seed, batch, views, ...) the trials can ask for;
    a sampled key that would change them is refused by name; keys that do not (train.lr) cost nothing."""
    cfg = tiny_config(synthetic_root, student=True)
    # Arms without learned tokens share the bank; token arms add tokens; the unlabeled arm its set and features.
    assert len(trial_preparations(cfg)) == 1 + 1 + 1
    seeds = tiny_config(synthetic_root, "tune.search_space={distill.parts: {grid: [none, token]}, "
                        "train.seed: {grid: [0, 1]}, train.lr: {loguniform: [1.0e-4, 1.0e-3]}}", student=True)
    preps = [preparation(c) for c in trial_preparations(seeds)]
    assert len(preps) == 4 and len({p[1] for p in preps}) == 2  # two seeds: two banks, each with and without tokens
    assert {p[0].seed for p in preps if p[0]} == {0, 1}
    views = tiny_config(synthetic_root, "tune.search_space={distill.output.views: {grid: [1, 2]}, "
                        "data.aug.rotation_factor: {choice: [0.0, 30.0]}}", student=True)
    assert len({preparation(c)[1] for c in trial_preparations(views)}) == 4
    # A one-value grid prepares for its value, not the base config's (seed 0 here).
    one = tiny_config(synthetic_root, "tune.search_space={distill.parts: {grid: [none, token]}, "
                      "train.seed: {grid: [3]}}", student=True)
    assert {c.train.seed for c in trial_preparations(one)} == {3}
    assert {p[0].seed for p in map(preparation, trial_preparations(one)) if p[0]} == {3}
    grid = tiny_config(synthetic_root, "tune.search_space={distill.token.num_tokens: {grid: [1, 2]}}", student=True)
    assert sorted(p[0].num_tokens for p in map(preparation, trial_preparations(grid))) == [1, 2]
    for key, values in (("train.seed", "[0, 4]"), ("distill.token.num_tokens", "[1, 4]"),
                        ("data.aug.scale_factor", "[0.1, 0.4]"), ("train.batch_size", "[4, 8]")):
        sampled = tiny_config(synthetic_root, f"tune.search_space={{{key}: {{uniform: {values}}}}}", student=True)
        with pytest.raises(ConfigError, match=f"tune.search_space.{key}: a uniform value changes"):
            trial_preparations(sampled)
    online = tiny_config(synthetic_root, "distill.output.mode=online", "tune.search_space={train.seed: "
                         "{uniform: [0, 4]}, distill.parts: {grid: [none, output]}}", student=True)
    assert [preparation(c) for c in trial_preparations(online)] == [(None, None)]  # nothing to prepare


def test_sweep_plot_follows_each_trial_and_marks_stopped_ones(tmp_path):
    from types import SimpleNamespace

    import pandas as pd
    from PIL import Image

    from vitpose.distill.report import plot_sweep, trial_curves

    def result(parts: str, aps: list[float]) -> SimpleNamespace:
        frame = pd.DataFrame({"epoch": range(1, len(aps) + 1), "val/AP": aps})
        return SimpleNamespace(metrics_dataframe=frame, config={"distill.parts": parts}, metrics={})

    curves = trial_curves([result("both", [0.1, 0.2, 0.3, 0.4]), result("token", [0.1, 0.15])], "val/AP")
    assert curves == {"parts=both": [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)], "parts=token": [(1, 0.1), (2, 0.15)]}
    table = pd.DataFrame({"config/distill.parts": ["both", "token"], "val/AP": [0.4, 0.15], "epoch": [4, 2]})
    path = plot_sweep(table, "val/AP", tmp_path / "sweep.png", curves, epochs=4)
    with Image.open(path) as im:
        assert im.size[0] > 2 * im.size[1]  # the per-epoch panel beside the per-setting one
        width = im.size[0]
    from vitpose.distill.stats import Setting

    seeded = [Setting({"distill.parts": "both"}, {0: 0.4, 1: 0.42}), Setting({"distill.parts": "token"}, {0: 0.15, 1: 0.2})]
    path = plot_sweep(table, "val/AP", tmp_path / "seeded.png", curves, epochs=4, settings=seeded)
    with Image.open(path) as im:
        assert im.size[0] > width * 1.3  # a third panel: each setting's mean and interval over its seeds


def test_student_initialisation_follows_train_seed(synthetic_root):
    """Arms of one comparison start from the same weights for a seed, and seeds differ: the initialisation is
    part of what a seed reproduces, whatever the process drew from the RNG before."""
    cfg = tiny_config(synthetic_root, student=True)
    first = build_student(cfg, None).state_dict()
    torch.randn(1000)  # other work in between must not matter
    again = build_student(cfg, None).state_dict()
    other = build_student(tiny_config(synthetic_root, "train.seed=1", student=True), None).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    with_tokens = build_student(cfg, torch.randn(1, 96)).state_dict()  # the token arms start from the same weights
    assert with_tokens.keys() - first.keys() == {"backbone.knowledge_tokens.tokens"}
    assert all(torch.equal(first[k], with_tokens[k]) for k in first)
    weights = [k for k in first if k.endswith("weight") and first[k].ndim > 1]
    assert all(not torch.equal(first[k], other[k]) for k in weights)


def test_only_asha_sweeps_must_evaluate_every_epoch(synthetic_root, tmp_path, monkeypatch):
    from vitpose.distill.sweep import preflight

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="ASHA compares trials on val AP every epoch"):
        preflight(tiny_config(synthetic_root, "train.eval_every=4", student=True))
    fifo = tiny_config(synthetic_root, "train.eval_every=4", "tune.scheduler=fifo", student=True)
    assert preflight(fifo) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def _sparse_evaluation_trial(config):
    from vitpose.train.session import TuneSession

    session = TuneSession("val/AP")
    for epoch in range(1, 5):  # evaluated every second epoch, as train.eval_every=2 does
        metrics = {"epoch": epoch, "train/loss": 1.0 / epoch}
        if epoch % 2 == 0:
            metrics["val/AP"] = epoch / 10
        session.report(metrics, None)


@pytest.mark.slow
def test_a_tune_trial_that_evaluates_every_other_epoch_reports_its_evaluated_epochs(tmp_path):
    """Tune refuses a result without the sweep's metric; a FIFO sweep with train.eval_every > 1 must run."""
    import tempfile

    import ray
    from ray import tune

    ray_tmp = tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=ray_tmp)
    try:
        results = tune.Tuner(_sparse_evaluation_trial, tune_config=tune.TuneConfig(metric="val/AP", mode="max"),
                             run_config=tune.RunConfig(storage_path=str(tmp_path), name="sparse")).fit()
    finally:
        ray.shutdown()
    assert not results.errors, results.errors
    best = results.get_best_result()
    assert list(best.metrics_dataframe["epoch"]) == [2, 4] and best.metrics["val/AP"] == pytest.approx(0.4)


def _declining_trial(config):
    """Val AP that falls after epoch 1: the trial ASHA stops at epoch 1 shows a higher number than the
    trial that finishes."""
    from ray import tune

    for epoch, ap in enumerate(config["curve"], 1):
        tune.report({"epoch": epoch, "val/AP": ap})


@pytest.mark.slow
def test_the_champion_is_chosen_among_trials_that_trained_every_epoch(tmp_path):
    import tempfile

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from vitpose.distill.sweep import champion

    ray_tmp = tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=ray_tmp)
    try:
        asha = ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)
        results = tune.Tuner(_declining_trial, param_space={"curve": tune.grid_search([[0.5, 0.3, 0.3, 0.3],
                                                                                      [0.4, 0.2, 0.2, 0.2]])},
                             tune_config=tune.TuneConfig(metric="val/AP", mode="max", scheduler=asha,
                                                         max_concurrent_trials=1),
                             run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha")).fit()
    finally:
        ray.shutdown()
    reached = sorted((r.metrics["epoch"], r.metrics["val/AP"]) for r in results)
    assert reached == [(1, 0.4), (4, 0.3)]  # the second trial stopped at epoch 1, above the finished one's 0.3
    assert results.get_best_result(metric="val/AP", mode="max", scope="last").metrics["val/AP"] == 0.4
    best = champion(results, "val/AP", epochs=4)
    assert (best.metrics["epoch"], best.metrics["val/AP"]) == (4, 0.3)


def test_settings_over_seeds_give_means_intervals_and_an_honest_significance_line():
    from vitpose.distill.stats import group_by_setting, interval, paired, verdict

    trials = [({"distill.parts": arm, "train.seed": s}, ap) for arm, aps in
              (("none", [0.50, 0.52, 0.48]), ("output", [0.55, 0.58, 0.53]), ("copy", [0.50, 0.52, 0.48]))
              for s, ap in enumerate(aps)]
    settings = group_by_setting(trials)
    assert [s.label for s in settings] == ["distill.parts=none", "distill.parts=output", "distill.parts=copy"]
    mean, low, high = settings[1].stats
    assert mean == pytest.approx(0.5533333) and high - mean == pytest.approx(4.303 * 0.0251661 / 3 ** 0.5, rel=1e-4)
    assert interval([0.5])[0] == 0.5 and math.isnan(interval([0.5])[1])
    # Paired by seed: output beats none by 0.05, 0.06, 0.05, far narrower than either setting's own spread.
    diff, d_low, d_high, n = paired(settings[1], settings[0])
    assert n == 3 and diff == pytest.approx(0.0533333) and d_low > 0.03
    answer = verdict(settings, "distill.parts=none")
    assert answer["champion"] is settings[1]
    assert "over the baseline (distill.parts=none): +0.0533" in answer["leads"][1]
    assert answer["leads"][1].endswith(", beyond the interval")
    # Two identical settings: the lead of one over the other is never beyond the interval.
    twins = verdict([settings[0], settings[2]], None)
    assert twins["leads"][0].endswith("NOT beyond the interval")


def test_tune_seeds_run_every_setting_with_the_same_seeds(synthetic_root):
    from vitpose.distill.space import searched

    cfg = tiny_config(synthetic_root, "train.seed=5", "tune.seeds=3", student=True)
    assert searched(cfg)["train.seed"] == {"grid": [5, 6, 7]}
    assert search_space(cfg)["train.seed"] == {"grid_search": [5, 6, 7]}
    # Every seed's views are prepared: one bank per seed, tokens per seed for the token arms.
    assert {c.train.seed for c in trial_preparations(cfg)} == {5, 6, 7}
    both = tiny_config(synthetic_root, "tune.seeds=2", "tune.search_space={train.seed: {grid: [0, 1]}}", student=True)
    with pytest.raises(ConfigError, match="tune.seeds=2 and tune.search_space.train.seed both choose seeds"):
        searched(both)


STATE_API_PROBE = textwrap.dedent("""
    import json, os, subprocess, sys, ray
    from ray.util.state import list_nodes
    from vitpose.config import ConfigError
    from vitpose.run import cluster

    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1, "
                              "include_dashboard=False); print('up', flush=True); time.sleep(300)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"  # a second Ray on this machine, as in a test session
        cluster.connect(num_cpus=1)
        cluster.check_state_api("a sweep")
        ours = ray.get_runtime_context().get_node_id()
        # What Ray Train's placement-group cleaner does inside a worker: the state API with no address.
        seen = ray.get(ray.remote(lambda: [n.node_id for n in list_nodes(raise_on_missing_output=False)]).remote())
        # A cluster whose state API does not answer (Ray's clients read the variable before their argument).
        cluster._state_api = os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"
        try:
            cluster.check_state_api("tune.workers_per_trial=2 with tune.scheduler=asha")
            refused = ""
        except ConfigError as err:
            refused = str(err)
        cluster.disconnect()
    finally:
        other.terminate()
        other.wait()
    print(json.dumps({"ours": ours, "seen": seen, "refused": refused, "left": os.environ.get("RAY_API_SERVER_ADDRESS")}))
""")


@pytest.mark.slow
def test_workers_find_their_own_clusters_state_api_beside_another_ray():
    """Ray Train frees a stopped trial's ranks after asking the state API, from a worker, with no address: with a
    second Ray on the machine that asks which one; the local Ray tells its processes its own. A cluster whose
    state API does not answer is refused for multi-rank ASHA sweeps in one line."""
    out = subprocess.run([sys.executable, "-c", STATE_API_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["seen"] == [report["ours"]]
    assert "tune.scheduler=asha needs Ray's state API, which does not answer at http://127.0.0.1:9" in report["refused"]
    assert "--include-dashboard=true" in report["refused"] and report["left"] is None  # restored on disconnect

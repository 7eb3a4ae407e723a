"""Partial fine-tuning (model.freeze): what freezes, the optimizer groups, and a real training step."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from vitpose.build import build_model_from_config
from vitpose.config import ConfigError, load_config
from vitpose.models import build_model, freeze, frozen_parameter_names, param_groups_layer_decay


def test_freeze_marks_exactly_the_chosen_sublayers() -> None:
    model = build_model("vitpose_nano", img_size=(64, 48), patch_size=8)
    report = freeze(model, attention="all", mlp=[1])
    names = set(frozen_parameter_names(model))
    assert names == set(report.names)
    attn = {f"backbone.blocks.{b}.{m}.{p}" for b in range(3) for m, ps in
            (("norm1", ("weight", "bias")), ("attn.qkv", ("weight", "bias")), ("attn.proj", ("weight", "bias")))
            for p in ps}
    mlp = {f"backbone.blocks.1.{m}.{p}" for m in ("norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    assert names == attn | mlp
    assert report.num_params == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert report.summary().startswith("frozen: attention in blocks 0-2; mlp in blocks 1 (")
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in names)
    with pytest.raises(ValueError, match="model.freeze.mlp: blocks \\[3\\] do not exist; this backbone has blocks 0-2"):
        freeze(model, mlp=[3])


def test_optimizer_groups_hold_only_what_trains() -> None:
    model = build_model("vitpose_nano", img_size=(64, 48), patch_size=8)
    freeze(model, attention=[0, 2], embed=True)
    frozen = set(frozen_parameter_names(model))
    assert "backbone.pos_embed" in frozen and "backbone.patch_embed.proj.weight" in frozen
    grouped = [n for g in param_groups_layer_decay(model, lr=1e-3, weight_decay=0.1) for n in g["names"]]
    assert not frozen & set(grouped)
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters() if n not in frozen)


def test_config_freezes_and_rejects_blocks_past_the_depth() -> None:
    cfg = load_config(None, ["model.preset=vitpose_nano", "model.freeze={attention: all, mlp: [0]}"])
    model = build_model_from_config(cfg)
    assert model.freeze_report.blocks == {"attention": [0, 1, 2], "mlp": [0]}
    assert len(frozen_parameter_names(model)) == 3 * 6 + 6
    assert not hasattr(build_model_from_config(load_config(None, ["model.preset=vitpose_nano"])), "freeze_report")
    with pytest.raises(ConfigError, match="model.freeze.attention: blocks \\[3\\] do not exist; preset 'vitpose_nano'"):
        load_config(None, ["model.preset=vitpose_nano", "model.freeze.attention=[0, 3]"])
    with pytest.raises(ConfigError, match="freeze.mlp"):
        load_config(None, ["model.freeze.mlp=some"])


def test_frozen_parameters_do_not_move_in_training(synthetic_root, tmp_path) -> None:
    # The real loop: DeepSpeed engine, AdamW with weight decay over the layer-decay groups, three steps.
    import mlflow

    from vitpose.run.tracking import WorkerTracker
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    cfg = tiny_config(synthetic_root, "model.freeze={attention: [0, 2], mlp: [1]}", "deepspeed.zero_stage=0",
                      "train.precision=fp32", "train.max_steps_per_epoch=3", "train.lr=1e-2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("freeze")).info.run_id
    tracker = WorkerTracker(uri, run_id, background=False)
    trainer = Trainer(cfg, LocalSession(tmp_path), tracker=tracker)
    model = trainer.engine.module
    tracker.close()
    params = client.get_run(run_id).data.params  # the MLflow param, through the tracker's outbox
    assert params["model.frozen_params"] == str(model.freeze_report.num_params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = set(frozen_parameter_names(model))
    assert frozen == set(model.freeze_report.names) and len(frozen) == 2 * 6 + 6
    stats = trainer.train_epoch(0, 1)
    assert stats.steps == 3
    after = dict(model.named_parameters())
    for name, value in before.items():
        moved = not torch.equal(value, after[name].detach())
        assert moved == (name not in frozen), name


def test_zero3_trains_with_windows_and_frozen_blocks(synthetic_root, tmp_path) -> None:
    # ZeRO-3 builds the model partitioned (build_partitioned_model): the freeze and the window masks (buffers)
    # must survive that path, and the optimizer must take groups without the frozen parameters.
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    cfg = tiny_config(synthetic_root, "model.freeze={mlp: all}", "model.attention={kind: shift_pool_window, "
                      "window: [4, 4]}", "deepspeed.zero_stage=3", "train.max_steps_per_epoch=2")
    trainer = Trainer(cfg, LocalSession(tmp_path))
    assert trainer.stage == 3
    assert trainer.engine.module.freeze_report.blocks["mlp"] == [0, 1, 2]
    stats = trainer.train_epoch(0, 1)
    assert stats.steps == 2 and stats.loss == stats.loss  # finite: not NaN

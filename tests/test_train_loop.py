"""The per-worker engine run in-process (no Ray): schedule, training, exact resume, NaN handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from vitpose.train.loop import NonFiniteLossError, Trainer, gt_loss, lr_factor
from vitpose.train.run_folder import MODEL_FILE, newest_complete_checkpoint, verify_checkpoint
from vitpose.train.session import LocalSession


def test_lr_schedule_warmup_then_steps(synthetic_root):
    cfg = tiny_config(synthetic_root, "train.warmup_iters=10", "train.warmup_ratio=0.001",
                      "train.lr_steps=[3, 5]", "train.lr_gamma=0.1")
    assert lr_factor(0, 0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, 0, cfg) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, 0, cfg) == 1.0
    assert lr_factor(100, 3, cfg) == pytest.approx(0.1)
    assert lr_factor(100, 5, cfg) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "stage, sets",
    [
        # The tiny config trains in bf16 (DeepSpeed's bf16 wrappers over fp32 masters); fp32 runs AdamW unwrapped
        # at stage 0. Every stage steps the shipped torch AdamW with "fused": true (configs/deepspeed/zero*.json),
        # so a restored run continues from the fused optimizer's own state.
        (0, []),
        (0, ["train.precision=fp32"]),
        (1, []),
        (2, ["train.precision=fp32"]),
        (3, []),
        # Persistent loader processes (the epoch travels with each index) and drop path drawing from the
        # torch RNG: a resumed run must still draw what the uninterrupted one drew.
        (0, ["data.loader_workers=1", "model.drop_path_rate=0.1"]),
        # ZeRO-Offload: the optimizer state and step on the CPU in DeepSpeed's CPU Adam (built here with g++).
        (3, ["deepspeed.config=configs/deepspeed/zero3_offload.json"]),
    ],
    ids=["zero0", "zero0-fp32", "zero1", "zero2-fp32", "zero3", "zero0-loader-procs", "zero3-offload"],
)
def test_training_lowers_loss_and_resume_is_exact(synthetic_root, tmp_path, stage, sets):
    cfg = tiny_config(synthetic_root, "train.epochs=3", f"deepspeed.zero_stage={stage}", *sets)
    full = LocalSession(tmp_path / "full")
    uninterrupted = Trainer(cfg, full)
    uninterrupted.fit()
    losses = [r["train/loss"] for r in full.reports]
    assert losses[-1] < losses[0], losses
    assert len(full.checkpoints) == 3 and all("val/AP" in r for r in full.reports)
    meta = verify_checkpoint(full.checkpoints[-1])
    assert meta["epoch"] == 2 and meta["zero_stage"] == stage and (full.checkpoints[-1] / MODEL_FILE).is_file()

    # A new worker restored from the epoch-1 checkpoint continues at epoch 2 and ends where the
    # uninterrupted run ended: data order, augmentation and RNG are functions of (seed, epoch).
    resumed = LocalSession(tmp_path / "resumed", resume_from=full.checkpoints[0])
    trainer = Trainer(cfg, resumed)
    trainer.fit()
    assert trainer.start_epoch == 1
    if any("offload" in s for s in sets):  # the step really ran in DeepSpeed's CPU Adam, on offloaded state
        assert type(trainer.optimizer.optimizer).__name__ == "DeepSpeedCPUAdam"
    else:  # torch's fused AdamW, restored: its step count and moments end where the uninterrupted run's did
        opt = trainer.engine.basic_optimizer
        assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True, opt.defaults
        restored, reference = adam_state(trainer), adam_state(uninterrupted)
        assert restored and len(restored) == len(reference)
        for (step, m, v), (step_ref, m_ref, v_ref) in zip(restored, reference, strict=True):
            assert step == step_ref >= trainer.global_step
            torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-12)
    assert [r["epoch"] for r in resumed.reports] == [2, 3]
    assert resumed.reports[-1]["train/loss"] == pytest.approx(full.reports[-1]["train/loss"], rel=1e-5)
    history = json.loads((resumed.checkpoints[-1] / "meta.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]

    # Restored from the final checkpoint (a sweep driver killed before it recorded the last report): no
    # training, the final result is reported again with a checkpoint of the same weights.
    again = LocalSession(tmp_path / "again", resume_from=full.checkpoints[-1])
    final = Trainer(cfg, again).fit()
    assert again.reports == [final] and final["epoch"] == 3 and final["val/AP"] == full.reports[-1]["val/AP"]
    assert load_file(again.checkpoints[0] / MODEL_FILE).keys() == load_file(full.checkpoints[-1] / MODEL_FILE).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(again.checkpoints[0] / MODEL_FILE).values(),
                                                  load_file(full.checkpoints[-1] / MODEL_FILE).values(), strict=True))

    # What a restored Tune trial resumes from: the newest checkpoint that is complete.
    assert newest_complete_checkpoint(tmp_path / "full") == full.checkpoints[-1]
    (full.checkpoints[-1] / "rank0.complete").unlink()
    assert newest_complete_checkpoint(tmp_path / "full") == full.checkpoints[-2]


def adam_state(trainer: Trainer) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """(step, exp_avg, exp_avg_sq) of each tensor the torch AdamW inside DeepSpeed steps (the order its state was
    made in: group by group; ZeRO-3 swaps each sub-group's partition into the groups only for its step)."""
    return [(float(s["step"]), s["exp_avg"], s["exp_avg_sq"]) for s in trainer.engine.basic_optimizer.state.values()]


def test_incomplete_checkpoint_is_refused(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, "train.epochs=1", "deepspeed.zero_stage=0")
    session = LocalSession(tmp_path / "run")
    Trainer(cfg, session).fit()
    ckpt = session.checkpoints[0]
    (ckpt / "rank0.complete").unlink()
    with pytest.raises(RuntimeError, match="incomplete checkpoint"):
        verify_checkpoint(ckpt)


def nan_at(steps: set[int]):
    calls = {"n": 0}

    def loss_fn(model, batch):
        loss, parts = gt_loss(model, batch)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] in steps else loss), parts

    return loss_fn


def test_nonfinite_loss_is_skipped_and_counted(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, "train.epochs=1", "deepspeed.zero_stage=0", "train.on_nonfinite_loss=skip")
    session = LocalSession(tmp_path / "run")
    Trainer(cfg, session, loss_fn=nan_at({2})).fit()
    assert session.reports[-1]["train/nonfinite_skipped"] == 1
    state = load_file(str(session.checkpoints[-1] / MODEL_FILE))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_loss_stops_with_step_and_batch(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, "train.epochs=1", "deepspeed.zero_stage=0", "train.on_nonfinite_loss=error")
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2, batch 1 \(instances \["):
        Trainer(cfg, LocalSession(tmp_path / "run"), loss_fn=nan_at({2})).fit()


def test_too_many_nonfinite_skips_stop(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, "train.epochs=1", "deepspeed.zero_stage=0", "train.max_nonfinite_skips=1")
    with pytest.raises(NonFiniteLossError, match="exceed train.max_nonfinite_skips=1"):
        Trainer(cfg, LocalSession(tmp_path / "run"), loss_fn=nan_at({1, 2, 3})).fit()


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_training_saves_the_fp32_master_weights(synthetic_root, tmp_path, stage):
    cfg = tiny_config(synthetic_root, "train.epochs=1", "train.precision=bf16", f"deepspeed.zero_stage={stage}")
    session = LocalSession(tmp_path / "run")
    Trainer(cfg, session).fit()
    weights = load_file(str(session.checkpoints[-1] / MODEL_FILE))
    assert all(w.dtype == torch.float32 for w in weights.values())
    # Values a bf16 copy could not hold: the optimizer's masters were saved, not the rounded model.
    w = weights["backbone.blocks.0.mlp.fc1.weight"]
    assert not torch.equal(w, w.bfloat16().float())


def test_zero3_bf16_keeps_batchnorm_statistics_in_fp32(synthetic_root):
    """What the deepspeed floor in pyproject.toml rests on: DeepSpeed >= 0.19 honours the head's
    ``_keep_in_fp32_modules_strict`` under ``zero.Init``, so the statistics a bf16 run saves and resumes are
    fp32. An older DeepSpeed (or a floor below 0.19 resolving to one) turns them bf16 and this fails."""
    from vitpose.build import build_partitioned_model
    from vitpose.train.deepspeed_config import complete_deepspeed_config
    from vitpose.train.engine import init_comm

    init_comm()
    cfg = tiny_config(synthetic_root, "deepspeed.zero_stage=3", "train.precision=bf16")
    model = build_partitioned_model(cfg, complete_deepspeed_config(cfg, 1), rank=0)
    stats = {n: b.dtype for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert stats and set(stats.values()) == {torch.float32}, stats
    weights = {p.dtype for n, p in model.named_parameters() if n.startswith("backbone.blocks")}
    assert weights == {torch.bfloat16}  # the rest does train in bf16: the check is not vacuous


def test_deepspeeds_comm_layer_is_up_without_its_cpu_shared_memory_op():
    """Training's collectives go through torch.distributed: DeepSpeed's shared-memory all-reduce, which it would
    compile with g++ (~30 s) on the first use in each Python environment, is never built."""
    from deepspeed.comm import comm

    from vitpose.train.engine import init_comm

    init_comm()
    assert comm.cdb is not None and comm.cdb.is_initialized()
    assert comm.cdb.shm_comm_op is None

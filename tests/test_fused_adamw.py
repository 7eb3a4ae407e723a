"""The shipped DeepSpeed configs build torch's fused AdamW, and it trains as the for-loop AdamW they built
before did (issue 19, item 2).

DeepSpeed with ``optimizer.params.torch_adam: true`` constructs ``torch.optim.AdamW(groups, **the other
params)``, so ``"fused": true`` in configs/deepspeed/zero{0,1,2,3}.json reaches torch (the CPU fused kernel
exists since torch 2.4). Each stage wraps that AdamW differently (ZeRO-0 fp32: none; ZeRO-0 bf16: DeepSpeed's
unfused bf16 wrapper over fp32 masters; ZeRO 1-3: flat fp32 partitions), so every stage and precision is
checked: the fused kernel really runs, and the losses and weights follow the for-loop's within rounding.
Exact resume with the fused optimizer: tests/test_train_loop.py (its stage/resume tests run the shipped JSON).
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from tests.conftest import REPO, tiny_config
from vitpose.train.loop import Trainer, gt_loss
from vitpose.train.run_folder import gather_fp32_state_dict
from vitpose.train.session import LocalSession, NullSession

ADAM = importlib.import_module("torch.optim.adam")  # torch.optim.adam the module, not the class
STAGES = [0, 1, 2, 3]


def shipped_json(stage: int):
    return REPO / "configs" / "deepspeed" / f"zero{stage}.json"


def for_loop_json(stage: int, tmp_path):
    """The shipped JSON without ``fused``: torch's default AdamW, the for-loop on CPU (what shipped before)."""
    data = json.loads(shipped_json(stage).read_text())
    data["optimizer"]["params"].pop("fused", None)
    path = tmp_path / f"zero{stage}-for-loop.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def fused_calls(monkeypatch):
    """How many tensors each call of torch's fused Adam kernel got (``adam()`` looks ``_fused_adam`` up per call)."""
    calls: list[int] = []
    real = ADAM._fused_adam

    def spy(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(ADAM, "_fused_adam", spy)
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", STAGES)
def test_shipped_deepspeed_config_builds_fused_adamw(synthetic_root, fused_calls, stage, precision):
    cfg = tiny_config(synthetic_root, f"deepspeed.config={shipped_json(stage)}", f"train.precision={precision}",
                      "train.max_steps_per_epoch=2")
    trainer = Trainer(cfg, NullSession())
    assert trainer.stage == stage
    opt = trainer.engine.basic_optimizer  # the torch optimizer inside DeepSpeed's bf16 / ZeRO wrapper
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] is True and all(g["fused"] for g in opt.param_groups), opt.defaults
    fused_calls.clear()  # a wrapper may take a zero-gradient step while it is built
    trainer.train_epoch(0, 1)
    assert sum(fused_calls) > 0, "the engine's step did not reach torch's fused AdamW kernel"


def train_and_weights(cfg):
    """Losses of every step and the full fp32 weights (the masters under ZeRO 1-3) at 0, 1 and 12 steps."""
    losses: list[float] = []

    def loss_fn(model, batch):
        loss, parts = gt_loss(model, batch)
        losses.append(float(loss.detach()))
        return loss, parts

    trainer = Trainer(cfg, NullSession(), loss_fn=loss_fn)
    low = trainer.cfg.train.precision != "fp32"  # auto: as the worker picked
    weights = [gather_fp32_state_dict(trainer.engine, trainer.stage, low)]
    for epoch, steps in enumerate((1, 11)):
        trainer.train_epoch(epoch, 2, max_steps=steps)
        weights.append(gather_fp32_state_dict(trainer.engine, trainer.stage, low))
    return torch.tensor(losses), weights, trainer


def relative_to_movement(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over all trained weights: how far apart the two runs are against how far
    training moved them (a max abs difference would be ruled by near-zero gradients, whose Adam steps flip
    sign with any rounding: the same happens between 1 and 2 threads of the for-loop)."""
    keys = [k for k in a if "running_" not in k and "num_batches" not in k]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(b[k] - start[k]).flatten() for k in keys]).norm()
    return float(diff / moved)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", STAGES)
def test_fused_adamw_trains_as_the_for_loop(synthetic_root, tmp_path, stage, precision):
    sets = [f"train.precision={precision}", "train.warmup_iters=0", "train.epochs=2"]
    fused_losses, fused_w, fused_trainer = train_and_weights(
        tiny_config(synthetic_root, f"deepspeed.config={shipped_json(stage)}", *sets))
    loop_losses, loop_w, loop_trainer = train_and_weights(
        tiny_config(synthetic_root, f"deepspeed.config={for_loop_json(stage, tmp_path)}", *sets))
    assert fused_trainer.engine.basic_optimizer.defaults["fused"] is True
    assert not loop_trainer.engine.basic_optimizer.defaults["fused"]
    assert all(torch.equal(fused_w[0][k], loop_w[0][k]) for k in fused_w[0])  # the same start
    # One step from the same weights and gradients: the two kernels agree to rounding (measured <= 5e-6).
    assert relative_to_movement(fused_w[1], loop_w[1], loop_w[0]) < 1e-4
    # 12 steps: what is left is fp32 rounding carried through the model, no more than the for-loop's own
    # distance between 1 and 2 threads (measured: fp32 <= 1.5e-3 against 1.5e-3; bf16 <= 4.6e-3 against 8e-2).
    fp32 = precision == "fp32"
    assert len(fused_losses) == 12
    assert torch.allclose(fused_losses, loop_losses, rtol=1e-4 if fp32 else 1e-3, atol=0)
    assert relative_to_movement(fused_w[2], loop_w[2], loop_w[0]) < (1e-2 if fp32 else 5e-2)


@pytest.mark.parametrize("stage", [0, 3])
def test_for_loop_checkpoint_resumes_with_fused_adamw(synthetic_root, tmp_path, stage):
    """A run checkpointed before this change (the for-loop AdamW) continues under the fused shipped config:
    the optimizer's moments and step count load into the fused AdamW and training goes on where it was."""
    sets = ["train.epochs=2", "train.precision=fp32"]
    old = LocalSession(tmp_path / "old")
    Trainer(tiny_config(synthetic_root, f"deepspeed.config={for_loop_json(stage, tmp_path)}", *sets), old).fit()
    new = LocalSession(tmp_path / "new", resume_from=old.checkpoints[0])
    trainer = Trainer(tiny_config(synthetic_root, f"deepspeed.config={shipped_json(stage)}", *sets), new)
    trainer.fit()
    assert trainer.start_epoch == 1 and trainer.engine.basic_optimizer.defaults["fused"] is True
    steps = {float(s["step"]) for s in trainer.engine.basic_optimizer.state.values()}
    assert steps == {float(trainer.global_step)}, steps  # the restored count went on, not from 0
    assert new.reports[-1]["train/loss"] == pytest.approx(old.reports[-1]["train/loss"], rel=1e-4)

"""One process at ZeRO stage 0 trains without the gradient all-reduce (vitpose/train/lone_rank.py), and to the
same bits as with it; stages 1-3 keep their reduce, which fills their optimizer's partitions."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, tiny_config
from vitpose.train.loop import Trainer
from vitpose.train.run_folder import gather_fp32_state_dict
from vitpose.train.session import NullSession


def trained_weights(cfg, allreduce: bool | None) -> tuple[dict, dict, int, Trainer]:
    """Weights before and after 3 steps and how many times the engine all-reduced; ``allreduce`` forces the
    engine's switch back on (True) before training, None leaves the Trainer's choice."""
    trainer = Trainer(cfg, NullSession())
    engine, calls = trainer.engine, []
    low = trainer.cfg.train.precision != "fp32"  # auto: as the worker picked
    start = gather_fp32_state_dict(engine, trainer.stage, low)
    if allreduce is not None:
        engine.enable_backward_allreduce = allreduce
    real = engine.allreduce_gradients
    engine.allreduce_gradients = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    trainer.train_epoch(0, 1, max_steps=3)
    return start, gather_fp32_state_dict(engine, trainer.stage, low), len(calls), trainer


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lone_stage0_rank_skips_the_allreduce_with_the_same_weights(synthetic_root, precision):
    cfg = tiny_config(synthetic_root, f"train.precision={precision}", "train.warmup_iters=0",
                      f"deepspeed.config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}")
    start, skipped, skipped_calls, trainer = trained_weights(cfg, None)
    _, reduced, reduced_calls, _ = trained_weights(cfg, True)
    assert trainer.stage == 0 and trainer.engine.enable_backward_allreduce is False
    assert skipped_calls == 0 and reduced_calls == 3
    assert sum(not torch.equal(start[k], reduced[k]) for k in reduced) > 10  # training moved the weights
    assert all(torch.equal(skipped[k], reduced[k]) for k in reduced), "skipping the 1-rank all-reduce changed them"


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_keep_their_reduce_with_one_rank(synthetic_root, stage):
    cfg = tiny_config(synthetic_root, f"deepspeed.config={REPO / 'configs' / 'deepspeed' / f'zero{stage}.json'}")
    _, _, calls, trainer = trained_weights(cfg, None)
    assert trainer.stage == stage and trainer.engine.enable_backward_allreduce is True and calls == 3

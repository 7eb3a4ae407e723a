"""Two ZeRO-3 ranks train without writing torch's deprecation warning for the collectives DeepSpeed calls: the
engine ignores it (vitpose/train/engine.py), where it used to be written again at every step."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO, tiny_config


def rank_steps(rank: int, port: int, root: str, queue) -> None:
    """One rank: build the Trainer and train 3 steps, recording the warnings the filters let through."""
    import warnings

    import torch

    from vitpose.train.loop import Trainer
    from vitpose.train.session import NullSession, single_process_env

    os.environ.update(single_process_env(rank, 2, port))
    torch.set_num_threads(1)
    cfg = tiny_config(root, f"deepspeed.config={REPO / 'configs' / 'deepspeed' / 'zero3.json'}")
    with warnings.catch_warnings(record=True) as seen:  # the filters as they are, records what passes them
        trainer = Trainer(cfg, NullSession(rank, 2))
        trainer.train_epoch(0, 1, max_steps=3)
    queue.put((rank, trainer.stage, [str(w.message) for w in seen if "torch.distributed" in str(w.message)]))
    torch.distributed.barrier()


@pytest.mark.slow
def test_two_zero3_ranks_train_without_torch_deprecation_warnings(synthetic_root):
    import torch.multiprocessing as mp

    from vitpose.train.session import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_steps, args=(r, port, str(synthetic_root), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [stage for _, stage, _ in results] == [3, 3]
    assert all(not found for _, _, found in results), [found[:2] for _, _, found in results]

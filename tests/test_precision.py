"""``train.precision=auto``: each worker trains in the precision it picks, every rank in rank 0's pick, the
checkpoint records it, and a resume in another precision is refused with the key to set."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import REPO, tiny_config
from vitpose.train import precision
from vitpose.train.loop import Trainer
from vitpose.train.run_folder import META_FILE
from vitpose.train.session import LocalSession, single_process_env

ZERO0 = f"deepspeed.config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# The margin decides with the matmuls this CPU really ran: 0 picks bf16 whatever the rates, inf picks fp32.
@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs auto picks by the card's bf16, not by timing")
@pytest.mark.parametrize(("margin", "picked"), [(0.0, "bf16"), (float("inf"), "fp32")])
def test_auto_precision_is_what_the_worker_trains_in_and_what_its_checkpoint_says(synthetic_root, tmp_path,
                                                                                 monkeypatch, margin, picked):
    monkeypatch.setattr(precision, "BF16_MARGIN", margin)
    cfg = tiny_config(synthetic_root, "train.precision=auto", "train.epochs=1", ZERO0)
    session = LocalSession(tmp_path / "run")
    trainer = Trainer(cfg, session)
    assert trainer.cfg.train.precision == picked and trainer.dtype == DTYPES[picked]
    assert trainer.ds_config["bf16"]["enabled"] is (picked == "bf16")
    assert next(trainer.engine.module.parameters()).dtype == DTYPES[picked]  # the engine computes in it
    trainer.fit()
    assert json.loads((session.checkpoints[-1] / META_FILE).read_text())["precision"] == picked

    other = "fp32" if picked == "bf16" else "bf16"
    resumed = Trainer(tiny_config(synthetic_root, f"train.precision={other}", "train.epochs=2", ZERO0),
                      LocalSession(tmp_path / "again", resume_from=session.checkpoints[-1]))
    with pytest.raises(RuntimeError, match=rf"trained in {picked}, this run trains in {other}.*"
                                           rf"--set train.precision={picked}"):
        resumed.restore()

    # auto again, on a machine that would pick the other one: the resumed run keeps the checkpoint's precision.
    monkeypatch.setattr(precision, "BF16_MARGIN", float("inf") if picked == "bf16" else 0.0)
    again = Trainer(tiny_config(synthetic_root, "train.precision=auto", "train.epochs=2", ZERO0),
                    LocalSession(tmp_path / "again", resume_from=session.checkpoints[-1]))
    assert again.cfg.train.precision == picked and again.restore() and again.start_epoch == 1


def _pick_on_rank(rank: int, port: int, margins: tuple[float, float], out) -> None:
    import torch.distributed as dist

    os.environ.update(single_process_env(rank, 2, port))
    dist.init_process_group("gloo")
    precision.BF16_MARGIN = margins[rank]
    out.put((rank, *precision.resolve_precision("auto", torch.device("cpu"), 2)))
    dist.destroy_process_group()


def test_every_rank_trains_in_rank_0s_pick():
    import torch.multiprocessing as mp

    from vitpose.train.session import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    ranks = [ctx.Process(target=_pick_on_rank, args=(r, port, (float("inf"), 0.0), out)) for r in (0, 1)]
    for p in ranks:
        p.start()
    picks = {rank: (pick, why) for rank, pick, why in (out.get(timeout=120) for _ in ranks)}
    for p in ranks:
        p.join(timeout=60)
    assert picks[0][0] == picks[1][0] == "fp32", picks  # rank 1 alone would have picked bf16
    assert picks[1][1].startswith("rank 0's choice (here: bf16"), picks


def test_a_precision_given_is_kept():
    assert precision.resolve_precision("bf16", torch.device("cpu"), 1) == ("bf16", None)
    assert precision.resolve_precision("fp32", torch.device("cpu"), 1) == ("fp32", None)

"""Memory is a tested property: ZeRO-3's training memory per rank against ZeRO-0's, two gloo ranks, through
the real engine and optimizer (`python -m benchmarks.zero_memory`, the benchmark's own code path).

Resident memory, not time: on these machines the same run gives the same peaks to ~0.01 GiB (five runs, see
benchmarks/NOTES.md), so a bound a few hundredths above the measured ratio catches a change that makes stage 3
keep more than it should (a full gather left alive, a bucket sized in the model, activations grown by a config
the benchmark inherits, the fp32 master copy back) without flaking.

And the fix that brought it down (vitpose/train/zero_memory.py: in fp32, ZeRO-3's optimizer updates the
parameter partition itself instead of a second fp32 copy) changes no number: the same losses and weights, bit
for bit, over several steps and across a checkpoint resume, either way round.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest

from tests.conftest import REPO

PRESET = "vitpose_b"  # 86M parameters: the partitioned states dominate, as for the large models ZeRO is for
# stage-3 / stage-0 training memory, rank 0, fp32: 0.600 in five runs (2026-11-30, fp32 master shared; 0.696 with
# DeepSpeed's separate copy, which this bound fails)
MEASURED = 0.60
BOUND = MEASURED + 0.03  # 15x the spread of repeated runs


@pytest.mark.slow
def test_zero3_keeps_its_share_of_training_memory(tmp_path):
    ratios = []
    # On a busy machine stage 0's peak has read low now and then (ViTPose-L: 1 run in 5, by up to 6%), which
    # raises the ratio; one more run before failing. A real regression fails both.
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "benchmarks.zero_memory", "--preset", PRESET, "--stages", "0,3",
                              "--json", "--data-root", str(tmp_path / "data")],
                             cwd=REPO, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        rank0 = {r["stage"]: r for r in rows if r["rank"] == 0}
        assert {r["stage"] for r in rows} == {0, 3} and len(rows) == 4, out.stdout[-2000:]
        ratios.append(rank0[3]["train_gib"] / rank0[0]["train_gib"])
        print(f"\nZeRO-3 / ZeRO-0 training memory per rank, {PRESET} fp32, 2 ranks: {ratios[-1]:.3f} (bound "
              f"{BOUND:.2f}); stage 0 {rank0[0]['train_gib']:.2f} GiB, stage 3 {rank0[3]['train_gib']:.2f} GiB, "
              f"fp32 master {rank0[3]['fp32_master']}")
        if ratios[-1] <= BOUND:
            break
    assert min(ratios) <= BOUND, f"ZeRO-3 now keeps {min(ratios):.3f} of stage 0's training memory (measured {MEASURED})"


# ----------------------------------------------------------------------------- the shared fp32 master
def zero3_fp32(**zero: object) -> dict:
    return {"zero_optimization": {"stage": 3, **zero}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def test_shared_master_only_where_it_is_valid(monkeypatch):
    from vitpose.train.zero_memory import ENV, why_not_shared

    monkeypatch.delenv(ENV, raising=False)
    assert why_not_shared(zero3_fp32()) == ""
    assert why_not_shared({"zero_optimization": {"stage": 2}}) == "not ZeRO stage 3"
    assert "bf16" in why_not_shared({**zero3_fp32(), "bf16": {"enabled": True}})
    assert "fp16" in why_not_shared({**zero3_fp32(), "fp16": {"enabled": True}})
    assert "offload_optimizer" in why_not_shared(zero3_fp32(offload_optimizer={"device": "cpu"}))
    assert "offload_param" in why_not_shared(zero3_fp32(offload_param={"device": "nvme"}))
    assert why_not_shared(zero3_fp32(offload_param={"device": "none"})) == ""
    monkeypatch.setenv(ENV, "separate")
    assert ENV in why_not_shared(zero3_fp32())


def test_shared_master_patches_only_inside_its_block_and_only_a_checked_deepspeed(monkeypatch):
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from vitpose.train.zero_memory import ENV, shared_fp32_master

    monkeypatch.delenv(ENV, raising=False)
    original = Stage3.__dict__["_create_fp32_partitions"]
    with shared_fp32_master(zero3_fp32()) as sharing:
        assert sharing.applied and Stage3.__dict__["_create_fp32_partitions"] is not original
        with shared_fp32_master(zero3_fp32()) as inner:  # loop.py's hook inside the benchmark's: one patch
            assert not inner.applied and "already" in inner.skipped
    assert Stage3.__dict__["_create_fp32_partitions"] is original
    with shared_fp32_master({**zero3_fp32(), "bf16": {"enabled": True}}) as sharing:
        assert not sharing.applied and Stage3.__dict__["_create_fp32_partitions"] is original

    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shared_fp32_master(zero3_fp32()) as sharing:
            assert not sharing.applied and Stage3.__dict__["_create_fp32_partitions"] is original
    assert "DeepSpeed 0.99.0" in sharing.skipped and "separate fp32 master" in sharing.skipped
    assert any("DeepSpeed 0.99.0" in str(w.message) for w in caught)


def exact_worker(rank: int, world: int, root: str, out: str) -> None:
    """One rank of test_shared_master_changes_no_number, in its own process (the benchmark's way of starting
    gloo ranks): ViTPose-tiny under ZeRO-3 fp32, two epochs of three steps with a checkpoint between, once with
    DeepSpeed's separate fp32 master and once shared; then the second epoch again from each checkpoint."""
    import torch

    from tests.conftest import tiny_config
    from vitpose.train.deepspeed_config import complete_deepspeed_config
    from vitpose.train.loop import Trainer
    from vitpose.train.run_folder import gather_fp32_state_dict
    from vitpose.train.session import NullSession
    from vitpose.train.zero_memory import ENV, shared_fp32_master

    torch.set_num_threads(1)
    cfg = tiny_config(Path(root), "model.preset=vitpose_tiny", "train.precision=fp32", "train.batch_size=4",
                      "deepspeed.config=configs/deepspeed/zero3.json", "train.max_steps_per_epoch=3",
                      "train.warmup_iters=2", "train.grad_clip=1.0")

    class Resume(NullSession):
        def __init__(self, ckpt: Path | None):
            super().__init__(rank, world)
            self.ckpt = ckpt

        def latest_checkpoint(self):
            return nullcontext(self.ckpt)

    def trainer(master: str, ckpt: Path | None = None) -> tuple[Trainer, list[float]]:
        os.environ[ENV] = master  # "shared": anything but "separate"
        with shared_fp32_master(complete_deepspeed_config(cfg, world)):
            t = Trainer(cfg, Resume(ckpt))
        opt = t.engine.optimizer
        aliased = [m is lp for m, lp in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat,
                                            strict=True)]
        assert len(aliased) > 1 and all(a == (master == "shared") for a in aliased), (master, aliased)
        losses: list[float] = []
        loss_fn = t.loss_fn

        def recorded(engine, batch):
            loss, parts = loss_fn(engine, batch)
            losses.append(float(loss.detach()))
            return loss, parts

        t.loss_fn = recorded
        return t, losses

    results = {}
    for master in ("separate", "shared"):
        t, losses = trainer(master)
        t.train_epoch(0, 2)
        ckpt = Path(out) / f"ckpt-{master}"
        ckpt.mkdir(exist_ok=True)
        t.save_checkpoint(ckpt, 0, {"val/AP": 0.0})
        t.train_epoch(1, 2)
        results[master] = (losses, gather_fp32_state_dict(t.engine, 3, low_precision=False))
        del t
        gc.collect()
    for master, source in (("shared", "shared"), ("shared", "separate"), ("separate", "shared")):
        t, losses = trainer(master, Path(out) / f"ckpt-{source}")
        assert t.restore() and t.start_epoch == 1
        t.train_epoch(1, 2)
        results[f"{master} resumed from {source}"] = (losses, gather_fp32_state_dict(t.engine, 3, False))
        del t
        gc.collect()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    sys.stdout.flush()
    os._exit(0)  # as the benchmark's workers: no interpreter teardown with gloo threads alive


@pytest.mark.slow
def test_shared_master_changes_no_number(synthetic_root, tmp_path):
    import torch

    from vitpose.train.session import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    code = "import sys; from tests.test_zero_memory import exact_worker; exact_worker(int(sys.argv[1]), 2, *sys.argv[2:])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(synthetic_root), str(tmp_path)], cwd=REPO,
                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    # The checkpoint saves the shared partition once, as it saved the copy: the same files, the same sizes.
    sizes = {master: {f.relative_to(tmp_path / f"ckpt-{master}"): f.stat().st_size
                      for f in (tmp_path / f"ckpt-{master}").rglob("*") if f.is_file()} for master in ("separate", "shared")}
    assert sizes["separate"].keys() == sizes["shared"].keys()
    for name, size in sizes["separate"].items():
        assert abs(sizes["shared"][name] - size) <= 0.01 * size + 65536, (name, size, sizes["shared"][name])
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        losses, weights = results["separate"]
        assert len(losses) == 6 and len(set(losses)) > 1
        for name, (other_losses, other_weights) in results.items():
            assert other_losses == (losses if len(other_losses) == 6 else losses[3:]), name
            assert other_weights.keys() == weights.keys()
            different = [k for k in weights if not torch.equal(weights[k], other_weights[k])]
            assert not different, f"rank {rank}, {name}: {different[:5]} differ from the separate master's"

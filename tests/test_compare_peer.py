"""python -m benchmarks.compare_peer (its sections in benchmarks/peer/): the peer (transformers' VitPose) built
from our spec computes our function once our weights are copied in; the report's arithmetic; the harness's
interleaving. Timings are printed by the benchmark, never asserted."""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import interleave
from benchmarks.peer import model as bench
from benchmarks.peer.report import check_targets, shipped_section
from benchmarks.peer.shipped import pair_rows, variant_json
from benchmarks.peer.speed import Row
from tests.conftest import REPO
from vitpose.models import build_model


def test_peer_computes_our_function():
    pytest.importorskip("transformers", reason="the peer comes with the 'bench' extra")
    torch.manual_seed(0)
    ours = build_model("vitpose_nano", img_size=(64, 48), deconv_channels=256)
    bench.make_loud(ours)
    peer = bench.peer_model(ours)
    bench.copy_into_peer(ours, peer)
    diff = bench.same_function(ours, peer)
    assert 0.5 < diff["max abs heatmap"] < 2.0
    assert diff["eval fp32 max abs diff"] < 1e-5
    assert diff["train fp32 max abs diff"] < 1e-4
    # Within fp32 rounding: the larger of 1e-3 and 3x how far another thread count moves our own gradient.
    assert diff["train grad rel diff (block 0 fc1)"] < max(1e-3, 3 * diff["train grad rel diff, ours 1 vs 2 threads"])
    assert diff["bf16 vs fp32, ours"] < 0.1  # bf16 autocast stays close for both
    with pytest.raises(ValueError, match="256 channels"):
        bench.peer_model(build_model("vitpose_nano", device="meta"))


def test_rows_ratios_and_targets():
    row = Row("vitpose_s", "fp32", "train b16", 16, 1e12, ours=[1.0, 2.0, 1.0], peer=[2.0, 2.0, 1.5],
                    peak=[2000.0, 1000.0, 4000.0])
    assert row.ips("ours") == 16.0 and row.ratio == 1.5  # median of per-repetition peer/ours times
    assert row.mfu("ours", 2000.0) == pytest.approx(0.5)
    assert row.mfu_adjacent == pytest.approx(0.5)  # per repetition 0.5, 0.5, 0.25 against the matmul beside it
    infer32 = Row("vitpose_s", "fp32", "infer b32", 32, 1e11, ours=[1.0], peer=[1.0])
    infer16 = Row("vitpose_s", "bf16", "infer b32", 32, 1e11, ours=[0.5], peer=[1.0])
    targets = {name: ok for name, _, ok in check_targets(
        [row, infer32, infer16], {"fp32": 2000.0, "bf16": 8000.0}, None, {"slowdown": 0.05})}
    assert targets["vitpose_s fp32 train b16: ours/peer >= 1.15"]
    assert targets["vitpose_s fp32 infer b32: ours/peer >= 1.0"]  # equal speed is enough there
    assert targets["vitpose_s our bf16 / fp32 inference b32 >= 1.8"]
    assert not targets["vitpose_s our fp32 training-step MFU >= 75% of the fp32 peak"]
    assert targets["data loader slows the tiny teacher's step by <= 10%"]


def test_shipped_rows_ratios_labels_and_targets(tmp_path):
    result = {"model": "vitpose_s", "precision": "bf16", "ranks": 1, "stage": 0, "batch": 16, "steps": 8,
              "labels": {"shipped": "shipped: ZeRO-0 fused", "other": "shipped: ZeRO-0 for-loop", "peer": "peer"},
              "times": {"shipped": [1.0, 2.0, 1.0], "other": [1.2, 2.2, 1.0], "peer": [1.2, 2.6, 1.1]},
              "fused": {"shipped": True, "other": False}, "losses": {"shipped": 1.0, "other": 1.0, "peer": 2.0}}
    vs_peer, fused = pair_rows(result)
    assert vs_peer.kind == "shipped / peer" and vs_peer.a_label == "shipped: ZeRO-0 fused" and vs_peer.b_label == "peer"
    assert vs_peer.ratio == pytest.approx(1.2) and vs_peer.target == 1.15  # median of 1.2, 1.3, 1.1
    assert vs_peer.ips("a") == 16.0
    assert fused.kind == "fused / for-loop" and fused.a_label.endswith("fused") and fused.ratio == pytest.approx(1.1)
    assert fused.target is None and "rel. diff 0.0e+00" in fused.note
    # The shipped JSON without fused: the rows still read fused / for-loop, the other engine being the fused one.
    flipped = dict(result, fused={"shipped": False, "other": True})
    assert pair_rows(flipped)[1].a_label == "shipped: ZeRO-0 for-loop"
    two = dict(result, ranks=2, stage=3, precision="fp32", times={k: [1.0] for k in result["times"]})
    zero2 = dict(result, stage=2)  # a stage chosen with --shipped-stages: measured, no target
    assert pair_rows(zero2)[0].target is None
    targets = {name: ok for name, _, ok in check_targets(
        [], {}, None, None, pair_rows(result) + pair_rows(two) + pair_rows(zero2))}
    assert targets == {"vitpose_s bf16 shipped ZeRO-0 step on 1 rank(s) / peer's plain loop >= 1.15": True,
                       "vitpose_s fp32 shipped ZeRO-3 step on 2 rank(s) / peer's DDP loop >= 0.9": True}
    assert "| vitpose_s | bf16 | 0 | 1 x 16 | shipped / peer |" in "\n".join(shipped_section([vs_peer], []))


def test_shipped_variant_is_the_json_with_the_other_adamw(tmp_path):
    import json

    for stage in (0, 1, 2, 3):
        shipped = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        other = json.loads(variant_json(stage, tmp_path).read_text())
        assert bool(shipped["optimizer"]["params"].get("fused")) != bool(other["optimizer"]["params"].get("fused"))
        shipped["optimizer"]["params"].pop("fused", None), other["optimizer"]["params"].pop("fused", None)
        assert shipped == other  # nothing else differs


def test_interleave_turns_through_every_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = interleave(fns, reps=6, warmup=1, order="permute")  # section 2b's three-way rotation
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
    orders = [tuple(calls[3 + 3 * r: 6 + 3 * r]) for r in range(6)]
    assert len(set(orders)) == 6  # each function in each place twice


def test_harness_rotation_and_ratio_spread():
    from benchmarks.harness import ratio, round_order

    assert [list(round_order("rotate", r, ["a", "b", "c"])) for r in range(3)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [list(round_order("rotate", r, ["a", "b"])) for r in range(2)] == [["a", "b"], ["b", "a"]]
    r = ratio([2.0, 4.0, 3.0], [1.0, 1.0, 2.0])  # per repetition 2, 4, 1.5
    assert r["median"] == 2.0 and r["min"] == 1.5 and r["max"] == 4.0 and r["of_medians"] == 3.0
    assert 1.5 <= r["ci95"][0] <= r["median"] <= r["ci95"][1] <= 4.0

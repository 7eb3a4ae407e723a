"""Section 2b of ``benchmarks.compare_peer``: the shipped training step (the real ``Trainer`` loop over the
DeepSpeed engine built from configs/deepspeed/zero<stage>.json) against the peer's plain torch loop (DDP on two
ranks) and against the engine with the other AdamW, three-way interleaved in fresh spawned processes."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from benchmarks.harness import REPO, SpeedRatio, interleave, load_average, retain_freed_memory
from benchmarks.peer.common import MODELS, autocast, heatmaps, set_dist_env, tiny_config
from benchmarks.peer.model import copy_into_peer, peer_model
from vitpose.train.session import NullSession, free_port

SHIPPED_STAGE = {1: 0, 2: 3}  # ranks -> the ZeRO stage timed by default: ZeRO-0 in one process, ZeRO-3 over two
SHIPPED_DS = REPO / "configs" / "deepspeed"
# Shipped step / peer's plain loop: ZeRO-0 on one rank (fp32, bf16); ZeRO-3 on two ranks / DDP on two. Other
# (ranks, stage) pairs (--shipped-stages, e.g. ZeRO-2 on one GPU) are measured without a target.
SHIPPED_TARGETS = {(1, 0, "fp32"): 1.0, (1, 0, "bf16"): 1.15, (2, 3, "fp32"): 0.9, (2, 3, "bf16"): 0.9}


@dataclass
class PairRow(SpeedRatio):
    """Two training steps timed interleaved in the same process(es): ``a`` against ``b``, each labelled with the
    path it times. Ratio = a's speed / b's speed (median of the per-repetition ratios)."""

    speed_pair: ClassVar[tuple[str, str]] = ("a", "b")
    model: str
    precision: str
    ranks: int
    batch: int  # per rank
    kind: str  # "shipped / peer" or "fused / for-loop"
    stage: int  # the engine's ZeRO stage
    a_label: str
    b_label: str
    a: list[float] = field(default_factory=list)  # seconds per step (the slowest rank's)
    b: list[float] = field(default_factory=list)
    target: float | None = None
    note: str = ""
    a_opt: list[float] = field(default_factory=list)  # seconds of the optimizer phase of each step (see _shipped_one)
    b_opt: list[float] = field(default_factory=list)

    def opt_s(self, who: str) -> float:
        times = getattr(self, f"{who}_opt")
        return statistics.median(times) if times else float("nan")

    def ips(self, who: str) -> float:
        return self.batch * self.ranks / statistics.median(getattr(self, who))



def shipped_config(name: str, precision: str, batch: int, ds_json: Path | str) -> Any:
    """The tiny teacher's config (synthetic data, the real Trainer) with the model at the peer rows' size
    (256x192, patch 16), the COCO recipe's layer decay (the preset's) and gradient clipping (1.0), no drop path
    (the peer has none), no warm-up, and the DeepSpeed JSON ``ds_json``."""
    return tiny_config([f"model.preset={MODELS[name]}", "model.img_size=[256, 192]", "model.patch_size=16",
                        "model.drop_path_rate=0.0", "model.layer_decay=null", f"train.precision={precision}",
                        f"train.batch_size={batch}", "train.grad_clip=1.0", "train.warmup_iters=0",
                        f"deepspeed.config={ds_json}", "data.loader_workers=0"])


def deepspeed_fused(trainer: Any) -> bool:
    """Whether the torch AdamW that DeepSpeed built (inside any bf16 / ZeRO wrapper) runs the fused kernel."""
    return bool(trainer.engine.basic_optimizer.defaults.get("fused"))


def engine_label(trainer: Any) -> str:
    opt = trainer.engine.basic_optimizer
    kind = "fused" if deepspeed_fused(trainer) else "for-loop"
    precision = "bf16 weights, fp32 masters" if trainer.dtype == torch.bfloat16 else "fp32"
    return (f"shipped: DeepSpeed ZeRO-{trainer.stage} engine.step ({type(trainer.optimizer).__name__}), "
            f"torch {type(opt).__name__} {kind}, clip {trainer.cfg.train.grad_clip:g}, {precision}")


def variant_json(stage: int, out: Path) -> Path:
    """configs/deepspeed/zero<stage>.json with the optimizer the other way round: without ``fused`` (torch's
    default, the for-loop on CPU: what was shipped before) when the shipped JSON has it, with it otherwise."""
    data = json.loads((SHIPPED_DS / f"zero{stage}.json").read_text())
    params = data.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    if params.get("fused"):
        del params["fused"]
    else:
        params["fused"] = True
    path = out / f"zero{stage}-other-adamw.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def _shipped_one(name: str, precision: str, rank: int, world: int, stage: int, batch: int, reps: int,
                 other_json: Path, warmup: int = 2) -> dict[str, Any] | None:
    """One model and precision on this rank: the shipped engine, the engine with the other AdamW, the peer.

    Besides each whole step, its optimizer phase is timed: the engine's ``engine.step()`` (clipping, the bf16 /
    ZeRO wrapper's copies and collectives, AdamW) and the peer's clipping, ``opt.step()`` and ``zero_grad``; the
    AdamW before/after shows there without the noise of the forward and backward passes around it. The device
    is the engine's (a GPU where DeepSpeed finds one): the peer and its batch go there too, the batch moved in
    every step as the Trainer moves it, and a GPU is synchronised before each clock reading."""
    import torch.distributed as dist

    from vitpose.build import build_model_from_config
    from vitpose.losses import keypoint_mse
    from vitpose.train.loop import Trainer

    t0, load_start = time.perf_counter(), load_average()
    trainers = {"shipped": Trainer(shipped_config(name, precision, batch, SHIPPED_DS / f"zero{stage}.json"),
                                   NullSession(rank, world)),
                "other": Trainer(shipped_config(name, precision, batch, other_json), NullSession(rank, world))}
    premade = next(iter(trainers["shipped"].loaders.train))  # a real batch of this rank, made beforehand
    losses: dict[str, float] = {}
    opt_times: dict[str, list[float]] = {"shipped": [], "other": [], "peer": []}
    device = trainers["shipped"].device
    on_gpu = torch.device(device).type == "cuda"

    def synced() -> float:  # a clock reading after the device's queued work is done
        if on_gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def engine_step(key: str) -> Callable[[], None]:
        trainer = trainers[key]
        trainer.loaders.train = [premade]
        real_step = trainer.engine.step

        def timed_step(*args: Any, **kwargs: Any) -> Any:  # the engine's own step, timed (an instance attribute)
            t = synced()
            out = real_step(*args, **kwargs)
            opt_times[key].append(synced() - t)
            return out
        trainer.engine.step = timed_step

        def run() -> None:  # the real loop: lr, device/dtype, loss, finiteness check, backward, engine.step
            losses[key] = trainer.train_epoch(0, 1, max_steps=1).loss
            synced()
        return run

    cfg, fused = trainers["shipped"].cfg, deepspeed_fused(trainers["shipped"])
    ours = build_model_from_config(cfg)  # the engines' initial weights (same seed)
    peer = peer_model(ours)
    copy_into_peer(ours, peer)
    del ours
    peer.to(device).train()
    net = nn.parallel.DistributedDataParallel(peer) if world > 1 else peer
    opt = torch.optim.AdamW(peer.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay, fused=fused or None)
    clip, bf16 = cfg.train.grad_clip, precision == "bf16"

    def peer_step() -> None:
        x, target, weight = (premade[k].to(device, non_blocking=True) for k in ("image", "target", "target_weight"))
        with autocast(bf16, torch.device(device).type):
            out = heatmaps(net, x)
        loss = keypoint_mse(out, target, weight)
        loss.backward()
        t = synced()
        if clip:
            torch.nn.utils.clip_grad_norm_(peer.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt_times["peer"].append(synced() - t)
        losses["peer"] = float(loss.detach())

    fns = {"shipped": engine_step("shipped"), "other": engine_step("other"), "peer": peer_step}
    # Every order of the three in turn (with 6 repetitions each sits in each place twice); on two ranks a
    # barrier before each timed call, so the ranks start a step together.
    times = interleave(fns, reps, warmup=warmup, order="permute",
                       before_each=(lambda _: dist.barrier()) if world > 1 else None)
    times.update({f"{k} opt": v[-reps:] for k, v in opt_times.items()})  # the timed repetitions' optimizer phases
    if world > 1:  # a step lasts until its slowest rank is done
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, times)
        times = {k: [max(t[k][i] for t in everyone) for i in range(reps)] for k in times}
    labels = {k: engine_label(t) for k, t in trainers.items()}
    backend = "nccl" if on_gpu else "gloo"
    labels["peer"] = (f"peer: plain loop{f', DDP ({backend})' if world > 1 else ''}, torch AdamW "
                      f"{'fused' if fused else 'for-loop'}, clip {clip:g}, "
                      f"{'autocast bf16, fp32 weights' if bf16 else 'fp32'}")
    result = {"model": MODELS[name], "precision": precision, "ranks": world, "stage": stage, "batch": batch,
              "threads": torch.get_num_threads(), "device": str(device), "labels": labels, "times": times,
              "fused": {k: deepspeed_fused(t) for k, t in trainers.items()}, "steps": warmup + reps, "losses": losses,
              "load average": f"{load_start} at start, {load_average()} at end",
              "seconds": time.perf_counter() - t0}
    fns.clear(), trainers.clear()  # the engines and the peer go with the closures
    gc.collect()
    return result if rank == 0 else None


def _shipped_rank(rank: int, world: int, port: int, job: dict[str, Any], queue: Any) -> None:
    try:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations, per step
        set_dist_env(rank, world, port)
        torch.set_num_threads(job["threads"])
        if job["retain"]:
            retain_freed_memory()
        for name, precision in job["runs"]:
            result = _shipped_one(name, precision, rank, world, job["stage"], job["batch"], job["reps"],
                                  Path(job["other_json"]), job.get("warmup", 2))
            if result is not None:
                queue.put(result)
        if rank == 0:
            queue.put({"done": True})
    except BaseException as err:  # the parent must not wait forever
        queue.put({"error": f"rank {rank}: {type(err).__name__}: {err}"})
        raise
    finally:
        queue.close()
        queue.join_thread()  # what was put is in the pipe before the process goes
    # Leave without the interpreter's teardown: gloo/DeepSpeed threads still alive at exit can abort the process.
    sys.stdout.flush()
    os._exit(0)


def pair_rows(result: dict[str, Any]) -> list[PairRow]:
    """The two rows of one result: shipped / peer (with its target) and fused / for-loop (the AdamW before/after)."""
    common = dict(model=result["model"], precision=result["precision"], ranks=result["ranks"], batch=result["batch"],
                  stage=result["stage"])
    t, labels, losses = result["times"], result["labels"], result["losses"]
    fused_key, loop_key = ("shipped", "other") if result["fused"]["shipped"] else ("other", "shipped")
    diff = abs(losses[fused_key] - losses[loop_key]) / max(abs(losses[loop_key]), 1e-12)
    return [
        PairRow(kind="shipped / peer", a_label=labels["shipped"], b_label=labels["peer"], a=t["shipped"],
                b=t["peer"], target=SHIPPED_TARGETS.get((result["ranks"], result["stage"], result["precision"])),
                a_opt=t.get("shipped opt", []), b_opt=t.get("peer opt", []), **common),
        PairRow(kind="fused / for-loop", a_label=labels[fused_key], b_label=labels[loop_key], a=t[fused_key],
                b=t[loop_key], note=f"loss after {result['steps']} steps: fused {losses[fused_key]:.6g}, for-loop "
                                    f"{losses[loop_key]:.6g} (rel. diff {diff:.1e})",
                a_opt=t.get(f"{fused_key} opt", []), b_opt=t.get(f"{loop_key} opt", []), **common),
    ]


def shipped_rows(names: list[str], precisions: list[str], ranks: list[int], batch: int, reps: int, threads: int,
                 retain: bool, say: Callable[[str], None], warmup: int = 2,
                 stages: list[int] = ()) -> tuple[list[PairRow], list[dict[str, Any]]]:
    """The shipped training step (the real Trainer's loop over a DeepSpeed engine) against the peer's plain
    torch loop, and against itself with the other AdamW; each rank count and ZeRO stage (``stages``; default
    the rank count's ``SHIPPED_STAGE``) in its own fresh processes."""
    import tempfile
    from queue import Empty

    import torch.multiprocessing as mp

    from vitpose.build import ensure_data

    ensure_data(shipped_config(names[0], precisions[0], batch, SHIPPED_DS / "zero0.json"))  # not timed
    rows: list[PairRow] = []
    results: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="shipped-step-") as tmp:
        for world, stage in [(w, st) for w in ranks for st in (stages or [SHIPPED_STAGE[w]])]:
            job = {"runs": [(n, p) for n in names for p in precisions], "stage": stage, "batch": batch, "reps": reps,
                   "threads": max(1, threads // world), "retain": retain, "warmup": warmup,
                   "other_json": str(variant_json(stage, Path(tmp)))}
            queue, port = ctx.Queue(), free_port()
            procs = [ctx.Process(target=_shipped_rank, args=(r, world, port, job, queue)) for r in range(world)]
            for p in procs:
                p.start()
            try:
                while True:
                    try:
                        result = queue.get(timeout=10)
                    except Empty:
                        dead = [p.exitcode for p in procs if not p.is_alive()]
                        if dead:
                            raise RuntimeError(f"a rank of section 2b ended (exit codes {dead}) before its results "
                                               "came back") from None
                        continue
                    if "error" in result:
                        raise RuntimeError(result["error"])
                    if result.get("done"):
                        break
                    results.append(result)
                    for row in pair_rows(result):
                        rows.append(row)
                        say(f"  {row.model} {row.precision} ZeRO-{row.stage} {row.ranks} rank(s) x batch {row.batch}, {row.kind}: "
                            f"{row.ips('a'):.2f} / {row.ips('b'):.2f} img/s = {row.ratio:.3f}"
                            f"{f' (target {row.target})' if row.target else ''}; optimizer phase "
                            f"{row.opt_s('a'):.3f} / {row.opt_s('b'):.3f} s; {row.note}")
                    say(f"    a: {rows[-2].a_label}\n    b: {rows[-2].b_label}\n    other: {result['labels']['other']}"
                        f"\n    load average {result['load average']}, {result['seconds']:.0f}s")
            finally:
                for p in procs:
                    p.join(timeout=120)
                    if p.is_alive():
                        p.kill()
    return rows, results


"""Peak memory per rank for DeepSpeed ZeRO stages 0-3, two CPU ranks on gloo, through the real engine.

    python -m benchmarks.zero_memory [--preset vitpose_l] [--stages 0,1,2,3] [--batch-size 1] [--steps 2]
    python -m benchmarks.zero_memory --giant            # also one full-size vitpose_g step under ZeRO-3
    python -m benchmarks.zero_memory --stages 0,3 --phases   # rank 0's peak per forward/backward/step and
                                                             # the engine's long-lived buffers under it
    python -m benchmarks.zero_memory --stages 3 --fp32-master separate   # DeepSpeed's own second fp32 copy

Each configuration runs in two fresh processes (rank 0 and 1) that build the engine's ``Trainer`` from
configs/teacher/synthetic_tiny.yaml with the preset at full size (256x192) and the stage's JSON from
configs/deepspeed/, then run a few optimizer steps on real synthetic batches. Per rank it records the
resident memory after imports (the interpreter, torch, DeepSpeed: the same for every stage), after
``deepspeed.initialize`` and the peak (VmHWM) over the steps. "train GiB" is peak minus after-imports, the
memory that training itself costs; the last column is that against stage 0's.

ZeRO-3 in fp32 runs with the optimizer's fp32 master sharing the parameter partition
(vitpose/train/zero_memory.py), which this script applies around ``Trainer`` as loop.py is to; the last column
says what DeepSpeed built.

Processes start with ``MALLOC_MMAP_THRESHOLD_`` set as Ray workers do (glibc otherwise keeps freed
optimizer temporaries and a big model's stage 3 runs out of memory, see STACK-NOTES).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO
from vitpose.train.session import free_port

GIB = 1024**3


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


# ------------------------------------------------------------------------------------------- phases
class PhaseMeter:
    """The resident peak of each phase of each step: forward (the loss function, which calls the engine),
    backward and optimizer step. Before a phase the kernel's high-water mark is reset (``5`` to
    /proc/self/clear_refs, Linux 4.0+), so VmHWM read after it is that phase's own peak; ``peak()`` is the
    maximum over all of them and what came before the first reset (initialisation), the same figure an
    unreset VmHWM gives. Each phase also records a census of the engine's persistent buffers at its end."""

    def __init__(self, trainer) -> None:
        self.trainer, self.records, self.step = trainer, [], 0
        self.hwm_before = rss_bytes("VmHWM")
        self.before_first_phase = 0  # the peak up to the first forward: initialisation and the first batch
        self.census_after_init = buffer_census(trainer.engine)
        loss_fn, engine = trainer.loss_fn, trainer.engine
        trainer.loss_fn = self._wrap("forward", loss_fn)
        # Instance attributes shadow the engine's methods for this process only (train_epoch calls these).
        engine.backward = self._wrap("backward", engine.backward)
        engine.step = self._wrap("step", engine.step)

    def _wrap(self, phase: str, fn):
        def measured(*args, **kwargs):
            self.hwm_before = max(self.hwm_before, rss_bytes("VmHWM"))
            if not self.records:
                self.before_first_phase = self.hwm_before
            Path("/proc/self/clear_refs").write_text("5")
            start = rss_bytes("VmRSS")
            out = fn(*args, **kwargs)
            self.records.append({"step": self.step, "phase": phase, "start_gib": start / GIB,
                                 "peak_gib": rss_bytes("VmHWM") / GIB, "end_gib": rss_bytes("VmRSS") / GIB,
                                 "census": buffer_census(self.trainer.engine)})
            if phase == "step":
                self.step += 1
            return out
        return measured

    def peak(self) -> int:
        return max(self.hwm_before, rss_bytes("VmHWM"))


def buffer_census(engine) -> dict[str, float]:
    """GiB held by the engine's long-lived tensors, by role, each storage counted once (the first role
    that names it): what a phase's peak is made of, besides activations and temporaries."""
    import torch

    opt = engine.optimizer
    roles: dict[str, list] = {}
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        roles["param partition"] = [getattr(opt, "lp_param_buffer", None), *opt.fp16_partitioned_groups_flat]
        roles["fp32 master (separate)"] = list(opt.fp32_partitioned_groups_flat)
        roles["grad partition"] = [getattr(opt, "grad_partitions_flat_buffer", None)]
        roles["ipg bucket"] = [b.buffer for b in getattr(opt, "ipg_buckets", {}).values()]
        roles["gathered/persistent params"] = [p.data for p in engine.module.parameters()]
        inner = opt.optimizer
    else:
        roles["params"] = [p.data for p in engine.module.parameters()]
        roles["grads"] = [p.grad for p in engine.module.parameters()]
        for attr in ("single_partition_of_fp32_groups", "bit16_groups_flat", "fp32_groups_flat_partition"):
            roles.setdefault("optimizer flats", []).extend(getattr(opt, attr, None) or [])
        inner = getattr(opt, "optimizer", opt)
    roles["Adam states"] = [t for state in getattr(inner, "state", {}).values() for t in state.values()
                            if torch.is_tensor(t)]
    seen: set[int] = set()
    out: dict[str, float] = {}
    for role, tensors in roles.items():
        total = 0
        for t in tensors:
            if not torch.is_tensor(t) or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        out[role] = total / GIB
    return out


# ------------------------------------------------------------------------------------------- worker
def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)  # two ranks on two cores
    after_imports_probe = rss_bytes("VmRSS")
    import deepspeed  # noqa: F401  (counted in the baseline, like torch)

    from vitpose.config import TeacherConfig, load_config
    from vitpose.train.deepspeed_config import complete_deepspeed_config
    from vitpose.train.loop import Trainer
    from vitpose.train.session import NullSession
    from vitpose.train.zero_memory import shared_fp32_master

    sets = [
        # The paper's model: patch 16 at 256x192 (a 16x12 grid). The synthetic config's patch 8 would give 4x
        # the tokens and activations (it did, from 2026-11-26 to 11-29, and looked like a stage-3 regression).
        f"model.preset={a.preset}", "model.img_size=[256, 192]", f"model.patch_size={a.patch_size}",
        f"model.activation_checkpointing={str(a.activation_checkpointing).lower()}",
        f"deepspeed.config={a.ds_config or f'configs/deepspeed/zero{a.stage}.json'}",
        f"train.precision={a.precision}", f"train.batch_size={a.batch_size}", f"train.max_steps_per_epoch={a.steps}",
        "train.epochs=1", "train.warmup_iters=0", "data.loader_workers=0",
        f"data.root={a.data_root}", "data.synthetic.generate=true", "data.synthetic.train_instances=32", "data.synthetic.val_instances=4",
    ]
    cfg = load_config(REPO / "configs/teacher/synthetic_tiny.yaml", sets, schema=TeacherConfig)
    baseline, file_baseline = rss_bytes("VmRSS"), rss_bytes("RssFile")
    t0 = time.time()
    # The hook Trainer is to carry around deepspeed.initialize (see zero_memory.py), applied from outside until
    # loop.py has it; nested inside loop.py's own it does nothing. --fp32-master separate sets the variable that
    # turns both off.
    with shared_fp32_master(complete_deepspeed_config(cfg, a.world)):
        trainer = Trainer(cfg, NullSession(a.rank, a.world))
    after_init = rss_bytes("VmRSS")
    meter = PhaseMeter(trainer) if a.phases else None
    t1 = time.time()
    stats = trainer.train_epoch(0, 1)
    t2 = time.time()
    peak = meter.peak() if meter else rss_bytes("VmHWM")
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    opt = trainer.engine.optimizer
    master = "-"  # what DeepSpeed built, whoever asked: ZeRO-3's fp32 master is the parameter partition or a copy
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        pairs = zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat, strict=True)
        shared = [m is lp for m, lp in pairs]
        master = "shared" if all(shared) else "separate" if not any(shared) else "mixed"
    result = {
        "rank": a.rank, "stage": a.stage, "preset": a.preset, "precision": a.precision, "params": params,
        "fp32_master": master,
        "torch_only_gib": after_imports_probe / GIB, "baseline_gib": baseline / GIB,
        "after_init_gib": after_init / GIB, "peak_gib": peak / GIB,
        # Mapped files (torch's libraries) count in resident memory; under memory pressure from other processes
        # the kernel drops some of those pages, and a peak then reads low by as much (see main's warning).
        "file_dropped_gib": max(0, file_baseline - rss_bytes("RssFile")) / GIB,
        "init_s": t1 - t0, "step_s": (t2 - t1) / max(stats.steps, 1), "steps": stats.steps, "loss": stats.loss,
    }
    if meter:
        result["before_steps_peak_gib"] = meter.before_first_phase / GIB
        result["census_after_init"] = meter.census_after_init
        result["phases"] = meter.records
    Path(a.result).write_text(json.dumps(result))
    # Leave without the interpreter's teardown: gloo/DeepSpeed threads still alive at exit can abort the process
    # ("terminate called without an active exception") after the figures are safely written.
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------- driver
def run_pair(stage: int, preset: str, precision: str, args: argparse.Namespace, tmp: Path) -> list[dict] | str:
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if args.fp32_master == "separate":
        env["VITPOSE_ZERO3_FP32_MASTER"] = "separate"
    procs, results = [], []
    for rank in (0, 1):
        result = tmp / f"{preset}-{stage}-{precision}-{rank}.json"
        cmd = [sys.executable, "-m", "benchmarks.zero_memory", "--worker", "--rank", str(rank), "--world", "2", "--stage", str(stage),
               "--preset", preset, "--precision", precision, "--batch-size", str(args.batch_size),
               "--patch-size", str(args.patch_size), "--ds-config", args.ds_config,
               "--steps", str(args.steps), "--data-root", args.data_root, "--result", str(result)]
        if args.phases:
            cmd.append("--phases")
        if args.activation_checkpointing or preset == "vitpose_g":
            cmd.append("--activation-checkpointing")
        log = open(tmp / f"{preset}-{stage}-{precision}-{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))), result, log))
    failed = []
    for proc, result, log in procs:
        rc = proc.wait()
        log.close()
        if rc == 0 and result.is_file():
            results.append(json.loads(result.read_text()))
        else:
            failed.append(rc)
    if failed:
        for proc, _, _ in procs:
            proc.kill()
        tail = (tmp / f"{preset}-{stage}-{precision}-0.log").read_text()[-1500:]
        why = "killed (out of memory)" if -9 in failed else f"exit codes {failed}"
        return f"{why}; rank 0 log tail:\n{tail}"
    return sorted(results, key=lambda r: r["rank"])


def print_phases(rows: list[dict]) -> None:
    """Rank 0's phases: where the peak is, and which long-lived buffers stand under it."""
    for r in rows:
        if r["rank"] != 0 or "phases" not in r:
            continue
        base = r["baseline_gib"]
        print(f"\n{r['preset']} stage {r['stage']} {r['precision']}, rank 0, GiB above after-imports "
              f"({base:.2f}): after init {r['after_init_gib'] - base:.2f}, peak before the first step "
              f"{r['before_steps_peak_gib'] - base:.2f}")
        print(f"  {'step':>4} {'phase':9} {'start':>6} {'peak':>6} {'end':>6} {'peak-start':>10}   long-lived buffers at the end")
        for ph in r["phases"]:
            census = ", ".join(f"{k} {v:.2f}" for k, v in ph["census"].items() if v >= 0.005)
            print(f"  {ph['step']:4d} {ph['phase']:9} {ph['start_gib'] - base:6.2f} {ph['peak_gib'] - base:6.2f} "
                  f"{ph['end_gib'] - base:6.2f} {ph['peak_gib'] - ph['start_gib']:10.2f}   {census}")
        census = ", ".join(f"{k} {v:.2f}" for k, v in r["census_after_init"].items() if v >= 0.005)
        print(f"  after init: {census}")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zero_memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vitpose_l")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--ds-config", default="", help="a DeepSpeed JSON to use for every stage listed (default: "
                   "configs/deepspeed/zero<stage>.json), e.g. to compare bucket settings")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--giant", action="store_true", help="also one vitpose_g step under ZeRO-3 (bf16)")
    p.add_argument("--data-root", default=str(REPO / "runs/bench/zero-memory-data"))
    p.add_argument("--fp32-master", default="shared", choices=["shared", "separate"],
                   help="ZeRO-3 fp32: the optimizer's fp32 master is the parameter partition (vitpose/train/"
                   "zero_memory.py, default) or DeepSpeed's separate copy (as before 2026-11-30)")
    p.add_argument("--phases", action="store_true", help="also rank 0's peak in each phase of each step "
                   "(forward, backward, optimizer step) and the engine's long-lived buffers at its end")
    p.add_argument("--json", action="store_true", help="also print every rank's figures as one JSON list, last line")
    # worker-side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0

    runs: list[tuple[str, int, str]] = [(a.preset, int(s), a.precision) for s in a.stages.split(",")]
    if a.giant:
        runs.append(("vitpose_g", 3, "bf16"))
    print(f"ZeRO memory: 2 ranks (gloo, 1 thread each), batch {a.batch_size} per rank, 256x192 at patch {a.patch_size}, "
          f"{a.steps} optimizer steps, AdamW (torch)\n")
    header = (f"{'model':10} {'stage':>5} {'prec':>5} {'params':>8} {'after imports':>13} {'after init':>10} "
              f"{'peak':>6} {'peak/st.0':>9} {'train GiB':>9} {'train/st.0':>10} {'s/step':>7} {'fp32 master':>11}")
    print(header)
    print("-" * len(header))
    stage0: dict[tuple[str, str], tuple[float, float]] = {}  # (preset, precision) -> rank 0's (peak, train)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="zero-memory-") as tmp:
        for preset, stage, precision in runs:
            out = run_pair(stage, preset, precision, a, Path(tmp))
            if isinstance(out, str):
                print(f"{preset:10} {stage:5d} {precision:>5}  FAILED: {out}")
                continue
            rows.extend(out)
            for r in out:
                train = r["peak_gib"] - r["baseline_gib"]
                if stage == 0 and r["rank"] == 0:
                    stage0[(preset, precision)] = (r["peak_gib"], train)
                ref = stage0.get((preset, precision))
                peak_ratio = f"{r['peak_gib'] / ref[0]:9.2f}" if ref else f"{'-':>9}"
                train_ratio = f"{train / ref[1]:10.2f}" if ref else f"{'-':>10}"
                print(f"{preset + ' r' + str(r['rank']):10} {stage:5d} {precision:>5} {r['params'] / 1e6:7.1f}M "
                      f"{r['baseline_gib']:12.2f}G {r['after_init_gib']:9.2f}G {r['peak_gib']:5.2f}G {peak_ratio} "
                      f"{train:8.2f}G {train_ratio} {r['step_s']:7.1f} {r['fp32_master']:>11}", flush=True)
    if a.phases:
        print_phases(rows)
    dropped = [r for r in rows if r.get("file_dropped_gib", 0) > 0.01]
    if dropped:
        print("\nWARNING: the kernel dropped mapped-file pages (memory pressure from other processes) in " +
              ", ".join(f"stage {r['stage']} r{r['rank']} ({r['file_dropped_gib']:.2f} GiB)" for r in dropped) +
              ": their peaks read low by up to that much; rerun on a quieter machine.")
    print("\npeak: the process's resident high-water mark (VmHWM); train GiB: peak minus after imports (the\n"
          "interpreter, torch and DeepSpeed, the same for every stage); st.0: the same column of stage 0, rank 0;\n"
          "fp32 master: ZeRO-3's optimizer updates the parameter partition itself (shared) or its own copy.")
    if a.json:
        print(json.dumps([{**r, "train_gib": r["peak_gib"] - r["baseline_gib"]} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

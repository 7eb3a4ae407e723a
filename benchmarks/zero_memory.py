"""Peak memory per rank for DeepSpeed ZeRO stages 0-3, two CPU ranks on gloo, through the real engine.

    python benchmarks/zero_memory.py [--preset vitpose_l] [--stages 0,1,2,3] [--batch-size 1] [--steps 2]
    python benchmarks/zero_memory.py --giant            # also one full-size vitpose_g step under ZeRO-3

Each configuration runs in two fresh processes (rank 0 and 1) that build the engine's ``Trainer`` from
configs/teacher/synthetic_tiny.yaml with the preset at full size (256x192) and the stage's JSON from
configs/deepspeed/, then run a few optimizer steps on real synthetic batches. Per rank it records the
resident memory after imports (the interpreter, torch, DeepSpeed: the same for every stage), after
``deepspeed.initialize`` and the peak (VmHWM) over the steps. "train GiB" is peak minus after-imports, the
memory that training itself costs; the last column is that against stage 0's.

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

from vitpose.train.session import free_port

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


# ------------------------------------------------------------------------------------------- worker
def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)  # two ranks on two cores
    after_imports_probe = rss_bytes("VmRSS")
    import deepspeed  # noqa: F401  (counted in the baseline, like torch)

    from vitpose.config import TeacherConfig, load_config
    from vitpose.train.loop import Trainer
    from vitpose.train.session import NullSession

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
    baseline = rss_bytes("VmRSS")
    t0 = time.time()
    trainer = Trainer(cfg, NullSession(a.rank, a.world))
    after_init = rss_bytes("VmRSS")
    t1 = time.time()
    stats = trainer.train_epoch(0, 1)
    t2 = time.time()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    result = {
        "rank": a.rank, "stage": a.stage, "preset": a.preset, "precision": a.precision, "params": params,
        "torch_only_gib": after_imports_probe / GIB, "baseline_gib": baseline / GIB,
        "after_init_gib": after_init / GIB, "peak_gib": rss_bytes("VmHWM") / GIB,
        "init_s": t1 - t0, "step_s": (t2 - t1) / max(stats.steps, 1), "steps": stats.steps, "loss": stats.loss,
    }
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
    procs, results = [], []
    for rank in (0, 1):
        result = tmp / f"{preset}-{stage}-{precision}-{rank}.json"
        cmd = [sys.executable, __file__, "--worker", "--rank", str(rank), "--world", "2", "--stage", str(stage),
               "--preset", preset, "--precision", precision, "--batch-size", str(args.batch_size),
               "--patch-size", str(args.patch_size), "--ds-config", args.ds_config,
               "--steps", str(args.steps), "--data-root", args.data_root, "--result", str(result)]
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
              f"{'peak':>6} {'peak/st.0':>9} {'train GiB':>9} {'train/st.0':>10} {'s/step':>7}")
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
                      f"{train:8.2f}G {train_ratio} {r['step_s']:7.1f}", flush=True)
    print("\npeak: the process's resident high-water mark (VmHWM); train GiB: peak minus after imports (the\n"
          "interpreter, torch and DeepSpeed, the same for every stage); st.0: the same column of stage 0, rank 0.")
    if a.json:
        print(json.dumps([{**r, "train_gib": r["peak_gib"] - r["baseline_gib"]} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

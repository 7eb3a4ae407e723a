"""Where the demo's training time goes: the demo teacher's step and a demo sweep trial's step, phase by phase.

    python -m benchmarks.demo_profile [--parts teacher student] [--steps 40] [--warmup 5] [--skip-eval]
                                      [--levers REPS [--only WORD ...]] [--teacher-set ...] [--student-set ...] [--json [PATH]]

Both run the shipped ``Trainer`` (vitpose/train/loop.py, ``train_epoch``) outside Ray, with the demo's configs:
the teacher (configs/teacher/synthetic_tiny.yaml: vitpose_nano, 2 ranks of 1 thread, ZeRO-3, bf16, batch 16
per rank) and a trial of the sweep (configs/distill/synthetic_tiny.yaml: vitpose_pico, 1 rank, ZeRO-0, batch 32,
the output arm on the view bank's views; the bank is built first from a randomly initialised teacher of the
demo's shape, untimed: a step costs the same whatever the teacher knows). What Ray and Tune add around a step
(reporting, the trial's process) is not in these figures; the demo's own log shows it.

Per rank, after an untimed warm-up epoch of a few steps:
1. phases of ``--steps`` steps, timed by wrapping the Trainer's parts (the next batch from the loader, the loss
   function = the forward pass, the finite-loss check, ``engine.backward``, ``engine.step``; "loop" is what is
   left of the step: the Trainer's own bookkeeping);
2. ops of another ``--steps // 2`` steps under torch.profiler (CPU): self time of matmul-like kernels, of
   collectives, of the other aten ops, and the rest of the wall time, which runs in Python (ours, DeepSpeed's
   hooks, autograd's engine) and is what tiny models are bound by;
3. one evaluation (val set, flip test, COCOeval on rank 0) and one checkpoint save, each timed once.
``--levers REPS``: instead, the step time (phases only) of each lever in ``LEVERS`` against the shipped setting,
one thing changed per arm, the arms taking turns REPS times; the median ratio with its min and max.
MFU: training FLOPs (3 x the forward's, the forward's being 2 x ``ViTPose.flops`` multiply-accumulates) per
second of step, over this machine's matmul rate at the run's precision on one thread (2048^3, measured here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO, Run, add_json_option, cpu_model, load_average

TEACHER = REPO / "configs" / "teacher" / "synthetic_tiny.yaml"
STUDENT = REPO / "configs" / "distill" / "synthetic_tiny.yaml"
DATA = REPO / "runs" / "bench" / "demo-profile" / "synthetic"
TOP_OPS = 12
PHASES = ("data", "forward", "finite check", "backward", "optimizer step", "loop")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward",
              "aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::mkldnn_", "aten::_mkldnn")
COLLECTIVE_MARKS = ("gloo", "c10d", "all_gather", "allgather", "reduce_scatter", "allreduce", "all_reduce",
                    "broadcast", "barrier")


class PhaseClock:
    """Seconds per phase, summed over the steps it watched."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0
        return timed

    def batches(self, loader: Any) -> Any:
        clock = self

        class Timed:
            def __iter__(self) -> Iterator[Any]:
                it = iter(loader)
                while True:
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    finally:
                        clock.seconds["data"] += time.perf_counter() - t0
                    yield batch

        return Timed()


def instrument(trainer: Any, clock: PhaseClock) -> Callable[[], None]:
    """Wrap the Trainer's step parts with ``clock``; returns the undo."""
    engine = trainer.engine
    saved = (trainer.loaders.train, trainer.loss_fn, trainer._all_finite)
    trainer.loaders.train = clock.batches(saved[0])
    trainer.loss_fn = clock.wrap("forward", saved[1])
    trainer._all_finite = clock.wrap("finite check", saved[2])
    engine.backward = clock.wrap("backward", type(engine).backward.__get__(engine))
    engine.step = clock.wrap("optimizer step", type(engine).step.__get__(engine))

    def undo() -> None:
        trainer.loaders.train, trainer.loss_fn, trainer._all_finite = saved
        del engine.backward, engine.step
    return undo


def op_breakdown(prof: Any, wall: float, steps: int) -> dict[str, float]:
    """Milliseconds per step: matmul-like kernels, collectives, other aten ops (self times), the rest (Python)."""
    cats = {"matmul kernels": 0.0, "collectives": 0.0, "other ops": 0.0}
    for ev in prof.key_averages():
        name = ev.key
        self_s = ev.self_cpu_time_total / 1e6
        if any(m in name.lower() for m in COLLECTIVE_MARKS):
            cats["collectives"] += self_s
        elif name.startswith(MATMUL_OPS):
            cats["matmul kernels"] += self_s
        elif name.startswith(("aten::", "c10d::", "autograd::", "Optimizer", "torch::")) or "Backward" in name:
            cats["other ops"] += self_s
    cats["python and the rest"] = max(0.0, wall - sum(cats.values()))
    return {k: 1000 * v / steps for k, v in cats.items()}


def top_ops(prof: Any, steps: int, count: int) -> list[tuple[str, float, int]]:
    """The ``count`` ops of most self time: (name, ms per step, calls per step)."""
    evs = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:count]
    return [(e.key, e.self_cpu_time_total / 1e3 / steps, round(e.count / steps)) for e in evs]


def build_teacher_trainer(rank: int, world: int, sets: list[str]) -> Any:
    from vitpose.config import TeacherConfig, load_config
    from vitpose.train.loop import Trainer
    from vitpose.train.session import NullSession

    cfg = load_config(TEACHER, [f"data.root={DATA}", "data.synthetic.generate=true", *sets], schema=TeacherConfig)
    return Trainer(cfg, NullSession(rank, world))


def build_student_trainer(sets: list[str], bank_dir: Path) -> Any:
    """A trial of the demo sweep's output arm, put together as ``vitpose.distill.trial.train_student`` does."""
    from vitpose.build import build_datasets, build_model_from_config
    from vitpose.config import StudentConfig, TeacherConfig, load_config
    from vitpose.distill.bank import BankedViews, ViewBank
    from vitpose.distill.space import apply_params
    from vitpose.distill.student import build_student, distill_loss
    from vitpose.train.loop import Trainer
    from vitpose.train.session import NullSession

    base = [f"data.root={DATA}", "data.synthetic.generate=true"]
    cfg = load_config(STUDENT, [*base, "distill.teacher_uri=runs/none", *sets], schema=StudentConfig)
    cfg = apply_params(cfg, {"distill.parts": "output"})
    teacher_cfg = load_config(TEACHER, base, schema=TeacherConfig)
    teacher = build_model_from_config(teacher_cfg).eval()
    train_ds, val_ds = build_datasets(cfg, is_local_leader=True)
    o = cfg.distill.output
    bank = ViewBank.build(teacher, train_ds, o.views, cfg.train.seed, bank_dir, "random-teacher",
                          say=lambda _: None)
    loss = distill_loss(o.weight, None)
    model = build_student(cfg, None)
    return Trainer(cfg, NullSession(), model=model, loss_fn=loss,
                   datasets=(BankedViews(train_ds, bank, cfg.train.seed, False), val_ds))


def profile_rank(part: str, rank: int, world: int, port: int, steps: int, sets: list[str], queue: Any,
                 warmup: int = 5, skip_eval: bool = False, phases_only: bool = False) -> None:
    try:
        from torch.profiler import ProfilerActivity, profile

        from benchmarks.peer.speed import matmul_gflops  # the same peak compare_peer measures
        from vitpose.models.vitpose import build_model_from_spec
        from vitpose.train.session import single_process_env

        os.environ.update(single_process_env(rank, world, port))
        torch.set_num_threads(1)  # what Ray gives a 1-CPU worker (OMP_NUM_THREADS=1)
        if os.environ.get(WITH_SHM_OP):  # the lever arm "as before": DeepSpeed's comm layer with its shm op
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")  # the Trainer's init_comm then finds it up
        with tempfile.TemporaryDirectory() as tmp:
            trainer = (build_teacher_trainer(rank, world, sets) if part == "teacher"
                       else build_student_trainer(sets, Path(tmp) / "bank"))
            if os.environ.get(SHOW_DEPRECATIONS):  # the lever arm "as before": the engine's filter taken out
                from vitpose.train.engine import DEPRECATED_COLLECTIVES

                warnings.filters[:] = [f for f in warnings.filters
                                       if getattr(f[1], "pattern", None) != DEPRECATED_COLLECTIVES]
            trainer.train_epoch(0, 4, max_steps=warmup)  # warm-up: DeepSpeed's buffers, the image cache's first reads
            clock = PhaseClock()
            undo = instrument(trainer, clock)
            stats = trainer.train_epoch(1, 4, max_steps=steps)
            undo()
            n = stats.steps
            phases = {k: 1000 * v / n for k, v in clock.seconds.items()}
            phases["loop"] = max(0.0, 1000 * stats.seconds / n - sum(phases.values()))
            ops: dict[str, float] = {}
            top: list[tuple[str, float, int]] = []
            wall, prof_step_count = float("nan"), 1
            if not phases_only:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    t0 = time.perf_counter()
                    pstats = trainer.train_epoch(2, 4, max_steps=max(2, steps // 2))
                    wall, prof_step_count = time.perf_counter() - t0, pstats.steps
                ops = op_breakdown(prof, wall, prof_step_count)
                top = top_ops(prof, prof_step_count, TOP_OPS)
            eval_s = save_s = ap = float("nan")
            if not (skip_eval or phases_only):
                t0 = time.perf_counter()
                ap = trainer.evaluate(2).get("val/AP", float("nan"))
                eval_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                trainer.save_checkpoint(Path(tmp) / "ckpt", 2, {})
                save_s = time.perf_counter() - t0
            spec, precision = trainer.spec, trainer.cfg.train.precision
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
            peak = matmul_gflops(dtype)
            train_flops = 3 * 2 * build_model_from_spec(spec, device="meta").flops()
            batch = trainer.cfg.train.batch_size
            step_ms = 1000 * stats.seconds / n
            result = {
                "part": part, "rank": rank, "world": world, "stage": trainer.stage, "precision": precision,
                "preset": trainer.cfg.model.preset, "batch per rank": batch, "steps": n,
                "step ms": step_ms, "img/s": batch * world * 1000 / step_ms, "phases ms": phases,
                "ops ms (profiled steps)": ops, "top ops (name, ms per step, calls per step)": top, "profiled step ms": 1000 * wall / prof_step_count,
                "eval s": eval_s, "checkpoint s": save_s, "val AP (untrained)": ap,
                "train GFLOP per image": train_flops / 1e9, "matmul peak GFLOP/s (1 thread)": peak,
                "MFU": train_flops * batch / (step_ms / 1000) / (peak * 1e9),
            }
            queue.put(result)
    except BaseException as err:  # the parent must not wait forever
        queue.put({"error": f"{part} rank {rank}: {type(err).__name__}: {err}"})
        raise
    finally:
        queue.close()
        queue.join_thread()  # the result is written before the process leaves
        sys.stdout.flush()
    os._exit(0)  # gloo/DeepSpeed threads at interpreter teardown can abort the process after the result is sent


def run_part(part: str, steps: int, sets: list[str], warmup: int = 5, skip_eval: bool = False,
             phases_only: bool = False, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from vitpose.build import ensure_data
    from vitpose.config import TeacherConfig, load_config
    from vitpose.train.session import free_port

    ensure_data(load_config(TEACHER, [f"data.root={DATA}", "data.synthetic.generate=true"], schema=TeacherConfig))
    world = 2 if part == "teacher" else 1
    for s in sets:
        if s.startswith("ray.num_workers="):
            world = int(s.split("=", 1)[1])
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=profile_rank, args=(part, r, world, port, steps, sets, queue, warmup, skip_eval,
                                                    phases_only)) for r in range(world)]
    saved = dict(os.environ)
    os.environ.update(env or {})  # what glibc reads as the children start (a spawned child copies it)
    try:
        for p in procs:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        sys.exit("\n".join(errors))
    return sorted(results, key=lambda r: r["rank"])


def table(results: list[dict[str, Any]], key: str) -> list[str]:
    rows = list(results[0][key])
    lines = [f"    {'':22s}" + "".join(f"{'rank ' + str(r['rank']):>10s}" for r in results)]
    for row in rows:
        lines.append(f"    {row:22s}" + "".join(f"{r[key][row]:10.1f}" for r in results))
    return lines


def report(results: list[dict[str, Any]]) -> None:
    r0 = results[0]
    print(f"{r0['part']}: {r0['preset']}, {r0['world']} rank(s) of 1 thread, ZeRO-{r0['stage']}, {r0['precision']}, "
          f"batch {r0['batch per rank']} per rank; {r0['steps']} steps")
    print(f"  step {r0['step ms']:.1f} ms = {r0['img/s']:.1f} img/s; MFU {100 * r0['MFU']:.1f}% "
          f"({r0['train GFLOP per image']:.3f} GFLOP per training image, matmul peak "
          f"{r0['matmul peak GFLOP/s (1 thread)']:.0f} GFLOP/s per thread at {r0['precision']})")
    print("  phases, ms per step:")
    print("\n".join(table(results, "phases ms")))
    print(f"  ops, ms per step (under the profiler: {r0['profiled step ms']:.1f} ms per step):")
    print("\n".join(table(results, "ops ms (profiled steps)")))
    print("  top ops by self time (rank 0): " + "; ".join(f"{n} {ms:.1f} ms x{c}" for n, ms, c in
                                                          r0["top ops (name, ms per step, calls per step)"]))
    if r0["eval s"] == r0["eval s"]:  # not NaN: measured
        print(f"  one evaluation {r0['eval s']:.2f} s; one checkpoint save {r0['checkpoint s']:.2f} s (rank 0)")


HEAP_131K = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# Each lever against the shipped setting, one thing changed: (config overrides, environment).
SHOW_DEPRECATIONS = "DEMO_PROFILE_SHOW_DEPRECATIONS"
WITH_SHM_OP = "DEMO_PROFILE_WITH_SHM_OP"
LEVERS: dict[str, dict[str, tuple[list[str], dict[str, str]]]] = {
    "teacher": {
        "shipped": ([], {}),
        "torch's deprecation warnings written every step (as before)": ([], {SHOW_DEPRECATIONS: "1"}),
        "heap: blocks over 128 KiB mapped (as before)": ([], HEAP_131K),
        "ZeRO-3 with persistent tiny tensors (zero3.json)": (["deepspeed.config=configs/deepspeed/zero3.json"], {}),
        "ZeRO-0 (reference, not the demo's)": (["deepspeed.config=configs/deepspeed/zero0.json"], {}),
        "bf16 teacher (as before train.precision=auto)": (["train.precision=bf16"], {}),
        "DeepSpeed's CPU shared-memory all-reduce op loaded (as before)": ([], {WITH_SHM_OP: "1"}),
        "the paper's simple decoder (not shipped: its AP unmeasured here)": (["model.decoder=simple"], {}),
    },
    "student": {
        "shipped": ([], {}),
        "heap: blocks over 128 KiB mapped (as before)": ([], HEAP_131K),
        "bf16 students (not shipped)": (["train.precision=bf16"], {}),
        "DeepSpeed's CPU shared-memory all-reduce op loaded (as before)": ([], {WITH_SHM_OP: "1"}),
    },
}


def compare_levers(part: str, steps: int, reps: int, sets: list[str], only: list[str]) -> dict[str, Any]:
    """Step time of each lever of ``part``, the arms taking turns (benchmarks.harness.interleave), rank 0's."""
    from benchmarks.harness import interleave, ratio

    def arm(extra: list[str], env: dict[str, str]) -> Any:
        return lambda: run_part(part, steps, [*sets, *extra], phases_only=True, env=env)[0]["step ms"] / 1000

    arms = {name: arm(extra, env) for name, (extra, env) in LEVERS[part].items()
            if name == "shipped" or not only or any(word in name for word in only)}
    times = interleave(arms, reps, warmup=0, self_timed=True)
    print(f"{part}: ms per step, {reps} turns of {steps} steps each, interleaved")
    out = {}
    for name, secs in times.items():
        r = ratio(secs, times["shipped"])
        out[name] = {"ms": [1000 * t for t in secs], "vs shipped": r}
        print(f"  {name:52s} {statistics.median(secs) * 1000:7.1f} ms  x{r['median']:.2f} the shipped step's time "
              f"[{r['min']:.2f}, {r['max']:.2f}]")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["teacher", "student"], default=["teacher", "student"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--skip-eval", action="store_true", help="no evaluation or checkpoint timing (big models)")
    p.add_argument("--levers", type=int, metavar="REPS", default=0,
                   help="instead of the profile: each lever's step time against the shipped one, REPS turns")
    p.add_argument("--only", nargs="+", default=[], metavar="WORD",
                   help="with --levers: only the levers whose name holds one of these words (and the shipped arm)")
    p.add_argument("--teacher-set", action="append", default=[], help="config override for the teacher")
    p.add_argument("--student-set", action="append", default=[], help="config override for the trial")
    add_json_option(p, "demo_profile")
    a = p.parse_args(argv)
    run = Run("demo_profile", a.json, argv)
    print(f"{cpu_model()}, {os.cpu_count()} cores; load average {load_average()}")
    out: dict[str, Any] = {}
    for part in a.parts:
        sets = a.teacher_set if part == "teacher" else a.student_set
        if a.levers:
            out[f"{part} levers"] = compare_levers(part, a.steps, a.levers, sets, a.only)
            continue
        out[part] = run_part(part, a.steps, sets, a.warmup, a.skip_eval)
        report(out[part])
    out["load average at end"] = load_average()
    run.finish(**out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

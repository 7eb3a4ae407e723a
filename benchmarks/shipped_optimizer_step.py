"""The optimizer phase of the shipped training step, fused AdamW against torch's for-loop AdamW.

    python -m benchmarks.shipped_optimizer_step [--models s,b] [--stages 0,3] [--threads 1,2] [--reps 8]

Two DeepSpeed engines per case, built by the real ``Trainer`` (see ``benchmarks.peer.shipped.shipped_config``:
ViTPose at 256x192, the paper's layer-decayed groups, clipping 1.0) from configs/deepspeed/zero<stage>.json as
shipped and from the same JSON with the other AdamW (``benchmarks.peer.shipped.variant_json``), in one process
(one rank). Each
repetition runs forward and backward on a pre-made batch of 2 untimed, then times ``engine.step()`` alone:
clipping, DeepSpeed's bf16 / ZeRO wrapper (fp32 masters) and torch's AdamW. That is the only part of the step
the AdamW implementation changes, so it is timed without the forward and backward passes whose noise on a
loaded machine is larger than the whole difference (``benchmarks.compare_peer`` section 2b times the whole
step). Interleaved (``benchmarks.harness.interleave``: the order flips each repetition), after one untimed round; median and minimum per engine and the
median of the per-repetition ratios. The load average is printed with every row. Engines are not all handed back
between cases (DeepSpeed keeps references): the full grid of 16 cases grew past 20 GB here with ViTPose-B at
ZeRO-3, so run it in parts (e.g. --stages 0, then --stages 3) where memory is short.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from benchmarks.harness import (
    Run,
    add_json_option,
    cpu_model,
    interleave,
    load_average,
    ratio,
    retain_freed_memory,
)
from benchmarks.peer.common import MODELS, set_dist_env
from benchmarks.peer.shipped import SHIPPED_DS, deepspeed_fused, shipped_config, variant_json


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shipped_optimizer_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="s,b")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--stages", default="0,3")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=8)
    add_json_option(p, "shipped_optimizer_step")
    a = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    run = Run("shipped_optimizer_step", a.json)
    rows = []
    from vitpose.build import ensure_data
    from vitpose.train.loop import Trainer
    from vitpose.train.session import NullSession, free_port

    retain_freed_memory()
    set_dist_env(0, 1, free_port())
    models, precisions = a.models.split(","), a.precisions.split(",")
    ensure_data(shipped_config(models[0], precisions[0], 2, SHIPPED_DS / "zero0.json"))
    print(f"engine.step() of the shipped ZeRO engines, one rank, batch 2; {cpu_model()}, load {load_average()}")
    with tempfile.TemporaryDirectory(prefix="shipped-opt-") as tmp:
        for stage in [int(s) for s in a.stages.split(",")]:
            other = variant_json(stage, Path(tmp))
            for threads in [int(t) for t in a.threads.split(",")]:
                torch.set_num_threads(threads)
                for name in models:
                    for precision in precisions:
                        engines = {k: Trainer(shipped_config(name, precision, 2, j), NullSession()) for k, j in
                                   (("shipped", SHIPPED_DS / f"zero{stage}.json"), ("other", other))}
                        fused = {k: deepspeed_fused(t) for k, t in engines.items()}
                        f_key, l_key = ("shipped", "other") if fused["shipped"] else ("other", "shipped")
                        batch = engines["shipped"]._to_device(next(iter(engines["shipped"].loaders.train)))

                        def backward(k: str, batch: dict = batch, engines: dict = engines) -> None:  # untimed
                            t = engines[k]
                            loss, _ = t.loss_fn(t.engine, batch)
                            t.engine.backward(loss)

                        # The first round is a warm-up (optimizer state, allocations); then fused, for-loop in
                        # turns, each engine.step() timed after its untimed forward and backward.
                        steps = {k: engines[k].engine.step for k in (f_key, l_key)}
                        times = interleave(steps, a.reps, warmup=1, before_each=backward)
                        f, lo = times[f_key], times[l_key]
                        speedup = ratio(lo, f)
                        print(f"{MODELS[name]} {precision} ZeRO-{stage} ({type(engines[f_key].optimizer).__name__}) "
                              f"{threads} thread(s): fused {statistics.median(f):.3f} s (min {min(f):.3f}), for-loop "
                              f"{statistics.median(lo):.3f} s (min {min(lo):.3f}); for-loop / fused "
                              f"{speedup['median']:.2f}x (range {speedup['min']:.2f}-{speedup['max']:.2f}, mins "
                              f"{min(lo) / min(f):.2f}x); shipped JSON fused: {fused['shipped']}; load "
                              f"{load_average()}", flush=True)
                        rows.append({"model": MODELS[name], "precision": precision, "stage": stage,
                                     "threads": threads, "fused": f, "for-loop": lo, "for-loop / fused": speedup,
                                     "shipped JSON fused": fused["shipped"], "load": os.getloadavg()})
                        engines.clear()
                        gc.collect()
    run.finish(rows=rows)
    sys.stdout.flush()
    os._exit(0)  # gloo/DeepSpeed threads still alive at exit can abort the interpreter's teardown


if __name__ == "__main__":
    raise SystemExit(main())

"""The optimizer phase of the shipped training step, fused AdamW against torch's for-loop AdamW.

    python benchmarks/shipped_optimizer_step.py [--models s,b] [--stages 0,3] [--threads 1,2] [--reps 8]

Two DeepSpeed engines per case, built by the real ``Trainer`` (see ``compare_peer.shipped_config``: ViTPose at
256x192, the paper's layer-decayed groups, clipping 1.0) from configs/deepspeed/zero<stage>.json as shipped and
from the same JSON with the other AdamW (``compare_peer.variant_json``), in one process (one rank). Each
repetition runs forward and backward on a pre-made batch of 2 untimed, then times ``engine.step()`` alone:
clipping, DeepSpeed's bf16 / ZeRO wrapper (fp32 masters) and torch's AdamW. That is the only part of the step
the AdamW implementation changes, so it is timed without the forward and backward passes whose noise on a
loaded machine is larger than the whole difference (compare_peer.py section 2b times the whole step).
Interleaved (the order flips each repetition), after one untimed round; median and minimum per engine and the
median of the per-repetition ratios. The load average is printed with every row. Engines are not all handed back
between cases (DeepSpeed keeps references): the full grid of 16 cases grew past 20 GB here with ViTPose-B at
ZeRO-3, so run it in parts (e.g. --stages 0, then --stages 3) where memory is short.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_compare_peer():
    spec = importlib.util.spec_from_file_location("compare_peer", REPO / "benchmarks" / "compare_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_peer"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="s,b")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--stages", default="0,3")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=8)
    a = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    cp = load_compare_peer()
    from vitpose.build import ensure_data
    from vitpose.train.loop import Trainer
    from vitpose.train.session import NullSession, free_port

    cp.retain_freed_memory()
    cp.set_dist_env(0, 1, free_port())
    models, precisions = a.models.split(","), a.precisions.split(",")
    ensure_data(cp.shipped_config(models[0], precisions[0], 2, cp.SHIPPED_DS / "zero0.json"))
    print(f"engine.step() of the shipped ZeRO engines, one rank, batch 2; {cp.cpu_model()}, load {cp.load_average()}")
    with tempfile.TemporaryDirectory(prefix="shipped-opt-") as tmp:
        for stage in [int(s) for s in a.stages.split(",")]:
            other = cp.variant_json(stage, Path(tmp))
            for threads in [int(t) for t in a.threads.split(",")]:
                torch.set_num_threads(threads)
                for name in models:
                    for precision in precisions:
                        engines = {k: Trainer(cp.shipped_config(name, precision, 2, j), NullSession()) for k, j in
                                   (("shipped", cp.SHIPPED_DS / f"zero{stage}.json"), ("other", other))}
                        fused = {k: cp.deepspeed_fused(t) for k, t in engines.items()}
                        f_key, l_key = ("shipped", "other") if fused["shipped"] else ("other", "shipped")
                        batch = engines["shipped"]._to_device(next(iter(engines["shipped"].train_loader)))
                        times: dict[str, list[float]] = {k: [] for k in engines}
                        for r in range(a.reps + 1):
                            for k in ((f_key, l_key) if r % 2 else (l_key, f_key)):
                                t = engines[k]
                                loss, _ = t.loss_fn(t.engine, batch)
                                t.engine.backward(loss)
                                t0 = time.perf_counter()
                                t.engine.step()
                                if r:  # the first round is a warm-up (optimizer state, allocations)
                                    times[k].append(time.perf_counter() - t0)
                        f, lo = times[f_key], times[l_key]
                        print(f"{cp.MODELS[name]} {precision} ZeRO-{stage} ({type(engines[f_key].optimizer).__name__}) "
                              f"{threads} thread(s): fused {statistics.median(f):.3f} s (min {min(f):.3f}), for-loop "
                              f"{statistics.median(lo):.3f} s (min {min(lo):.3f}); for-loop / fused "
                              f"{statistics.median(b / x for x, b in zip(f, lo, strict=True)):.2f}x (mins "
                              f"{min(lo) / min(f):.2f}x); shipped JSON fused: {fused['shipped']}; load "
                              f"{cp.load_average()}", flush=True)
                        engines.clear()
                        gc.collect()
    sys.stdout.flush()
    os._exit(0)  # gloo/DeepSpeed threads still alive at exit can abort the interpreter's teardown


if __name__ == "__main__":
    raise SystemExit(main())

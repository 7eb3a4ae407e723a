"""Inference throughput of the pose network: images/second in PyTorch eager, onnxruntime and (opt-in)
torch.compile, for student presets at batch 1 and 32, measured side by side.

    python -m benchmarks.inference                                  # vitpose_nano + vitpose_s, batch 1 and 32
    python -m benchmarks.inference --compile --presets vitpose_nano # add torch.compile (slow to compile)

What is timed is the network alone on normalised 256x192 crops (the part a deployment swaps runtimes for);
cropping and decoding are the same Python in every case. Backends are interleaved within each repetition,
in a rotating order (``benchmarks.harness.rates``), so load from other processes hits them alike; the table
shows medians and the median of the per-repetition ratios to eager (their spread in the JSON record). Weights are random: speed does not depend on their values.

torch.compile is off by default: on a 2-core CPU it compiles each input shape for 20 s (warm inductor cache)
to 90 s (cold), which would blow the ~3 minute budget of the default run, for about 1.15x over eager on
vitpose_nano at one thread; --compile measures it.

On a CPU shared with other jobs, OpenMP's spin-waiting threads can make PyTorch many times slower with one
thread per core than with one thread in total (seen here: 50x at batch 1); the script warns when the load
average says so, and --threads 1 gives numbers that describe the runtimes rather than the contention.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Run, add_json_option, rates
from vitpose.deploy.onnx import export_onnx, onnx_session, sample_crops
from vitpose.models import build_model

BATCH1_CALLS = 8  # batch-1 calls per timed measurement: one call is too short to time against scheduler noise


def make_backends(preset: str, with_compile: bool, tmp: Path) -> dict[str, Any]:
    """name -> callable(tensor) running the network; each built once per preset."""
    torch.manual_seed(0)
    model = build_model(preset).eval()
    session = onnx_session(export_onnx(model, tmp / f"{preset}.onnx"))
    backends: dict[str, Any] = {"eager": model, "onnxruntime": lambda x: session.run(None, {"images": x.numpy()})[0]}
    if with_compile:
        backends["compile"] = torch.compile(model)
    return backends


@torch.inference_mode()
def bench_preset(preset: str, batches: list[int], reps: int, with_compile: bool, tmp: Path) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    backends = make_backends(preset, with_compile, tmp)
    print(f"{preset}: built and exported in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    names = list(backends)
    for batch in batches:
        x = sample_crops(batch, (256, 192))
        calls = BATCH1_CALLS if batch == 1 else 1
        for name in names:  # warm-up: first-call allocations, ORT arena growth, compilation
            t = time.perf_counter()
            backends[name](x)
            if name == "compile":
                print(f"  torch.compile warm-up at batch {batch}: {time.perf_counter() - t:.0f}s", flush=True)
        row = {"preset": preset, "batch": batch,
               **rates(backends, reps, "eager", calls=calls, items=batch, args=(x,))}
        rows.append(row)
        print(f"  batch {batch}: " + ", ".join(f"{n} {row[n]:.1f} img/s" for n in names), flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    names = [k for k in ("eager", "onnxruntime", "compile") if k in rows[0]]
    ratios = [f"{n}/eager" for n in names[1:]]
    head = f"{'preset':<14}{'batch':>6}" + "".join(f"{n + ' img/s':>19}" for n in names) + "".join(f"{r:>19}" for r in ratios)
    print("\n" + head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['preset']:<14}{row['batch']:>6}" + "".join(f"{row[n]:>19.1f}" for n in names)
              + "".join(f"{row[r]:>18.2f}x" for r in ratios))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["vitpose_nano", "vitpose_s"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per cell (median reported)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes of compilation on CPU)")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime (default: torch's, one per core)")
    add_json_option(p, "inference")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; onnxruntime with the same thread count")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        # Measured here: with other jobs on a 2-core machine, 2 spin-waiting OpenMP threads made eager batch 1
        # 50x slower than 1 thread; such numbers describe the contention, not the runtimes.
        print(f"warning: load average {load:.1f} on {cores} cores: other processes compete for the CPU; "
              "compare rows of this run only, and try --threads 1")
    t0 = time.perf_counter()
    run = Run("inference", a.json)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            rows += bench_preset(preset, a.batches, a.reps, a.compile, Path(tmp))
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    run.finish(rows=rows)


if __name__ == "__main__":
    main()

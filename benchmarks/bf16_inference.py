"""bf16 inference on the CPU: the model cast to bf16 once (what ``PosePredictor(dtype=torch.bfloat16)``, and
so serving, runs) against fp32 and against bf16 autocast over fp32 weights (which casts every weight on
every call), side by side.

    python -m benchmarks.bf16_inference                        # vitpose_s and vitpose_b, batch 1 and 32

Timed: ``PosePredictor.heatmaps`` on normalised 256x192 crops, flip test off, the network alone. Paths are
interleaved in a rotating order within each repetition (``benchmarks.harness.rates``) so load from other processes hits them alike; the
table shows medians and the median of the per-repetition ratios to fp32. Also printed: the largest heatmap
difference of each bf16 path from fp32 (random weights; speed does not depend on their values).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.harness import Run, add_json_option, rates
from vitpose.deploy.inference import PosePredictor
from vitpose.deploy.onnx import sample_crops
from vitpose.models import build_model

BATCH1_CALLS = 8


def paths(preset: str) -> dict[str, Any]:
    torch.manual_seed(0)
    fp32 = PosePredictor(build_model(preset).eval(), flip_test=False)
    cast = PosePredictor(build_model(preset).eval(), flip_test=False, dtype=torch.bfloat16)
    cast.model.load_state_dict(fp32.model.state_dict())

    def autocast(x: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fp32.heatmaps(x)

    return {"fp32": fp32.heatmaps, "bf16 weights": cast.heatmaps, "bf16 autocast": autocast}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bf16_inference", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["vitpose_s", "vitpose_b"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--reps", type=int, default=5)
    add_json_option(p, "bf16_inference")
    a = p.parse_args()
    run = Run("bf16_inference", a.json)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for preset in a.presets:
        fns = paths(preset)
        names = list(fns)
        for batch in a.batches:
            x = sample_crops(batch, (256, 192))
            ref = fns["fp32"](x)[0]
            diffs = {n: float(abs(fns[n](x)[0] - ref).max()) for n in names[1:]}  # also the warm-up
            calls = BATCH1_CALLS if batch == 1 else 1
            row = {"preset": preset, "batch": batch, **rates(fns, a.reps, "fp32", calls=calls, items=batch, args=(x,))}
            rows.append(row)
            print(f"{preset} batch {batch}: " + ", ".join(f"{n} {row[n]:.1f} img/s" for n in names)
                  + "; max |heatmap - fp32| " + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()), flush=True)
    print(f"\n{'preset':<12}{'batch':>6}{'fp32 img/s':>12}{'bf16 weights':>14}{'bf16 autocast':>15}"
          f"{'weights/fp32':>14}{'autocast/fp32':>15}")
    for r in rows:
        print(f"{r['preset']:<12}{r['batch']:>6}{r['fp32']:>12.1f}{r['bf16 weights']:>14.1f}{r['bf16 autocast']:>15.1f}"
              f"{r['bf16 weights/fp32']:>13.2f}x{r['bf16 autocast/fp32']:>14.2f}x")
    run.finish(rows=rows)


if __name__ == "__main__":
    main()

"""What the sections of ``benchmarks.compare_peer`` share: the presets, the tiny teacher's config, the process
environment of a rank, and how both implementations are called."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn as nn

from benchmarks.harness import REPO, cpu_flags, cpu_model, gpu_name, load_average
from vitpose.train.session import single_process_env

TINY_TEACHER = REPO / "configs" / "teacher" / "synthetic_tiny.yaml"
CACHE = REPO / "runs" / "bench" / "compare-peer"
MODELS = {"s": "vitpose_s", "b": "vitpose_b", "l": "vitpose_l", "h": "vitpose_h"}
INFER_BATCHES = (1, 32)
TRAIN_BATCH = 16
MIN_MEASURE_S = 0.4  # batch-1 calls are repeated until one measurement lasts about this long
LR, WD = 1e-4, 0.05


def machine_info() -> dict[str, Any]:
    import platform

    import transformers

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu_name() or "none",
        "isa": torch.backends.cpu.get_cpu_capability(),
        "bf16 in hardware": ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load average at start": load_average(),
    }


def heatmaps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.heatmaps


def autocast(bf16: bool, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def tiny_config(overrides: list[str]) -> Any:
    from vitpose.config import load_config

    data = CACHE / "synthetic"
    return load_config(TINY_TEACHER, [f"data.root={data}", "data.synthetic.generate=true"] + overrides)


def set_dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(single_process_env(rank, world, port))

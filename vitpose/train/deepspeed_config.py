"""DeepSpeed JSON completion: our config fills batch sizes, optimizer, clipping and precision.

The JSON under configs/deepspeed/ holds only what is DeepSpeed's own business (ZeRO stage and buckets).
Anything our config also decides is written in from it; a JSON that states a different value is an
error rather than a silent winner, so the two can never disagree.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from vitpose.config import ConfigError, TeacherConfig, resolve_path


def load_deepspeed_json(cfg: TeacherConfig) -> dict[str, Any]:
    path = resolve_path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(
            f"deepspeed.config: {path} not found; use one of configs/deepspeed/zero{{0,1,2,3}}.json"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def complete_deepspeed_config(cfg: TeacherConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict that ``deepspeed.initialize`` gets, completed and checked."""
    source = resolve_path(cfg.deepspeed.config)
    ds = copy.deepcopy(load_deepspeed_json(cfg))
    t = cfg.train

    def put(path: str, value: Any) -> None:
        node = ds
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if keys[-1] in node and node[keys[-1]] != value:
            raise ConfigError(
                f"{source}: '{path}' is {node[keys[-1]]!r} but our config gives {value!r}; "
                f"remove it from the JSON (it is filled from train.* / deepspeed.*) or change our config"
            )
        node[keys[-1]] = value

    put("train_micro_batch_size_per_gpu", t.batch_size)
    put("gradient_accumulation_steps", t.grad_accum)
    put("train_batch_size", t.batch_size * t.grad_accum * world_size)
    put("gradient_clipping", t.grad_clip)
    if cfg.deepspeed.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if t.precision != "auto":
        put("bf16.enabled", t.precision == "bf16")
        put("fp16.enabled", t.precision == "fp16")
    elif any(isinstance(ds.get(k), dict) and "enabled" in ds[k] for k in ("bf16", "fp16")):
        raise ConfigError(f"{source}: train.precision=auto picks bf16 or fp32 where the run trains (vitpose/train/"
                          f"precision.py); remove 'bf16.enabled' / 'fp16.enabled' from the JSON or set train.precision")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(optimizer.get("type", "")).lower() != "adamw":
        raise ConfigError(f"{source}: optimizer.type must be AdamW (the paper's recipe), got {optimizer.get('type')!r}")
    put("optimizer.params.lr", t.lr)
    put("optimizer.params.betas", list(t.betas))
    put("optimizer.params.weight_decay", t.weight_decay)
    # Our scheduler sets every group's lr each step (warm-up, steps, layer decay); a DS one would fight it.
    if "scheduler" in ds:
        raise ConfigError(f"{source}: remove 'scheduler'; the lr schedule comes from train.warmup_* and train.lr_steps")
    check_offload(ds, str(source))
    return ds


def offload_devices(ds: dict[str, Any]) -> dict[str, str]:
    """{'offload_optimizer' | 'offload_param': device} for the parts the config moves off the accelerator."""
    zero = ds.get("zero_optimization", {})
    found = {key: str(zero[key].get("device", "none")) for key in ("offload_optimizer", "offload_param")
             if isinstance(zero.get(key), dict)}
    return {key: device for key, device in found.items() if device != "none"}


def check_offload(ds: dict[str, Any], source: str) -> None:
    """Refuse, with one line, an offload that cannot run here (checked on the driver and again on every worker,
    since the workers' machines are the ones that build and run the offloaded optimizer)."""
    offload = offload_devices(ds)
    if not offload:
        return
    stage = zero_stage(ds)
    if "offload_param" in offload and stage != 3:
        raise ConfigError(f"{source}: zero_optimization.offload_param needs ZeRO stage 3, the stage is {stage}")
    if "offload_optimizer" in offload and stage == 0:
        raise ConfigError(f"{source}: zero_optimization.offload_optimizer needs ZeRO stage 1-3, the stage is 0")
    torch_keys = [k for k in ("torch_adam", "fused") if k in ds.get("optimizer", {}).get("params", {})]
    if "offload_optimizer" in offload and torch_keys:
        raise ConfigError(f"{source}: remove optimizer.params.{' and '.join(torch_keys)}: an offloaded optimizer runs "
                          "DeepSpeed's CPU Adam, not torch's AdamW (configs/deepspeed/zero3_offload.json)")
    from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder

    if "offload_optimizer" in offload and not CPUAdamBuilder().is_compatible(verbose=False):
        raise ConfigError(f"{source}: offload_optimizer needs DeepSpeed's CPU Adam, which cannot be built on this "
                          "machine (it needs a C++ compiler: install g++)")
    for key, device in offload.items():
        if device == "nvme":
            path = ds["zero_optimization"][key].get("nvme_path")
            if not path or not os.path.isdir(path) or not os.access(path, os.W_OK):
                raise ConfigError(f"{source}: zero_optimization.{key}.nvme_path={path!r} is not a writable folder "
                                  "on this machine; point it at a local NVMe mount")
            if not AsyncIOBuilder().is_compatible(verbose=False):
                raise ConfigError(f"{source}: {key} to NVMe needs DeepSpeed's async I/O op, which needs libaio "
                                  "(apt install libaio-dev) on every worker; or offload to device cpu")
        elif device != "cpu":
            raise ConfigError(f"{source}: zero_optimization.{key}.device must be cpu, nvme or none, got {device!r}")


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))

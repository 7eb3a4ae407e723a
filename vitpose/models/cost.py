"""What a model costs beyond its FLOPs: the activations a training step keeps, measured, and the attention table of
`python -m vitpose.models summary --compare-attention`.

Measured, not modelled: the tensors autograd saves for the backward pass during one forward, counted once per
storage (parameters excluded), with the kernels this machine runs. That is the activation memory of training
without activation checkpointing; with fused attention (SDPA's flash/efficient kernels) the attention maps are not
among them, which is why window attention saves much less memory today than in the paper's Table (explicit
softmax), while `attention_map_bytes` gives that explicit figure.
"""

from __future__ import annotations

import dataclasses

import torch

from .vitpose import ViTPose, build_model_from_spec


def activation_bytes(model: ViTPose, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes autograd keeps from one training-mode forward of `batch` random images (on the model's device)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    device = next(model.parameters()).device
    images = torch.randn(batch, 3, *model.spec.img_size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.train()(images)
    return sum(seen.values())


KINDS_COMPARED = ("full", "window", "shift_window", "pool_window", "shift_pool_window")


def attention_table(model: ViTPose, window: tuple[int, int], measure: bool = False) -> str:
    """One row per attention kind at the model's size: GFLOPs, explicit attention maps, measured activations."""
    rows = [f"{'attention':<24} {'GFLOPs':>8} {'attn maps MB':>13}" + (f" {'activations MB':>15}" if measure else "")]
    for kind in KINDS_COMPARED:
        spec = dataclasses.replace(model.spec, attention={"kind": kind, "window": window})
        m = build_model_from_spec(spec, device=None if measure else "meta")
        row = f"{spec.attention.describe():<24} {m.flops() / 1e9:>8.2f} {m.backbone.attention_map_bytes() / 2**20:>13.1f}"
        if measure:
            torch.manual_seed(0)
            row += f" {activation_bytes(m) / 2**20:>15.1f}"
        rows.append(row)
    rows.append("(batch 1; attn maps: fp32 softmax probabilities of all blocks, what an explicit attention keeps "
                "for backward, the paper's memory; activations: measured saved tensors of one training forward "
                "on this machine's kernels)")
    return "\n".join(rows)

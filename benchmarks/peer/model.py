"""Section 1 of ``benchmarks.compare_peer``: transformers' ``VitPoseForPoseEstimation`` built with our model's
architecture, our weights copied in, and how far the two functions are apart."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from benchmarks.peer.common import autocast, heatmaps
from vitpose.models import ViTPose


def peer_model(ours: ViTPose) -> nn.Module:
    """transformers' VitPoseForPoseEstimation with our model's architecture (classic decoder)."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    s = ours.spec
    if s.decoder != "classic" or s.deconv_channels != 256:
        raise ValueError("the peer's classic decoder has 256 channels: compare the S/B/L/H presets")
    if s.mlp_hidden_dim % s.embed_dim:
        raise ValueError("the peer takes an integer mlp_ratio")
    backbone = VitPoseBackboneConfig(
        image_size=list(s.img_size), patch_size=[s.patch_size, s.patch_size], hidden_size=s.embed_dim,
        num_hidden_layers=s.depth, num_attention_heads=s.num_heads, mlp_ratio=s.mlp_hidden_dim // s.embed_dim,
        out_indices=[s.depth], layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )
    return VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, use_simple_decoder=False,
                                                  num_labels=s.num_keypoints))


def copy_into_peer(ours: ViTPose, peer: nn.Module) -> None:
    """Our state dict in the peer's names; the fused qkv is split into query, key and value."""
    s, d = ours.state_dict(), {}
    d["backbone.embeddings.patch_embeddings.projection.weight"] = s["backbone.patch_embed.proj.weight"]
    d["backbone.embeddings.patch_embeddings.projection.bias"] = s["backbone.patch_embed.proj.bias"]
    d["backbone.embeddings.position_embeddings"] = s["backbone.pos_embed"]
    pairs = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    for i in range(ours.spec.depth):
        o, p = f"backbone.blocks.{i}.", f"backbone.encoder.layer.{i}."
        for t in ("weight", "bias"):
            for a, b in pairs:
                d[f"{p}{b}.{t}"] = s[f"{o}{a}.{t}"]
            for name, part in zip(("query", "key", "value"), s[f"{o}attn.qkv.{t}"].chunk(3), strict=True):
                d[f"{p}attention.attention.{name}.{t}"] = part
    for t in ("weight", "bias"):
        d[f"backbone.layernorm.{t}"] = s[f"backbone.last_norm.{t}"]
    head = (("deconv_layers.0", "deconv1"), ("deconv_layers.1", "batchnorm1"), ("deconv_layers.3", "deconv2"),
            ("deconv_layers.4", "batchnorm2"), ("final_layer", "conv"))
    for a, b in head:
        for k, v in s.items():
            if k.startswith(f"keypoint_head.{a}."):
                d[f"head.{b}.{k.rsplit('.', 1)[1]}"] = v
    result = peer.load_state_dict(d, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result


def make_loud(model: ViTPose, seed: int = 0) -> None:
    """Random BatchNorm statistics and a last conv scaled to heatmaps of about 1 (an untrained head gives
    ~1e-4, where any difference would look small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.keypoint_head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        model.eval()
        peak = float(model(torch.randn(2, 3, *model.spec.img_size, generator=g)).abs().max())
        model.keypoint_head.final_layer.weight.div_(peak)
        model.keypoint_head.final_layer.bias.div_(peak)



def same_function(ours: ViTPose, peer: nn.Module) -> dict[str, float]:
    x = torch.randn(4, 3, *ours.spec.img_size, generator=torch.Generator().manual_seed(1))
    out: dict[str, float] = {}
    ours.eval(), peer.eval()
    with torch.inference_mode():
        a, b = heatmaps(ours, x), heatmaps(peer, x)
        out["max abs heatmap"] = float(a.abs().max())
        out["eval fp32 max abs diff"] = float((a - b).abs().max())
        with autocast(True):
            a16, b16 = heatmaps(ours, x).float(), heatmaps(peer, x).float()
        out["eval bf16 max abs diff"] = float((a16 - b16).abs().max())
        out["bf16 vs fp32, ours"] = float((a16 - a).abs().max())
        out["bf16 vs fp32, peer"] = float((b16 - b).abs().max())
    # Training mode (BatchNorm on batch statistics) on copies, so running statistics stay as they were.
    o2, p2 = copy.deepcopy(ours).train(), copy.deepcopy(peer).train()
    ya, yb = heatmaps(o2, x), heatmaps(p2, x)
    out["train fp32 max abs diff"] = float((ya - yb).detach().abs().max())
    ya.square().mean().backward()
    yb.square().mean().backward()
    ga = o2.backbone.blocks[0].mlp.fc1.weight.grad
    gb = p2.backbone.encoder.layer[0].mlp.fc1.weight.grad
    out["train grad rel diff (block 0 fc1)"] = float((ga - gb).norm() / ga.norm())
    # The same gradient of our own model with another summation order (one thread instead of the run's): how
    # far fp32 rounding alone moves it. Through 12 blocks and batch-statistics BatchNorm on 4 images it reaches
    # 1e-3 for some weight draws, so ours-vs-peer is judged against this floor, not against zero.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        o3 = copy.deepcopy(ours).train()
        heatmaps(o3, x).square().mean().backward()
        g1 = o3.backbone.blocks[0].mlp.fc1.weight.grad
    finally:
        torch.set_num_threads(threads)
    out["train grad rel diff, ours 1 vs 2 threads"] = float((ga - g1).norm() / ga.norm())
    return out


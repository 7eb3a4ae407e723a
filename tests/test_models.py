"""Model package: sizes against the paper, shapes, knowledge tokens, layer-decay groups, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vitpose.models import (
    ModelSpec,
    ViTPose,
    build_model,
    build_model_from_spec,
    list_presets,
    match_preset,
    param_groups_layer_decay,
)
from vitpose.models.__main__ import main as cli_main
from vitpose.models.backbone import fixed_lift, initial_knowledge_tokens, token_grid
from vitpose.models.vitpose import PRESETS

# ---- sizes against the paper (DESIGN.md §3), on the meta device: no memory, no time --------------------


@pytest.mark.parametrize(
    ("preset", "millions"),
    [("vitpose_s", 24.29), ("vitpose_b", 89.99), ("vitpose_l", 308.54), ("vitpose_h", 637.21)],
)
def test_param_counts_match_paper(preset: str, millions: float) -> None:
    model = build_model(preset, device="meta")
    assert model.num_params() / 1e6 == pytest.approx(millions, rel=0.005)


def test_param_count_g_and_b_backbone() -> None:
    g = build_model("vitpose_g", device="meta")
    assert g.backbone.blocks[0].mlp.fc1.out_features == 6144
    assert 0.98e9 < g.num_params() < 1.05e9
    b = build_model("vitpose_b", device="meta")
    assert sum(p.numel() for p in b.backbone.parameters()) / 1e6 == pytest.approx(85.79, rel=0.005)


def test_b_backbone_gflops_match_paper() -> None:
    b = build_model("vitpose_b", device="meta")
    assert b.backbone.flops() / 1e9 == pytest.approx(17.1, rel=0.01)
    assert b.flops(batch=2) == 2 * b.flops()
    assert b.flops() > b.backbone.flops()  # the head is counted too


def test_token_grid_of_padded_patch_conv() -> None:
    # Padding 2 on a 16x16 stride-16 conv: (256 + 4 - 16) // 16 + 1 = 16 rows, 12 columns.
    assert token_grid((256, 192), 16, 2) == (16, 12)
    conv = nn.Conv2d(3, 8, kernel_size=16, stride=16, padding=2, device="meta")
    assert conv(torch.empty(1, 3, 256, 192, device="meta")).shape[-2:] == (16, 12)
    for patch, size in [(8, (128, 96)), (14, (224, 168)), (32, (256, 192))]:
        spec = build_model("vitpose_nano", device="meta", patch_size=patch, img_size=size).spec
        assert spec.grid_size == (size[0] // patch, size[1] // patch)


# ---- presets and builder -------------------------------------------------------------------------------


def test_presets_and_errors() -> None:
    names = list_presets()
    for base in (
        "vitpose_s",
        "vitpose_b",
        "vitpose_l",
        "vitpose_h",
        "vitpose_g",
        "vitpose_tiny",
        "vitpose_nano",
        "vitpose_pico",
    ):
        assert base in names and f"{base}_simple" in names
    assert build_model("vitpose_b_simple", device="meta").spec.decoder == "simple"
    with pytest.raises(ValueError, match="vitpose_b, vitpose_b_simple"):
        build_model("vitpose_x")
    with pytest.raises(ValueError, match="unknown model overrides \\['heads'\\]"):
        build_model("vitpose_nano", heads=4)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_model("vitpose_nano", num_heads=5)
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_model("vitpose_nano", decoder="fancy")


def test_spec_round_trip_and_match_preset() -> None:
    model = build_model("vitpose_l", device="meta", img_size=[384, 288], num_keypoints=133)
    spec = model.spec
    assert spec.img_size == (384, 288)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert build_model_from_spec(spec.to_dict(), device="meta").spec == spec
    assert match_preset(spec) == "vitpose_l"
    assert match_preset(build_model("vitpose_l_simple", device="meta").spec) == "vitpose_l_simple"


def test_drop_path_increases_linearly() -> None:
    model = build_model("vitpose_b", device="meta")
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.backbone.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])


# ---- forward shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "gflops", "mparams"), [
    ("vitpose_student_t", 0.4, 1.5), ("vitpose_student_s", 0.7, 3.0), ("vitpose_student_m", 2.0, 9.0)])
def test_student_ladder_sits_where_efficient_pose_models_live(preset: str, gflops: float, mparams: float) -> None:
    # RTMPose-t/s/m: 0.36/0.68/1.93 GFLOPs at 256x192. Each rung has a shape of its own, so a checkpoint of it
    # is reported as that preset.
    for name in (preset, f"{preset}_simple"):
        model = build_model(name, device="meta")
        assert model.spec.img_size == (256, 192)
        assert model.flops() / 1e9 == pytest.approx(gflops, rel=0.1)
        assert model.num_params() / 1e6 == pytest.approx(mparams, rel=0.15)
        assert match_preset(model.spec) == name


@pytest.mark.parametrize("preset", ["vitpose_tiny", "vitpose_nano", "vitpose_nano_simple"])
def test_forward_real_size(preset: str) -> None:
    model = build_model(preset).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 256, 192))
    assert out.shape == (2, 17, 64, 48)
    assert model.heatmap_size == (64, 48)


@pytest.mark.parametrize(
    ("overrides", "heatmap"),
    [
        (dict(img_size=(128, 96)), (32, 24)),
        (dict(img_size=(128, 96), decoder="simple", num_keypoints=5), (32, 24)),
        (dict(img_size=(64, 64), num_keypoints=133), (16, 16)),
        (dict(img_size=(64, 48), patch_size=8), (32, 24)),  # heatmaps are 4x the token grid
        (dict(img_size=(96, 64), patch_size=32, decoder="simple"), (12, 8)),
    ],
)
def test_forward_other_shapes(overrides: dict, heatmap: tuple[int, int]) -> None:
    model = build_model("vitpose_nano", **overrides).eval()
    h, w = model.spec.img_size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert out.shape == (1, model.spec.num_keypoints, *heatmap)
    assert model.heatmap_size == heatmap


def test_wrong_input_size_is_explained() -> None:
    model = build_model("vitpose_nano").eval()
    with pytest.raises(ValueError, match="built for img_size \\(256, 192\\)"):
        model(torch.randn(1, 3, 384, 288))


# ---- knowledge tokens ----------------------------------------------------------------------------------


def _small(preset: str = "vitpose_nano", **kw) -> ViTPose:
    torch.manual_seed(0)
    return build_model(preset, img_size=(64, 48), **kw).eval()


def test_knowledge_tokens_change_output_not_shape() -> None:
    model = _small()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        before, feat_before = model(x), model.backbone(x)
        model.backbone.add_knowledge_tokens(2)
        after, feat_after = model(x), model.backbone(x)
    assert after.shape == before.shape and feat_after.shape == feat_before.shape
    # The head starts at std 0.001, so heatmaps are tiny: compare relative to their scale.
    assert (after - before).abs().max() > 1e-2 * before.abs().max()
    assert (feat_after - feat_before).abs().mean() > 1e-2
    assert model.spec.num_knowledge_tokens == 2
    assert len(model.backbone.knowledge_token_params()) == 1  # the tokens alone
    assert model.backbone.flops() > _small().backbone.flops()


def test_tokens_learned_through_a_fixed_lift_reach_the_student_unchanged() -> None:
    """Token learning on a wider teacher holds the tokens in the student's width, lifted by a fixed matrix;
    the student gets exactly those tokens, frozen, with nothing trainable between them and its blocks."""
    teacher, student = _small("vitpose_tiny"), _small("vitpose_nano")  # 192 and 96 wide
    lift = fixed_lift(96, 192, seed=0)
    torch.testing.assert_close(lift.T @ lift, torch.eye(96), atol=1e-5, rtol=0)  # norm-preserving
    learning = teacher.backbone.set_knowledge_tokens(initial_knowledge_tokens(1, 96, seed=0), trainable=True,
                                                     lift=lift)
    assert [n for n, _ in learning.named_parameters()] == ["tokens"]  # the lift is a buffer: never trained
    assert "backbone.knowledge_tokens.lift" not in teacher.state_dict()
    teacher(torch.randn(2, 3, 64, 48)).square().mean().backward()
    assert learning.tokens.grad is not None and learning.tokens.grad.abs().sum() > 0
    torch.testing.assert_close(learning(), learning.tokens @ lift.T)

    student.backbone.set_knowledge_tokens(learning.tokens, trainable=False)
    kt = student.backbone.knowledge_tokens
    assert torch.equal(kt(), learning.tokens) and kt.tokens.data_ptr() != learning.tokens.data_ptr()
    assert sum(p.numel() for p in kt.parameters() if p.requires_grad) == 0
    with pytest.raises(ValueError, match="width 192 do not fit this backbone"):
        student.backbone.set_knowledge_tokens(torch.zeros(1, 192))

    student.train()
    student(torch.randn(2, 3, 64, 48)).square().mean().backward()
    assert kt.tokens.grad is None
    rebuilt = build_model_from_spec(student.spec)  # what the engine stores with a student checkpoint
    assert rebuilt.state_dict().keys() == student.state_dict().keys()
    assert torch.equal(initial_knowledge_tokens(2, 96, 5), initial_knowledge_tokens(2, 96, 5))
    assert not torch.equal(initial_knowledge_tokens(2, 96, 5), initial_knowledge_tokens(2, 96, 6))


def test_a_student_with_a_token_projection_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="distill it again"):
        ModelSpec.from_dict({**PRESETS["vitpose_nano"].to_dict(), "num_knowledge_tokens": 1,
                             "knowledge_token_dim": 192})


# ---- layer-wise lr decay -------------------------------------------------------------------------------


def test_layer_decay_groups() -> None:
    model = build_model("vitpose_nano", device="meta", num_knowledge_tokens=2)
    depth, rate = 3, 0.75
    groups = param_groups_layer_decay(model, lr=1e-3, weight_decay=0.1, layer_decay=rate)

    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_name = {n: g for g in groups for n in g["names"]}

    for name in ("backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias", "backbone.pos_embed"):
        assert by_name[name]["lr_scale"] == pytest.approx(rate ** (depth + 1))
    for i in range(depth):
        assert by_name[f"backbone.blocks.{i}.attn.qkv.weight"]["lr_scale"] == pytest.approx(
            rate ** (depth - i)
        )
    for name in (
        "backbone.last_norm.weight",
        "keypoint_head.final_layer.weight",
        "backbone.knowledge_tokens.tokens",
    ):
        assert by_name[name]["lr_scale"] == 1.0 and by_name[name]["layer_id"] == depth + 1
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) and g["name"]

    params = dict(model.named_parameters())
    no_wd = {n for n, g in by_name.items() if g["weight_decay"] == 0.0}
    expected = {n for n, p in params.items() if p.ndim == 1}
    expected |= {"backbone.pos_embed", "backbone.knowledge_tokens.tokens"}
    assert no_wd == expected
    assert all(g["weight_decay"] == 0.1 for g in groups if g["names"][0] not in no_wd)

    # Default rate comes from the spec; frozen parameters are left out; torch's AdamW takes the groups.
    real = _small()
    real.backbone.set_knowledge_tokens(torch.zeros(1, 96), trainable=False)
    groups = param_groups_layer_decay(real, lr=1e-3, weight_decay=0.1)
    assert max(g["lr_scale"] for g in groups) == 1.0
    assert min(g["lr_scale"] for g in groups) == pytest.approx(real.spec.layer_decay_rate ** (depth + 1))
    assert "backbone.knowledge_tokens.tokens" not in [n for g in groups for n in g["names"]]
    torch.optim.AdamW(groups, lr=1e-3)


# ---- activation checkpointing --------------------------------------------------------------------------


def test_grad_checkpointing_matches() -> None:
    model = _small(drop_path_rate=0.2, num_knowledge_tokens=1).train()
    x = torch.randn(2, 3, 64, 48)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # same drop-path draws in both runs
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_off, grads_off = loss_and_grads()
    model.set_grad_checkpointing(True)
    assert model.backbone.grad_checkpointing
    loss_on, grads_on = loss_and_grads()
    assert torch.equal(loss_on, loss_off)
    for a, b in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- CLI -----------------------------------------------------------------------------------------------


def test_summary_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["summary", "vitpose_b"]) == 0
    out = capsys.readouterr().out
    assert "89.99 M" in out and "17.10" in out and "16 x 12 = 192 tokens" in out and "17 x 64 x 48" in out
    assert cli_main(["summary", "vitpose_s", "--img-size", "384", "288", "--decoder", "simple"]) == 0
    out = capsys.readouterr().out
    assert "24 x 18 = 432 tokens" in out and "17 x 96 x 72" in out and "simple decoder" in out


# ---- fast paths keep the function ----------------------------------------------------------------------


def test_bf16_inference_never_serves_stale_weights() -> None:
    """Every way of writing weights (in place, through ``.data`` as DeepSpeed and user scripts do, a state dict)
    shows in the next bf16 autocast inference: nothing keeps a cast copy that such a write could bypass."""
    model = _small().eval()
    x = torch.randn(2, 3, 64, 48)

    def bf16(m: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float()

    def fresh() -> torch.Tensor:  # a new model with the same weights: nothing cached anywhere
        other = _small().eval()
        other.load_state_dict(model.state_dict())
        return bf16(other)

    first = bf16(model)
    assert torch.equal(first, fresh())
    with torch.no_grad():  # in place, as an optimizer step
        for p in model.parameters():
            p.mul_(1.5)
    after_step = bf16(model)
    assert torch.equal(after_step, fresh()) and not torch.equal(after_step, first)
    for p in model.parameters():  # through .data: the version counter autograd sees does not move
        p.data.copy_(torch.randn_like(p) * 0.05)
    after_data = bf16(model)
    assert torch.equal(after_data, fresh()) and (after_data - after_step).abs().max() > 1e-3
    model.load_state_dict(_small(num_keypoints=17).state_dict())
    assert torch.equal(bf16(model), fresh())
    with torch.inference_mode():  # no autocast: plain fp32
        assert model(x).dtype == torch.float32


@pytest.mark.parametrize("decoder", ["classic", "simple"])
def test_heatmaps_contiguous_and_backbone_channels_last(decoder: str) -> None:
    model = _small(decoder=decoder)
    x = torch.randn(2, 3, 64, 48)
    feat = model.backbone(x)
    assert feat.is_contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.is_contiguous()
    out.square().mean().backward()  # and trains in bf16 autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x)
    assert out16.dtype == torch.bfloat16
    out16.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_explicit_attention_is_the_fused_kernels_function() -> None:
    # The bf16 CPU training path (two batched matmuls) against F.scaled_dot_product_attention: the same
    # function in fp32, and in bf16 (forward and gradients) as close to the fp32 result as the fused
    # kernel's own bf16 result is, within bf16 rounding.
    from vitpose.models.attention import explicit_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 3, 40, 16) * 2).unbind(0)
    torch.testing.assert_close(explicit_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.float().mul(torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return [out.float()] + [t.grad.float() for t in leaves]

    ref = run(explicit_attention, torch.float32)
    ours = run(explicit_attention, torch.bfloat16)
    fused = run(torch.nn.functional.scaled_dot_product_attention, torch.bfloat16)
    for r, o, f in zip(ref, ours, fused, strict=True):
        scale = r.abs().max()
        assert (o - r).abs().max() / scale < 0.03
        assert (o - r).abs().max() <= 3 * (f - r).abs().max() + 1e-3 * scale


def test_bf16_training_takes_the_explicit_attention_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import vitpose.models.attention as attention

    calls = []
    real = attention.explicit_attention
    monkeypatch.setattr(attention, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    model = _small().train()
    x = torch.randn(2, 3, 64, 48)
    model(x)  # fp32: the fused kernel
    assert not calls
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # bf16 inference: the fused kernel
    assert not calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().mean().backward()
    assert len(calls) == len(model.backbone.blocks)

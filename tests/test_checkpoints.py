"""Checkpoints: official-layout compatibility (against an independent reference forward), pos_embed
resizing, round trips, and loader errors that name the file, the keys and the preset that fits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitpose.models import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    build_model,
    create,
    infer_spec_from_state_dict,
    match_preset,
    read_checkpoint,
    save_official,
    save_safetensors,
)
from vitpose.models.weights import load_checkpoint

# ---- an independent implementation: official keys written by hand, forward in plain torch ops ---------


def _official_state_dict(
    dim: int, depth: int, hidden: int, grid: tuple[int, int], keypoints: int, decoder: str, deconv: int = 32
) -> dict[str, torch.Tensor]:
    """Random weights in the official mmpose ViTPose layout, written without our model code."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, std: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=g)

    sd = {
        "backbone.cls_token": rnd(1, 1, dim),
        "backbone.pos_embed": rnd(1, 1 + grid[0] * grid[1], dim, std=0.1),
        "backbone.patch_embed.proj.weight": rnd(dim, 3, 16, 16),
        "backbone.patch_embed.proj.bias": rnd(dim),
    }
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        sd |= {
            p + "norm1.weight": rnd(dim, mean=1.0, std=0.1),
            p + "norm1.bias": rnd(dim),
            p + "attn.qkv.weight": rnd(3 * dim, dim),
            p + "attn.qkv.bias": rnd(3 * dim),
            p + "attn.proj.weight": rnd(dim, dim),
            p + "attn.proj.bias": rnd(dim),
            p + "norm2.weight": rnd(dim, mean=1.0, std=0.1),
            p + "norm2.bias": rnd(dim),
            p + "mlp.fc1.weight": rnd(hidden, dim),
            p + "mlp.fc1.bias": rnd(hidden),
            p + "mlp.fc2.weight": rnd(dim, hidden),
            p + "mlp.fc2.bias": rnd(dim),
        }
    sd |= {"backbone.last_norm.weight": rnd(dim, mean=1.0, std=0.1), "backbone.last_norm.bias": rnd(dim)}
    h = "keypoint_head."
    if decoder == "classic":
        for conv, bn, c_in in ((0, 1, dim), (3, 4, deconv)):
            sd |= {
                f"{h}deconv_layers.{conv}.weight": rnd(c_in, deconv, 4, 4),
                f"{h}deconv_layers.{bn}.weight": rnd(deconv, mean=1.0, std=0.1),
                f"{h}deconv_layers.{bn}.bias": rnd(deconv),
                f"{h}deconv_layers.{bn}.running_mean": rnd(deconv, std=0.1),
                f"{h}deconv_layers.{bn}.running_var": 0.5 + torch.rand(deconv, generator=g),
                f"{h}deconv_layers.{bn}.num_batches_tracked": torch.tensor(1000),
            }
        sd |= {f"{h}final_layer.weight": rnd(keypoints, deconv, 1, 1), f"{h}final_layer.bias": rnd(keypoints)}
    else:
        sd |= {f"{h}final_layer.weight": rnd(keypoints, dim, 3, 3), f"{h}final_layer.bias": rnd(keypoints)}
    return sd


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """ViTPose forward from the paper / official code, reading the official keys directly."""
    b = "backbone."
    x = F.conv2d(x, sd[b + "patch_embed.proj.weight"], sd[b + "patch_embed.proj.bias"], stride=16, padding=2)
    n_batch, dim, hp, wp = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = sd[b + "pos_embed"]
    x = x + pos[:, 1:] + pos[:, :1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(b + "blocks."))
    hd = dim // num_heads
    for i in range(depth):
        p = f"{b}blocks.{i}."
        y = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(n_batch, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n_batch, -1, dim)
        x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = F.layer_norm(x, (dim,), sd[b + "last_norm.weight"], sd[b + "last_norm.bias"], eps=1e-6)
    x = x.transpose(1, 2).reshape(n_batch, dim, hp, wp)
    h = "keypoint_head."
    if f"{h}deconv_layers.0.weight" in sd:
        for conv, bn in ((0, 1), (3, 4)):
            x = F.conv_transpose2d(x, sd[f"{h}deconv_layers.{conv}.weight"], stride=2, padding=1)
            d = f"{h}deconv_layers.{bn}."
            x = F.batch_norm(
                x, sd[d + "running_mean"], sd[d + "running_var"], sd[d + "weight"], sd[d + "bias"], eps=1e-5
            )
            x = F.relu(x)
        return F.conv2d(x, sd[f"{h}final_layer.weight"], sd[f"{h}final_layer.bias"])
    x = F.interpolate(F.relu(x), scale_factor=4, mode="bilinear", align_corners=False)
    return F.conv2d(x, sd[f"{h}final_layer.weight"], sd[f"{h}final_layer.bias"], padding=1)


@pytest.mark.parametrize("decoder", ["classic", "simple"])
def test_loads_file_written_by_another_implementation(tmp_path: Path, decoder: str) -> None:
    sd = _official_state_dict(dim=96, depth=3, hidden=384, grid=(8, 6), keypoints=17, decoder=decoder)
    path = tmp_path / "official.pth"
    # mmcv's layout, with numpy scalars in 'meta' as mmcv's hooks leave them.
    meta = {"mmcv_version": "1.3.9", "epoch": 210, "hook_msgs": {"best_score": np.float64(0.758)}}
    torch.save({"state_dict": sd, "meta": meta}, path)

    x = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _reference_forward(sd, x, num_heads=3)

    # Spec inferred from the file alone: width, depth, decoder, 8x6 grid -> 128x96, heads from vitpose_nano.
    model = create(path).eval()
    assert model.spec.img_size == (128, 96) and model.spec.decoder == decoder
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape == (2, 17, 32, 24)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    preset = "vitpose_nano" if decoder == "classic" else "vitpose_nano_simple"
    explicit = build_model(preset, img_size=(128, 96), deconv_channels=32).eval()
    report = load_checkpoint(explicit, path)
    assert report.ignored_keys == ["backbone.cls_token"] and report.pos_embed_resized is None
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), expected, rtol=1e-4, atol=1e-4)


# ---- round trips ---------------------------------------------------------------------------------------


def _trained_like(preset: str = "vitpose_nano", **kw):
    torch.manual_seed(0)
    model = build_model(preset, img_size=(64, 48), **kw)
    with torch.no_grad():  # non-default BN statistics and head weights, so the round trip means something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.keypoint_head.final_layer.weight.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    model = _trained_like()
    path = tmp_path / f"model.{fmt}"
    (save_official if fmt == "pth" else save_safetensors)(model, path)
    fresh = build_model("vitpose_nano", img_size=(64, 48)).eval()
    load_checkpoint(fresh, path)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    state, spec = read_checkpoint(path)
    assert spec == model.spec and set(state) == set(model.state_dict())
    if fmt == "pth":
        ckpt = torch.load(path, weights_only=True)  # plain types only: the official code can read it
        assert set(ckpt) == {"state_dict", "meta"}


def test_round_trip_with_knowledge_tokens(tmp_path: Path) -> None:
    model = _trained_like()
    model.backbone.set_knowledge_tokens(torch.randn(2, model.spec.embed_dim), trainable=False)
    save_safetensors(model, tmp_path / "student.safetensors")
    loaded = create(tmp_path / "student.safetensors").eval()
    assert loaded.spec == model.spec and loaded.spec.num_knowledge_tokens == 2
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bare_state_dict_accepted(tmp_path: Path) -> None:
    model = _trained_like()
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    state, spec = read_checkpoint(tmp_path / "bare.pth")
    assert spec is None and set(state) == set(model.state_dict())
    assert infer_spec_from_state_dict(state).embed_dim == 96


# ---- pos_embed resize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_spec", [True, False])
def test_pos_embed_resized_bicubically(tmp_path: Path, with_spec: bool) -> None:
    torch.manual_seed(0)
    small = build_model("vitpose_nano").eval()  # 256x192 -> 16x12 grid
    path = tmp_path / "nano_256x192.pth"
    if with_spec:
        save_official(small, path)
    else:  # grid guessed from the token count and the target's aspect ratio
        torch.save({"state_dict": small.state_dict()}, path)
    big = build_model("vitpose_nano", img_size=(384, 288)).eval()
    report = load_checkpoint(big, path)
    assert report.pos_embed_resized == ((16, 12), (24, 18))

    src = small.backbone.pos_embed.detach()
    grid = src[:, 1:].reshape(1, 16, 12, 96).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(24, 18), mode="bicubic", align_corners=False)
    got = big.backbone.pos_embed.detach()
    assert got.shape == (1, 1 + 24 * 18, 96)
    assert torch.equal(got[:, :1], src[:, :1])
    torch.testing.assert_close(got[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 24 * 18, 96))
    torch.testing.assert_close(
        big.backbone.blocks[0].attn.qkv.weight, small.backbone.blocks[0].attn.qkv.weight
    )
    with torch.no_grad():
        assert big(torch.randn(1, 3, 384, 288)).shape == (1, 17, 96, 72)


# ---- errors --------------------------------------------------------------------------------------------


def _fake_file(path: Path, preset: str, **kw) -> Path:
    """An official-layout file of any preset at almost no cost: zero-stride tensors keep one element."""
    shapes = build_model(preset, device="meta", **kw).state_dict()
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in shapes.items()}
    torch.save({"state_dict": sd}, path)
    return path


def test_wrong_preset_names_mis_shaped_keys_and_the_fitting_preset(tmp_path: Path) -> None:
    path = _fake_file(tmp_path / "vitpose-b.pth", "vitpose_b")
    model = build_model("vitpose_s", device="meta")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, path)
    err = info.value
    msg = str(err)
    assert str(path) in msg
    assert "backbone.pos_embed: (1, 193, 768) vs (1, 193, 384)" in msg
    assert "... and" in msg  # long list truncated
    assert "fits preset 'vitpose_b'" in msg and "build_model('vitpose_b')" in msg
    assert len(err.mis_shaped) > 12 and not err.missing and not err.unexpected
    assert isinstance(err, ValueError)


def test_missing_and_unexpected_keys_listed(tmp_path: Path) -> None:
    model = _trained_like()
    sd = dict(model.state_dict())
    del sd["backbone.blocks.2.mlp.fc2.bias"]
    sd["backbone.blocks.3.norm1.weight"] = torch.ones(96)
    sd["keypoint_head.extra.weight"] = torch.ones(1)
    torch.save({"state_dict": sd}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(_trained_like(), tmp_path / "broken.pth")
    err = info.value
    assert err.missing == ["backbone.blocks.2.mlp.fc2.bias"]
    assert err.unexpected == ["backbone.blocks.3.norm1.weight", "keypoint_head.extra.weight"]
    assert "missing keys (1)" in str(err) and "unexpected keys (2)" in str(err)


def test_decoder_and_keypoints_suggested(tmp_path: Path) -> None:
    path = _fake_file(tmp_path / "simple.pth", "vitpose_tiny_simple", num_keypoints=133)
    with pytest.raises(
        CheckpointMismatchError, match=r"build_model\('vitpose_tiny_simple', num_keypoints=133\)"
    ):
        load_checkpoint(build_model("vitpose_tiny", device="meta"), path)


def test_knowledge_token_keys(tmp_path: Path) -> None:
    with_tokens = _trained_like(num_knowledge_tokens=1)
    save_official(with_tokens, tmp_path / "tokens.pth")
    with pytest.raises(CheckpointMismatchError, match="num_knowledge_tokens=1") as info:
        load_checkpoint(_trained_like(), tmp_path / "tokens.pth")
    assert info.value.unexpected == ["backbone.knowledge_tokens.tokens"]

    # An official file never has tokens: a model with tokens keeps its own.
    save_official(_trained_like(), tmp_path / "plain.pth")
    report = load_checkpoint(with_tokens, tmp_path / "plain.pth")
    assert report.kept_initialised == ["backbone.knowledge_tokens.tokens"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_non_tensor_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.pos_embed": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pth.*pathlib"):
        read_checkpoint(path)
    assert not marker.exists()


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "vitpose-b.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_checkpoint(missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth is not a PyTorch weights file"):
        read_checkpoint(garbage)
    torch.save({"state_dict": {"a": 1}}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        read_checkpoint(tmp_path / "ints.pth")


def test_infer_spec_from_state_dict(tmp_path: Path) -> None:
    for preset in ("vitpose_b", "vitpose_g", "vitpose_h_simple"):
        shapes = build_model(preset, device="meta").state_dict()
        spec = infer_spec_from_state_dict(shapes)
        assert match_preset(spec) == preset
        assert spec.num_heads == build_model(preset, device="meta").spec.num_heads
        assert spec.img_size == (256, 192)

"""Input resolution (paper §4): any multiple of the patch builds and runs, a checkpoint trained at another size
loads with its position embeddings resampled by timm's function (the report says "resized"), and the COCO
resolution configs give the paper's grids."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vitpose.build import build_model_from_config, model_spec
from vitpose.config import ConfigError, load_config
from vitpose.models import build_model, save_official, save_safetensors
from vitpose.models.__main__ import main as models_cli
from vitpose.models.pretrained import load_pretrained
from vitpose.models.weights import load_checkpoint


@pytest.mark.parametrize("size", [(80, 48), (112, 96), (64, 160)])
def test_any_multiple_of_the_patch_runs(size: tuple[int, int]) -> None:
    model = build_model("vitpose_pico", img_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape[-2:] == (size[0] // 4, size[1] // 4)


def test_a_size_off_the_patch_is_an_error_naming_both() -> None:
    with pytest.raises(ValueError, match=r"img_size \[250, 192\] is not a multiple of patch_size 16; use e.g. "
                                         r"\[256, 192\]"):
        build_model("vitpose_b", device="meta", img_size=(250, 192))
    with pytest.raises(ConfigError, match=r"model.img_size \[264, 192\] is not a multiple of the patch size 16 "
                                          r".*use e.g. model.img_size=\[256, 192\]"):
        load_config(None, ["model.preset=vitpose_b", "model.img_size=[264, 192]"])
    with pytest.raises(ConfigError, match="patch size 8"):
        load_config(None, ["model.preset=vitpose_b", "model.patch_size=8", "model.img_size=[132, 96]"])


def _expected(src_model, src_grid, dst_grid) -> torch.Tensor:
    pos = src_model.backbone.pos_embed.detach()
    grid = resample_abs_pos_embed(pos[:, 1:], new_size=list(dst_grid), old_size=list(src_grid),
                                  num_prefix_tokens=0, antialias=False)
    return torch.cat([pos[:, :1], grid], dim=1)


@pytest.mark.parametrize("writer", ["ours_safetensors", "official_pth"])
def test_checkpoint_of_another_size_is_resized(tmp_path, writer: str) -> None:
    small = build_model("vitpose_nano", img_size=(64, 48))  # 4x3 tokens
    if writer == "ours_safetensors":
        path = save_safetensors(small, tmp_path / "small.safetensors")
    else:  # the official layout: a bare mmcv dict, no spec (the grid is guessed 4:3 from the token count)
        path = tmp_path / "small.pth"
        torch.save({"state_dict": {**small.state_dict(), "backbone.cls_token": torch.zeros(1, 1, 96)}}, path)
    big = build_model("vitpose_nano", img_size=(96, 64))  # 6x4 tokens
    report = load_checkpoint(big, path)
    assert report.resized == ["backbone.pos_embed"] and report.pos_embed_resized == ((4, 3), (6, 4))
    assert "resized" in report.summary() and any("4x3 -> 6x4" in n for n in report.notes)
    torch.testing.assert_close(big.backbone.pos_embed.detach(), _expected(small, (4, 3), (6, 4)))
    assert torch.equal(big.backbone.blocks[0].attn.qkv.weight, small.backbone.blocks[0].attn.qkv.weight)


def test_same_token_count_other_grid_is_resized_too(tmp_path) -> None:
    # 64x48 (4x3 tokens) and 48x64 (3x4) hold 12 tokens each; a file we wrote says its grid.
    small = build_model("vitpose_nano", img_size=(64, 48))
    path = save_official(small, tmp_path / "small.pth")
    wide = build_model("vitpose_nano", img_size=(48, 64))
    assert load_checkpoint(wide, path).pos_embed_resized == ((4, 3), (3, 4))


def test_init_checkpoint_at_another_size(tmp_path) -> None:
    teacher = build_model("vitpose_nano", img_size=(64, 48), patch_size=8)  # 8x6 tokens
    path = save_safetensors(teacher, tmp_path / "teacher.safetensors")
    cfg = load_config(None, ["model.preset=vitpose_nano", "model.patch_size=8", "model.img_size=[96, 72]",
                             f"model.init_checkpoint={path}"])
    model = build_model_from_config(cfg)
    assert model.init_report.pos_embed_resized == ((8, 6), (12, 9))
    assert "backbone.pos_embed" in model.init_report.resized
    torch.testing.assert_close(model.backbone.pos_embed.detach(), _expected(teacher, (8, 6), (12, 9)))
    # load_pretrained is the same path (what model.init_checkpoint calls)
    again = build_model("vitpose_nano", img_size=(96, 72), patch_size=8)
    assert load_pretrained(again, path).resized == ["backbone.pos_embed"]


@pytest.mark.parametrize(("name", "grid"), [("256x192", (16, 12)), ("384x288", (24, 18)), ("576x432", (36, 27))])
def test_coco_resolution_configs(name: str, grid: tuple[int, int]) -> None:
    cfg = load_config(f"configs/teacher/coco_vitpose_b_{name}.yaml")
    spec = model_spec(cfg)
    assert cfg.model.preset == "vitpose_b" and spec.grid_size == grid
    assert spec.heatmap_size == (4 * grid[0], 4 * grid[1])
    assert cfg.tracking.alias == f"coco-vitpose-b-{name}"


def test_summary_cli_compares_attention(capsys) -> None:
    assert models_cli(["summary", "vitpose_b", "--img-size", "576", "432", "--compare-attention"]) == 0
    out = capsys.readouterr().out
    assert "token grid       36 x 27 = 972 tokens" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("full ", "shift_pool"))}
    assert float(rows["shift_pool_window"][2]) < float(rows["full"][1])  # GFLOPs
    models_cli(["summary", "vitpose_pico", "--img-size", "64", "48", "--compare-attention", "--window", "2", "2",
                "--measure"])
    measured = capsys.readouterr().out
    assert "activations MB" in measured and "window 2x2" in measured

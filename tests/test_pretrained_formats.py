"""Starting from pre-trained files (issue 17, items 1-3), without downloads.

Tiny timm ViTs of each family (MAE/AugReg-style, DINOv2 with LayerScale and registers, CLIP-style with
norm_pre) and transformers VitPose models (ViTPose+ MoE too) are built from a seed, saved in each format, and
loaded into our backbone. The reference is the other library's own forward: timm's `forward_features` of the
same ViT without its class/register tokens (our backbone has none), transformers' backbone with the chosen
`dataset_index`; for a resized grid and patch, the same timm ViT built at our grid from timm's resampling
functions applied directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from vitpose.build import build_model_from_config
from vitpose.config import load_config
from vitpose.models import CheckpointError, CheckpointMismatchError, build_model, create, save_official
from vitpose.models.__main__ import main
from vitpose.models.pretrained import load_pretrained
from vitpose.models.weights import load_checkpoint

DIM, DEPTH, HEADS = 64, 2, 2  # vitpose_pico's shape, so inspect suggests it
FAMILIES: dict[str, dict[str, Any]] = {
    "timm": {},  # MAE / DeiT / AugReg: class token with a position slot
    "timm-dinov2": {"init_values": 0.1, "reg_tokens": 2, "no_embed_class": True},  # LayerScale + registers
    "timm-clip": {"pre_norm": True},  # norm_pre, patch conv without bias
}


def timm_vit(family: str, img: int | tuple[int, int] = 32, patch: int = 8, seed: int = 0, **kw: Any) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                            num_classes=10, **{**FAMILIES[family], **kw}).eval()
    with torch.no_grad():  # LayerScale at its init value is a scalar and timm's biases start at zero: make the
        for name, p in vit.named_parameters():  # fold (weights and biases) do real work
            if name.endswith("gamma"):
                p.copy_(torch.rand_like(p) + 0.05)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return vit


def without_prefix(vit: VisionTransformer, family: str, img: Any = 32, patch: int = 8,
                   pos: torch.Tensor | None = None, proj: torch.Tensor | None = None) -> VisionTransformer:
    """The same ViT in timm without class/register tokens: what our backbone computes by design."""
    kw = {k: v for k, v in FAMILIES[family].items() if k != "reg_tokens"}
    kw["no_embed_class"] = True
    ref = VisionTransformer(img_size=img, patch_size=patch, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                            num_classes=0, class_token=False, global_pool="avg", fc_norm=False, **kw).eval()
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith(("cls_token", "reg_token", "head."))}
    if vit.has_class_token and not vit.no_embed_class:
        sd["pos_embed"] = sd["pos_embed"][:, 1:]  # the class position goes with the class token
    if pos is not None:
        sd["pos_embed"] = pos
    if proj is not None:
        sd["patch_embed.proj.weight"] = proj
    ref.load_state_dict(sd, strict=True)
    return ref


def ours(img: tuple[int, int] = (32, 32), patch: int = 8, **kw: Any):
    # patch_padding=0: timm's patch conv does not pad (ViTPose's layout pads by 2 * patch // 16).
    return build_model("vitpose_pico", img_size=img, patch_size=patch, patch_padding=0, embed_dim=DIM, depth=DEPTH,
                       num_heads=HEADS, deconv_channels=8, **kw).eval()


def save(sd: dict[str, torch.Tensor], path: Path, how: str) -> Path:
    if how == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    torch.save({"model": sd} if how == "mae" else sd, path.with_suffix(".pth"))
    return path.with_suffix(".pth")


def tokens(model, x: torch.Tensor) -> torch.Tensor:
    return model.backbone(x).flatten(2).transpose(1, 2)


CASES = [("timm", "pth"), ("timm", "safetensors"), ("timm", "mae"), ("timm-dinov2", "pth"),
         ("timm-dinov2", "safetensors"), ("timm-clip", "safetensors")]


@pytest.mark.parametrize(("family", "how"), CASES)
def test_timm_family_gives_timms_patch_tokens(tmp_path: Path, family: str, how: str) -> None:
    vit = timm_vit(family)
    path = save(vit.state_dict(), tmp_path / "vit", how)
    model = ours(pre_norm=family == "timm-clip")
    report = load_pretrained(model, path)

    assert report.format == ("mae" if how == "mae" else family)
    assert report.resized == [] and all(k.startswith("keypoint_head.") for k in report.new)
    assert "cls_token" in report.ignored and "backbone.last_norm.weight" in report.loaded
    # Slot 0 is added to every patch: zero, so each patch keeps exactly its own pre-trained position.
    assert torch.equal(model.backbone.pos_embed[0, 0], torch.zeros(DIM))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tokens(model, x), without_prefix(vit, family).forward_features(x),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["timm", "timm-dinov2"])
def test_resized_grid_and_patch_follow_timms_resampling(tmp_path: Path, family: str) -> None:
    vit = timm_vit(family, img=32, patch=8)  # 4x4 grid of 8x8 patches
    path = save(vit.state_dict(), tmp_path / "vit", "pth")
    model = ours(img=(48, 24), patch=4)  # 12x6 grid of 4x4 patches
    report = load_pretrained(model, path)
    assert report.resized == ["backbone.patch_embed.proj.weight", "backbone.pos_embed"]
    assert report.pos_embed_resized == ((4, 4), (12, 6))

    patch_pos = vit.pos_embed[:, 1:] if family == "timm" else vit.pos_embed
    pos = resample_abs_pos_embed(patch_pos.detach(), new_size=[12, 6], old_size=[4, 4], num_prefix_tokens=0)
    proj = resample_patch_embed(vit.patch_embed.proj.weight.detach(), [4, 4])
    ref = without_prefix(vit, family, img=(48, 24), patch=4, pos=pos, proj=proj)
    x = torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        torch.testing.assert_close(tokens(model, x), ref.forward_features(x), atol=1e-5, rtol=0)


def transformers_folder(path: Path, experts: int, simple: bool) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = {"num_experts": experts, "part_features": 8} if experts > 1 else {}
    backbone = transformers.VitPoseBackboneConfig(
        image_size=[64, 48], patch_size=[16, 16], hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        mlp_ratio=4, layer_norm_eps=1e-6, out_indices=[DEPTH], **extra)
    model = transformers.VitPoseForPoseEstimation(transformers.VitPoseConfig(
        backbone_config=backbone, num_labels=17, use_simple_decoder=simple)).eval()
    with torch.no_grad():  # an untrained head's heatmaps are ~1e-4, where any difference looks small
        for name, p in model.named_parameters():
            if name.startswith("head."):
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(("experts", "simple"), [(1, True), (3, False)])
def test_transformers_folder_and_vitpose_plus_experts(tmp_path: Path, experts: int, simple: bool) -> None:
    peer = transformers_folder(tmp_path / "hf", experts, simple)
    x = torch.randn(2, 3, 64, 48)
    for expert in range(experts):
        model = build_model("vitpose_pico_simple" if simple else "vitpose_pico", img_size=(64, 48), patch_size=16,
                            embed_dim=DIM, depth=DEPTH, num_heads=HEADS, deconv_channels=256).eval()
        report = load_pretrained(model, tmp_path / "hf", expert=expert)
        assert report.format == "transformers-vitpose" and report.new == [] and report.resized == []
        assert len(report.ignored) == DEPTH * 2 * (experts - 1)  # the other experts' weights and biases
        index = {"dataset_index": torch.full((2,), expert)} if experts > 1 else {}
        with torch.no_grad():
            want = peer.backbone(x, **index).feature_maps[-1]
            torch.testing.assert_close(tokens(model, x), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(model(x), peer(x, **index).heatmaps, atol=1e-5, rtol=0)


def test_a_backbone_key_that_does_not_load_is_an_error(tmp_path: Path) -> None:
    sd = timm_vit("timm").state_dict()
    unknown = {**sd, "blocks.0.attn.q_norm.weight": torch.ones(DIM // HEADS)}
    with pytest.raises(CheckpointError, match="q_norm"):
        load_pretrained(ours(), save(unknown, tmp_path / "unknown", "pth"))
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc2.weight"):
        load_pretrained(ours(), save(missing, tmp_path / "missing", "pth"))
    with pytest.raises(CheckpointError, match="pre_norm=True"):  # a CLIP file into a model without norm_pre
        load_pretrained(ours(), save(timm_vit("timm-clip").state_dict(), tmp_path / "clip", "pth"))
    transformers_folder(tmp_path / "hf", 1, True)
    with pytest.raises(CheckpointError, match="attention heads"):
        load_pretrained(build_model("vitpose_pico_simple", img_size=(64, 48), patch_size=16, embed_dim=DIM,
                                    depth=DEPTH, num_heads=1), tmp_path / "hf")


def test_init_checkpoint_builds_what_the_file_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vit = timm_vit("timm-clip")
    path = save(vit.state_dict(), tmp_path / "clip", "safetensors")
    cfg = load_config(None, [f"model.init_checkpoint={path}", "model.preset=vitpose_pico", "model.img_size=[32,32]",
                             "model.patch_size=8"])
    model = build_model_from_config(cfg)
    assert model.spec.pre_norm and "format timm-clip" in capsys.readouterr().out
    torch.testing.assert_close(model.backbone.norm_pre.weight, vit.norm_pre.weight)


def test_official_files_load_as_before_with_a_report(tmp_path: Path) -> None:
    src = build_model("vitpose_pico").eval()
    path = save_official(src, tmp_path / "pico.pth")
    model = build_model("vitpose_pico")
    report = load_pretrained(model, path)
    assert report.format == "vitpose" and report.preset == "vitpose_pico"
    assert report.new == [] and report.resized == [] and set(report.loaded) == set(src.state_dict())


def test_an_official_file_of_another_keypoint_set_starts_a_new_final_layer(tmp_path: Path) -> None:
    """An official ViTPose .pth (mmcv dict, cls_token, no spec of ours) of 17 keypoints into a 14-keypoint model:
    backbone and deconvolutions load, the final layer is new and reported; any other difference is still an
    error, and the strict loaders (load_checkpoint, load_model) refuse or rebuild as before."""
    coco = build_model("vitpose_pico", num_keypoints=17)
    sd = {"backbone.cls_token": torch.zeros(1, 1, coco.spec.embed_dim), **coco.state_dict()}
    path = tmp_path / "vitpose_coco.pth"
    torch.save({"state_dict": sd, "meta": {"mmcv_version": "1.3.9", "epoch": 210}}, path)
    final = ["keypoint_head.final_layer.weight", "keypoint_head.final_layer.bias"]

    model = build_model("vitpose_pico", num_keypoints=14)
    before = {k: model.state_dict()[k].clone() for k in final}
    report = load_pretrained(model, path)
    assert report.format == "vitpose" and report.new == final
    assert report.ignored == ["backbone.cls_token", *final]
    assert set(report.loaded) == set(coco.state_dict()) - set(final)
    assert any("predicts 17 keypoints, the model 14" in n for n in report.notes)
    assert "2 new" in report.summary() and "keypoint_head.* (2 keys: the pose head)" in report.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k] if k in final else coco.state_dict()[k]), k

    with pytest.raises(CheckpointMismatchError, match="final_layer.weight: \\(17, 32, 1, 1\\) vs \\(14, 32, 1, 1\\)"):
        load_checkpoint(build_model("vitpose_pico", num_keypoints=14), path)  # strict as before
    assert create(path).spec.num_keypoints == 17
    with pytest.raises(CheckpointMismatchError, match="fits preset 'vitpose_pico'"):  # the backbone stays strict
        load_pretrained(build_model("vitpose_pico", num_keypoints=14, depth=coco.spec.depth + 1), path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(12\)"):  # so does the rest of the head
        load_pretrained(build_model("vitpose_pico_simple", num_keypoints=14), path)
    wide = {**sd, final[0]: torch.zeros(17, 32, 3, 3)}  # a final layer that differs in more than its outputs
    torch.save({"state_dict": wide}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatchError, match=r"final_layer.weight: \(17, 32, 3, 3\) vs \(14, 32, 1, 1\)"):
        load_pretrained(build_model("vitpose_pico", num_keypoints=14), tmp_path / "wide.pth")


def inspect_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["inspect", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert list(result) == ["format", "preset", "loaded", "resized", "new", "ignored"]
    return result


def test_inspect_prints_format_preset_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mae = save(timm_vit("timm").state_dict(), tmp_path / "mae", "mae")
    got = inspect_json([str(mae), "--preset", "vitpose_pico"], capsys)
    assert got["format"] == "mae" and got["preset"] == "vitpose_pico"
    assert got["resized"] == ["backbone.patch_embed.proj.weight", "backbone.pos_embed"]  # 8 -> 16, 4x4 -> 16x12
    assert "cls_token" in got["ignored"] and "backbone.blocks.1.mlp.fc2.bias" in got["loaded"]

    transformers_folder(tmp_path / "hf", 3, False)
    got = inspect_json([str(tmp_path / "hf")], capsys)  # suggests the preset of the file's width and depth
    assert got["format"] == "transformers-vitpose" and got["preset"] == "vitpose_pico" and got["new"] == []

    official = save_official(build_model("vitpose_pico"), tmp_path / "pico.pth")
    assert inspect_json([str(official)], capsys)["format"] == "vitpose"

    assert main(["inspect", str(official)]) == 0
    assert "format vitpose, preset vitpose_pico" in capsys.readouterr().out

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err

"""ViTPose+ mixture of experts (issue 20 item 5): the MoE MLP with one expert selected is the model with that
expert joined onto fc2, exactly; a transformers ViTPose+ folder loads with all its experts and matches
transformers per dataset_index; a dataset's single-expert export round-trips through the single-dataset
loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_pretrained_formats import DEPTH, DIM, HEADS, tokens, transformers_folder
from vitpose.models import build_model, create, save_safetensors
from vitpose.models.multi_dataset import dataset_meta, export_dataset
from vitpose.models.pretrained import load_pretrained
from vitpose.models.vitpose import ModelSpec

DATASETS = (("coco", 17), ("crowd", 14), ("mpii", 16))


def moe_model(part: int = 16, decoder: str = "classic", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("vitpose_pico" if decoder == "classic" else "vitpose_pico_simple", img_size=(64, 48),
                        datasets=DATASETS, moe_part_features=part, num_keypoints=17, **kw)
    with torch.no_grad():  # an untrained head outputs ~1e-6: random heads make an exact comparison mean something
        for name, p in model.named_parameters():
            if "head" in name:
                p.normal_(0, 0.2)
    return model.eval()


def test_one_expert_selected_equals_the_joined_single_expert_model():
    model = moe_model()
    assert [k for k in model.state_dict() if k.startswith("backbone.blocks.0.mlp.")] == [
        f"backbone.blocks.0.mlp.{n}.{t}" for n in ("fc1", "fc2", "experts.0", "experts.1", "experts.2")
        for t in ("weight", "bias")]
    assert model.backbone.blocks[0].mlp.fc2.out_features == DIM - 16
    x = torch.randn(5, 3, 64, 48)
    index = torch.tensor([2, 0, 1, 2, 0])
    with torch.no_grad():
        routed = model(x, index)  # one tensor per dataset: its samples, through its expert and head
        for d, (_, k) in enumerate(DATASETS):
            single = export_dataset(model, d)
            assert single.spec.num_keypoints == k and not single.spec.datasets and not single.spec.moe_part_features
            assert single.backbone.blocks[0].mlp.fc2.out_features == DIM  # shared outputs + the expert's
            want = single(x)
            assert routed[d].shape == (int((index == d).sum()), k, 16, 12)
            torch.testing.assert_close(routed[d], want[index == d], atol=1e-6, rtol=0)
            torch.testing.assert_close(model(x, d), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), model(x, 0), atol=0, rtol=0)  # no index: the primary
    assert ModelSpec.from_dict(model.spec.to_dict()) == model.spec


def test_single_expert_export_round_trips_through_the_single_dataset_loaders(tmp_path: Path):
    from vitpose.models import create

    model = moe_model()
    save_safetensors(model, tmp_path / "moe.safetensors")
    again = create(tmp_path / "moe.safetensors")  # the spec in the file rebuilds the experts and heads
    assert again.spec == model.spec
    single = export_dataset(again, "crowd")
    path = save_safetensors(single, tmp_path / "crowd.safetensors")
    served = create(str(path))  # what serving, evaluation and export load
    assert served.spec == single.spec and served.spec.num_keypoints == 14
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x, 1), atol=1e-6, rtol=0)
    from vitpose.models.__main__ import main

    assert main(["export-dataset", str(tmp_path / "moe.safetensors"), "crowd", "--out", str(tmp_path / "crowd")]) == 0
    folder_model = create(str(tmp_path / "crowd"))
    folder_meta = folder_model.meta  # a folder serving loads like any model's
    assert folder_model.spec == single.spec and folder_meta["exported_from"] == {"dataset": "crowd", "index": 1}
    assert len(folder_meta["keypoints"]["names"]) == 14  # the file stored no sets: one assumed for 14 keypoints
    multi_meta = {"keypoints": {"set": "coco", "datasets": [{"name": n, "set": n, "names": [str(i) for i in range(k)]}
                                                            for n, k in DATASETS]}}
    narrowed = dataset_meta(multi_meta, model.spec, "crowd")
    assert narrowed["keypoints"]["set"] == "crowd" and len(narrowed["keypoints"]["names"]) == 14
    with pytest.raises(ValueError, match="no dataset 'aic'; its datasets: coco, crowd, mpii"):
        export_dataset(model, "aic")


def test_vitpose_plus_transformers_folder_loads_every_expert(tmp_path: Path):
    peer = transformers_folder(tmp_path / "hf", 3, False)  # 3 experts of 8 features, one 17-keypoint head
    model = build_model("vitpose_pico", img_size=(64, 48), patch_size=16, embed_dim=DIM, depth=DEPTH,
                        num_heads=HEADS, deconv_channels=256, datasets=(("coco", 17), ("aic", 17), ("mpii", 17)),
                        moe_part_features=8).eval()
    report = load_pretrained(model, tmp_path / "hf")
    assert report.format == "transformers-vitpose" and report.new == [] and report.ignored == []
    assert any("all 3 experts kept" in n for n in report.notes)
    assert any("associate_keypoint_heads.0, associate_keypoint_heads.1" in n for n in report.notes)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        for expert in range(3):
            index = torch.full((2,), expert)
            want = peer.backbone(x, dataset_index=index).feature_maps[-1]
            torch.testing.assert_close(model.backbone(x, expert).flatten(2).transpose(1, 2), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(model(x, expert), peer(x, dataset_index=index).heatmaps, atol=1e-5, rtol=0)
        mixed = torch.tensor([2, 0])  # per-sample routing, as transformers' dataset_index tensor
        routed = model(x, mixed)
        torch.testing.assert_close(routed[2], peer(x, dataset_index=mixed).heatmaps[:1], atol=1e-5, rtol=0)
        # The single-expert export of a loaded file is the plain model load_pretrained(expert=i) makes.
        plain = build_model("vitpose_pico", img_size=(64, 48), patch_size=16, embed_dim=DIM, depth=DEPTH,
                            num_heads=HEADS, deconv_channels=256).eval()
        load_pretrained(plain, tmp_path / "hf", expert=1)
        torch.testing.assert_close(export_dataset(model, 1)(x), plain(x), atol=1e-6, rtol=0)
        assert tokens(plain, x).shape == (2, 12, DIM)

    two = build_model("vitpose_pico", img_size=(64, 48), patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                      deconv_channels=256, datasets=(("coco", 17), ("crowd", 14)), moe_part_features=8)
    report = load_pretrained(two, tmp_path / "hf")  # fewer datasets: expert 2 ignored; a 14-keypoint head is new
    assert len(report.ignored) == DEPTH * 2 and all(".mlp.experts.2." in k for k in report.ignored)
    assert report.new and all(k.startswith("associate_keypoint_heads.0.") for k in report.new)


def test_an_official_vitpose_plus_file_loads_with_its_experts_and_heads(tmp_path: Path):
    """The official (mmpose) ViTPose+ layout: mlp.experts.i and associate_keypoint_heads.j in an mmcv dict with a
    cls_token and no spec of ours; the spec is read from its keys (datasets named in ViTPose+'s order)."""
    model = moe_model()
    sd = {"backbone.cls_token": torch.zeros(1, 1, DIM), **model.state_dict()}
    torch.save({"state_dict": sd, "meta": {"mmcv_version": "1.3.9"}}, tmp_path / "vitpose_plus.pth")
    loaded = create(tmp_path / "vitpose_plus.pth").eval()
    assert loaded.spec.datasets == (("coco", 17), ("aic", 14), ("mpii", 16)) and loaded.spec.moe_part_features == 16
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        for d in range(3):
            torch.testing.assert_close(loaded(x, d), model(x, d), atol=0, rtol=0)
    fresh = moe_model()
    report = load_pretrained(fresh, tmp_path / "vitpose_plus.pth")  # into a model built for it: plain, strict
    assert report.ignored == ["backbone.cls_token"] and report.new == []

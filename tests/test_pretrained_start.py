"""python -m benchmarks.pretrained_start's plumbing: the backbone it re-saves is timm's ViT layout to the letter (timm
loads it strictly and computes our tokens), both files read back as MAE / timm into the same function, and the
table's arithmetic (epochs to a threshold, a seed that never gets there). The training itself is the
benchmark's to run, not the tests'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tests.test_pretrained_formats import DEPTH, DIM, HEADS, ours, tokens, without_prefix
from vitpose.models.pretrained import load_pretrained


@pytest.fixture(scope="module")
def bench():
    from benchmarks import pretrained_start

    return pretrained_start


@pytest.fixture()
def trained_like():
    """Our backbone with every weight away from its init, the shared position slot 0 too (the part the
    conversion must fold into each patch)."""
    torch.manual_seed(0)
    model = ours()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_resaved_backbone_is_a_timm_vit_computing_our_tokens(bench, trained_like):
    sd = bench.timm_backbone(trained_like.state_dict())
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                            num_classes=0).eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same ViT without the class token, as the loader reads it, computes ours
        torch.testing.assert_close(without_prefix(vit, "timm").forward_features(x), tokens(trained_like, x),
                                   atol=1e-5, rtol=0)


def test_both_files_read_back_as_their_format_and_our_function(bench, trained_like, tmp_path: Path):
    files = bench.save_foreign(bench.timm_backbone(trained_like.state_dict()), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    for fmt, path in files.items():
        model = ours()
        assert load_pretrained(model, path).format == fmt
        with torch.no_grad():
            torch.testing.assert_close(tokens(model, x), tokens(trained_like, x), atol=1e-5, rtol=0)
    assert bench.inspect(files["mae"], "mae")["format"] == "mae"  # the CLI the benchmark prints
    with pytest.raises(SystemExit, match="not 'timm'"):
        bench.inspect(files["mae"], "timm")


def test_epochs_to_threshold_and_the_seed_that_never_gets_there(bench):
    curves = {"scratch": {0: [0.1, 0.3, 0.5], 1: [0.1, 0.2, 0.3]},
              "pretrained": {0: [0.4, 0.5, 0.6], 1: [0.3, 0.45, 0.5]}}
    r = bench.summarise(curves, [0, 1], None)
    assert r["threshold"] == pytest.approx(0.4)  # the scratch arm's last-epoch mean
    assert r["arms"]["scratch"]["epochs_to_T"] == [3, None]
    assert r["arms"]["scratch"]["epochs_to_T_mean"] == 3.5 and not r["arms"]["scratch"]["epochs_to_T_all_reached"]
    assert r["arms"]["pretrained"]["epochs_to_T"] == [1, 2]
    assert r["arms"]["pretrained"]["mean_curve_epochs_to_T"] == 2  # means 0.35, 0.475, 0.55
    assert r["final_AP_difference"]["per_seed"] == pytest.approx([0.1, 0.2])
    assert bench.summarise(curves, [0, 1], 0.55)["arms"]["scratch"]["mean_curve_epochs_to_T"] is None

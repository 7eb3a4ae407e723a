"""Sub-pixel export of the head's deconvolutions (``vitpose.models.subpixel``): the same function as
``ConvTranspose2d(k4, s2, p1)`` + BatchNorm + ReLU at random weights, the exported trained model matching eager
on real crops, and the int8 file running the head's convolutions as int8 kernels."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn

from vitpose.deploy.onnx import INPUT_NAME, export_onnx, onnx_session
from vitpose.models import build_model
from vitpose.models.subpixel import FINAL_FORMS, FORMS, SubpixelDeconv, subpixel_copy


def random_block(cin: int, cout: int, bias: bool, seed: int) -> tuple[nn.ConvTranspose2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    deconv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=bias).double()
    bn = nn.BatchNorm2d(cout).double().eval()
    with torch.no_grad():  # statistics far from the identity, so a wrong fold shows
        bn.running_mean.normal_(0, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.normal_(1, 0.5)
        bn.bias.normal_(0, 1)
    return deconv, bn


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("cin", "cout", "hw", "bias"), [(5, 7, (6, 4), False), (16, 8, (5, 7), True), (3, 1, (1, 1), False)])
def test_subpixel_equals_conv_transpose(form, cin, cout, hw, bias):
    deconv, bn = random_block(cin, cout, bias, seed=cin * 31 + hw[1])
    x = torch.randn(3, cin, *hw, dtype=torch.float64)
    with torch.no_grad():
        ref = deconv(x)
        # In float64, so the test sees the algebra, not float32 rounding: plain, +BN, +BN+ReLU.
        for bn_, relu, expected in ((None, False, ref), (bn, False, bn(ref)), (bn, True, torch.relu(bn(ref)))):
            sub = SubpixelDeconv(deconv, bn_, relu, form).double()
            got = sub(x)
            assert got.shape == expected.shape == (3, cout, 2 * hw[0], 2 * hw[1])
            assert (got - expected).abs().max() <= 1e-10 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("form", FINAL_FORMS)
@pytest.mark.parametrize(("cin", "cout", "k", "hw"), [(5, 7, 3, (6, 4)), (16, 8, 17, (5, 7)), (3, 1, 2, (1, 1))])
def test_final_conv_before_the_shuffle_equals_it_after(form, cin, cout, k, hw):
    """The head's 1x1 conv run on the four phases before the shuffle (dense block-structured, or grouped with
    phase-major channels and DepthToSpace DCR) == ConvTranspose2d + BN + ReLU, then the 1x1 conv, in float64."""
    deconv, bn = random_block(cin, cout, True, seed=cin * 7 + k)
    final = nn.Conv2d(cout, k, 1).double()
    with torch.no_grad():
        final.weight.normal_(0, 1)
        final.bias.normal_(0, 1)
    x = torch.randn(2, cin, *hw, dtype=torch.float64)
    with torch.no_grad():
        for relu in (False, True):
            y = bn(deconv(x))
            expected = final(torch.relu(y) if relu else y)
            sub = SubpixelDeconv(deconv, bn, relu, form, final=final).double()
            assert (sub.final.groups == 4) == (form == "phases_final_grouped")
            got = sub(x)
            assert got.shape == expected.shape == (2, k, 2 * hw[0], 2 * hw[1])
            assert (got - expected).abs().max() <= 1e-10 * max(1.0, float(expected.abs().max()))
    with pytest.raises(ValueError, match="final conv"):
        SubpixelDeconv(deconv, bn, True, "phases", final=final)


def test_subpixel_copy_rewrites_a_copy_and_keeps_other_heads():
    model = build_model("vitpose_pico", img_size=(64, 48), patch_size=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = subpixel_copy(model)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in copy.modules())
    assert sum(isinstance(m, SubpixelDeconv) for m in copy.modules()) == 2
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in model.modules()) == 2  # the original keeps its head
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for form in FINAL_FORMS:  # the final 1x1 conv moves into the last SubpixelDeconv, the head's own is gone
        moved = subpixel_copy(model, form)
        assert isinstance(moved.keypoint_head.final_layer, nn.Identity)
        assert [m.final is not None for m in moved.modules() if isinstance(m, SubpixelDeconv)] == [False, True]
        x = torch.randn(2, 3, 64, 48)
        with torch.no_grad():
            assert (moved(x) - model(x)).abs().max() <= 1e-5 * max(1.0, float(model(x).abs().max()))
    assert isinstance(model.keypoint_head.final_layer, nn.Conv2d)
    simple = build_model("vitpose_pico_simple", img_size=(64, 48), patch_size=8).eval()
    assert subpixel_copy(simple) is simple  # nothing to rewrite: no copy made


@pytest.mark.parametrize("form", FORMS)
def test_subpixel_export_matches_the_trained_model(trained_teacher, tmp_path, form):
    """fp32 ONNX with the sub-pixel head vs the eager (ConvTranspose) model on validation crops."""
    model, _, (_, val) = trained_teacher
    path = export_onnx(model, tmp_path / f"{form}.onnx", deconv=form)
    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.op_type == "ConvTranspose"]
    d2s = [n for n in graph.node if n.op_type == "DepthToSpace"]
    modes = [onnx.helper.get_attribute_value(a) for n in d2s for a in n.attribute if a.name == "mode"]
    assert modes == [b"CRD", b"DCR" if form == "phases_final_grouped" else b"CRD"]
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name.startswith("/keypoint_head/")]
    assert len(convs) == 3  # the two phase convs and the final one
    if form in FINAL_FORMS:  # the final conv runs before the last shuffle, which moves K channels, not C
        assert d2s[-1].input[0] == convs[-1].output[0]
    crops = torch.stack([val[i]["image"] for i in range(8)])
    with torch.no_grad():
        expected = model(crops).numpy()
    got = onnx_session(path).run(None, {INPUT_NAME: crops.numpy()})[0]
    assert abs(expected).max() > 0.3  # a trained model's peaks
    assert abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("form", ["phases", "phases_final", "phases_final_grouped"])
def test_int8_head_runs_in_int8(trained_teacher, tmp_path, form):
    """After onnxruntime's optimiser, every Conv of the head (the grouped final one too) is a QLinearConv (an
    int8 kernel), not a float Conv between Dequantize/Quantize pairs, and no ConvTranspose is left."""
    import onnxruntime as ort

    from vitpose.deploy.int8 import calibration_crops, quantize_int8

    model, _, (train, _) = trained_teacher
    int8 = quantize_int8(export_onnx(model, tmp_path / "m.onnx", deconv=form), tmp_path / "m.int8.onnx",
                         calibration_crops(train, 8))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # where QDQ pairs fuse
    options.optimized_model_filepath = str(tmp_path / "m.int8.opt.onnx")
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    head = [n for n in nodes if n.name.startswith("/keypoint_head/")]
    if form == "phases_final_grouped":
        grouped = [n for n in head if any(a.name == "group" and a.i == 4 for a in n.attribute)]
        assert [n.op_type for n in grouped] == ["QLinearConv"], [(n.name, n.op_type) for n in head]
    assert sorted(n.op_type for n in head if "Conv" in n.op_type) == ["QLinearConv"] * 3, [(n.name, n.op_type) for n in head]
    # Integer from Conv to Conv: the ReLUs folded into the int8 output ranges, the shuffles and crops moving
    # bytes, no Dequantize/Quantize pair (a float stretch) inside the head.
    assert {n.op_type for n in head} <= {"QLinearConv", "DepthToSpace", "Slice"}, sorted({n.op_type for n in head})
    assert not [n for n in nodes if n.op_type == "ConvTranspose"]

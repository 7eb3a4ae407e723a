"""ONNX export: parity with PyTorch at several batch sizes (dynamic batch), metadata carried in the file,
the export CLI (refusal above tolerance, clean errors) and registration as the mlflow.onnx flavour."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from tests.helpers_serving import REPO, random_model, register_model, sqlite_store
from vitpose.deploy.onnx import (
    DEFAULT_DECONV,
    INPUT_NAME,
    check_parity,
    export_onnx,
    onnx_session,
    sample_crops,
)
from vitpose.models import create


def load_cli():
    spec = importlib.util.spec_from_file_location("vitpose_cli_export", REPO / "pipelines" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loud_model(tmp_path, **kwargs):
    """A random model whose heatmaps have a trained model's scale (~1), so a tolerance of 1e-4 means something:
    an untrained head outputs ~1e-4 and any export would pass."""
    weights, meta = random_model(tmp_path / "model.safetensors", **kwargs)
    model = create(str(weights))
    meta = model.meta
    with torch.no_grad():
        peak = float(model(sample_crops(2, tuple(model.spec.img_size), seed=123)).abs().max())
        model.keypoint_head.final_layer.weight.div_(peak)
        model.keypoint_head.final_layer.bias.div_(peak)
    return model, meta


@pytest.mark.parametrize(("tokens", "deconv"), [(0, DEFAULT_DECONV), (2, DEFAULT_DECONV), (0, "phases"),
                                                       (0, "transpose")])
def test_onnx_matches_pytorch_at_any_batch(tmp_path, tokens, deconv):
    model, meta = loud_model(tmp_path, knowledge_tokens=tokens)  # students carry knowledge tokens
    path = export_onnx(model, tmp_path / "m.onnx", meta=meta, deconv=deconv)
    parity = check_parity(model, onnx_session(path), (1, 3, 8))
    for batch, p in parity.items():
        assert p["max_abs_value"] > 0.5, (batch, p)
        assert p["max_abs_diff"] <= 1e-4, (batch, p)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["vitpose_spec"]) == model.spec.to_dict()
    assert json.loads(props["vitpose_keypoints"])["names"][0] == "nose"
    assert props["vitpose_deconv"] == deconv  # the head's form in the graph (vitpose.models.subpixel)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("ConvTranspose" in ops) == (deconv == "transpose") and ("DepthToSpace" in ops) == (deconv != "transpose")
    graph_input = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert graph_input[0].dim_param == "batch" and [d.dim_value for d in graph_input[1:]] == [3, 128, 96]


def test_onnx_matches_a_trained_model_on_real_crops(trained_teacher, tmp_path):
    """The trained teacher (val AP ~0.3), carrying frozen knowledge tokens as a distilled student does, on
    validation crops: heatmaps of the size the codec decodes, so 1e-4 is far below anything that matters."""
    model, _, (_, val) = trained_teacher
    student = copy.deepcopy(model)
    student.backbone.set_knowledge_tokens(torch.randn(1, model.spec.embed_dim) * 0.02, trainable=False)
    path = export_onnx(student, tmp_path / "trained.onnx")
    crops = torch.stack([val[i]["image"] for i in range(8)])
    with torch.no_grad():
        expected = student(crops).numpy()
    got = onnx_session(path).run(None, {INPUT_NAME: crops.numpy()})[0]
    assert np.abs(expected).max() > 0.3  # a trained model's peaks
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - model(crops).detach().numpy()).max() > 1e-3  # the tokens are in the exported graph


def test_sample_crops_are_seeded_and_image_like():
    a, b = sample_crops(2, (64, 48), seed=1), sample_crops(2, (64, 48), seed=1)
    assert torch.equal(a, b) and a.shape == (2, 3, 64, 48)
    assert -2.2 < float(a.min()) and float(a.max()) < 2.7  # inside the normalised range of 0..255 pixels


def test_export_cli_prints_parity_and_refuses_bad_input(tmp_path, capsys):
    cli = load_cli()
    model, meta = loud_model(tmp_path)
    from vitpose.models import save_safetensors

    save_safetensors(model, tmp_path / "loud.safetensors")
    out = tmp_path / "loud.onnx"
    assert cli.main(["--model", str(tmp_path / "loud.safetensors"), "--out", str(out), "--check-batch", "1", "5"]) == 0
    text = capsys.readouterr().out
    assert "batch   1: max |onnxruntime - pytorch| heatmap difference" in text and "parity ok" in text
    assert out.is_file()
    # A tolerance no float arithmetic meets: the export is refused with exit 1.
    assert cli.main(["--model", str(tmp_path / "loud.safetensors"), "--out", str(out), "--atol", "0"]) == 1
    assert "not registering" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: model")
    # A file that is not a checkpoint: one line saying so, not torch's advice to unpickle with weights_only=False.
    (tmp_path / "fake.pth").write_text("not a checkpoint\n")
    assert cli.main(["--model", str(tmp_path / "fake.pth")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'fake.pth'} is not a PyTorch weights file") and "weights_only" not in line


@pytest.mark.slow
def test_export_registers_the_onnx_flavour_beside_the_pyfunc(tmp_path, capsys):
    import mlflow

    root = tmp_path / "store"
    uri, exp = sqlite_store(root)
    weights, meta = random_model(root / "model.safetensors", seed=5)
    run_id = register_model(uri, exp, weights, meta, "vitpose-student", "champion")
    cli = load_cli()
    out = tmp_path / "student.onnx"
    assert cli.main(["--model", "models:/vitpose-student@champion", "--tracking-uri", uri, "--out", str(out),
                     "--register", "vitpose-student-onnx", "--alias", "champion"]) == 0
    assert "registered models:/vitpose-student-onnx@champion" in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("vitpose-student-onnx", "champion")
    assert version.run_id == run_id  # logged into the run that made the model: both flavours side by side
    mlflow.set_tracking_uri(uri)
    onnx_model = mlflow.pyfunc.load_model("models:/vitpose-student-onnx@champion")
    x = sample_crops(2, (128, 96), seed=9)
    got = onnx_model.predict(x.numpy())
    got = got["heatmaps"] if isinstance(got, dict) else got
    ref_model = create(str(weights))
    with torch.no_grad():
        ref = ref_model(x).numpy()
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4
    shutil.rmtree(root, ignore_errors=True)

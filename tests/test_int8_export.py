"""int8 ONNX export: keypoints of the quantized trained model close to eager, the export CLI's --int8 (config
from the model's run, parity and AP printed) and serving the registered int8 model with ``mlflow models serve``."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch

from tests.helpers_serving import ModelServer, register_trained
from tests.test_export import load_cli
from vitpose.data.keypoints import keypoint_info
from vitpose.deploy.inference import PosePredictor
from vitpose.deploy.int8 import calibration_crops, quantize_int8, val_ap
from vitpose.deploy.onnx import export_onnx
from vitpose.deploy.runtime import OrtNetwork

# The trained teacher's val AP is ~0.3 and moves by ~0.01 between neighbouring epochs; int8 measured within
# 0.005 of eager. Keypoints: int8 moves them by ~0.1 px on 256 px images; a broken calibration by several px.
AP_BOUND = 0.02
MEAN_PX_BOUND = 1.0


def keypoints(predictor: PosePredictor, val) -> np.ndarray:
    return np.stack([p["keypoints"][:, :2] for p in predictor.predict_dataset(val)])


def test_int8_keypoints_and_ap_close_to_eager(trained_teacher, tmp_path):
    model, _, (train, val) = trained_teacher
    meta = {"spec": model.spec.to_dict(), "keypoints": keypoint_info(val)}
    fp32 = export_onnx(model, tmp_path / "m.onnx", meta=meta)
    int8 = OrtNetwork(quantize_int8(fp32, tmp_path / "m.int8.onnx", calibration_crops(train, 32)), model.spec)
    eager_kp = keypoints(PosePredictor(model, meta), val)
    int8_kp = keypoints(PosePredictor(int8, meta), val)
    error = np.linalg.norm(int8_kp - eager_kp, axis=-1)
    assert error.mean() < MEAN_PX_BOUND, error.mean()
    ap_eager, ap_int8 = val_ap(model, meta, val), val_ap(int8, meta, val)
    assert ap_eager > 0.1 and abs(ap_int8 - ap_eager) <= AP_BOUND, (ap_eager, ap_int8)


@pytest.mark.slow
def test_export_cli_int8_registers_a_served_int8_model(trained_teacher, tmp_path, capsys):
    import mlflow
    from PIL import Image

    from vitpose.config import dump_config

    model, cfg, (_, val) = trained_teacher
    root = tmp_path / "store"
    uri, run_id = register_trained(model, val, root)
    weights, meta = root / "model.safetensors", {"spec": model.spec.to_dict(), "keypoints": keypoint_info(val)}
    cli = load_cli()
    # A model file has no run, so no stored config: the CLI says to give --config.
    assert cli.main(["--model", str(weights), "--out", str(tmp_path / "f.onnx"), "--int8"]) == 2
    assert "--config" in capsys.readouterr().err
    # The registered model's run carries its training config, as a training run's does.
    mlflow.MlflowClient(uri).log_artifact(run_id, str(dump_config(cfg, tmp_path / "cfg" / "config.yaml")))
    assert cli.main(["--model", "models:/vitpose-student@champion", "--tracking-uri", uri, "--out",
                     str(tmp_path / "s.onnx"), "--int8", "--calib-crops", "32", "--register", "vitpose-student-int8"]) == 0
    text = capsys.readouterr().out
    assert f"training crops of the config of run {run_id}" in text and "max |int8 - fp32|" in text
    assert "int8 ok" in text and "registered models:/vitpose-student-int8/1 (version 1, pose pyfunc" in text

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/vitpose-student-int8/1").unwrap_python_model()
    assert isinstance(loaded.predictor.model, OrtNetwork)
    image = (val[0]["image"].permute(1, 2, 0).numpy() * 50 + 120).clip(0, 255).astype(np.uint8)  # any picture
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    body = {"dataframe_records": [{"image": base64.b64encode(buf.getvalue()).decode()}]}
    server = ModelServer("models:/vitpose-student-int8/1", uri, tmp_path / "serve")
    try:
        status, reply = server.post(body)
    finally:
        server.stop()
    assert status == 200, reply
    served = np.asarray(reply["predictions"][0]["persons"][0]["keypoints"])[:, :2]
    with torch.no_grad():
        eager = np.asarray(PosePredictor(model, meta).predict(image)["persons"][0]["keypoints"])[:, :2]
    assert np.linalg.norm(served - eager, axis=-1).mean() < MEAN_PX_BOUND
    shutil.rmtree(root, ignore_errors=True)

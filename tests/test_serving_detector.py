"""A registered pose model with a person detector: the served model answers a bare image with everyone's pose,
and boxes a client sends still win."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.helpers_serving import ModelServer, register_trained
from tests.test_detector import fixed_output_model
from tests.test_export import load_cli


@pytest.mark.slow
def test_a_registered_model_with_a_detector_answers_a_bare_image(trained_teacher, tmp_path, capsys):
    import mlflow
    import pandas as pd

    model, _, (_, val) = trained_teacher
    uri, _ = register_trained(model, val, tmp_path / "store")
    ann = json.loads(val.ann_file.read_text())
    counts: dict[int, int] = {}
    for a in ann["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    info = next(i for i in ann["images"] if counts.get(i["id"]) == 2)
    boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == info["id"]]
    image = (val.image_dir / info["file_name"]).read_bytes()
    ratio = 640 / max(info["width"], info["height"])
    dets = np.array([[[x * ratio, y * ratio, (x + w) * ratio, (y + h) * ratio, 0.9] for x, y, w, h in boxes]],
                    dtype=np.float32)
    fixed_output_model(tmp_path / "end2end.onnx", "input", 640, {"dets": dets, "labels": np.zeros((1, 2), np.int64)})

    cli = load_cli()
    (tmp_path / "notes.onnx").write_text("no model")
    assert cli.main(["--model", "models:/vitpose-student@champion", "--tracking-uri", uri, "--out",
                     str(tmp_path / "s.onnx"), "--register", "with-detector", "--detector",
                     str(tmp_path / "notes.onnx")]) == 2  # refused before any export work
    assert "--detector" in capsys.readouterr().err
    assert cli.main(["--model", "models:/vitpose-student@champion", "--tracking-uri", uri, "--out",
                     str(tmp_path / "s.onnx"), "--register", "with-detector", "--detector",
                     str(tmp_path / "end2end.onnx"), "--detector-format", "yolox"]) == 0
    assert "pose pyfunc, yolox detector" in capsys.readouterr().out

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/with-detector/1")
    bare, given = served.predict(pd.DataFrame([{"image": image}, {"image": image, "boxes": [boxes[0]]}])).to_dict(
        "records")
    assert bare["num_persons"] == 2 and not bare["whole_image_box"]
    np.testing.assert_allclose([p["box"] for p in bare["persons"]], boxes, atol=1.0)
    assert all(len(p["keypoints"]) == 17 for p in bare["persons"])
    assert given["num_persons"] == 1  # the client's box, not the detector's two

    server = ModelServer("models:/with-detector/1", uri, tmp_path / "serve")
    try:
        status, reply = server.post({"dataframe_records": [{"image": base64.b64encode(image).decode()}]})
    finally:
        server.stop()
    assert status == 200, reply
    assert reply["predictions"][0]["num_persons"] == 2

"""Serving: image/box input handling, the predictor's geometry and batching, the MLflow pyfunc through the
registry, and a real ``mlflow models serve`` answering good and bad HTTP requests."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import MINI_DETS, MINI_IMAGES
from tests.helpers_serving import (
    ModelServer,
    random_model,
    register_model,
    sqlite_store,
)
from vitpose.deploy.inference import (
    BadRequest,
    PosePredictor,
    decode_image,
    default_keypoint_info,
    parse_boxes,
)
from vitpose.models import ModelNotFoundError, create


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def picture(h: int = 120, w: int = 90, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> PosePredictor:
    weights, meta = random_model(tmp_path_factory.mktemp("w") / "model.safetensors")
    model = create(str(weights))
    meta = model.meta
    return PosePredictor(model, meta, batch_size=4)


# ------------------------------------------------------------------------------------------- input
def test_decode_image_accepts_common_encodings_and_modes():
    rgb = picture()
    assert np.array_equal(decode_image(encode(rgb)), rgb)
    assert np.array_equal(decode_image(base64.b64encode(encode(rgb)).decode()), rgb)
    assert np.array_equal(decode_image("data:image/png;base64," + base64.b64encode(encode(rgb)).decode()), rgb)
    wrapped = base64.encodebytes(encode(rgb)).decode()  # line-wrapped like the `base64` tool writes it
    assert np.array_equal(decode_image(wrapped), rgb)
    assert decode_image(encode(rgb, "JPEG")).shape == rgb.shape
    gray = decode_image(encode(rgb, mode="L"))
    assert gray.shape == rgb.shape and np.array_equal(gray[..., 0], gray[..., 2])
    rgba = decode_image(encode(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])))
    assert np.array_equal(rgba, rgb)  # alpha dropped
    assert decode_image(encode(rgb, mode="P")).shape == rgb.shape
    sixteen = Image.fromarray((np.arange(120 * 90).reshape(120, 90) * 6).astype(np.uint16))
    buf = io.BytesIO()
    sixteen.save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.dtype == np.uint8 and out.max() > 100  # rescaled, not clipped to white
    assert np.array_equal(decode_image(rgb), rgb)
    assert decode_image(rgb[..., 0]).shape == rgb.shape
    assert np.array_equal(decode_image(np.dstack([rgb, rgb[..., :1]])), rgb)
    assert np.array_equal(decode_image(rgb.astype(np.int64).tolist()), rgb)


@pytest.mark.parametrize(("data", "needle"), [
    (b"this is a text file, not a picture", "not a decodable image"),
    (b"", "empty"),
    ("%%% not base64 %%%", "not valid base64"),
    (np.zeros((10, 10, 3), np.float32) + 0.5, "uint8"),
    (np.zeros((10, 10, 2), np.uint8), "shape"),
    (12345, "got a int"),
])  # fmt: skip
def test_decode_image_refuses_with_a_clear_message(data, needle):
    with pytest.raises(BadRequest, match=needle):
        decode_image(data)


def test_parse_boxes_forms_and_errors():
    assert parse_boxes(None, 100, 80) is None
    assert parse_boxes(float("nan"), 100, 80) is None
    assert parse_boxes("", 100, 80) is None
    assert parse_boxes([], 100, 80) == []
    assert parse_boxes([[1, 2, 30, 40]], 100, 80) == [[1.0, 2.0, 30.0, 40.0, 1.0]]
    assert parse_boxes("[[1, 2, 30, 40, 0.5]]", 100, 80) == [[1.0, 2.0, 30.0, 40.0, 0.5]]
    assert parse_boxes(np.array([[1, 2, 30, 40]]), 100, 80) == [[1.0, 2.0, 30.0, 40.0, 1.0]]
    assert parse_boxes([{"bbox": [1, 2, 30, 40], "score": 0.7}], 100, 80) == [[1.0, 2.0, 30.0, 40.0, 0.7]]
    assert parse_boxes([[-10, -10, 30, 40]], 100, 80)  # partly outside is fine: detectors do that
    for boxes, needle in [
        ([[10, 10, 0, 20]], "width and height must be > 0"),
        ([[10, 10, 20, -5]], "width and height must be > 0"),
        ([[150, 10, 20, 20]], "outside the 100x80 image"),
        ([[-50, 10, 20, 20]], "outside"),
        ([[1, 2, 3]], r"expected \[x, y, w, h\]"),
        ([[1, 2, "a", 4]], "must be a number"),
        ([[1, 2, float("nan"), 4]], "finite"),
        ("{not json", "not valid JSON"),
        (42, "send a list"),
        ([{"box": [1, 2, 3, 4]}], "needs 'bbox'"),
    ]:
        with pytest.raises(BadRequest, match=needle):
            parse_boxes(boxes, 100, 80)


# --------------------------------------------------------------------------------------- predictor
def test_keypoints_come_back_in_original_image_coordinates(predictor):
    """The same content at an offset inside a larger canvas gives the same keypoints, shifted."""
    content = picture(200, 160, seed=1)
    canvas = np.zeros((330, 300, 3), np.uint8)
    dx, dy = 70, 95
    canvas[dy : dy + 200, dx : dx + 160] = content
    box = [50, 40, 60, 100]  # its padded crop stays inside the content in both images
    a = predictor.predict(content, [box])["persons"][0]
    b = predictor.predict(canvas, [[box[0] + dx, box[1] + dy, *box[2:]]])["persons"][0]
    ka, kb = np.array(a["keypoints"]), np.array(b["keypoints"])
    assert np.allclose(kb[:, 0] - dx, ka[:, 0], atol=0.02) and np.allclose(kb[:, 1] - dy, ka[:, 1], atol=0.02)
    assert np.allclose(ka[:, 2], kb[:, 2], atol=1e-4)


def test_batch_of_images_equals_one_by_one_and_whole_image_is_flagged(predictor):
    images = [picture(120, 90, 2), picture(64, 200, 3), picture(300, 240, 4)]
    boxes = [[[5, 5, 40, 100, 0.9], [30, 10, 50, 60]], None, []]
    together = predictor.predict_batch(list(zip(images, boxes, strict=True)))  # 3 crops: one forward (batch 4)
    for image, b, result in zip(images, boxes, together, strict=True):
        alone = predictor.predict(image, b)
        assert result["num_persons"] == alone["num_persons"] == len(result["persons"])
        for p, q in zip(result["persons"], alone["persons"], strict=True):
            assert np.allclose(p["keypoints"], q["keypoints"], atol=1e-3)
    assert [r["whole_image_box"] for r in together] == [False, True, False]
    assert together[1]["persons"][0]["box"] == [0.0, 0.0, 200.0, 64.0]
    assert together[2]["persons"] == []  # [] = nobody, not the whole image
    assert together[0]["persons"][0]["box_score"] == 0.9 and together[0]["persons"][1]["box_score"] == 1.0
    assert len(together[0]["persons"][0]["keypoints"]) == 17
    assert (together[0]["width"], together[0]["height"]) == (90, 120)


def test_flip_test_changes_the_result_and_can_be_turned_off(predictor):
    image, box = picture(120, 90, 5), [[10, 10, 60, 100]]
    with_flip = predictor.predict_batch([(image, box)])[0]["persons"][0]["keypoints"]
    without = predictor.predict_batch([(image, box)], flip=False)[0]["persons"][0]["keypoints"]
    assert not np.allclose(with_flip, without)
    no_pairs = PosePredictor(predictor.model, {"keypoints": {**default_keypoint_info(17), "flip_pairs": []}})
    assert no_pairs.flip_test is False  # without left/right pairs a mirrored pass cannot be merged


def test_missing_model_uris_say_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        create(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no model.safetensors"):
        create(str(tmp_path / "empty"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(ModelNotFoundError, match="vitpose-missing"):
        PosePredictor.from_uri("models:/vitpose-missing@champion", uri)


# ------------------------------------------------------------------------------------ MLflow pyfunc
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A private SQLite store with a random nano model registered as vitpose-student@champion."""
    root = tmp_path_factory.mktemp("registry")
    uri, exp = sqlite_store(root)
    weights, meta = random_model(root / "model.safetensors", seed=3)
    run_id = register_model(uri, exp, weights, meta, "vitpose-student", "champion")
    yield {"uri": uri, "root": root, "run_id": run_id, "weights": weights, "meta": meta}
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_pyfunc_round_trip_through_the_registry(registry, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    mlflow.set_tracking_uri(registry["uri"])
    model = mlflow.pyfunc.load_model("models:/vitpose-student@champion")
    sig = model.metadata.signature
    assert [c.name for c in sig.inputs.inputs] == ["image", "boxes"]
    assert "persons" in sig.outputs.input_names() and sig.params.to_dict()[0]["name"] == "flip_test"
    local = Path(mlflow.artifacts.download_artifacts("models:/vitpose-student@champion"))
    assert (local / "artifacts" / "model.safetensors").is_file() and (local / "artifacts" / "vitpose_meta.json").is_file()
    assert (local / "input_example.json").is_file()
    assert not list(local.glob("*.pkl"))  # models from code: nothing to unpickle

    images = [picture(140, 100, 6), picture(90, 120, 7)]
    frame = pd.DataFrame({"image": [encode(images[0]), base64.b64encode(encode(images[1])).decode()],
                          "boxes": [[[10, 10, 50, 100, 0.8]], None]})
    out = model.predict(frame)
    assert list(out["num_persons"]) == [1, 1] and list(out["whole_image_box"]) == [False, True]
    # The registered model is the same network as the weights we gave it.
    ref_model = create(str(registry["weights"]))
    ref = PosePredictor(ref_model, registry["meta"]).predict_batch(
        [(images[0], [[10, 10, 50, 100, 0.8]]), (images[1], None)])
    for got, want in zip(out["persons"], ref, strict=True):
        assert np.allclose(got[0]["keypoints"], want["persons"][0]["keypoints"], atol=1e-6)
    # Arrays go in too, and a list of dicts; the flip_test param switches the second pass off.
    arr = model.predict([{"image": images[0], "boxes": [[10, 10, 50, 100]]}], params={"flip_test": False})
    assert arr["num_persons"][0] == 1
    # runs:/ URIs and the loader used by the CLIs see the same model.
    m2 = create(f"runs:/{registry['run_id']}/model", tracking_uri=registry["uri"])
    meta2 = m2.meta
    assert meta2["keypoints"]["names"][0] == "nose"
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), ref_model.state_dict().values(), strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
def test_mlflow_models_serve_answers_real_requests_and_survives_bad_ones(registry, tmp_path):
    import mlflow

    image_path = MINI_IMAGES / "000000196141.jpg"
    dets = [d for d in json.loads(MINI_DETS.read_text()) if d["image_id"] == 196141 and d["score"] >= 0.3]
    boxes = [[*d["bbox"], d["score"]] for d in dets]
    jpeg = image_path.read_bytes()
    server = ModelServer("models:/vitpose-student@champion", registry["uri"], tmp_path / "serve")
    try:
        status, body = server.post({"dataframe_records": [{"image": _b64(jpeg), "boxes": boxes}]})
        assert status == 200, body
        row = body["predictions"][0]
        assert row["num_persons"] == len(boxes) == len(row["persons"]) and row["whole_image_box"] is False
        assert (row["width"], row["height"]) == (640, 429)
        for person, box in zip(row["persons"], boxes, strict=True):
            kps = np.array(person["keypoints"])
            assert kps.shape == (17, 3)
            # Keypoints lie in the padded box, in original image pixels.
            x, y, w, h = box[:4]
            assert (kps[:, 0] > x - w).all() and (kps[:, 0] < x + 2 * w).all()
            assert (kps[:, 1] > y - h).all() and (kps[:, 1] < y + 2 * h).all()
        # The server says what the in-process pyfunc says.
        mlflow.set_tracking_uri(registry["uri"])
        local = mlflow.pyfunc.load_model("models:/vitpose-student@champion").predict(
            pd.DataFrame({"image": [jpeg], "boxes": [boxes]}))
        assert np.allclose([p["keypoints"] for p in row["persons"]], [p["keypoints"] for p in local["persons"][0]],
                           atol=1e-6)

        rgb = np.asarray(Image.open(image_path).convert("RGB"))
        gray, rgba = encode(rgb, mode="L"), encode(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
        status, body = server.post({"dataframe_split": {"columns": ["image", "boxes"],
                                                        "data": [[_b64(gray), [[300, 50, 100, 200]]], [_b64(rgba), None]]}})
        assert status == 200, body
        assert [r["whole_image_box"] for r in body["predictions"]] == [False, True]

        bad = [
            ({"dataframe_records": [{"image": _b64(b"%PDF-1.4 not an image")}]}, "not a decodable image"),
            ({"dataframe_records": [{"image": _b64(jpeg), "boxes": [[900, 50, 100, 100]]}]}, "outside the 640x429 image"),
            ({"dataframe_records": [{"image": _b64(jpeg), "boxes": [[300, 50, 0, 100]]}]}, "width and height must be > 0"),
            ({"dataframe_records": [{"image": "@@@"}]}, "not valid base64"),
            ({"dataframe_records": [{"boxes": [[1, 2, 3, 4]]}]}, "image"),
        ]
        for request, needle in bad:
            status, body = server.post(request)
            assert status == 400, (request, body)
            assert needle in json.dumps(body), body
            # The reason alone, not MLflow's dump of the request before it.
            assert body["message"].startswith(("row 0: ", "input has no")) and "Failed to predict" not in body["message"]
        status, _ = server.post(b"{ not json", "application/json")
        assert status == 400
        status, _ = server.post(jpeg, "image/jpeg")  # a raw upload: wrong content type, refused cleanly
        assert status == 415
        assert server.proc.poll() is None  # still running
        status, body = server.post({"inputs": {"image": [_b64(jpeg), _b64(gray)]}})  # columnar, no boxes
        assert status == 200, body
        assert [r["whole_image_box"] for r in body["predictions"]] == [True, True]
    finally:
        server.stop()
    assert server.proc.poll() is not None

"""The evaluate and predict CLIs: AP identical to the training engine's own evaluation, detection boxes and
flip test switches, MLflow logging, pictures and JSON, and clean ``error:`` exits for user mistakes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import MINI, MINI_DETS, MINI_IMAGES
from tests.helpers_serving import (
    REPO,
    sqlite_store,
    train_tiny_model,
)

pytestmark = pytest.mark.slow  # every test here trains, or uses what the session trained


def load_cli(name: str):
    spec = importlib.util.spec_from_file_location(f"vitpose_cli_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_cli = load_cli("evaluate")
predict_cli = load_cli("predict")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A vitpose_nano trained for a minute by the real engine on a synthetic set (see helpers_serving)."""
    root = tmp_path_factory.mktemp("trained")
    yield train_tiny_model(root)
    shutil.rmtree(root, ignore_errors=True)


def run_cli(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pipelines" / script), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


# --------------------------------------------------------------------------------------------- evaluate
def test_evaluate_reproduces_the_engine_ap(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = evaluate_cli.main(["--model", str(trained.checkpoint), "--data-root", str(trained.data_root),
                            "--out", str(out), "--batch-size", "7"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 5 and printed.count("Average Recall") == 5
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert trained.val_metrics["val/AP"] > 0, "the tiny model learned nothing: the comparison would be of zeros"
    for name, value in trained.val_metrics.items():
        assert metrics[name.removeprefix("val/")] == pytest.approx(value, abs=1e-6), name
    results = json.loads((out / "keypoint_results.json").read_text())
    assert results and len(results[0]["keypoints"]) == 17 * 3

    # Prediction level: the CLI's fused flip pass equals the engine's two separate passes, instance by instance.
    from vitpose.data.coco import TopDownCocoDataset
    from vitpose.deploy.inference import PosePredictor
    from vitpose.evaluation import decode_batch_to_predictions

    predictor = PosePredictor.from_uri(str(trained.checkpoint), batch_size=7)
    ds = TopDownCocoDataset(trained.data_root / "annotations/person_keypoints_val.json",
                            trained.data_root / "images/val", train=False, input_size=predictor.input_size)
    ours = predictor.predict_dataset(ds)
    engine_way = []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(ds, batch_size=16):
            hm, hf = predictor.model(batch["image"]), predictor.model(batch["image"].flip(3))
            engine_way += decode_batch_to_predictions(hm, batch, hf, flip_pairs=ds.flip_pairs, input_size=ds.input_size)
    assert len(ours) == len(engine_way) == len(ds)
    for a, b in zip(ours, engine_way, strict=True):
        assert np.allclose(a["keypoints"][:, :2], b["keypoints"][:, :2], atol=1e-3)
        assert np.allclose(a["keypoints"][:, 2], b["keypoints"][:, 2], atol=1e-5)


def test_evaluate_with_detections_flip_off_and_mlflow_logging(trained, tmp_path, capsys):
    import mlflow

    uri, _ = sqlite_store(tmp_path / "mlflow")
    mlflow.MlflowClient(uri).create_experiment("eval-tests", artifact_location=(tmp_path / "mlflow" / "a").as_uri())
    args = ["--model", str(trained.checkpoint), "--data-root", str(MINI),
            "--ann", "annotations/person_keypoints_val2017_mini.json", "--images", "images",
            "--det-file", str(MINI_DETS)]
    assert evaluate_cli.main([*args, "--out", str(tmp_path / "flip")]) == 0
    assert evaluate_cli.main([*args, "--out", str(tmp_path / "noflip"), "--no-flip-test", "--mlflow-run-name", "mini",
                              "--experiment", "eval-tests", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "detections" in printed and "flip test off" in printed
    flip = json.loads((tmp_path / "flip" / "metrics.json").read_text())["settings"]
    noflip = json.loads((tmp_path / "noflip" / "metrics.json").read_text())["settings"]
    assert flip["instances"] == noflip["instances"] == len(json.loads(MINI_DETS.read_text()))
    assert flip["flip_test"] is True and noflip["flip_test"] is False
    a = json.loads((tmp_path / "flip" / "keypoint_results.json").read_text())
    b = json.loads((tmp_path / "noflip" / "keypoint_results.json").read_text())
    assert a and b and a[0]["keypoints"] != b[0]["keypoints"]

    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("eval-tests").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "mini"
    assert "eval/AP" in runs[0].data.metrics and runs[0].data.params["flip_test"] == "False"
    logged = {f.path for f in mlflow.MlflowClient(uri).list_artifacts(runs[0].info.run_id)}
    assert {"keypoint_results.json", "metrics.json", "summary.txt"} <= logged


def test_evaluate_user_errors_exit_2_without_a_traceback(trained, tmp_path, capsys):
    proc = run_cli("evaluate.py", "--model", str(tmp_path / "no-such-model"), "--data-root", str(trained.data_root))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr
    assert evaluate_cli.main(["--model", str(trained.checkpoint), "--data-root", str(trained.data_root),
                              "--ann", "annotations/nope.json"]) == 2
    assert "--ann annotations/nope.json" in capsys.readouterr().err
    assert evaluate_cli.main(["--model", str(trained.checkpoint), "--data-root", str(tmp_path / "nowhere")]) == 2
    assert evaluate_cli.main(["--model", str(trained.checkpoint), "--data-root", str(trained.data_root),
                              "--det-file", "missing.json"]) == 2
    assert "--det-file missing.json: not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- predict
def test_predict_draws_skeletons_and_writes_keypoints(trained, tmp_path, capsys):
    ann = json.loads((trained.data_root / "annotations/person_keypoints_val.json").read_text())
    image = ann["images"][0]
    boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == image["id"]]
    src = trained.data_root / "images/val" / image["file_name"]
    (tmp_path / "boxes.json").write_text(json.dumps({image["file_name"]: boxes}))
    out = tmp_path / "pred"
    assert predict_cli.main(["--model", str(trained.checkpoint), str(src), "--boxes", str(tmp_path / "boxes.json"),
                             "--out", str(out)]) == 0
    png = out / f"{src.stem}_pose.png"
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.size == (image["width"], image["height"])
        drawn = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(drawn - np.asarray(Image.open(src).convert("RGB")).astype(int)).max() > 100  # something was drawn
    result = json.loads((out / "keypoints.json").read_text())
    entry = result["images"][0]
    assert entry["num_persons"] == len(boxes) and entry["whole_image_box"] is False
    assert all(len(p["keypoints"]) == 17 for p in entry["persons"]) and len(result["keypoint_names"]) == 17


def test_predict_a_video_and_an_image_with_a_detector(trained, tmp_path, capsys):
    """A video and a photo without boxes: the detector file (mmdeploy's layout) finds the people, every frame's
    people keep their track ids, and a file that is no video is skipped with a line (exit 1: partial)."""
    from tests.test_detector import fixed_output_model
    from vitpose.deploy.video import VideoWriter, read_video

    ann = json.loads((trained.data_root / "annotations/person_keypoints_val.json").read_text())
    counts = {}
    for a in ann["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    image = next(i for i in ann["images"] if counts.get(i["id"]) == 2)  # two people
    boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == image["id"]]
    src = trained.data_root / "images/val" / image["file_name"]
    still = np.asarray(Image.open(src).convert("RGB"))
    with VideoWriter(tmp_path / "two.mp4", fps=10) as out:
        for _ in range(8):
            out.write(still)
    ratio = 640 / max(still.shape[:2])
    dets = np.array([[[x * ratio, y * ratio, (x + w) * ratio, (y + h) * ratio, 0.9] for x, y, w, h in boxes]],
                    dtype=np.float32)
    fixed_output_model(tmp_path / "end2end.onnx", "input", 640, {"dets": dets, "labels": np.zeros((1, 2), np.int64)})
    (tmp_path / "broken.mp4").write_text("not a video")
    out = tmp_path / "pred"
    rc = predict_cli.main(["--model", str(trained.checkpoint), str(tmp_path / "two.mp4"), str(src),
                           str(tmp_path / "broken.mp4"), "--detector", str(tmp_path / "end2end.onnx"),
                           "--detector-format", "yolox", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 1 and "skipping" in printed.err and "broken.mp4: not a video FFmpeg can read" in printed.err
    assert "two.mp4: 8 frames, 2 track(s)" in printed.out
    assert len(list(read_video(out / "two_pose.mp4"))) == 8
    poses = json.loads((out / "two_poses.json").read_text())
    assert poses["frames"] == 8 and poses["stopped"] is None and poses["smoothing"]["min_cutoff"] == 1.0
    tracks = {}
    for r in poses["results"]:
        tracks.setdefault(r["track_id"], []).append(r["image_id"])
        assert len(r["keypoints"]) == 17 * 3 and r["category_id"] == 1
    assert sorted(tracks) == [1, 2] and all(frames == list(range(8)) for frames in tracks.values())
    photo = next(e for e in json.loads((out / "keypoints.json").read_text())["images"] if e["file"] == str(src))
    assert photo["num_persons"] == 2 and photo["whole_image_box"] is False  # the detector's two people
    assert predict_cli.main(["--model", str(trained.checkpoint), str(src), "--detector", str(src)]) == 2


def test_predict_folder_with_coco_detections_and_whole_images(trained, tmp_path):
    out = tmp_path / "mini"
    assert predict_cli.main(["--model", str(trained.checkpoint), str(MINI_IMAGES), "--boxes", str(MINI_DETS),
                             "--box-score-thr", "0.5", "--out", str(out)]) == 0
    result = json.loads((out / "keypoints.json").read_text())
    counts = {Path(e["file"]).stem: e["num_persons"] for e in result["images"]}
    assert counts == {"000000000785": 1, "000000040083": 5, "000000196141": 6, "000000197388": 6}
    assert len(list(out.glob("*_pose.png"))) == 4

    rgb = np.asarray(Image.open(MINI_IMAGES / "000000000785.jpg").convert("RGB"))
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(tmp_path / "rgba.png")
    out2 = tmp_path / "whole"
    assert predict_cli.main(["--model", str(trained.checkpoint), str(tmp_path / "gray.png"),
                             str(tmp_path / "rgba.png"), "--out", str(out2), "--no-flip-test"]) == 0
    result = json.loads((out2 / "keypoints.json").read_text())
    assert [e["whole_image_box"] for e in result["images"]] == [True, True] and result["flip_test"] is False


def test_predict_reports_an_unreadable_image_and_goes_on(trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("000000000785.jpg", "000000040083.jpg"):
        shutil.copy(MINI_IMAGES / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 cut off mid-download")
    out = tmp_path / "pred"
    assert predict_cli.main(["--model", str(trained.checkpoint), str(folder), "--out", str(out)]) == 1  # partial
    captured = capsys.readouterr()
    assert len(list(out.glob("*_pose.png"))) == 2
    assert "skipped 1 of 3 input(s):" in captured.err and "broken.jpg: image:" in captured.err
    assert "wrote 2 picture(s)" in captured.out and "--score-thr 0.3" in captured.out


def test_predict_user_errors_exit_2_without_a_traceback(trained, tmp_path, capsys):
    uri, _ = sqlite_store(tmp_path / "store")
    image = MINI_IMAGES / "000000000785.jpg" if MINI_IMAGES.is_dir() else None
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("meeting notes, not a picture")
    proc = run_cli("predict.py", "--model", "models:/vitpose-nope@champion", str(not_image),
                   env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "vitpose-nope" in proc.stderr and "Traceback" not in proc.stderr

    model = str(trained.checkpoint)
    assert predict_cli.main(["--model", model, str(not_image), "--out", str(tmp_path / "o")]) == 2
    assert "notes.jpg: image: " in capsys.readouterr().err
    if image is not None:
        (tmp_path / "bad.json").write_text(json.dumps([[10, 10, 0, 50]]))
        assert predict_cli.main(["--model", model, str(image), "--boxes", str(tmp_path / "bad.json"),
                                 "--out", str(tmp_path / "o")]) == 2
        assert "width and height must be > 0" in capsys.readouterr().err
        (tmp_path / "two.json").write_text(json.dumps([[10, 10, 20, 50]]))
        assert predict_cli.main(["--model", model, str(image), str(not_image), "--boxes", str(tmp_path / "two.json"),
                                 "--out", str(tmp_path / "o")]) == 2
        assert "fits one image" in capsys.readouterr().err
    assert predict_cli.main(["--model", model, str(tmp_path / "missing.jpg")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # refused before any input is read, not a video skipped later
        predict_cli.main(["--model", model, str(not_image), "--smooth-beta", "-1"])
    assert stop.value.code == 2 and "--smooth-beta: One-Euro beta must be >= 0, got -1.0" in capsys.readouterr().err

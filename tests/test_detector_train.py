"""The embedded default's person detector (pipelines/detector.py): trained from random weights it finds the
synthetic people (box AP far above an untrained network's), its ONNX export in MLflow gives the boxes the trained
network gives, predict finds people in a bare image through it, and a run resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import load_cli as load_script

SMALL = ["model.input_size=128", "model.width=16", "train.batch_size=8", "train.lr_steps=[]",
         "train.warmup_iters=10", "train.eval_every=1"]
EPOCHS = 6


def data_sets(cfg) -> list[str]:
    """The pose fixture's dataset as it was generated (other knobs would regenerate it under the other tests)."""
    s = cfg.data.synthetic
    return [f"data.root={cfg.data.root_path()}", f"data.synthetic.train_instances={s.train_instances}",
            f"data.synthetic.val_instances={s.val_instances}",
            f"data.synthetic.unlabeled_instances={s.unlabeled_instances}"]


def detector_cli(data: list[str], out: Path, uri: str, *extra: str) -> list[str]:
    sets = [*data, f"output={out}", f"tracking.tracking_uri={uri}", *SMALL, *extra]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def trained_detector(trained_teacher, tmp_path_factory):
    """(run folder, tracking URI, data root): the pipeline run on the teacher fixture's synthetic data (400
    training instances), the pose fixture's store beside it."""
    from tests.helpers_serving import sqlite_store

    _, cfg, _ = trained_teacher
    base = tmp_path_factory.mktemp("detector")
    uri, _ = sqlite_store(base / "store")
    assert load_script("detector").main(detector_cli(data_sets(cfg), base / "runs", uri,
                                                     f"train.epochs={EPOCHS}")) == 0
    (folder,) = (base / "runs").glob("synthetic-detector-*")
    return folder, uri, data_sets(cfg)


@pytest.mark.slow
def test_the_trained_detector_finds_people_and_its_onnx_export_agrees(trained_detector):
    import torch

    from vitpose.config import load_config
    from vitpose.deploy.detector import OnnxPersonDetector, detector_file
    from vitpose.detection.config import DetectorConfig
    from vitpose.detection.data import PersonBoxes
    from vitpose.detection.model import build_detector
    from vitpose.detection.train import box_ap, detect_split

    folder, uri, data = trained_detector
    history = torch.load(folder / "checkpoint.pt", weights_only=False)["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    trained = max(h["val/AP50"] for h in history)
    cfg = load_config("configs/detector/synthetic.yaml", [*data, *SMALL], schema=DetectorConfig)
    root = cfg.data.root_path()
    val_ann = root / cfg.data.val_ann
    val = PersonBoxes(val_ann, root / cfg.data.val_images, cfg.model.input_size, train=False)
    torch.manual_seed(0)
    untrained = box_ap(val_ann, detect_split(build_detector(cfg.model.model_dump()), val, torch.device("cpu"), 8))
    assert trained > 0.5 and untrained["AP50"] < 0.1, (trained, untrained)

    detections = json.loads((folder / "val_detections.json").read_text())
    assert set(detections[0]) == {"image_id", "category_id", "bbox", "score"}  # COCO results, as evaluate reads
    onnx = OnnxPersonDetector(detector_file("models:/vitpose-detector@current", uri), score_thr=0.3)
    assert onnx.format == "torchvision"  # told by the tag in the file, format 'auto'
    from vitpose.data.files import load_image

    compared = 0
    for info in val.images[:8]:
        mine = np.array([[*d["bbox"], d["score"]] for d in detections
                         if d["image_id"] == info["id"] and d["score"] >= 0.3]).reshape(-1, 5)
        theirs = onnx(load_image(val.image_dir / info["file_name"]))
        assert theirs.shape == mine.shape
        np.testing.assert_allclose(theirs, mine, atol=0.05)  # the best epoch's network, exported whole
        compared += len(mine)
    assert compared >= 4


@pytest.fixture(scope="module")
def pose_and_detector(trained_teacher, trained_detector, tmp_path_factory):
    """The pose fixture registered as models:/vitpose-student@champion in the detector's store; (URI, an image
    of two people, its true boxes)."""
    import mlflow

    from tests.helpers_serving import register_model
    from vitpose.data.keypoints import keypoint_info
    from vitpose.models import save_safetensors

    model, _, (_, val) = trained_teacher
    _, uri, _ = trained_detector
    exp = mlflow.MlflowClient(uri).get_experiment_by_name("vitpose-detector").experiment_id
    weights = save_safetensors(model, tmp_path_factory.mktemp("pose") / "model.safetensors")
    register_model(uri, exp, weights, {"spec": model.spec.to_dict(), "keypoints": keypoint_info(val)},
                   "vitpose-student", "champion")
    ann = json.loads(val.ann_file.read_text())
    people = {i["id"]: [a["bbox"] for a in ann["annotations"] if a["image_id"] == i["id"]] for i in ann["images"]}
    two = next(i for i in ann["images"] if len(people[i["id"]]) == 2)
    return uri, val.image_dir / two["file_name"], people[two["id"]]


@pytest.mark.slow
def test_predict_finds_the_people_of_a_bare_image_with_the_registered_detector(pose_and_detector, tmp_path, capsys):
    import mlflow

    uri, image, _ = pose_and_detector
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # what this process used last is no guide
    predict = load_script("predict")
    assert predict.main(["--model", "models:/vitpose-student@champion", "--tracking-uri", uri, "--config",
                         "configs/predict/synthetic.yaml", "--out", str(tmp_path / "out"), str(image)]) == 0
    assert "2 person(s)" in capsys.readouterr().out  # the shipped config's detector, at the file's own threshold
    assert predict.main(["--model", "models:/vitpose-student@champion", "--tracking-uri", uri, "--detector",
                         "models:/no-such-detector@current", "--out", str(tmp_path / "out2"), str(image)]) == 2
    assert "models:/no-such-detector@current" in capsys.readouterr().err


@pytest.mark.slow
def test_the_served_model_with_the_registered_detector_answers_a_bare_image(pose_and_detector, tmp_path, capsys):
    import mlflow
    import pandas as pd

    uri, image, boxes = pose_and_detector
    assert load_script("export").main(["--model", "models:/vitpose-student@champion", "--tracking-uri", uri, "--out",
                                       str(tmp_path / "s.onnx"), "--register", "student-with-detector",
                                       "--detector", "models:/vitpose-detector@current"]) == 0
    assert "torchvision detector" in capsys.readouterr().out
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/student-with-detector/1")
    (bare,) = served.predict(pd.DataFrame([{"image": image.read_bytes()}])).to_dict("records")
    assert bare["num_persons"] == 2 and not bare["whole_image_box"]
    from scipy.optimize import linear_sum_assignment

    from vitpose.deploy.tracking import iou_matrix

    def xyxy(b):
        b = np.asarray(b, dtype=float)
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)

    iou = iou_matrix(xyxy([p["box"] for p in bare["persons"]]), xyxy(boxes))
    rows, cols = linear_sum_assignment(-iou)
    assert (iou[rows, cols] > 0.5).all(), iou  # each person's own box, from a detector trained for seconds


@pytest.mark.slow
def test_a_detector_run_resumes_after_its_last_finished_epoch(trained_detector, capsys):
    import torch

    folder, uri, data = trained_detector
    before = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert load_script("detector").main(["--resume", *detector_cli(data, folder.parent, uri,
                                                                   f"train.epochs={EPOCHS + 1}")]) == 0
    out = capsys.readouterr().out
    assert f"resuming {folder.name} after epoch {EPOCHS}" in out and f"epoch {EPOCHS + 1}/{EPOCHS + 1}" in out
    assert "epoch 1/" not in out
    after = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert after["run_id"] == before["run_id"] and len(after["history"]) == EPOCHS + 1
    assert after["history"][:EPOCHS] == before["history"]


def test_detector_config_mistakes_are_named(tmp_path):
    from vitpose.config import ConfigError, load_config
    from vitpose.detection.config import DetectorConfig

    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config("configs/detector/synthetic.yaml", ["train.epoch=3"], schema=DetectorConfig)
    assert load_script("detector").main(["--set", "model.input_size=10"]) == 2


def test_the_detector_reads_the_dataset_the_pose_models_read():
    """Two configs generating the same root with other knobs would regenerate it under each other."""
    from vitpose.config import StudentConfig, TeacherConfig, load_config
    from vitpose.detection.config import DetectorConfig

    data = [load_config(path, [], schema=schema).data for path, schema in (
        ("configs/teacher/synthetic_tiny.yaml", TeacherConfig), ("configs/distill/synthetic_tiny.yaml", StudentConfig),
        ("configs/detector/synthetic.yaml", DetectorConfig))]
    assert len({(d.root, d.synthetic.model_dump_json()) for d in data}) == 1


def test_predict_config_fills_the_flags_left_unset(tmp_path):
    import argparse

    from vitpose.config import ConfigError
    from vitpose.deploy.predict_config import fill_from_config

    def filled(config: str | None, **given):
        flags = {"detector": None, "detector_format": None, "detector_score_thr": None, "smooth_min_cutoff": None,
                 "smooth_beta": None, "no_smooth": False, **given}
        args = argparse.Namespace(config=config, **flags)
        fill_from_config(args)
        return args

    shipped = filled("configs/predict/synthetic.yaml")
    assert (shipped.detector, shipped.detector_format, shipped.detector_score_thr) == (
        "models:/vitpose-detector@current", "auto", None)
    assert (shipped.smooth_min_cutoff, shipped.smooth_beta, shipped.no_smooth) == (1.0, 0.05, False)
    assert filled(None).detector is None and filled(None).detector_format == "auto"  # no config: the defaults
    mine = tmp_path / "mine.yaml"
    mine.write_text("detector: {model: det.onnx, format: yolox, score_thr: 0.6}\nsmoothing: {enabled: false}\n")
    args = filled(str(mine), detector_score_thr=0.4)
    assert (args.detector, args.detector_format, args.detector_score_thr, args.no_smooth) == (
        "det.onnx", "yolox", 0.4, True)  # the flag wins, the rest from the file
    mine.write_text("detector: {modle: det.onnx}\n")
    with pytest.raises(ConfigError, match="did you mean 'detector.model'"):
        filled(str(mine))
    mine.write_text("smoothing: {min_cutoff: 0}\n")
    with pytest.raises(ConfigError, match="min_cutoff"):
        filled(str(mine))
    with pytest.raises(SystemExit) as usage:  # before any model or input is read
        load_script("predict").main(["--model", "x", "--config", str(mine), "a.jpg"])
    assert usage.value.code == 2


def test_an_image_that_does_not_decode_is_named(tmp_path):
    from vitpose.data.files import BadSampleError
    from vitpose.detection.data import PersonBoxes

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not a jpeg")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 64}],
                               "annotations": [{"id": 1, "image_id": 7, "bbox": [1, 1, 20, 30], "iscrowd": 0}]}))
    with pytest.raises(BadSampleError, match=r"a\.jpg: not a readable image .*image id 7"):
        PersonBoxes(ann, tmp_path / "images", 128, train=True)[0]

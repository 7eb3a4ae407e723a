"""Distillation from unlabelled images: a detector's box file and an image folder as their publishers write them,
the synthetic unlabelled split, the teacher's flip-averaged labels in a bank that survives an interrupted build,
the labelled/unlabelled mix, and a student that learns from teacher labels alone."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vitpose.config import ConfigError
from vitpose.data.codec import flip_back
from vitpose.data.figures import SynthConfig
from vitpose.data.files import BadSampleError
from vitpose.data.synthetic import UNLABELED_BOXES, UNLABELED_IMAGES, generate_split, generate_unlabeled_split
from vitpose.data.unlabeled import UnlabeledBoxes
from vitpose.distill.bank import BankedViews, ViewBank, teacher_heatmaps

QUIET = {"say": lambda _: None}


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (160, 120)) -> None:
    cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def unlabeled_split(tmp_path_factory) -> Path:
    """The synthetic unlabelled split (400 people): images and a detector's boxes, no keypoints."""
    root = tmp_path_factory.mktemp("unlabeled")
    generate_unlabeled_split(root, 400, seed=5, cfg=SynthConfig())
    return root


def test_a_detectors_box_file_and_a_coco_named_image_folder(trained_teacher, tmp_path):
    """Detections as a detector writes them for COCO (a json list; image ids are the numbers ending COCO's file
    names); every kind of bad entry is skipped and counted, never fatal."""
    _, _, (train_ds, _) = trained_teacher
    images = tmp_path / "frames"
    images.mkdir()
    rng = np.random.default_rng(0)
    _jpeg(images / "000000000139.jpg", rng)
    _jpeg(images / "COCO_val2014_000000000285.jpg", rng)
    (images / "000000000632.jpg").write_bytes(b"not a jpeg")  # found, named, undecodable
    (images / "notes.txt").write_text("not an image")
    detections = [
        {"image_id": 139, "category_id": 1, "bbox": [10.0, 20.0, 50.0, 90.0], "score": 0.98},
        {"image_id": 139, "category_id": 1, "bbox": [60.0, 10.0, 40.0, 100.0], "score": 0.2},  # below score_thr
        {"image_id": 285, "category_id": 1, "bbox": [5.5, 8.25, 70.0, 110.0], "score": 0.91},
        {"image_id": 285, "category_id": 18, "bbox": [0.0, 0.0, 30.0, 30.0], "score": 0.9},  # a dog
        {"image_id": 632, "category_id": 1, "bbox": [0.0, 0.0, 30.0, 60.0], "score": 0.8},
        {"image_id": 999, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9},  # no such image
        {"image_id": 139, "category_id": 1, "bbox": [10.0, 10.0, 0.0, 30.0], "score": 0.9},  # empty box
        {"image_id": 139, "category_id": 1, "score": 0.9},  # no box
    ]
    boxes = tmp_path / "detections.json"
    boxes.write_text(json.dumps(detections))
    ds = UnlabeledBoxes(images, boxes, keypoints=train_ds.keypoint_set, score_thr=0.3,
                        input_size=train_ds.input_size, aug_seed=0)
    assert [(inst.image_id, inst.bbox_score) for inst in ds.instances] == [(139, 0.98), (285, 0.91), (632, 0.8)]
    assert ds.index_bad_counts == {"unknown_image_id": 1, "zero_area_box": 1, "bad_detection": 1}
    from vitpose.distill.unlabeled import describe

    assert "1 boxes of detections.json name images that are not in the folder" in describe(ds)
    item = ds.load(1)
    assert item["image"].shape == (3, *train_ds.input_size) and float(item["target_weight"].sum()) == 0
    np.testing.assert_allclose(item["center"], [5.5 + 35, 8.25 + 55])
    with pytest.raises(BadSampleError):
        ds.load(2)

    teacher, _, _ = trained_teacher
    bank = ViewBank.build(teacher, ds, views=2, seed=0, folder=tmp_path / "bank", teacher_id="t",
                          flip_pairs=ds.flip_pairs, **QUIET)
    assert bank.valid.tolist() == [True, True, False] and bank.info["invalid_instances"] == 1
    assert bank.info["flip_averaged"] and bank.info["teacher_forwards"] == 2 * 2 * 3


def test_the_synthetic_unlabeled_split_is_what_a_detector_leaves(unlabeled_split, tmp_path):
    root = unlabeled_split
    assert not list((root / "annotations").glob("person_keypoints_*.json"))  # no keypoints anywhere
    detections = json.loads((root / UNLABELED_BOXES).read_text())
    people = json.loads(generate_split(tmp_path, "unlabeled", 400, 5, SynthConfig()).read_text())["annotations"]
    people = [p for p in people if p["num_keypoints"] > 0]
    files = {p.name for p in (root / UNLABELED_IMAGES).iterdir()}
    assert {f"{d['image_id']:08d}.jpg" for d in detections} <= files

    def iou(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)

    best = [max((iou(d["bbox"], p["bbox"]) for p in people if p["image_id"] == d["image_id"]), default=0.0)
            for d in detections]
    found = sum(b >= 0.5 for b in best)
    false = sum(b < 0.3 for b in best)
    assert 0.85 * len(people) <= found < len(people)  # a few people missed
    assert 0 < false < 0.15 * len(detections)  # a few false boxes
    assert np.median([b for b in best if b >= 0.5]) < 0.95  # boxes jittered, not copied


def test_flip_averaged_labels_map_back_the_mirrored_pass(trained_teacher):
    """Averaged with the mirrored crop's heatmaps mapped back (mirror and swap left/right), the labels of a
    mirrored crop are the mirror of the crop's labels; mapped back without the swap, left and right blur."""
    teacher, _, (train_ds, _) = trained_teacher
    crops = torch.stack([train_ds.load(i)["image"] for i in range(0, 64, 4)])
    pairs = train_ds.flip_pairs
    labels = teacher_heatmaps(teacher, crops, pairs)
    mirrored = teacher_heatmaps(teacher, crops.flip(-1), pairs)
    torch.testing.assert_close(mirrored, flip_back(labels, pairs), atol=1e-5, rtol=0)
    one_pass = teacher_heatmaps(teacher, crops)
    assert float((one_pass.flip(-1) - mirrored).abs().max()) > 100 * 1e-5  # the teacher alone is not symmetric
    unswapped = teacher_heatmaps(teacher, crops, [])
    assert float((unswapped - one_pass).pow(2).mean()) > 3 * float((labels - one_pass).pow(2).mean())


def test_an_interrupted_bank_build_goes_on_where_it_stopped(trained_teacher, unlabeled_split, tmp_path):
    teacher, _, (train_ds, _) = trained_teacher
    ds = UnlabeledBoxes(unlabeled_split / UNLABELED_IMAGES, unlabeled_split / UNLABELED_BOXES,
                        keypoints=train_ds.keypoint_set, score_thr=0.3, input_size=train_ds.input_size, aug_seed=0)
    clean = ViewBank.build(teacher, ds, 2, 1, tmp_path / "clean", "t", batch_size=16, flip_pairs=ds.flip_pairs,
                           **QUIET)

    class Interrupted(Exception):
        pass

    load, calls = ds.load, []

    def failing_load(index, params=None):
        calls.append(index)
        if len(calls) == 300:
            raise Interrupted  # e.g. the driver killed part-way through the second view
        return load(index, params)

    ds.load = failing_load
    with pytest.raises(Interrupted):
        ViewBank.build(teacher, ds, 2, 1, tmp_path / "bank", "t", batch_size=16, flip_pairs=ds.flip_pairs, **QUIET)
    ds.load = load
    said: list[str] = []
    bank = ViewBank.build(teacher, ds, 2, 1, tmp_path / "bank", "t", batch_size=16, flip_pairs=ds.flip_pairs,
                          say=said.append)
    assert "going on from view 288/" in said[0], said  # the last full batch of 16 before the 300th load
    np.testing.assert_array_equal(np.asarray(bank.heatmaps), np.asarray(clean.heatmaps))
    np.testing.assert_array_equal(bank.params, clean.params)
    assert bank.info["teacher_forwards"] == 2 * (2 * len(ds) - 288)


def test_the_mix_gives_each_epoch_its_share_of_unlabeled_crops_in_turn(trained_teacher, unlabeled_split, tmp_path):
    from vitpose.distill.unlabeled import MixedViews

    teacher, _, (train_ds, _) = trained_teacher
    ds = UnlabeledBoxes(unlabeled_split / UNLABELED_IMAGES, unlabeled_split / UNLABELED_BOXES,
                        keypoints=train_ds.keypoint_set, score_thr=0.3, input_size=train_ds.input_size, aug_seed=0)
    labeled = BankedViews(train_ds, ViewBank.build(teacher, train_ds, 1, 0, tmp_path / "l", "t", **QUIET), 0)
    unlabeled = BankedViews(ds, ViewBank.build(teacher, ds, 1, 0, tmp_path / "u", "t", **QUIET), 0)
    mixed = MixedViews(labeled, unlabeled, ratio=0.25, seed=0)
    n, m = len(train_ds), round(0.25 * len(train_ds))
    assert len(mixed) == n and mixed.keypoint_names == train_ds.keypoint_names
    shown = []
    for epoch in range(6):  # 600 unlabelled slots for ~410 crops
        mixed.set_epoch(epoch)
        slots = np.flatnonzero(mixed._slots >= 0)
        assert len(slots) == m
        shown.extend(mixed._slots[slots].tolist())
    u = len(ds)
    assert sorted(shown[:u]) == list(range(u))  # every unlabelled crop once before any repeats
    mixed.set_epoch(1)
    index = int(np.flatnonzero(mixed._slots >= 0)[0])
    item = mixed[index]
    assert item["unlabeled"] and float(item["target_weight"].sum()) == 0
    torch.testing.assert_close(item["teacher_heatmaps"], unlabeled[int(mixed._slots[index])]["teacher_heatmaps"])
    index = int(np.flatnonzero(mixed._slots < 0)[0])
    assert not mixed[index]["unlabeled"] and float(mixed[index]["target_weight"].sum()) > 0
    again = MixedViews(labeled, unlabeled, ratio=0.25, seed=0)
    again.set_epoch(1)
    assert np.array_equal(again._slots, mixed._slots)
    again.set_epoch(2)
    assert not np.array_equal(again._slots, mixed._slots)


def test_a_student_learns_from_teacher_labelled_crops_alone(trained_teacher, unlabeled_split, tmp_path):
    """A sweep trial's training (``train_student``) with ``ratio=1``: no ground truth reaches the student, only
    the teacher's labels of the detector's boxes (heatmaps, and tokens through the student's feature projector,
    both read from the banks); its val AP ends far above an untrained student's."""
    from vitpose.config import to_dict
    from vitpose.distill.bank import bank_key
    from vitpose.distill.trial import StudentJob, SweepContext, train_student
    from vitpose.distill.unlabeled import unlabeled_bank_key, unlabeled_dataset
    from vitpose.train.session import LocalSession

    teacher, teacher_cfg, (train_ds, _) = trained_teacher
    cfg = tiny_config(teacher_cfg.data.root, "data.synthetic.train_instances=400", "model.preset=vitpose_nano",
                      "train.batch_size=16", "train.epochs=8", "train.lr=2e-3", "train.warmup_iters=20",
                      "train.precision=fp32", "deepspeed.zero_stage=0", "distill.token.enabled=false",
                      f"distill.unlabeled.images={unlabeled_split / UNLABELED_IMAGES}",
                      f"distill.unlabeled.boxes={unlabeled_split / UNLABELED_BOXES}", "distill.unlabeled.ratio=1.0",
                      "distill.output.views=2", "distill.feature.weight=1e-3", student=True)
    banks = tmp_path / "banks"
    ViewBank.build(teacher, train_ds, 2, cfg.train.seed, banks / bank_key("t", cfg), "t", features=True, **QUIET)
    ds = unlabeled_dataset(cfg, train_ds)
    ViewBank.build(teacher, ds, 2, cfg.train.seed, banks / unlabeled_bank_key("t", cfg), "t",
                   flip_pairs=ds.flip_pairs, features=True, **QUIET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = mlflow.MlflowClient(uri).create_run(mlflow.MlflowClient(uri).create_experiment("u")).info.run_id
    context = SweepContext(base_config=to_dict(cfg), tracking_uri=uri, parent_run_id=run_id, teacher_dir="",
                           teacher_id="t", token_dir=str(tmp_path), bank_dir=str(banks),
                           teacher_width=teacher.spec.embed_dim)
    session = LocalSession(tmp_path / "run")
    train_student(StudentJob(to_dict(cfg), context, run_id, "trial"), session)
    first, last = session.reports[0], session.reports[-1]
    assert first["train/gt_loss"] == 0 and last["train/gt_loss"] == 0  # nothing but the teacher's labels
    assert last["val/AP"] > 0.1, [r["val/AP"] for r in session.reports]  # untrained: ~0; 0.23 when measured
    assert last["train/feature_loss"] < 0.5 * first["train/feature_loss"]


def test_an_unlabeled_set_on_object_storage_is_copied_once_per_content(unlabeled_split, tmp_path, monkeypatch):
    from tests.helpers_s3 import s3_server
    from vitpose.distill import unlabeled as module

    monkeypatch.setattr(module, "CACHE", str(tmp_path / "cache"))
    with s3_server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        s3.create_bucket("frames")
        client = s3.client()
        names = sorted(p.name for p in (unlabeled_split / UNLABELED_IMAGES).iterdir())[:20]
        for name in names:
            client.upload_file(str(unlabeled_split / UNLABELED_IMAGES / name), "frames", f"cam1/{name}")
        kept = {int(n[:8]) for n in names}
        detections = [d for d in json.loads((unlabeled_split / UNLABELED_BOXES).read_text()) if d["image_id"] in kept]
        client.put_object(Bucket="frames", Key="cam1-boxes.json", Body=json.dumps(detections).encode())
        cfg = tiny_config(tmp_path, "distill.unlabeled.images=s3://frames/cam1",
                          "distill.unlabeled.boxes=s3://frames/cam1-boxes.json", student=True)
        images, boxes = module.unlabeled_paths(cfg)
        assert sorted(p.name for p in images.iterdir()) == names and json.loads(boxes.read_text()) == detections
        assert module.unlabeled_paths(cfg) == (images, boxes)  # the same content: the same copy
        client.put_object(Bucket="frames", Key="cam1-boxes.json", Body=json.dumps(detections[:3]).encode())
        again = module.unlabeled_paths(cfg)
        assert again[0] == images and json.loads(again[1].read_text()) == detections[:3]  # new boxes, new copy
        missing = tiny_config(tmp_path, "distill.unlabeled.images=s3://frames/cam2",
                              "distill.unlabeled.boxes=s3://frames/cam1-boxes.json", student=True)
        with pytest.raises(ConfigError, match="distill.unlabeled.images=s3://frames/cam2: no folder there"):
            module.unlabeled_paths(missing)


def test_unlabeled_sets_the_sweep_cannot_use_are_refused_before_it_starts(tmp_path):
    from vitpose.distill.sweep import preflight

    given = ["distill.unlabeled.images=frames", "distill.unlabeled.boxes=boxes.json"]
    online = tiny_config(tmp_path, *given, "distill.output.mode=online", student=True)
    with pytest.raises(ConfigError, match="distill.unlabeled needs distill.output.mode=bank"):
        preflight(online)
    with pytest.raises(ConfigError, match="distill.unlabeled.images is set but distill.unlabeled.boxes is not"):
        tiny_config(tmp_path, given[0], "distill.unlabeled.boxes=null", student=True)  # the demo config names both
    cfg = tiny_config(tmp_path, *given, student=True)
    with pytest.raises(ConfigError, match=r"distill.unlabeled.images=frames: no folder at .*frames"):
        from vitpose.distill.unlabeled import unlabeled_paths

        unlabeled_paths(cfg)

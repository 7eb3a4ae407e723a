"""Shared test fixtures: a small synthetic dataset, single-process distributed env, config builder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vitpose.config import StudentConfig, TeacherConfig, load_config
from vitpose.train.session import single_process_env

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER = REPO / "configs" / "teacher" / "synthetic_tiny.yaml"
TINY_DISTILL = REPO / "configs" / "distill" / "synthetic_tiny.yaml"
# Small enough for CPU tests: with the configs' patch 8, an 8x6 token grid and 32x24 heatmaps.
TEST_IMG = "[64, 48]"
# The tests' synthetic dataset: the shipped config's 1,000 unlabeled people took ~5 s per generated folder.
TEST_DATA = ["data.synthetic.train_instances=96", "data.synthetic.val_instances=32",
             "data.synthetic.unlabeled_instances=48"]
# Real COCO val2017 images with their keypoints and the paper's detector boxes (licences in its README).
MINI = REPO / "tests" / "data" / "coco_val2017_mini"
MINI_ANN = MINI / "annotations" / "person_keypoints_val2017_mini.json"
MINI_DETS = MINI / "annotations" / "person_detections_AP_H_56_mini.json"
MINI_IMAGES = MINI / "images"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from vitpose.build import ensure_data

    root = tmp_path_factory.mktemp("synthetic")
    ensure_data(tiny_config(root))
    return root


@pytest.fixture(scope="session", autouse=True)
def single_process_dist_env():
    """DeepSpeed in-process (world size 1) needs a rendezvous address; each test session its own port."""
    for key, value in single_process_env().items():
        os.environ.setdefault(key, value)
    yield


def tiny_config(root: Path, *sets: str, student: bool = False) -> TeacherConfig | StudentConfig:
    """The shipped tiny config, shrunk for tests and pointed at ``root``."""
    base = [f"data.root={root}", *TEST_DATA,
            "model.preset=vitpose_nano", f"model.img_size={TEST_IMG}", "train.batch_size=8", "train.epochs=2",
            "train.eval_every=1", "train.warmup_iters=2", "train.lr_steps=[]", "data.loader_workers=0"]
    path, schema = (TINY_DISTILL, StudentConfig) if student else (TINY_TEACHER, TeacherConfig)
    if not student:  # the demo teacher's auto would pick per CPU; tests name the precision they exercise
        base.append("train.precision=bf16")
    return load_config(path, base + list(sets), schema=schema)


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory):
    """(model, config, (train, val)): a nano ViTPose trained in-process for 12 epochs (~10 s) on 400 synthetic
    instances. Its val AP is ~0.3, its heatmap peaks ~0.5-0.9 and differ between images by as much, so a
    comparison of its outputs at a 1e-3 tolerance means something (an untrained head outputs ~1e-4)."""
    from vitpose.build import build_datasets
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    root = tmp_path_factory.mktemp("teacher_data")
    cfg = tiny_config(root, "data.synthetic.train_instances=400", "train.batch_size=16", "train.epochs=12",
                      "train.lr=2e-3", "train.warmup_iters=20", "train.precision=fp32", "deepspeed.zero_stage=0",
                      "data.synthetic.generate=true")
    datasets = build_datasets(cfg, is_local_leader=True)
    session = LocalSession(tmp_path_factory.mktemp("teacher_run"))
    trainer = Trainer(cfg, session, datasets=datasets)
    trainer.fit()
    assert session.reports[-1]["val/AP"] > 0.1, session.reports[-1]
    return trainer.engine.module.float().eval(), cfg, datasets

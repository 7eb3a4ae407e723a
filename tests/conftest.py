"""Shared test fixtures: a small synthetic dataset, single-process distributed env, config builder."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vitpose.config import StudentConfig, TeacherConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER = REPO / "configs" / "teacher" / "synthetic_tiny.yaml"
TINY_DISTILL = REPO / "configs" / "distill" / "synthetic_tiny.yaml"
# Small enough for CPU tests: with the configs' patch 8, an 8x6 token grid and 32x24 heatmaps.
TEST_IMG = "[64, 48]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from vitpose.engine import ensure_data

    root = tmp_path_factory.mktemp("synthetic")
    ensure_data(tiny_config(root))
    return root


@pytest.fixture(scope="session", autouse=True)
def single_process_dist_env():
    """DeepSpeed in-process (world size 1) needs a rendezvous address; each test session its own port."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    yield


def tiny_config(root: Path, *sets: str, student: bool = False) -> TeacherConfig | StudentConfig:
    """The shipped tiny config, shrunk for tests and pointed at ``root``."""
    base = [f"data.root={root}", "data.synthetic.train_instances=96", "data.synthetic.val_instances=32",
            "model.preset=vitpose_nano", f"model.img_size={TEST_IMG}", "train.batch_size=8", "train.epochs=2",
            "train.eval_every=1", "train.warmup_iters=2", "train.lr_steps=[]", "data.loader_workers=0"]
    path, schema = (TINY_DISTILL, StudentConfig) if student else (TINY_TEACHER, TeacherConfig)
    return load_config(path, base + list(sets), schema=schema)

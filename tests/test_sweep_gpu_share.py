"""tune.gpus_per_worker, on a machine without GPUs: a head that declares one GPU (`ray start --num-gpus=1`)
runs a 2-trial sweep at 0.5 GPU per trial, and each trial's MLflow run records the GPU Ray gave it; a local
Ray without GPUs refuses the same request before anything starts, naming the key.

In its own module so no other Ray of this test session is alive while the head runs."""

from __future__ import annotations

import os

import mlflow
import pytest

from tests.helpers_ray import ray_head
from tests.helpers_serving import register_model, sqlite_store
from tests.test_distill_pipeline import child_runs, common, run
from vitpose.data.keypoints import default_keypoint_info
from vitpose.models import save_safetensors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_store(trained_teacher, tmp_path_factory):
    model, _, _ = trained_teacher
    folder = tmp_path_factory.mktemp("gpu-share-registry")
    uri, experiment = sqlite_store(folder)
    weights = save_safetensors(model, folder / "teacher.safetensors")
    meta = {"spec": model.spec.to_dict(), "keypoints": default_keypoint_info(model.spec.num_keypoints)}
    register_model(uri, experiment, weights, meta, "vitpose-teacher", "current")
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_AUTH_MODE": "disabled"}


def test_fractional_gpus_reach_the_trials(teacher_store, synthetic_root, tmp_path):
    sweep = ["pipelines/distill.py", *common(synthetic_root, tmp_path), "--set", "train.epochs=1",
             "--set", "tune.search_space={distill.parts: {grid: [none, output]}}", "--set", "tune.scheduler=fifo",
             "--set", "tune.gpus_per_worker=0.5"]
    with ray_head(teacher_store, "--num-gpus=1") as head:
        out = run(sweep, {**teacher_store, "RAY_ADDRESS": head.gcs})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    uri = teacher_store["MLFLOW_TRACKING_URI"]
    parent = mlflow.MlflowClient(uri).get_model_version_by_alias("vitpose-student", "champion").run_id
    runs = child_runs(uri, parent)
    assert len(runs) == 2 and {r.data.tags["ray_gpu_ids"] for r in runs} == {"0"}  # each trial held GPU 0

    refused = run(sweep, teacher_store)  # a local Ray on this GPU-less machine
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "tune.gpus_per_worker=0" in refused.stderr and "Traceback" not in refused.stderr + refused.stdout

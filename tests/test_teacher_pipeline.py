"""pipelines/teacher.py end to end on a real local Ray, real DeepSpeed (gloo) and a real MLflow (SQLite)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import REPO, TEST_DATA, TEST_IMG
from vitpose.train.session import free_port

sys.path.insert(0, str(REPO / "pipelines"))
import teacher  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    from vitpose.run.cluster import WORKER_ENV

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)},
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def args(root: Path, storage: Path, *extra: str) -> list[str]:
    sets = [f"data.root={root}", *TEST_DATA,
            "model.preset=vitpose_nano", f"model.img_size={TEST_IMG}", "train.batch_size=8", "train.epochs=2",
            "train.eval_every=1", "train.warmup_iters=2", "train.lr_steps=[]", "data.loader_workers=0",
            f"ray.storage_path={storage}", "tracking.log_images=4", *extra]
    return [a for s in sets for a in ("--set", s)]


def latest_meta(storage: Path) -> dict:
    metas = sorted(storage.glob("*/checkpoint_*/meta.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(metas[-1].read_text())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_workers_each_zero_stage(stage, ray_local, tracking, synthetic_root, tmp_path, capsys):
    storage = tmp_path / "ray"
    assert teacher.main(args(synthetic_root, storage, f"deepspeed.zero_stage={stage}",
                             f"tracking.alias=stage{stage}")) == 0
    printed = capsys.readouterr().out
    meta = latest_meta(storage)
    assert meta["world_size"] == 2 and meta["zero_stage"] == stage
    losses = [h["train/loss"] for h in meta["history"]]
    assert losses[-1] < losses[0], losses

    client = mlflow.MlflowClient(tracking)
    version = client.get_model_version_by_alias("vitpose-teacher", f"stage{stage}")
    run = client.get_run(version.run_id)
    assert run.data.params["deepspeed.zero_stage"] == str(stage)
    assert run.data.params["model.preset"] == "vitpose_nano"
    # The demo config's train.precision=auto, as the workers made it concrete, on the run and the version.
    assert run.data.params["train.precision"] == "auto"
    assert run.data.tags["precision"] == version.tags["precision"] == meta["precision"] in ("fp32", "bf16")
    assert {"train/loss", "train/lr", "train/images_per_sec", "val/AP", "val/AR"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "predictions", "training_curves.png"} <= artifacts
    # Where to look, opened in the UI's model-training view (not MLflow 3's default GenAI view).
    assert f"/runs/{run.info.run_id}?workflowType=machine_learning" in printed
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    pictures = client.list_artifacts(run.info.run_id, "predictions")
    assert pictures and pictures[0].path.endswith(".png")

    from vitpose.models import ViTPose, create

    model = create(f"models:/vitpose-teacher@stage{stage}", tracking_uri=tracking)

    model_meta = model.meta
    assert isinstance(model, ViTPose) and model_meta["keypoints"]["names"][0] == "nose"
    assert model(torch.zeros(1, 3, 64, 48)).shape == (1, 17, *model.spec.heatmap_size)
    assert model.spec.patch_size == 8 and model.spec.heatmap_size == (32, 24)  # the config's patch 8, kept


def crash_once_loop(config: dict) -> None:
    """The real worker loop, but rank 1 dies hard near the end of epoch 3 of the first attempt."""
    from vitpose.config import TeacherConfig
    from vitpose.train.loop import Trainer, gt_loss
    from vitpose.train.session import RaySession

    marker = Path(config["marker"])
    session = RaySession()
    steps = {"n": 0}

    def loss_fn(model, batch):
        steps["n"] += 1
        if session.rank == 1 and not marker.exists() and trainer.start_epoch == 0 \
                and steps["n"] == 3 * trainer.loaders.steps_per_epoch - 1:
            marker.write_text("crashed\n")
            os._exit(1)  # a worker process lost mid-epoch, no clean shutdown
        return gt_loss(model, batch)

    trainer = Trainer(TeacherConfig.model_validate(config["cfg"]), session, loss_fn=loss_fn)
    trainer.fit()


def test_lost_worker_resumes_from_last_checkpoint(ray_local, synthetic_root, tmp_path):
    import cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vitpose.config import load_config, to_dict

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config(teacher.DEFAULT_CONFIG, args(synthetic_root, tmp_path)[1::2] + ["train.epochs=4"])
    result = TorchTrainer(
        crash_once_loop,
        train_loop_config={"cfg": to_dict(cfg), "marker": str(tmp_path / "crashed")},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="crash", storage_path=str(tmp_path / "ray"),
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    ).fit()
    assert result.error is None and (tmp_path / "crashed").exists()
    meta = latest_meta(tmp_path / "ray")
    # The crash came in epoch 3; the restarted group went on after the last *registered* checkpoint
    # (epoch 2's, or epoch 1's when Ray had not finished registering epoch 2's yet), not from scratch.
    assert len(meta["restored_at_epochs"]) == 1 and meta["restored_at_epochs"][0] in (1, 2)
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["ray.use_gpu=true"], "ray.use_gpu=true asks for 2 GPUs but the Ray cluster has 0"),
        (["ray.num_workers=8"], "ray.num_workers=8 x ray.cpus_per_worker=1 needs 8 CPUs"),
        (["deepspeed.config=BADJSON"], "train_micro_batch_size_per_gpu' is 64 but our config gives 8"),
    ],
)
def test_bad_requests_fail_before_training(extra, message, ray_local, tracking, synthetic_root, tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64}))
    extra = [e.replace("BADJSON", str(bad)) for e in extra]
    t0 = time.time()
    assert teacher.main(args(synthetic_root, tmp_path / "ray", *extra)) == 2
    assert message in capsys.readouterr().err
    assert time.time() - t0 < 30 and not (tmp_path / "ray").exists()


def test_unreachable_tracking_server_fails_fast(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    t0 = time.time()
    assert teacher.main(args(synthetic_root, tmp_path / "ray")) == 2
    err = capsys.readouterr().err
    assert "is not reachable" in err and "MLFLOW_TRACKING_URI" in err
    assert time.time() - t0 < 15

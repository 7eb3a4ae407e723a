"""pipelines/distill.py end to end: a registered teacher, a 2-trial Tune sweep, nested MLflow runs,
the champion, and an interrupted sweep completed with --resume (real Ray, DeepSpeed, MLflow)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO, TEST_IMG
from tests.faults.procs import Launched, assert_gone_with_the_driver
from vitpose.train.run_folder import IncompleteCheckpointError, verify_checkpoint

pytestmark = pytest.mark.slow

PY = sys.executable


def common(root: Path, storage: Path) -> list[str]:
    sets = [f"data.root={root}", "data.synthetic.train_instances=96", "data.synthetic.val_instances=32",
            f"model.img_size={TEST_IMG}", "train.batch_size=8", "train.warmup_iters=2", "train.lr_steps=[]",
            "data.loader_workers=0", f"ray.storage_path={storage}"]
    return [a for s in sets for a in ("--set", s)]


def run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def registry(synthetic_root, tmp_path_factory):
    """A tracking store holding a (tiny, briefly trained) teacher at models:/vitpose-teacher@current."""
    folder = tmp_path_factory.mktemp("registry")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    out = run(["pipelines/teacher.py", *common(synthetic_root, folder / "ray"), "--set", "model.preset=vitpose_nano",
               "--set", "train.epochs=1", "--set", "deepspeed.zero_stage=0"], env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return env


def child_runs(uri: str, parent: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("vitpose-distill")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def finished_trials(uri: str, parent: str, storage: Path, epochs: int = 2) -> set[str]:
    """Trials whose run has logged every epoch and whose final checkpoint is complete in the trial's folder.

    The driver marks run statuses only at the end; a trial logs its last epoch to MLflow before it saves
    the checkpoint, and one killed in between has not finished (it trains its last epoch again).
    """
    client = mlflow.MlflowClient(uri)
    return {r.data.tags["trial_id"] for r in child_runs(uri, parent)
            if len(client.get_metric_history(r.info.run_id, "val/AP")) == epochs
            and final_checkpoint_saved(storage, r.data.tags["trial_id"], epochs)}


def final_checkpoint_saved(storage: Path, trial_id: str, epochs: int) -> bool:
    for folder in storage.rglob(f"*{trial_id}*/checkpoint_*"):
        try:
            if verify_checkpoint(folder)["epoch"] == epochs - 1:
                return True
        except IncompleteCheckpointError:
            continue
    return False


def test_two_trial_sweep_registers_a_champion(registry, synthetic_root, tmp_path):
    args = ["pipelines/distill.py", *common(synthetic_root, tmp_path), "--set", "train.epochs=2",
            "--set", "tune.search_space={distill.parts: {grid: [none, both]}}", "--set", "tune.grace_period=2"]
    out = run(args, registry)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "registered model: models:/vitpose-student@champion (version 1)" in out.stdout

    uri = registry["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    champion = client.get_model_version_by_alias("vitpose-student", "champion")
    parent = champion.run_id
    children = child_runs(uri, parent)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert all("val/AP" in r.data.metrics for r in children)
    assert list(tmp_path.rglob("checkpoint_*")), "trials write checkpoints under the storage path"
    # What each trial's optimizer held, against the plan of the same arms: tokens enter frozen.
    plan_out = run(["pipelines/distill.py", *common(synthetic_root, tmp_path / "plan"), "--plan", "--json"], registry)
    assert plan_out.returncode == 0, plan_out.stdout[-3000:] + plan_out.stderr[-3000:]
    plan = json.loads(plan_out.stdout.strip().splitlines()[-1])["arms"]
    for r in children:
        arm, held = ast.literal_eval(r.data.tags["sweep_params"])["distill.parts"], r.data.params
        assert int(held["optimizer.params"]) == plan[arm]["trainable_params"] > 0
        assert int(held["optimizer.token_params"]) == plan[arm]["token_trainable_params"] == 0
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"results.csv", "sweep.png", "knowledge_tokens", "view_banks"} <= artifacts
    # The champion is the trial with the best val AP after its LAST epoch (never its best epoch on val), and
    # the registered weights are that epoch's.
    history = {r.data.tags["sweep_params"]: client.get_metric_history(r.info.run_id, "val/AP") for r in children}
    last = {params: sorted(h, key=lambda m: m.step)[-1].value for params, h in history.items()}
    assert client.get_run(parent).data.metrics["champion/val/AP"] == pytest.approx(max(last.values()))

    from vitpose.models import create

    student = create("models:/vitpose-student@champion", tracking_uri=uri)
    meta = student.meta
    assert student.spec.embed_dim == 64  # vitpose_pico
    assert last[str(meta["trial_params"])] == max(last.values())  # the champion's (ties: either)
    assert meta["epoch"] == 2  # the last epoch's weights


def test_plan_prints_each_arm_without_training(registry, synthetic_root, tmp_path):
    out = run(["pipelines/distill.py", *common(synthetic_root, tmp_path), "--plan", "--json"], registry)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(plan["arms"]) == ["none", "token", "random_token", "output", "both"]
    assert {a["token_trainable_params"] for a in plan["arms"].values()} == {0}
    assert len({json.dumps(a["views"], sort_keys=True) for a in plan["arms"].values()}) == 1  # one data stream
    assert [plan["arms"][a]["teacher_outputs"] for a in ("none", "output", "both")] == [None, "bank", "bank"]
    assert [plan["arms"][a]["tokens"] for a in ("none", "token", "random_token")] == [None, "teacher", "random"]
    assert plan["teacher"]["embed_dim"] == 96 and plan["arms"]["none"]["trainable_params"] > 0
    assert not list(tmp_path.rglob("checkpoint_*")), "a plan trains nothing"

    missing = {**registry, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}
    out = run(["pipelines/distill.py", *common(synthetic_root, tmp_path), "--plan", "--json"], missing)
    assert out.returncode == 2 and "vitpose-teacher" in out.stderr and "Traceback" not in out.stderr + out.stdout


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(registry, synthetic_root, tmp_path):
    uri = registry["MLFLOW_TRACKING_URI"]
    args = ["pipelines/distill.py", *common(synthetic_root, tmp_path), "--set", "train.epochs=2",
            "--set", "ray.name=resume-sweep", "--set", "tune.scheduler=fifo", "--set", "tune.max_concurrent_trials=1",
            "--set", "tune.search_space={distill.parts: {grid: [none, token, output]}}"]
    driver = Launched(args, registry, tmp_path / "first.log")
    try:
        parent_file = None
        deadline = time.time() + 600
        while time.time() < deadline:
            files = list(tmp_path.glob("resume-sweep-*/mlflow_run_id.txt"))
            if files:
                parent_file = files[0]
                if finished_trials(uri, parent_file.read_text().strip(), tmp_path):
                    break
            assert driver.proc.poll() is None, "sweep ended before it could be interrupted"
            time.sleep(2)
        else:
            pytest.fail("no trial finished in time")
        ray_procs = driver.snapshot()
        os.kill(driver.proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
        driver.wait(30)
        assert_gone_with_the_driver(ray_procs)
    finally:
        driver.cleanup()  # what is left of what this test launched, and nothing else
    parent = parent_file.read_text().strip()
    done_before = finished_trials(uri, parent, tmp_path)

    t0 = time.time()
    out = run([*args, "--resume"], registry)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"\nFAULT sweep driver SIGKILL after {len(done_before)} of 3 trials finished: --resume completed the "
          f"sweep in {time.time() - t0:.1f}s")
    assert "resuming sweep" in out.stdout
    runs = child_runs(uri, parent)
    assert len({r.data.tags["trial_id"] for r in runs}) == 3 == len(runs), "a trial got a second run"
    for r in runs:
        if r.data.tags["trial_id"] in done_before:  # finished trials were not trained again
            assert len(mlflow.MlflowClient(uri).get_metric_history(r.info.run_id, "train/loss")) == 2
    # An alias names one version by construction: the champion is now this sweep's best student, and the
    # sweep registered exactly one (the killed driver had not got that far; the resumed one did it once).
    champion = mlflow.MlflowClient(uri).get_model_version_by_alias("vitpose-student", "champion")
    assert champion.run_id == parent
    assert [v.version for v in mlflow.MlflowClient(uri).search_model_versions(f"run_id = '{parent}'")] == [
        champion.version]


def test_a_seeded_sweep_reports_each_setting_over_its_seeds(registry, synthetic_root, tmp_path):
    """tune.seeds=2: every setting runs with seeds 0 and 1; two settings that train identically (pictures on
    or off) cannot be told apart, and the summary says so; the registry says what the champion is."""
    args = ["pipelines/distill.py", *common(synthetic_root, tmp_path), "--set", "train.epochs=1",
            "--set", "tune.seeds=2", "--set", "tune.scheduler=fifo", "--set", "tune.baseline=tracking.log_images=0",
            "--set", "tune.search_space={tracking.log_images: {grid: [0, 1]}}", "--set", "tune.alias=seeded"]
    out = run(args, registry)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "over 2 seed(s)" in out.stdout and "NOT beyond the interval" in out.stdout
    assert "over the runner-up" in out.stdout
    uri = registry["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("vitpose-student", "seeded")
    assert version.tags["seeds"] == "2" and version.tags["keypoint set"] == "coco" and version.description
    assert {"setting", "val/AP mean", "val/AP interval", "teacher", "run", "input size"} <= set(version.tags)
    seeds = {ast.literal_eval(r.data.tags["sweep_params"])["train.seed"] for r in child_runs(uri, version.run_id)}
    assert seeds == {0, 1}
    table = client.download_artifacts(version.run_id, "settings.csv", str(tmp_path))
    assert len(Path(table).read_text().splitlines()) == 3  # header + two settings

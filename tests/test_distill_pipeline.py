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
from safetensors import safe_open

from tests.conftest import REPO, TEST_DATA, TEST_IMG
from tests.faults.procs import (
    Launched,
    assert_gone_with_the_driver,
    hold_env,
    hold_rank,
    kill_owned,
    read_status,
)
from vitpose.train.run_folder import MODEL_FILE, IncompleteCheckpointError, verify_checkpoint

pytestmark = pytest.mark.slow

PY = sys.executable


def common(root: Path, storage: Path) -> list[str]:
    sets = [f"data.root={root}", *TEST_DATA,
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


def weight_names(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_two_trial_sweep_registers_a_champion(registry, synthetic_root, tmp_path):
    # Feature distillation for every arm but none (which never learns from the teacher): the banks hold the
    # teacher's tokens, the both arm trains a projector that its weights leave out.
    features = ["--set", "distill.feature.weight=0.001"]
    args = ["pipelines/distill.py", *common(synthetic_root, tmp_path), "--set", "train.epochs=2",
            "--set", "tune.search_space={distill.parts: {grid: [none, both]}}", "--set", "tune.grace_period=2",
            *features]
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
    plan_out = run(["pipelines/distill.py", *common(synthetic_root, tmp_path / "plan"), "--plan", "--json",
                    *features], registry)
    assert plan_out.returncode == 0, plan_out.stdout[-3000:] + plan_out.stderr[-3000:]
    plan = json.loads(plan_out.stdout.strip().splitlines()[-1])["arms"]
    assert plan["both"]["feature_weight"] == 0.001 and plan["none"]["feature_weight"] == 0
    assert plan["both"]["trainable_params"] > plan["none"]["trainable_params"]  # the projector
    for r in children:
        arm, held = ast.literal_eval(r.data.tags["sweep_params"])["distill.parts"], r.data.params
        assert int(held["optimizer.params"]) == plan[arm]["trainable_params"] > 0
        assert int(held["optimizer.token_params"]) == plan[arm]["token_trainable_params"] == 0
        assert ("train/feature_loss" in r.data.metrics) == (arm == "both")
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"results.csv", "sweep.png", "knowledge_tokens", "view_banks"} <= artifacts
    (bank,) = client.list_artifacts(parent, "view_banks")
    assert json.loads(Path(client.download_artifacts(parent, bank.path, str(tmp_path))).read_text())["features"]
    weights = list(tmp_path.rglob(f"checkpoint_*/{MODEL_FILE}"))
    assert len(weights) >= 2 and not any("feature_projector" in key for w in weights for key in weight_names(w))
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
    assert list(plan["arms"]) == ["none", "token", "output", "both", "unlabeled"]
    assert {a["token_trainable_params"] for a in plan["arms"].values()} == {0}
    assert len({json.dumps(a["views"], sort_keys=True) for a in plan["arms"].values()}) == 1  # one data stream
    assert [plan["arms"][a]["teacher_outputs"] for a in ("none", "output", "both")] == [None, "bank", "bank"]
    assert [plan["arms"][a]["tokens"] for a in ("none", "token", "unlabeled")] == [None, "teacher", None]
    # The demo's unlabeled arm (tune.arm_settings): the unlabeled split and feature distillation; output neither.
    assert [(plan["arms"][a]["unlabeled_ratio"], plan["arms"][a]["feature_weight"]) for a in ("output", "unlabeled")
            ] == [(0.0, 0.0), (0.6, 0.001)]
    assert plan["unlabeled_set"].startswith("unlabelled set: ")
    assert plan["teacher"]["embed_dim"] == 96 and plan["arms"]["none"]["trainable_params"] > 0
    assert not list(tmp_path.rglob("checkpoint_*")), "a plan trains nothing"
    assert [e["setting"]["distill.parts"] for e in plan["settings"]] == list(plan["arms"])
    (effect,) = plan["token_effects"]  # one token setting (token and both share it): its effect on the teacher
    assert effect["setting"]["num_tokens"] == 1 and effect["random"] > 0 and effect["learned"] > 0
    assert "learned tokens (K=1, 1 epoch(s)" in out.stdout and "with the random control" in out.stdout

    # What trials will run is what is prepared: a one-value seed grid is seed 3's tokens and bank, not seed 0's.
    # With unlabeled images, the unlabeled arm also gets the unlabeled set's bank; output stays on labelled crops.
    space = "tune.search_space={distill.parts: {grid: [none, token, output, unlabeled]}, train.seed: {grid: [3]}}"
    frames = tmp_path / "frames"  # three of the val images as a camera's frames, and a detector's boxes
    frames.mkdir()
    val = json.loads((synthetic_root / "annotations" / "person_keypoints_val.json").read_text())
    for ann in val["annotations"][:3]:
        name = f"{ann['image_id']:08d}.jpg"
        (frames / name).write_bytes((synthetic_root / "images" / "val" / name).read_bytes())
    boxes = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 0.9, "category_id": 1}
             for a in val["annotations"][:3]] + [{"image_id": 999999, "bbox": [0, 0, 50, 90], "score": 0.9,
                                                  "category_id": 1}]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    unlabeled = ["--set", f"distill.unlabeled.images={frames}", "--set", f"distill.unlabeled.boxes={tmp_path}/boxes.json"]
    out = run(["pipelines/distill.py", *common(synthetic_root, tmp_path), "--plan", "--json", "--set", space,
               *unlabeled, "--set", "distill.second_stage.epochs=1"], registry)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seeded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(e["setting"], e["seeds"]) for e in seeded["settings"]] == [
        ({"distill.parts": "none"}, [3]), ({"distill.parts": "token"}, [3]), ({"distill.parts": "output"}, [3]),
        ({"distill.parts": "unlabeled"}, [3])]
    assert {e["seed"] for e in seeded["preparations"]} == {3}
    assert {e["token_file"]["seed"] for e in seeded["preparations"] if e["token_file"]} == {3}
    assert {e["view_bank"]["seed"] for e in seeded["preparations"]} == {3}
    assert [a["unlabeled_ratio"] for a in seeded["arms"].values()] == [0.0, 0.0, 0.0, 0.6]
    assert seeded["prepared_before_trials"]["view_banks"] == 2  # the labelled views' bank, the unlabeled set's
    assert "unlabelled share 0.6" in out.stdout
    assert [a["second_stage_epochs"] for a in seeded["arms"].values()] == [0, 1, 1, 1]  # never in the none arm
    images = len({a["image_id"] for a in val["annotations"][:3]})
    assert seeded["unlabeled_set"].startswith(f"unlabelled set: 3 person boxes on {images} images of {frames}")
    assert "1 boxes of boxes.json name images that are not in the folder" in out.stdout
    out = run(["pipelines/distill.py", *common(synthetic_root, tmp_path), "--plan", "--set", space,
               "--set", f"distill.unlabeled.images={tmp_path}/nowhere", *unlabeled[2:]], registry)
    assert out.returncode == 2 and "distill.unlabeled.images" in out.stderr and "Traceback" not in out.stderr

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
    assert "(95%, t) over 2 seeds" in out.stdout and "NOT beyond the interval" in out.stdout
    assert "over the runner-up" in out.stdout
    uri = registry["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("vitpose-student", "seeded")
    assert version.tags["seeds"] == "2" and version.tags["keypoint set"] == "coco" and version.description
    assert {"setting", "val/AP mean", "val/AP interval", "teacher", "run", "input size", "GFLOPs"} <= set(version.tags)
    assert version.tags["teacher"].startswith("models:/vitpose-teacher/1#")  # the version, not the alias
    seeds = {ast.literal_eval(r.data.tags["sweep_params"])["train.seed"] for r in child_runs(uri, version.run_id)}
    assert seeds == {0, 1}
    sweep_metrics = client.get_run(version.run_id).data.metrics  # per setting, on the sweep's run
    for setting in ("tracking.log_images 0", "tracking.log_images 1"):
        assert {f"setting/{setting}/val_AP_{k}" for k in ("mean", "ci_low", "ci_high")} <= set(sweep_metrics)
    assert "setting/tracking.log_images 1/val_AP_minus_baseline_ci_low" in sweep_metrics
    table = client.download_artifacts(version.run_id, "settings.csv", str(tmp_path))
    assert len(Path(table).read_text().splitlines()) == 3  # header + two settings


def test_trials_of_two_ranks_each_and_a_lost_rank(registry, synthetic_root, tmp_path):
    """tune.workers_per_trial=2: each trial is a Ray Train run of two ZeRO-2 ranks (gloo) whose ranks train on
    different shards; SIGKILL of one rank of one trial restarts that trial's ranks from its checkpoint, while
    the other trial's ranks run on untouched."""
    status_dir = tmp_path / "status"
    args = ["pipelines/distill.py", *common(synthetic_root, tmp_path / "ray"), "--set", "train.epochs=3",
            "--set", "tune.search_space={distill.parts: {grid: [none, output]}}", "--set", "tune.scheduler=fifo",
            "--set", "tune.workers_per_trial=2", "--set", "tune.cpus_per_worker=0.45",
            "--set", "deepspeed.zero_stage=2", "--set", "tracking.log_images=0", "--set", "tune.alias=two-ranks"]
    hold = hold_rank(status_dir, 1, phase="train", epoch=2)  # every trial's rank 1, after epoch 1's checkpoint
    sweep = Launched(args, {**registry, **hold_env(status_dir)}, tmp_path / "sweep.log")
    try:
        # Both trials at the hold at once (2 x 0.45 CPUs each fit); the first loses its rank 1, the other waits.
        deadline = time.time() + 400
        while len(trials := sorted(p.parent for p in status_dir.glob("*/rank1.json")
                                   if (read_status(p.parent, 1) or {}).get("held"))) < 2:
            assert sweep.proc.poll() is None and time.time() < deadline, sweep.output()[-3000:]
            time.sleep(0.1)
        victim, bystander = trials
        held = read_status(victim, 1)
        others = {rank: read_status(bystander, rank)["pid"] for rank in (0, 1)}
        kill_owned(held["pid"], sweep.proc.pid)
        hold.unlink()
        assert sweep.wait(timeout=600) == 0, sweep.output()[-3000:]
    finally:
        sweep.cleanup()
    out = sweep.output()
    assert "registered model: models:/vitpose-student@two-ranks" in out

    for trial in (victim, bystander):
        ranks = [read_status(trial, rank) for rank in (0, 1)]
        assert [s["world_size"] for s in ranks] == [2, 2] and [s["phase"] for s in ranks] == ["done", "done"]
        assert not set(ranks[0]["shard"]) & set(ranks[1]["shard"]), ranks  # each rank its own instances
    assert read_status(victim, 1)["pid"] != held["pid"]  # a new worker group
    assert {rank: read_status(bystander, rank)["pid"] for rank in (0, 1)} == others  # never restarted

    def final_meta(trial_id: str) -> dict:
        (folder,) = (tmp_path / "ray").glob(f"*/*{trial_id}*/train")
        return max((verify_checkpoint(c) for c in folder.glob("checkpoint_*") if c.is_dir()), key=lambda m: m["epoch"])

    victim_meta, bystander_meta = final_meta(victim.name), final_meta(bystander.name)
    assert victim_meta["epoch"] == bystander_meta["epoch"] == 2  # 0-based: all three epochs trained
    assert victim_meta["restored_at_epochs"] == [1]  # went on from epoch 1's checkpoint
    assert bystander_meta["restored_at_epochs"] == []
    uri = registry["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    parent = client.get_model_version_by_alias("vitpose-student", "two-ranks").run_id
    for r in child_runs(uri, parent):
        assert r.data.tags["workers"] == "2" and r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/AP")] == [1, 2, 3]

    # Trials of 2 ranks x 1 CPU (+ the trial's own process) cannot be placed on 2 CPUs: refused before any work.
    too_big = run([*args, "--set", "tune.cpus_per_worker=1"], registry)
    assert too_big.returncode == 2 and "Traceback" not in too_big.stdout + too_big.stderr
    assert "tune.workers_per_trial=2 x tune.cpus_per_worker=1" in too_big.stderr, too_big.stderr[-2000:]


def test_ranks_of_a_trial_asha_stops_go_to_the_next_trial(registry, synthetic_root, tmp_path):
    """ASHA stops every trial inside its last report (max_t = 1 epoch), killing the trial and its Train controller.
    Two trials of 2 ranks fit at once and the third fits only once a stopped trial's ranks are released, which
    Ray Train's placement-group cleaner does when the state API tells it the controller is gone."""
    args = ["pipelines/distill.py", *common(synthetic_root, tmp_path / "ray"), "--set", "train.epochs=1",
            "--set", "tune.search_space={distill.parts: {grid: [none, output, token]}}", "--set", "tune.scheduler=asha",
            "--set", "tune.grace_period=1", "--set", "tune.workers_per_trial=2", "--set", "tune.cpus_per_worker=0.45",
            "--set", "deepspeed.zero_stage=2", "--set", "tracking.log_images=0", "--set", "tune.alias=asha-ranks"]
    sweep = Launched(args, registry, tmp_path / "sweep.log")
    try:
        assert sweep.wait(timeout=420) == 0, sweep.output()[-3000:]
    finally:
        sweep.cleanup()
    uri = registry["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    parent = client.get_model_version_by_alias("vitpose-student", "asha-ranks").run_id
    trials = child_runs(uri, parent)
    assert sorted(ast.literal_eval(r.data.tags["sweep_params"])["distill.parts"] for r in trials) == ["none", "output", "token"]
    for r in trials:
        assert r.data.tags["workers"] == "2" and r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/AP")] == [1]

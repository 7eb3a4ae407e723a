"""pipelines/teacher.py and pipelines/distill.py with ``ray.storage_path=s3://...`` on a local S3-compatible
server (moto, own port): checkpoints and side files are bucket keys, nothing lands under the repository, the
model is registered, a teacher run whose driver was SIGKILLed continues from the bucket with --resume, a sweep
keeps Tune's state and its trials' checkpoints in the bucket, and unreachable storage stops the run in seconds
with one line (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import mlflow
import pytest

from tests.conftest import REPO, TEST_DATA
from tests.faults.procs import PY, Launched, cli_args, hold_env, hold_rank, wait_for_status
from tests.helpers_s3 import s3_server
from vitpose.run.storage import Storage
from vitpose.train.run_folder import newest_complete_checkpoint, verify_checkpoint

pytestmark = pytest.mark.slow

BUCKET = "teacher-runs"
STEPS_PER_EPOCH = 6  # 96 instances / (2 workers x batch 8)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.create_bucket(BUCKET)
        yield server


def env_for(s3, tmp_path, **extra: str) -> dict[str, str]:
    return {**os.environ, **s3.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra}


def test_teacher_on_s3_writes_only_to_the_bucket_and_resumes_from_it_after_a_driver_kill(s3, synthetic_root,
                                                                                         tmp_path):
    name = f"s3-teacher-{os.getpid()}"
    status_dir = tmp_path / "status"
    # The endpoint is given in the URI; the environment's points nowhere: the probe, Ray's checkpoint uploads
    # and the workers' own look into the run folder all reach the bucket only if the URI keeps its options.
    env = env_for(s3, tmp_path, **hold_env(status_dir), AWS_ENDPOINT_URL="http://127.0.0.1:9")
    uri = f"s3://{BUCKET}/runs?endpoint_override={s3.endpoint}"
    args = ["pipelines/teacher.py", *cli_args(synthetic_root, uri, f"ray.name={name}", "train.epochs=3")]
    hold = hold_rank(status_dir, 0, phase="save", epoch=2)  # the driver dies while rank 0 saves epoch 2
    first = Launched(args, env, tmp_path / "first.log")
    try:
        wait_for_status(status_dir, 0, lambda s: s["held"], 400, alive=lambda: first.proc.poll() is None)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        first.cleanup()
        hold.unlink(missing_ok=True)
    keys = s3.keys(BUCKET, "runs/")
    (run_prefix,) = {k.split("/")[1] for k in keys if k.startswith(f"runs/{name}-")}
    run_id = s3.client().get_object(Bucket=BUCKET, Key=f"runs/{run_prefix}/mlflow_run_id.txt")["Body"].read().strip()

    second = Launched([*args, "--resume"], env, tmp_path / "second.log")
    try:
        rc = second.wait(400)
    finally:
        second.cleanup()
    out = second.output()
    assert rc == 0, out[-3000:]
    assert f"MLflow run {run_id.decode()}" in out and f"Ray run folder s3://{BUCKET}/runs/{run_prefix}" in out
    assert f"at epoch 1 (step {STEPS_PER_EPOCH})" in out, "did not continue from the epoch-1 checkpoint in the bucket"

    keys = s3.keys(BUCKET, f"runs/{run_prefix}/")
    files = {k.removeprefix(f"runs/{run_prefix}/") for k in keys if not k.endswith("/")}
    assert {"mlflow_run_id.txt", "checkpoint_manager_snapshot.json"} <= files, sorted(files)
    assert "fatal_error.json" not in files
    checkpoints = sorted({f.split("/")[0] for f in files if f.startswith("checkpoint_") and "/" in f})
    # Ray keeps ray.num_to_keep (2) of the checkpoints it registered; an epoch-1 checkpoint the killed driver
    # never registered (RaySession found it in the run folder) stays beside them.
    assert len(checkpoints) in (2, 3), checkpoints
    for ckpt in checkpoints:
        assert {f"{ckpt}/{f}" for f in ("meta.json", "model.safetensors", "rank0.complete", "rank1.complete")} <= files
    snapshot = json.loads(s3.client().get_object(
        Bucket=BUCKET, Key=f"runs/{run_prefix}/checkpoint_manager_snapshot.json")["Body"].read())
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    os.environ.update(s3.env)  # verify in place, on the bucket
    meta = verify_checkpoint(Storage.parse(f"s3://{BUCKET}/runs/{run_prefix}/{latest}"))
    assert meta["epoch"] == 2 and meta["restored_at_epochs"] == [1]
    assert not list((REPO / "runs" / "ray").glob(f"{name}-*")), "the URI was re-rooted under the repository"

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("vitpose-teacher", "current")
    assert version.run_id == run_id.decode()
    assert client.get_run(version.run_id).data.tags["driver_resumes"] == "1"


@pytest.mark.parametrize(("uri", "endpoint", "cause"), [
    ("s3://no-such-bucket/runs", None, "The specified bucket does not exist"),
    (f"s3://{BUCKET}/runs", "http://127.0.0.1:9", "Could not connect to server"),  # nothing listens on port 9
])
def test_unreachable_storage_stops_in_seconds_with_one_line(uri, endpoint, cause, s3, synthetic_root, tmp_path):
    env = env_for(s3, tmp_path, **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {}))
    t0 = time.time()
    out = subprocess.run([PY, "pipelines/teacher.py", *cli_args(synthetic_root, uri, "ray.name=unreachable")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.time() - t0
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stdout + out.stderr
    assert errors[0].startswith(f"error: ray.storage_path={uri}: ") and cause in errors[0]
    assert errors[0].endswith("(check AWS_ENDPOINT_URL / credentials)")
    assert "MLflow run" not in out.stdout and seconds < 40, seconds


def test_sweep_keeps_tune_state_and_trial_checkpoints_in_the_bucket(s3, synthetic_root, tmp_path):
    # The endpoint only in the URI: Tune's state, the trials' checkpoints and the results reach the bucket only
    # if every path below the sweep folder keeps the URI's options.
    env = env_for(s3, tmp_path, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    teacher = subprocess.run([PY, "pipelines/teacher.py", *cli_args(synthetic_root, tmp_path / "ray", "train.epochs=1",
                                                                   "deepspeed.zero_stage=0", "train.precision=fp32",
                                                                   "ray.num_workers=1")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert teacher.returncode == 0, teacher.stdout[-2000:] + teacher.stderr[-2000:]
    name = f"s3-sweep-{os.getpid()}"
    sets = [f"data.root={synthetic_root}", *TEST_DATA,
            "model.img_size=[64, 48]", "train.batch_size=8", "train.warmup_iters=2", "train.lr_steps=[]",
            "data.loader_workers=0", f"ray.storage_path=s3://{BUCKET}/sweeps?endpoint_override={s3.endpoint}",
            f"ray.name={name}", "train.epochs=2",
            "tune.search_space={distill.parts: {grid: [none, both]}}", "tune.grace_period=2"]
    out = subprocess.run([PY, "pipelines/distill.py", *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "registered model: models:/vitpose-student@champion (version 1)" in out.stdout
    (sweep,) = {k.split("/")[1] for k in s3.keys(BUCKET, f"sweeps/{name}-")}
    assert f"sweep folder s3://{BUCKET}/sweeps/{sweep}" in out.stdout
    assert f"results table: s3://{BUCKET}/sweeps/{sweep}/results.csv" in out.stdout
    files = [k.removeprefix(f"sweeps/{sweep}/") for k in s3.keys(BUCKET, f"sweeps/{sweep}/") if not k.endswith("/")]
    assert {"mlflow_run_id.txt", "results.csv", "sweep.png", "tuner.pkl"} <= set(files), files
    assert any(f.startswith("experiment_state") for f in files), files  # Tune's state: --resume reads it here
    finals = [f for f in files if "/checkpoint_" in f and f.endswith("/meta.json")]
    trials = {f.split("/")[0] for f in finals}
    assert len(trials) == 2, files
    os.environ.update(s3.env)
    for trial in trials:  # each trial's newest checkpoint is complete, in place on the bucket
        newest = newest_complete_checkpoint(Storage.parse(f"s3://{BUCKET}/sweeps/{sweep}/{trial}"))
        assert newest is not None and verify_checkpoint(newest)["epoch"] == 1
    assert not list((REPO / "runs" / "ray").glob(f"{name}-*"))
    assert mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("vitpose-student", "champion")


def test_storage_outage_during_a_checkpoint_keeps_the_previous_one_usable(s3, synthetic_root, tmp_path):
    """The S3 server stops while rank 0 hands its epoch-2 checkpoint to Ray: the run stops with one line, the
    epoch-1 checkpoint in the bucket still verifies, and --resume (storage back) continues from it."""
    name = f"s3-outage-{os.getpid()}"
    status_dir = tmp_path / "status"
    env = env_for(s3, tmp_path, **hold_env(status_dir))
    args = ["pipelines/teacher.py", *cli_args(synthetic_root, f"s3://{BUCKET}/runs", f"ray.name={name}",
                                              "train.epochs=3")]
    hold = hold_rank(status_dir, 0, phase="report", epoch=2)  # saved locally, not yet handed to Ray
    first = Launched(args, env, tmp_path / "first.log")
    try:
        wait_for_status(status_dir, 0, lambda s: s["held"], 400, alive=lambda: first.proc.poll() is None)
        run_prefix = next(k.split("/")[1] for k in s3.keys(BUCKET, f"runs/{name}-"))
        s3.stop()
        t_stop = time.time()
        hold.unlink()
        rc = first.wait(400)
    finally:
        first.cleanup()
        hold.unlink(missing_ok=True)
        s3.start()
    out = first.output()
    print(f"\nS3 outage: the run ended {time.time() - t_stop:.0f}s after the server stopped, exit {rc}")
    assert rc == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training failed: "), out[-3000:]

    os.environ.update(s3.env)
    run = Storage.parse(f"s3://{BUCKET}/runs/{run_prefix}")
    newest = newest_complete_checkpoint(run)
    assert newest is not None and verify_checkpoint(newest)["epoch"] == 0, "the epoch-1 checkpoint is not usable"

    second = subprocess.run([PY, *args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"at epoch 1 (step {STEPS_PER_EPOCH})" in second.stdout + second.stderr

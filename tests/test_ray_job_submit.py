"""`ray job submit` of pipelines/teacher.py against a `ray start --head` that the test starts and stops.

In its own module so no other Ray of this test session is alive while the head runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.helpers_ray import LOOPBACK_IPS, RAY, listening_sockets, ray_head
from tests.test_teacher_pipeline import args

pytestmark = pytest.mark.slow


def submit(head, env: dict[str, str], argv: list[str], deadline: float, job_env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """README's ``ray job submit --working-dir . [--runtime-env-json ENV] -- <venv python> pipelines/teacher.py
    ARGV``, waiting for the job agent."""
    runtime = ["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []
    while True:
        done = subprocess.run(
            [str(RAY), "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), *runtime, "--",
             sys.executable, "pipelines/teacher.py", *argv],
            env=env, capture_output=True, text=True, timeout=600,
        )
        # The dashboard answers before its job agent is up; that refusal comes at once, so retry it.
        if "No available agent" not in done.stdout + done.stderr or time.time() > deadline + 240:
            return done
        time.sleep(3)


def test_ray_job_submit_against_a_head(synthetic_root, tmp_path):
    # The tracking URI reaches the job through its runtime environment only (README), not the head's.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"RAY_AUTH_MODE": "disabled"}
    tracking = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with ray_head(env) as head:
        deadline = time.time() + 90
        while True:
            probe = subprocess.run([str(RAY), "job", "list", "--address", head.dashboard], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, f"Ray job server did not come up: {probe.stderr[-500:]}"
            time.sleep(2)
        # Relative storage resolves inside the job's working-dir copy, which Ray deletes: refused before any work.
        lost = submit(head, env, ["--set", f"data.root={synthetic_root}", "--set", "ray.storage_path=runs/job-test"],
                      deadline)
        assert lost.returncode != 0
        assert "ray.storage_path" in lost.stdout and "the MLflow store" in lost.stdout, lost.stdout[-2000:]
        assert "working-dir copy" in lost.stdout, lost.stdout[-2000:]
        assert "Traceback" not in lost.stdout, lost.stdout[-2000:]
        job = submit(head, env, args(synthetic_root, tmp_path / "storage"), deadline, job_env=tracking)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "registered model: models:/vitpose-teacher@current (version 1)" in job.stdout
        # What the job made outlives it: checkpoints in the given storage, the run and model in the given store.
        assert list((tmp_path / "storage").glob("*/checkpoint_*/meta.json")), "no checkpoint in ray.storage_path"
        import mlflow

        version = mlflow.MlflowClient(tracking["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("vitpose-teacher",
                                                                                                 "current")
        assert int(version.version) == 1
        bound = listening_sockets(head.pid)
        assert {"gcs_server", "raylet"} <= {name for _, name in bound}, bound
        assert not [b for b in bound if b[0] not in LOOPBACK_IPS], f"the head listens beyond the loopback: {bound}"

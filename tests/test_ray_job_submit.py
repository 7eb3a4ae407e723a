"""`ray job submit` of pipelines/teacher.py against a `ray start --head` that the test starts and stops.

In its own module so no other Ray of this test session is alive while the head runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.helpers_ray import LOOPBACK_IPS, RAY, listening_sockets, ray_head
from tests.test_teacher_pipeline import args

pytestmark = pytest.mark.slow


def test_ray_job_submit_against_a_head(synthetic_root, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with ray_head(env) as head:
        deadline = time.time() + 90
        while True:
            probe = subprocess.run([str(RAY), "job", "list", "--address", head.dashboard], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, f"Ray job server did not come up: {probe.stderr[-500:]}"
            time.sleep(2)
        while True:
            submit = subprocess.run(
                [str(RAY), "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--",
                 sys.executable, "pipelines/teacher.py", *args(synthetic_root, tmp_path / "storage")],
                env=env, capture_output=True, text=True, timeout=600,
            )
            # The dashboard answers before its job agent is up; that refusal comes at once, so retry it.
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > deadline + 240:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "registered model: models:/vitpose-teacher@current (version 1)" in submit.stdout
        bound = listening_sockets(head.pid)
        assert {"gcs_server", "raylet"} <= {name for _, name in bound}, bound
        assert not [b for b in bound if b[0] not in LOOPBACK_IPS], f"the head listens beyond the loopback: {bound}"

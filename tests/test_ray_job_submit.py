"""`ray job submit` of pipelines/teacher.py against a `ray start --head` that the test starts and stops.

In its own module so no other Ray of this test session is alive while the head runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_teacher_pipeline import args
from vitpose.train.session import free_port

pytestmark = pytest.mark.slow


def test_ray_job_submit_against_a_head(synthetic_root, tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = free_port(), free_port()
    # Ray's socket paths must stay under 107 characters: pytest's tmp_path is too deep for them.
    head_tmp = tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # Another Ray (this module's local one) may be running: give the head's agents their own ports, or its
    # job agent cannot bind the defaults and every submission is refused.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--dashboard-port={dash}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--temp-dir={head_tmp}", *agent_ports], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            probe = subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, f"Ray head did not come up: {probe.stderr[-500:]}"
            time.sleep(2)
        while True:
            submit = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                 sys.executable, "pipelines/teacher.py", *args(synthetic_root, tmp_path / "storage")],
                env=env, capture_output=True, text=True, timeout=600,
            )
            # The dashboard answers before its job agent is up; that refusal comes at once, so retry it.
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > deadline + 240:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "registered model: models:/vitpose-teacher@current (version 1)" in submit.stdout
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(head_tmp, ignore_errors=True)

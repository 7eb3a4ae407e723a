"""Storage credentials reach Ray's workers from their node, never through Ray: a teacher job on a Ray head whose
environment holds the bucket's key (as a cluster node's would), against an S3 server that checks signatures,
writes its checkpoints from the workers, and the secret is nowhere in what Ray keeps about the job: `ray job`
and the dashboard's job API, Ray's state API (jobs, actors) and every log file of the head's session,
the runtime-env agent's included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers_ray import RAY, ray_head
from tests.helpers_s3 import signed_s3_server
from tests.test_teacher_pipeline import args as teacher_args

pytestmark = pytest.mark.slow
BUCKET = "creds"


def test_workers_reach_the_bucket_with_their_nodes_credentials_and_ray_never_holds_them(synthetic_root, tmp_path):
    with signed_s3_server(BUCKET) as s3:
        node_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        node_env.update({**s3.identity_env, "RAY_AUTH_MODE": "disabled"})
        uri = f"s3://{BUCKET}/runs?endpoint_override={s3.endpoint}"
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        argv = teacher_args(synthetic_root, uri, "ray.num_workers=2", "train.epochs=1", "deepspeed.zero_stage=0",
                            "train.precision=fp32", "tracking.log_images=0", "ray.name=creds")
        with ray_head(node_env, num_cpus=2) as head:
            job = subprocess.run([str(RAY), "job", "submit", "--address", head.dashboard, "--runtime-env-json",
                                  json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking}}), "--",
                                  sys.executable, str(REPO / "pipelines" / "teacher.py"), *argv],
                                 env=node_env, cwd=REPO, capture_output=True, text=True, timeout=600)
            assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
            # Ray persists a checkpoint from the workers that wrote it: the workers reached the bucket, signed
            # with the node's key.
            keys = s3.keys(BUCKET, "runs/creds-")
            assert any(k.endswith("/rank1.complete") for k in keys) and any(k.endswith("/meta.json") for k in keys)

            seen = {
                "ray job submit's output": job.stdout + job.stderr,
                "ray job list": _cli(node_env, "job", "list", "--address", head.dashboard),
                "the dashboard's job API": urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=30).read()
                .decode(),
                "ray list jobs --detail": _cli(node_env, "list", "jobs", "--detail", "--address", head.dashboard),
                "ray list actors --detail": _cli(node_env, "list", "actors", "--detail", "--limit", "1000",
                                                 "--address", head.dashboard),
            }
            assert "creds-" in seen["ray job submit's output"] and '"entrypoint"' in seen["the dashboard's job API"]
            logs = [p for p in Path(head.temp_dir).glob("session_*/logs/**/*") if p.is_file()]
            assert any("runtime_env" in p.name for p in logs), [p.name for p in logs]
            seen.update({f"Ray's log {p.name}": p.read_text(errors="replace") for p in logs})
            leaks = [where for where, text in seen.items() if s3.secret_key in text]
            assert not leaks, f"the bucket's secret key shows in {leaks}"


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout

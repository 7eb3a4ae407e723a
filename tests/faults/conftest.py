"""Fixtures of the fault suite: an in-process Ray and a SQLite MLflow store per module, both private."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A Ray started by this pytest process (so its workers descend from it: the tests may kill them)."""
    import ray

    from vitpose.run.cluster import WORKER_ENV

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)},
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield os.getpid()
    ray.shutdown()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """MLFLOW_TRACKING_URI of a SQLite store for the module (in-process runs and subprocesses)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri

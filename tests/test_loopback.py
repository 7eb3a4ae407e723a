"""The embedded default listens on the loopback only: every socket a private Ray opens (GCS, raylet, agents,
the driver's and a worker's gRPC servers) is bound to 127.0.0.1, so a laptop or a shared machine running the
demo exposes nothing to its network."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO
from tests.helpers_ray import LOOPBACK_IPS

PROBE = textwrap.dedent("""
    import json, os, psutil, ray
    from vitpose.run import cluster

    cluster.connect(num_cpus=1)
    assert ray.get(ray.remote(lambda: os.getpid()).remote()) > 0  # a worker process is up and serving
    tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
    pids = {p.pid: p.name() for p in tree}
    bound = sorted({(c.laddr.ip, pids[c.pid]) for c in psutil.net_connections("inet")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids})
    cluster.disconnect()
    print(json.dumps({"bound": bound, "switch": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}))
""")

@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    bound = [tuple(b) for b in report["bound"]]
    names = {name for _, name in bound}
    assert {"gcs_server", "raylet"} <= names, bound  # the probe saw Ray's servers, not an empty list
    exposed = [b for b in bound if b[0] not in LOOPBACK_IPS]
    assert not exposed, f"listening beyond the loopback: {exposed}"
    assert report["switch"] is None  # disconnect() put the environment back


def test_job_outputs_inside_the_working_dir_copy_are_refused(tmp_path):
    """Under `ray job submit --working-dir`, relative paths resolve inside Ray's temporary copy: refused,
    naming what would be lost; absolute storage and tracking elsewhere pass; outside a job nothing is checked."""
    from vitpose.config import ConfigError
    from vitpose.run.cluster import check_outputs_outlive_job

    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    with pytest.raises(ConfigError, match=r"ray.storage_path .* and the MLflow store .* working-dir copy"):
        check_outputs_outlive_job(copy / "runs/ray", f"sqlite:///{copy}/runs/mlflow.db", root=copy)
    with pytest.raises(ConfigError, match=r"^the MLflow store"):
        check_outputs_outlive_job(tmp_path / "shared", f"sqlite:///{copy}/runs/mlflow.db", root=copy)
    check_outputs_outlive_job(tmp_path / "shared", "http://127.0.0.1:5000", root=copy)
    check_outputs_outlive_job(tmp_path / "repo/runs/ray", f"sqlite:///{tmp_path}/repo/runs/mlflow.db",
                              root=tmp_path / "repo")


def test_free_ports_come_from_below_the_kernels_ephemeral_range():
    # A port from the ephemeral range can be taken as an outgoing connection's source port between the pick and
    # the server's bind (a private Ray's dashboard once failed so); one below it only by a server naming it.
    import socket

    from vitpose.train.session import _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = {free_port() for _ in range(50)}
    assert all(20000 <= p < low for p in ports), sorted(ports)
    assert len(ports) > 40  # drawn at random, not one port handed to every caller
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # really free

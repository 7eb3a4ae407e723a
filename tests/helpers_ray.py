"""A `ray start --head` that a test starts and stops: own ports, own temp dir, loopback only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from vitpose.train.session import free_port

RAY = Path(sys.executable).parent / "ray"
# Without it Ray binds the head's servers to the machine's outward address even when given 127.0.0.1 (see
# vitpose/raycluster.py); README's one-machine head uses the same variable.
LOOPBACK_HEAD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class Head:
    gcs: str  # RAY_ADDRESS for drivers: 127.0.0.1:<port>
    dashboard: str  # --address for the `ray job` CLI
    pid: int  # the `ray start --block` process; the head's servers are its descendants
    temp_dir: str  # its --temp-dir (sessions, logs, the jobs' working-dir copies)


LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets(root_pid: int) -> list[tuple[str, str]]:
    """(address, process name) of every listening TCP socket of ``root_pid`` and its descendants."""
    root = psutil.Process(root_pid)
    names = {p.pid: p.name() for p in [root, *root.children(recursive=True)]}
    return sorted({(c.laddr.ip, names[c.pid]) for c in psutil.net_connections("inet")
                   if c.status == psutil.CONN_LISTEN and c.pid in names})


@contextmanager
def ray_head(env: dict[str, str], *extra: str, num_cpus: int = 2, cwd: Path | None = None) -> Iterator[Head]:
    """A head with ``extra`` ``ray start`` flags (e.g. ``--num-gpus=1``), up when this yields; started in ``cwd``
    (a job submitted without --working-dir runs there)."""
    env = {**env, **LOOPBACK_HEAD_ENV}
    port, dash = free_port(), free_port()
    # Ray's socket paths must stay under 107 characters: pytest's tmp_path is too deep for them.
    head_tmp = tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp")
    # Another Ray (a test module's local one) may be running: give the head's agents their own ports, or its
    # job agent cannot bind the defaults and every submission is refused.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                             "--node-ip-address=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--temp-dir={head_tmp}", *agent_ports, *extra],
                            env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        gcs = f"127.0.0.1:{port}"
        deadline = time.time() + 90
        while subprocess.run([str(RAY), "status", "--address", gcs], env=env, capture_output=True).returncode:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "Ray head did not come up in 90 s"
            time.sleep(2)
        yield Head(gcs=gcs, dashboard=f"http://127.0.0.1:{dash}", pid=head.pid, temp_dir=head_tmp)
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(head_tmp, ignore_errors=True)


@dataclass(frozen=True)
class Node:
    pid: int  # the node's `ray start --block`, leader of its own process group (kill that to lose the node)


@contextmanager
def ray_node(head: Head, env: dict[str, str], num_cpus: int = 1) -> Iterator[Node]:
    """A second node joined to ``head`` on the loopback (tests/ray_join_loopback.py), up when this yields."""
    env = {**env, **LOOPBACK_HEAD_ENV}
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
    before = _alive_nodes(head, env)
    node = subprocess.Popen([sys.executable, "-m", "tests.ray_join_loopback", "start", "--block",
                             f"--address={head.gcs}", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
                             *ports], env=env, cwd=Path(__file__).parents[1], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while _alive_nodes(head, env) <= before:
            assert node.poll() is None, "the second node's ray start exited"
            assert time.time() < deadline, "the second Ray node did not join in 90 s"
            time.sleep(2)
        yield Node(pid=node.pid)
    finally:
        if node.poll() is None:
            node.terminate()
            node.wait(timeout=60)


def _alive_nodes(head: Head, env: dict[str, str]) -> int:
    done = subprocess.run([str(RAY), "list", "nodes", "--address", head.dashboard, "--filter", "state=ALIVE",
                           "--format", "json"], env=env, capture_output=True, text=True)
    try:
        return len(json.loads(done.stdout))
    except ValueError:
        return 0

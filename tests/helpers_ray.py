"""A `ray start --head` that a test starts and stops: own ports, own temp dir, loopback only (or on the host side
of a network namespace the test made), and a second node joined from inside that namespace with docs/cluster.md's
worker command, so the two nodes talk over a real link between two addresses."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
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
# vitpose/run/cluster.py); docs/cluster.md's one-machine head uses the same variable.
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
def ray_head(env: dict[str, str], *extra: str, num_cpus: int = 2, cwd: Path | None = None,
             node_ip: str = "127.0.0.1") -> Iterator[Head]:
    """A head with ``extra`` ``ray start`` flags (e.g. ``--num-gpus=1``), up when this yields; started in ``cwd``
    (a job submitted without --working-dir runs there). On the loopback only, or with ``node_ip`` (a ``Netns``
    host address) an ordinary head that other nodes join."""
    env = {**env, **LOOPBACK_HEAD_ENV} if node_ip == "127.0.0.1" else dict(env)
    port, dash = free_port(), free_port()
    # Ray's socket paths must stay under 107 characters: pytest's tmp_path is too deep for them.
    head_tmp = tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp")
    # Another Ray (a test module's local one) may be running: give the head's agents their own ports, or its
    # job agent cannot bind the defaults and every submission is refused.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                             f"--node-ip-address={node_ip}", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--temp-dir={head_tmp}", *agent_ports, *extra],
                            env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        gcs = f"{node_ip}:{port}"
        deadline = time.time() + 90
        while subprocess.run([str(RAY), "status", "--address", gcs], env=env, capture_output=True).returncode:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "Ray head did not come up in 90 s"
            time.sleep(2)
        while not _answers(f"http://127.0.0.1:{dash}/api/version"):  # the dashboard (job API) can lag the GCS
            assert head.poll() is None and time.time() < deadline, "the head's dashboard did not answer in 90 s"
            time.sleep(1)
        yield Head(gcs=gcs, dashboard=f"http://127.0.0.1:{dash}", pid=head.pid, temp_dir=head_tmp)
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(head_tmp, ignore_errors=True)


@dataclass(frozen=True)
class Netns:
    """A network namespace a test made, linked to this one by a veth pair: ``host_ip`` on this side, ``ns_ip``
    inside. Nothing else is routed: inside, only its own loopback, its end of the pair and ``host_ip``."""

    name: str
    host_ip: str
    ns_ip: str
    host_if: str  # the pair's interfaces: a node whose hostname resolves to the loopback (this machine's does)
    ns_if: str  # names its own in GLOO_SOCKET_IFNAME, or its training ranks offer the others 127.0.0.1

    def run(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL what still runs inside (only this test's processes can be in a namespace it made)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextmanager
def netns() -> Iterator[Netns]:
    """A namespace and veth pair of our own (10.213.<k>.0/30, a block no interface here uses), removed
    afterwards with every process still inside it, also when the test fails."""
    used = subprocess.run(["ip", "-brief", "addr"], capture_output=True, text=True, check=True).stdout
    k = random.choice([k for k in range(1, 255) if f"10.213.{k}." not in used])
    name = f"vp{os.getpid() % 100000}x{k}"  # interface names: 15 characters at most
    host_if, ns_if = f"{name}h", f"{name}n"
    space = Netns(name=name, host_ip=f"10.213.{k}.1", ns_ip=f"10.213.{k}.2", host_if=host_if, ns_if=ns_if)
    steps = [["ip", "netns", "add", name], ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
             ["ip", "link", "set", ns_if, "netns", name], ["ip", "addr", "add", f"{space.host_ip}/30", "dev", host_if],
             ["ip", "link", "set", host_if, "up"], ["ip", "-n", name, "addr", "add", f"{space.ns_ip}/30", "dev", ns_if],
             ["ip", "-n", name, "link", "set", ns_if, "up"], ["ip", "-n", name, "link", "set", "lo", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield space
    finally:
        space.kill_all()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # takes its peer with it
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass(frozen=True)
class Node:
    pid: int  # `ip netns exec ... ray start --block`, leader of its own process group (kill that to lose the node)
    temp_dir: str


@contextmanager
def ray_node(head: Head, space: Netns, env: dict[str, str], num_cpus: int = 1) -> Iterator[Node]:
    """A second node joined to ``head`` from inside ``space`` with docs/cluster.md's worker command
    (``ray start --address=<head>:<port>``; ``--block`` keeps it in the foreground), up when this yields."""
    node_tmp = tempfile.mkdtemp(prefix="vp-node-", dir="/tmp")  # the namespaces share one file system
    node = subprocess.Popen(space.run([str(RAY), "start", f"--address={head.gcs}", f"--num-cpus={num_cpus}",
                                       f"--temp-dir={node_tmp}", "--block"]),
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        # Waited for by its address: a count taken while the head's state API was not answering yet read 0,
        # and the head alone then passed for the joined node.
        while space.ns_ip not in node_ips(head, env):
            assert node.poll() is None, "the second node's ray start exited"
            assert time.time() < deadline, "the second Ray node did not join in 90 s"
            time.sleep(2)
        yield Node(pid=node.pid, temp_dir=node_tmp)
    finally:
        if node.poll() is None:
            node.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=60)
        space.kill_all()
        shutil.rmtree(node_tmp, ignore_errors=True)


def node_ips(head: Head, env: dict[str, str]) -> set[str]:
    """The addresses of the head's alive nodes, as Ray records them."""
    done = subprocess.run([str(RAY), "list", "nodes", "--address", head.dashboard, "--filter", "state=ALIVE",
                           "--format", "json"], env=env, capture_output=True, text=True)
    try:
        return {n["node_ip"] for n in json.loads(done.stdout or "[]")}
    except ValueError:  # the state API not answering yet: an error text, not a list
        return set()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


@contextmanager
def relay(listen_ip: str, target_port: int) -> Iterator[int]:
    """A TCP relay from ``listen_ip`` (a ``Netns`` host address) to ``127.0.0.1:target_port``, so a node inside the
    namespace reaches a server this machine keeps on the loopback (S3, MLflow); yields the relay's port."""
    import socket
    import threading

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve(server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                try:
                    upstream = socket.create_connection(("127.0.0.1", target_port))
                except OSError:  # the server is down (an outage test): refused, as it would be directly
                    client.close()
                    continue
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pump, args=(a, b), daemon=True).start()

    server = socket.create_server((listen_ip, 0))
    threading.Thread(target=serve, args=(server,), daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()

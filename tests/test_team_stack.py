"""A team's stack on one machine, started and stopped here: an S3-compatible store (moto), an MLflow server on a
real PostgreSQL with the artifacts it proxies into that store and basic auth (loopback only), and a Ray cluster
of two nodes that `ray job submit` runs the teacher and the sweep on. The second node is a host of its own: a
network namespace the test makes, joined to a head on the host side of its veth pair with docs/cluster.md's worker
command (`ray start --address=<head>:<port>`), so Ray's traffic between the nodes crosses a real link between
two addresses. Every address the tests use is loopback or one of that pair's.

In its own module: no other Ray of the test session is alive while its cluster runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pytest

from tests.conftest import REPO, TEST_DATA
from tests.faults.procs import hold_env, hold_rank, wait_for_status
from tests.helpers_mlflow_server import ADMIN_PASSWORD, PASSWORD, USER, mlflow_server, postgres_server
from tests.helpers_ray import RAY, netns, node_ips, ray_head, ray_node, relay
from tests.helpers_s3 import s3_server
from tests.test_teacher_pipeline import args as teacher_args

sys.path.insert(0, str(REPO / "pipelines"))
import teacher  # noqa: E402

pytestmark = pytest.mark.slow
BUCKET = "team"
SECRETS = (PASSWORD, ADMIN_PASSWORD)
DOWN_S = 30  # the outage: several of MLflow's retries and two epochs or more long


@pytest.fixture(scope="module")
def stack():
    with s3_server() as s3, postgres_server() as pg:
        s3.create_bucket(BUCKET)
        with mlflow_server(pg, s3, BUCKET) as server:
            yield SimpleNamespace(s3=s3, pg=pg, mlflow=server)


@pytest.fixture
def as_worker(stack, monkeypatch):
    """This process as a training user: the server's URI and user, and no bucket credentials (artifacts go
    through the server)."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in stack.mlflow.client_env.items():
        monkeypatch.setenv(key, value)
    return mlflow.MlflowClient(stack.mlflow.uri)


def run_of(client: mlflow.MlflowClient, experiment: str) -> mlflow.entities.Run | None:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0] if runs else None


def epochs_saved(storage: Path) -> int:
    metas = sorted(storage.glob("*/checkpoint_*/meta.json"), key=lambda p: p.stat().st_mtime)
    return len(json.loads(metas[-1].read_text())["history"]) if metas else 0


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a password appears in {where}"


def test_preflight_names_refused_credentials_in_one_line(stack, as_worker, synthetic_root, tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    assert teacher.main(teacher_args(synthetic_root, tmp_path / "ray")) == 2
    err = capsys.readouterr().err
    assert f"MLflow server {stack.mlflow.uri} refused user '{USER}' (HTTP 401)" in err and "Traceback" not in err
    # A password written into the URI is refused without being repeated.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.uri.replace("://", f"://{USER}:{PASSWORD}@"))
    assert teacher.main(teacher_args(synthetic_root, tmp_path / "ray")) == 2
    err = capsys.readouterr().err
    assert "carries a user and password" in err and "MLFLOW_TRACKING_PASSWORD" in err
    assert_no_secret("the error", err)


def test_training_goes_on_through_a_tracking_server_outage(stack, as_worker, synthetic_root, tmp_path, capsys,
                                                           monkeypatch):
    """The MLflow server is stopped for half a minute after the first epoch's metrics arrived; epochs go on while
    it is down, and once it is back every epoch's metrics and pictures are there, in PostgreSQL and the bucket."""
    import ray

    from vitpose.run.cluster import WORKER_ENV

    client, storage, epochs, seen = as_worker, tmp_path / "ray", 12, {}

    def outage() -> None:
        deadline = time.time() + 400
        while time.time() < deadline:
            run_ids = list(storage.glob("*/mlflow_run_id.txt"))
            if run_ids and client.get_metric_history(run_ids[0].read_text().strip(), "val/AP"):
                break
            time.sleep(0.2)
        seen["before"] = epochs_saved(storage)
        stack.mlflow.stop()
        t0 = time.time()
        while time.time() - t0 < DOWN_S or epochs_saved(storage) < seen["before"] + 2 and time.time() - t0 < 240:
            time.sleep(1)
        seen["while_down"] = epochs_saved(storage) - seen["before"]
        stack.mlflow.start()
        seen["down_s"] = time.time() - t0

    watcher = threading.Thread(target=outage, daemon=True)
    # MLflow's client waits up to 2 minutes between its own retries (factor 2); shorter waits (a similar span of
    # tries over ~4 minutes) only make the held metrics arrive sooner after the server is back.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "8")
    ray_tmp = tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)}, _temp_dir=ray_tmp)
    try:
        watcher.start()
        code = teacher.main(teacher_args(synthetic_root, storage, f"train.epochs={epochs}",
                                         "tracking.experiment=outage",
                                         "tracking.registered_model=outage-teacher", "tracking.log_images=2"))
    finally:
        ray.shutdown()
        watcher.join(timeout=300)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert seen["while_down"] >= 2 and seen["down_s"] >= DOWN_S, seen  # training went on while the server was down
    assert "unreachable" in printed.out and "training goes on" in printed.out, (seen, printed.out[-3000:])
    assert "is back after" in printed.out, printed.out[-3000:]

    run = run_of(client, "outage")
    assert run.info.status == "FINISHED"
    for metric in ("val/AP", "train/loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), (metric, steps)  # none lost, none twice
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert len(pictures) == epochs, pictures
    # Artifacts went through the server into the bucket (this process holds no bucket credentials).
    keys = stack.s3.keys(BUCKET, "mlartifacts/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/predictions/val_predictions_epoch001.png") for k in keys)
    assert client.get_model_version_by_alias("outage-teacher", "current").run_id == run.info.run_id
    # The credentials are nowhere in what the run recorded or printed.
    for key, value in {**run.data.params, **run.data.tags}.items():
        assert_no_secret(f"param/tag {key}", f"{key}={value}")
    assert_no_secret("config.yaml", Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path / "dl"))).read_text())
    assert_no_secret("the console", printed.out + printed.err)


def submit(head, env: dict[str, str], script: str, argv: list[str], job_env: dict[str, str]) -> subprocess.Popen:
    """``ray job submit --working-dir . --runtime-env-json ... -- python pipelines/<script> ARGV``, tailing the
    job's output into a pipe; the caller waits."""
    runtime = json.dumps({"env_vars": job_env})
    return subprocess.Popen([str(RAY), "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO),
                             "--runtime-env-json", runtime, "--", sys.executable, f"pipelines/{script}", *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(job: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = job.communicate(timeout=timeout)
    return job.returncode, out


def tree(pid: int) -> set[int]:
    root = psutil.Process(pid)
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


NODE_PROBE = """
import json, os, sys
import numpy as np, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1])
(node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[2]]

@ray.remote(num_cpus=1)
def on_the_node(blob):
    return os.readlink("/proc/self/ns/net"), ray.util.get_node_ip_address(), float(blob.sum()), \
        np.ones(2_000_000, dtype=np.float32)

# 8 MB each way: through the object store, from this node to the other and back
netns, ip, total, back = ray.get(on_the_node.options(
    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(np.ones(2_000_000, np.float32)))
print(json.dumps({"netns": netns, "ip": ip, "total": total, "back": float(back.sum())}))
"""


def test_a_second_node_joins_from_its_own_network_namespace_with_the_readme_command():
    """A head on the host side of a veth pair, a node joined from inside the namespace with `ray start
    --address=<head>:<port>` and no patch: Ray records the two addresses, and a task pinned to the second node
    runs inside the namespace and trades 8 MB each way with a driver on the head's side."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with netns() as space, ray_head(env, num_cpus=1, node_ip=space.host_ip) as head, \
            ray_node(head, space, env, num_cpus=1):
        assert node_ips(head, env) == {space.host_ip, space.ns_ip}
        out = subprocess.run([sys.executable, "-c", NODE_PROBE, head.gcs, space.ns_ip], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        inside = f"net:[{os.stat(f'/run/netns/{space.name}').st_ino}]"  # the namespace the test made
        assert seen["ip"] == space.ns_ip and seen["netns"] == inside, (seen, space, inside)
        assert seen["total"] == seen["back"] == 2_000_000.0
    assert subprocess.run(["ip", "netns", "pids", space.name], capture_output=True).returncode != 0  # removed


def test_two_nodes_ray_job_submit_with_node_and_driver_kills(stack, as_worker, synthetic_root, tmp_path):
    """Teacher and sweep as `ray job submit` jobs on a two-node cluster, storage in the bucket, tracking on the
    server: workers spread over both nodes; the worker node killed mid-run -> the run resumes on the head
    from the bucket; the job's driver killed -> `--resume` continues from the bucket; then a 2-trial sweep."""
    with netns() as space, relay(space.host_ip, stack.s3.port) as s3_port, \
            relay(space.host_ip, stack.mlflow.port) as mlflow_port:
        two_nodes(stack, as_worker, synthetic_root, tmp_path, space, f"http://{space.host_ip}:{s3_port}",
                  f"http://{space.host_ip}:{mlflow_port}")


def two_nodes(stack, client, synthetic_root, tmp_path, space, s3_endpoint: str, mlflow_uri: str) -> None:
    """The body of the two-node test: the second node in ``space``; S3 and MLflow, kept on this machine's
    loopback, reached by both nodes at ``space``'s host address (``s3_endpoint``, ``mlflow_uri``)."""
    t_start = time.time()
    status_dir = tmp_path / "status"
    # Each node holds the bucket's and the server's credentials in its environment (as a cluster's secrets
    # would put them there); a job brings only where to track and the status folder.
    node_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    node_env.update({**stack.s3.env, "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_TRACKING_USERNAME": USER,
                     "MLFLOW_TRACKING_PASSWORD": PASSWORD, "RAY_AUTH_MODE": "disabled"})
    job_env = {"MLFLOW_TRACKING_URI": mlflow_uri, **hold_env(status_dir)}
    name = f"two-node-{os.getpid()}"
    sets = ["deepspeed.zero_stage=3", "train.precision=bf16", "train.epochs=6", "ray.placement_strategy=SPREAD",
            "ray.max_failures=2", f"ray.name={name}", "tracking.experiment=two-node",
            "tracking.registered_model=two-node-teacher", "tracking.log_images=2"]
    argv = teacher_args(synthetic_root, f"s3://{BUCKET}/runs", *sets)
    # Both hosts share this machine's hostname, which resolves to 127.0.0.1: each node names the interface its
    # training ranks reach the others on (gloo), as a node with several interfaces would.
    with ray_head({**node_env, "GLOO_SOCKET_IFNAME": space.host_if}, num_cpus=2, node_ip=space.host_ip) as head, \
            ray_node(head, space, {**node_env, "GLOO_SOCKET_IFNAME": space.ns_if}, num_cpus=2) as node:
        assert node_ips(head, node_env) == {space.host_ip, space.ns_ip}
        first = submit(head, node_env, "teacher.py", argv, job_env)
        try:
            # Spread: one rank on each node.
            pids = {r: wait_for_status(status_dir, r, lambda s: s["phase"] == "train", 400,
                                       alive=lambda: first.poll() is None)["pid"] for r in (0, 1)}
            on_node = [r for r, pid in pids.items() if pid in space.pids()]  # inside the second host
            assert len(on_node) == 1 and pids[1 - on_node[0]] in tree(head.pid), (pids, on_node)
            # The worker node is lost at the first step of epoch 3 (epoch 2's checkpoint is in the bucket): its
            # `ray start` and every process inside its namespace (raylet, agents, the training worker).
            hold = hold_rank(status_dir, on_node[0], phase="train", epoch=3)
            wait_for_status(status_dir, on_node[0], lambda s: s["held"], 400, alive=lambda: first.poll() is None)
            saved = [k for k in stack.s3.keys(BUCKET, f"runs/{name}-") if k.endswith("/meta.json")]
            assert saved, "no checkpoint in the bucket before the node kill"
            doomed = [psutil.Process(pid) for pid in space.pids()]  # everything on the second host
            t_kill = time.time()
            os.killpg(node.pid, signal.SIGKILL)
            for proc in doomed:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGKILL)
            _, alive = psutil.wait_procs(doomed, timeout=30)
            assert not alive, alive
            hold.unlink()
            # Resumed on the surviving node: new workers, both on the head, past epoch 2.
            wait_for_status(status_dir, 0, lambda s: s["pid"] != pids[0] and s["phase"] == "train", 400,
                            alive=lambda: first.poll() is None)
            resumed_s = time.time() - t_kill
            after = {r: wait_for_status(status_dir, r, lambda s, r=r: s["pid"] != pids[r], 400)["pid"] for r in (0, 1)}
            assert set(after.values()) <= tree(head.pid), after
            # The job's driver is killed while rank 0 starts epoch 5.
            hold = hold_rank(status_dir, 0, phase="train", epoch=5)
            wait_for_status(status_dir, 0, lambda s: s["held"], 400, alive=lambda: first.poll() is None)
            drivers = [p for p in psutil.Process(head.pid).children(recursive=True)
                       if p.name().startswith("python") and "pipelines/teacher.py" in p.cmdline()]
            assert len(drivers) == 1, [p.cmdline() for p in drivers]
            drivers[0].send_signal(signal.SIGKILL)
            hold.unlink()
            code, first_out = finish(first)
            (tmp_path / "first_job.log").write_text(first_out)
            assert code != 0, first_out[-2000:]
        except AssertionError as err:
            if first.poll() is None:
                first.kill()
            raise AssertionError(f"{err}\nthe first job's output:\n{first.communicate()[0][-5000:]}") from None
        finally:
            if first.poll() is None:
                first.kill()
        code, out = finish(submit(head, node_env, "teacher.py", [*argv, "--resume"], job_env))
        assert code == 0, out[-4000:]
        assert "registered model: models:/two-node-teacher@current" in out, out[-2000:]

        # Checkpoints in the bucket, none in the job's working-dir copy on the head.
        keys = stack.s3.keys(BUCKET, f"runs/{name}-")
        metas = sorted(k for k in keys if k.endswith("/meta.json"))
        assert metas and any(k.endswith("/rank1.complete") for k in keys), keys
        # (The console's log file is the one thing there; the job's output is kept by Ray: `ray job logs`.)
        copies = Path(head.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/runs")
        left = [p for copy in copies for p in copy.rglob("*") if p.is_file() and p.parent.name != "logs"]
        assert not left, left
        # One MLflow run on the server: the node loss as a restart, the driver kill as a resume, every epoch.
        run = run_of(client, "two-node")
        assert run.info.status == "FINISHED"
        assert int(run.data.tags["restarts"]) >= 1 and run.data.tags["driver_resumes"] == "1", run.data.tags
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val/AP")}
        (tmp_path / "resume_job.log").write_text(out)
        assert steps == set(range(1, 7)), (steps, f"job outputs in {tmp_path}")
        assert client.get_model_version_by_alias("two-node-teacher", "current").run_id == run.info.run_id

        # A 2-trial sweep on the same cluster, its trials on the server as nested runs.
        sweep_sets = [f"data.root={synthetic_root}", *TEST_DATA, "model.img_size=[64, 48]", "train.batch_size=8",
                      "train.warmup_iters=2", "train.lr_steps=[]", "data.loader_workers=0", "train.epochs=2",
                      f"ray.storage_path=s3://{BUCKET}/sweeps", f"ray.name=sweep-{name}",
                      "distill.teacher_uri=models:/two-node-teacher@current", "tracking.experiment=two-node-sweep",
                      "tune.search_space={distill.parts: {grid: [none, both]}}", "tune.grace_period=2"]
        code, out = finish(submit(head, node_env, "distill.py", [a for s in sweep_sets for a in ("--set", s)],
                                  {"MLFLOW_TRACKING_URI": mlflow_uri}))
        assert code == 0, out[-4000:]
        sweep = run_of(client, "two-node-sweep")
        exp = client.get_experiment_by_name("two-node-sweep").experiment_id
        parent = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]
        trials = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" in r.data.tags]
        assert len(parent) == 1 and len(trials) == 2, (parent, trials)
        assert {a.path for a in client.list_artifacts(parent[0].info.run_id)} >= {"sweep.png", "results.csv"}
        assert client.get_model_version_by_alias("vitpose-student", "champion")
        assert sweep is not None
    print(f"two-node test: {time.time() - t_start:.0f} s; resumed {resumed_s:.0f} s after the node kill; "
          f"checkpoints {len(metas)}")

"""Connecting to Ray and checking, before any work, that the cluster can hold what the config asks for.

Local by default (``ray.init()`` starts a private Ray); a cluster when ``RAY_ADDRESS`` is set or the
script was submitted with ``ray job submit`` (which sets it). Every Ray process gets where this process's object
storage and tracking server are (endpoint, region: ``vitpose.run.storage.credentials_env``) through the runtime
environment, never who we are there: Ray shows a runtime environment in its job metadata and logs it, so keys
and passwords come from each node's own environment or credential files (a local Ray's processes inherit this
one's). Impossible requests (more CPUs or GPUs than the cluster has, with no autoscaler to add them) fail here
with the fix, instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vitpose.config import ConfigError, one_line
from vitpose.run.storage import Storage, credentials_env
from vitpose.train.session import free_port

# The C heap's policy is set per model inside the worker (vitpose/train/heap.py), not here for every process.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}

_started_here = False  # connect() started or joined Ray in this process (not a caller's own ray.init)


def connect(num_cpus: int | None = None) -> dict[str, Any]:
    """Start or join Ray; returns the cluster's total resources."""
    import ray

    global _started_here
    if ray.is_initialized():
        return ray.cluster_resources()
    _started_here = True
    from vitpose.run.console import worker_env

    address = check_address()
    # Inside a `ray job submit`, variables the job's own runtime env sets already reach every process of the
    # job, and Ray refuses a ray.init that names them again.
    from_job = job_env_vars()
    env = {**WORKER_ENV, **worker_env(), **credentials_env()}
    runtime_env = {"env_vars": {k: v for k, v in env.items() if k not in from_job}}
    if address:
        if _host_port(address)[0] in ("127.0.0.1", "localhost", "::1"):
            _loopback_only(True)  # a loopback-only head answers only clients with the switch off
        try:
            context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as err:  # e.g. RAY_ADDRESS=auto with no cluster on this machine
            raise ConfigError(f"RAY_ADDRESS={address}: {one_line(err)}; start the head (ray start --head) or "
                              "unset RAY_ADDRESS to run on a local Ray") from None
    else:
        # "local": a private Ray, never one that a `ray start` left running on this machine (ray.init()
        # without an address joins that one, with someone else's workers and resources).
        _loopback_only(True)
        # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner asks whether a Train
        # controller still lives: without it the ranks of a sweep trial that Tune stopped stay placed for good.
        # The cleaner finds the API by RAY_API_SERVER_ADDRESS, else by looking for Ray on this machine, which
        # fails when there is more than one: every process of this Ray inherits the variable set here.
        port = free_port()
        _state_api_here(f"http://127.0.0.1:{port}")
        context = ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=True,
                           dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
    global _state_api
    _state_api = f"http://{context.dashboard_url}" if context.dashboard_url else ""
    return ray.cluster_resources()


def job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the runtime env of the Ray job this driver runs in (empty outside a job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    try:
        job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    except ValueError:
        return {}
    return dict((job.get("runtime_env") or {}).get("env_vars") or {})


def disconnect() -> None:
    """Leave Ray (stopping a local one) if ``connect`` joined it; a Ray the caller started is left alone."""
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        _started_here = False
        _loopback_only(False)
        _state_api_here(None)


_STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
_saved_state_api: tuple[str | None] | None = None
_state_api = ""  # the dashboard (state API) of the Ray connect() joined; "" when it has none


def _state_api_here(url: str | None) -> None:
    """Point Ray's state-API clients of this process and its children at ``url``, or restore what was there."""
    global _saved_state_api
    if url is not None:
        if _saved_state_api is None:
            _saved_state_api = (os.environ.get(_STATE_API_ENV),)
        os.environ[_STATE_API_ENV] = url
        return
    if _saved_state_api is not None:
        (before,) = _saved_state_api
        if before is None:
            os.environ.pop(_STATE_API_ENV, None)
        else:
            os.environ[_STATE_API_ENV] = before
        _saved_state_api = None


# Ray binds its servers to the node IP, and resolves 127.0.0.1 given as that IP to the machine's outward
# address (services.resolve_ip_for_localhost), so a private Ray listens on the network. With its multi-node
# switch off (what it does on Windows and macOS) the node IP is the loopback and nothing else is bound. A
# head started with the switch off (docs/cluster.md, one machine) times out clients that have it on, so drivers of a
# 127.0.0.1 address switch it off too; such a client also works with an ordinary head.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_saved_switch: tuple[str | None, bool] | None = None


def _loopback_only(on: bool) -> None:
    """Switch a private Ray to loopback-only (its child processes read the variable, this process the
    constant Ray computed from it at import), or restore what was there."""
    global _saved_switch
    from ray._private import ray_constants

    if on and _saved_switch is None:
        _saved_switch = (os.environ.get(_CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER)
        os.environ[_CLUSTER_SWITCH] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    elif not on and _saved_switch is not None:
        env, constant = _saved_switch
        if env is None:
            os.environ.pop(_CLUSTER_SWITCH, None)
        else:
            os.environ[_CLUSTER_SWITCH] = env
        ray_constants.ENABLE_RAY_CLUSTER = constant
        _saved_switch = None


def check_address() -> str | None:
    """``RAY_ADDRESS`` if set, after checking that something answers there (cheap: no Ray started)."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    return address or None


def _host_port(address: str) -> tuple[str | None, int | None]:
    if address == "auto":
        return None, None
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    return parsed.hostname, parsed.port


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, port = _host_port(address)
    if host is None or port is None:
        return
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        raise ConfigError(
            f"RAY_ADDRESS={address}: nothing answers at {host}:{port} ({err.strerror or err}); start the head "
            "(ray start --head) or unset RAY_ADDRESS to run on a local Ray"
        ) from None


def check_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float,
                    autoscaler: bool = False, keys: tuple[str, str] = ("ray.num_workers", "ray.cpus_per_worker"),
                    gpu_request: str = "ray.use_gpu=true", gpu_fix: str = "set ray.use_gpu=false (CPU training)",
                    extra_cpus: float = 0.0) -> None:
    """Refuse requests the cluster cannot satisfy now, unless it has an autoscaler to add nodes.

    ``keys`` name the config keys the worker count and CPUs per worker came from, ``gpu_request`` the setting
    that asked for GPUs and ``gpu_fix`` how to ask for none, so the message says which to change (a teacher
    run's ``ray.*``, a sweep's ``tune.*``); ``extra_cpus`` are needed beside the workers'.
    """
    import ray

    count_key, cpus_key = keys
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    problems = []
    if use_gpu and gpus < gpus_per_worker * num_workers:
        problems.append(
            f"{gpu_request} asks for {gpus_per_worker * num_workers:g} GPUs but the Ray cluster has "
            f"{gpus:g}; {gpu_fix} or connect to a GPU cluster with RAY_ADDRESS"
        )
    need = cpus_per_worker * num_workers + extra_cpus
    if need > cpus:
        beside = f" (+{extra_cpus:g} for the trial's own process)" if extra_cpus else ""
        problems.append(
            f"{count_key}={num_workers} x {cpus_key}={cpus_per_worker:g}{beside} needs {need:g} CPUs but the Ray cluster "
            f"has {cpus:g}; lower {count_key} or {cpus_key} (or set ray.autoscaler=true if the cluster adds nodes "
            "on demand)"
        )
    if problems and autoscaler:
        from vitpose.run.console import say

        say("warning: " + "; ".join(problems) + " (waiting for the autoscaler, ray.autoscaler=true)")
    elif problems:
        raise ConfigError(problems[0])


def check_state_api(needed_by: str) -> None:
    """Refuse, naming ``needed_by``, a cluster whose state API does not answer (a head started without its
    dashboard): Ray Train's placement-group cleaner asks it whether a Train controller still lives."""
    from ray.util.state import list_nodes

    fix = "start the head with its dashboard (ray start --head --include-dashboard=true)"
    if not _state_api:
        raise ConfigError(f"{needed_by} needs Ray's state API, which this cluster does not serve (no dashboard); {fix}")
    try:
        list_nodes(address=_state_api, limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as err:  # the state API's client raises several kinds, all meaning "not served"
        raise ConfigError(f"{needed_by} needs Ray's state API, which does not answer at {_state_api} "
                          f"({one_line(err)}); {fix}") from None


def run_name(storage: Path | Storage, name: str, resume: bool) -> str:
    """A new timestamped run name, or with ``resume`` the latest existing run folder of this name (in a local
    folder or on object storage)."""
    if resume:
        previous = sorted(p.name for p in Storage.of(storage).iterdir() if p.name.startswith(f"{name}-2"))
        if not previous:
            raise ConfigError(f"--resume: no earlier run named {name}-* in {storage}; run without --resume")
        return previous[-1]
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def job_working_copy(root: Path | None = None) -> Path | None:
    """The temporary copy of the repository this script runs from under ``ray job submit --working-dir``
    (Ray unpacks it below ``.../runtime_resources/working_dir_files/`` and deletes it with the job), else None."""
    from vitpose.config import REPO_ROOT

    root = root or REPO_ROOT
    return root if "working_dir_files" in root.parts else None


def check_outputs_outlive_job(storage: Path | None, tracking_uri: str, root: Path | None = None) -> None:
    """Refuse, before any work, a job whose checkpoints or MLflow store would land in its working-dir copy
    (relative paths resolve from the repository, here the copy): the job would succeed and lose them."""
    copy = job_working_copy(root)
    if copy is None:
        return
    lost = []
    if storage is not None and storage.is_relative_to(copy):  # None: object storage, outside any copy
        lost.append(f"ray.storage_path ({storage})")
    if tracking_uri.startswith("sqlite:///") and Path(tracking_uri[len("sqlite:///"):]).is_relative_to(copy):
        lost.append(f"the MLflow store ({tracking_uri})")
    if lost:
        raise ConfigError(
            f"{' and '.join(lost)} would be written inside this job's working-dir copy {copy}, which Ray deletes "
            "when the job ends; submit with --set ray.storage_path=<absolute shared path or s3://...> and the "
            "tracking URI in the job's environment: --runtime-env-json "
            "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://<server>:5000 or sqlite:////abs/path/mlflow.db\"}}'")

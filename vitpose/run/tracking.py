"""MLflow: where runs go, what they record, and the checks that make a bad tracking URI fail early.

The driver opens the run (so its id is known and an unreachable server fails before any training);
rank 0 of the workers attaches to the same run id and logs per-epoch metrics and prediction pictures.
A restarted worker group attaches to the same run again, so a run with restarts stays one run.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from vitpose.config import ConfigError, Section, dump_config, flatten, resolve_path

DEFAULT_DB = "runs/mlflow.db"
DEFAULT_ARTIFACTS = "runs/mlartifacts"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else a SQLite file under runs/ (the registry needs a DB)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        db = resolve_path(DEFAULT_DB)
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    return uri


# Where a database store's password comes from instead of its URI (the drivers read them themselves).
PASSWORD_ENV = {"postgresql": "PGPASSWORD (or ~/.pgpass)", "mysql": "the [client] password of ~/.my.cnf",
                "mssql": "the driver's own credential store", "http": "MLFLOW_TRACKING_PASSWORD"}
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the fix, when the tracking store cannot be used."""
    refuse_password(uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
        except (OSError, urllib.error.URLError) as err:
            raise ConfigError(
                f"MLflow tracking server {uri} is not reachable ({getattr(err, 'reason', err)}); start it "
                "(mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000) or "
                "unset MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from None
        check_credentials(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ConfigError(f"MLflow tracking URI {uri}: folder {folder} does not exist; create it or fix the URI")
    elif _db_kind(uri):
        probe_database(uri, timeout)
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"MLflow tracking URI {uri!r} is a file store, which has no model registry; use sqlite:///PATH.db "
            "or an http:// server"
        )


def _db_kind(uri: str) -> str | None:
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    return scheme if scheme in DB_PORTS else None


def refuse_password(uri: str, what: str = "MLflow tracking URI") -> None:
    """A URI is printed, logged with the run and handed to every worker: one with a password in it is refused
    in one line that names the URI without it and where the password goes instead."""
    try:
        parts = urllib.parse.urlsplit(uri)
        password = parts.password
    except ValueError:  # an unparsable netloc (bad port): the store's own check says what is wrong
        return
    if password is None:
        return
    host = parts.netloc.rsplit("@", 1)[1]
    scheme = parts.scheme.split("+", 1)[0].lower()
    kind = "http" if scheme in ("http", "https") else scheme
    if kind == "http":
        bare = parts._replace(netloc=host).geturl()
        raise ConfigError(f"{what} {bare} carries a user and password; give the bare URI and put them in "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    user = urllib.parse.unquote(parts.username or "")
    bare = parts._replace(netloc=f"{user}@{host}" if user else host).geturl()
    where = PASSWORD_ENV.get(kind, "the environment the store's driver reads")
    raise ConfigError(f"{what} {bare} carries a password; give the URI without it and the password in {where}")


def probe_database(uri: str, timeout: float) -> None:
    """A database store's host and port answer a TCP connect within ``timeout``: MLflow's engine would retry an
    unreachable one for minutes, silently (its messages go to the log file)."""
    import socket

    parts = urllib.parse.urlsplit(uri)
    host, port = parts.hostname, parts.port or DB_PORTS[_db_kind(uri) or ""]
    if not host:  # a Unix socket (host in the query): nothing to probe over TCP
        return
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        cause = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        user = f"{parts.username}@" if parts.username else ""
        bare = parts._replace(netloc=f"{user}{host}:{port}").geturl()
        raise ConfigError(f"MLflow tracking database {bare} is not reachable ({cause} within {timeout:g} s); "
                          "start it, fix the host/port, or unset MLFLOW_TRACKING_URI to use the local SQLite "
                          "store") from None


def check_credentials(uri: str) -> None:
    """A server with authentication (``mlflow server --app-name basic-auth``) answers /health to anyone; one
    real request tells whether the credentials from the environment are accepted."""
    import mlflow

    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as err:
        status = err.get_http_status_code()
        if status in (401, 403):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"user {user!r}" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
            raise ConfigError(f"MLflow server {uri} refused {who} (HTTP {status}); set MLFLOW_TRACKING_USERNAME "
                              "and MLFLOW_TRACKING_PASSWORD to an account of that server") from None
        raise


# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, "Evaluations"); ours are model
# training, so the runs table, their charts and artifacts are what it should open on.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(name: str, uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        refuse_lost_artifacts(name, exp.artifact_location)
        if not all(exp.tags.get(k) == v for k, v in EXPERIMENT_KIND.items()):
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri), tags=EXPERIMENT_KIND)


def artifact_location(uri: str) -> str | None:
    """A local store's artifacts go beside its database file (``runs/mlflow.db``: ``runs/mlartifacts``), so runs
    from any working folder, Ray's workers and a ``ray job submit`` (whose working folder is a copy Ray
    deletes) all write where the store is; a server decides for itself (None)."""
    db = sqlite_file(uri)
    return (db.parent / Path(DEFAULT_ARTIFACTS).name).as_uri() if db is not None else None


def refuse_lost_artifacts(name: str, location: str | None) -> None:
    """An experiment made by an earlier job inside its working-dir copy keeps pointing there: its models and
    pictures would go to a folder Ray deletes."""
    path = Path(urllib.parse.urlsplit(location or "").path)
    if "working_dir_files" in path.parts and "runtime_resources" in path.parts:
        raise ConfigError(f"MLflow experiment {name!r} keeps its artifacts in {location}, inside a Ray job's "
                          "working-dir copy that Ray deletes; log to a new experiment (--set tracking.experiment=...)")


def system_info() -> dict[str, str]:
    import torch

    return {
        "sys.python": platform.python_version(),
        "sys.torch": torch.__version__,
        "sys.cuda": str(torch.cuda.is_available()),
        "sys.cpu_count": str(os.cpu_count()),
        "sys.host": platform.node(),
    }


def start_driver_run(cfg: Section, uri: str, experiment: str, run_name: str, extra_tags: dict[str, str] | None = None,
                     parent_run_id: str | None = None, run_id: str | None = None,
                     experiment_id: str | None = None) -> str:
    """Create (or reopen, when ``run_id`` is given) the MLflow run and log the resolved config."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if run_id is None:
        exp_id = experiment_id or ensure_experiment(experiment, uri)
        tags = {"mlflow.runName": run_name, **(extra_tags or {})}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        params = flatten(cfg)
        params.update(system_info())
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifact(run_id, str(dump_config(cfg, Path(tmp) / "config.yaml")))
    return run_id


def ui_link(uri: str, run_id: str) -> str:
    """Where to see a run: the page itself, opened in the UI's model-training view (MLflow 3 starts a fresh
    browser in its GenAI view, where our runs read as "Evaluations")."""
    import mlflow

    exp = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


def log_json(uri: str, run_id: str, data: Any, name: str) -> None:
    import mlflow

    mlflow.MlflowClient(uri).log_dict(run_id, data, name)


def log_artifact(uri: str, run_id: str, path: Path, folder: str | None = None) -> None:
    import mlflow

    mlflow.MlflowClient(uri).log_artifact(run_id, str(path), folder)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import mlflow

    ts = int(time.time() * 1000)
    items = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in metrics.items()]
    if items:
        mlflow.MlflowClient(uri).log_batch(run_id, metrics=items)


def end_run(uri: str, run_id: str, status: str) -> None:
    import mlflow

    mlflow.MlflowClient(uri).set_terminated(run_id, status)


def increment_tag(uri: str, run_id: str, key: str) -> int:
    """Count an event (a restart, a resume) in a tag of the run; returns the new count."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    count = int(client.get_run(run_id).data.tags.get(key, "0")) + 1
    client.set_tag(run_id, key, str(count))
    return count


def start_trial_run(cfg: Section, uri: str, parent_run_id: str, trial_id: str, params: dict[str, Any]) -> str:
    """The nested MLflow run of one sweep trial; a restored trial finds and reuses its own run."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.trial_id = '{trial_id}' and tags.mlflow.parentRunId = '{parent_run_id}'")
    if found:
        return found[0].info.run_id
    name = f"trial-{trial_id}-" + "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items())
    return start_driver_run(cfg, uri, "", name[:200], extra_tags={"trial_id": trial_id, "sweep_params": str(params)},
                            parent_run_id=parent_run_id, experiment_id=parent.info.experiment_id)


# Rank 0's queue of tracking calls lives in vitpose.run.outbox; importable from here as before.
from vitpose.run.outbox import Outbox, TrackingUnavailable, WorkerTracker  # noqa: E402,F401


def sqlite_file(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, absolute (SQLAlchemy reads a relative one from the
    working folder), else None."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(os.path.abspath(uri[len("sqlite:///"):]))

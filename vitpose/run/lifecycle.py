"""A driver run's life, shared by a teacher run (``vitpose.train.driver``) and a sweep (``vitpose.distill.sweep``).

``open_run``: the storage probed (object storage answers in seconds, before Ray), outputs that must outlive a
``ray job submit`` working-dir copy, the run's name (new, or the latest with ``--resume``), generated data kept
outside a job copy, the pipeline's own data checks, the cluster connected and asked whether it can place one
unit of the work (a teacher run's workers, one sweep trial). ``DriverRun.start_tracking``: its MLflow run,
started or resumed, its id in the run folder. ``DriverRun.close`` / ``fail``: the run's status and the summary.
``checkpoint_of``: which of a Ray result's checkpoints is handed over (registered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitpose.config import ConfigError, one_line, resolve_path
from vitpose.run import cluster, console, tracking
from vitpose.run.storage import Storage, open_storage

RUN_ID_FILE = "mlflow_run_id.txt"


@dataclass(frozen=True)
class Request:
    """What one unit of the work asks of the cluster, and the config keys that asked (named in the refusal)."""

    workers: int
    cpus: float
    use_gpu: bool
    gpus: float
    keys: tuple[str, str] = ("ray.num_workers", "ray.cpus_per_worker")
    gpu_request: str = "ray.use_gpu=true"
    gpu_fix: str = "set ray.use_gpu=false (CPU training)"
    extra_cpus: float = 0.0  # beside the workers' (a multi-rank sweep trial's own process)


@dataclass
class DriverRun:
    cfg: Any
    tracking_uri: str
    storage: Storage
    name: str
    run_id: str = ""

    @property
    def folder(self) -> Storage:
        """The run folder: Ray's checkpoints or Tune's trials, and our side files (MLflow run id, fatal error)."""
        return self.storage / self.name

    def start_tracking(self, extra_tags: dict[str, str] | None = None) -> str:
        """Start the run's MLflow run, or continue the one its folder names (a resumed run logs to the same)."""
        previous = read_run_id(self.folder)
        self.run_id = tracking.start_driver_run(self.cfg, self.tracking_uri, self.cfg.tracking.experiment, self.name,
                                                extra_tags=extra_tags, run_id=previous)
        if previous:
            tracking.increment_tag(self.tracking_uri, self.run_id, "driver_resumes")
        write_run_id(self.folder, self.run_id)
        return self.run_id

    def close(self, summary: dict[str, Any]) -> int:
        tracking.end_run(self.tracking_uri, self.run_id, "FINISHED")
        for key, value in summary.items():
            console.say(f"{key:>18}: {value}")
        return 0

    def fail(self, message: str) -> int:
        try:
            tracking.end_run(self.tracking_uri, self.run_id, "FAILED")
        except Exception as err:  # noqa: BLE001 (the server may be what is away: the cause comes next)
            console.say(f"MLflow run {self.run_id} not marked FAILED ({one_line(err)[:120]})")
        console.error(message)
        return 1


def open_run(cfg: Any, tracking_uri: str, resume: bool, request: Request,
             check_data: Callable[[], None] | None = None) -> DriverRun:
    """Everything before the work starts, in the order that fails fastest (see the module docstring)."""
    storage = open_storage(cfg.ray.storage_path)
    cluster.check_outputs_outlive_job(storage.local_path if storage.is_local else None, tracking_uri)
    keep_outputs(cfg, tracking_uri)
    name = cluster.run_name(storage, cfg.ray.name, resume)
    if check_data is not None:
        check_data()
    cluster.connect()
    cluster.check_resources(request.workers, request.cpus, request.use_gpu, request.gpus, cfg.ray.autoscaler,
                            keys=request.keys, gpu_request=request.gpu_request, gpu_fix=request.gpu_fix,
                            extra_cpus=request.extra_cpus)
    return DriverRun(cfg, tracking_uri, storage, name)


def checkpoint_of(result: Any, metric: str, pick: str) -> tuple[Any, dict[str, Any]]:
    """The (checkpoint, metrics) of a Ray result to hand over: ``best`` (highest ``metric``: a teacher run) or
    ``last`` (latest epoch: a sweep trial, whose number is its last epoch's)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m and "epoch" in m]
    if not candidates:
        raise RuntimeError(f"{result.path} finished without a checkpoint that has {metric}; nothing to register")
    key = (lambda cm: cm[1][metric]) if pick == "best" else (lambda cm: cm[1]["epoch"])
    return max(candidates, key=key)


def checkpoint_meta(ckpt: Any) -> dict[str, Any]:
    """The meta file of a Ray ``Checkpoint`` (epoch, history, the precision it trained in), wherever it is stored."""
    import json

    from vitpose.train.run_folder import META_FILE

    return json.loads((Storage.from_filesystem(ckpt.filesystem, ckpt.path) / META_FILE).read_text())


def read_run_id(folder: Path | Storage) -> str | None:
    """The MLflow run a run folder (local or ``Storage``) belongs to, so a resumed run logs to the same run."""
    path = Storage.of(folder) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def write_run_id(folder: Path | Storage, run_id: str) -> None:
    (Storage.of(folder) / RUN_ID_FILE).write_text(run_id + "\n")


def durable_runs(tracking_uri: str | None) -> Path | None:
    """Where outputs the docs put under ``runs/`` go: the repository's ``runs/``; inside a ``ray job submit
    --working-dir`` copy (which Ray deletes with the job), the folder of the job's SQLite store when that lies
    outside the copy (docs/cluster.md's job line puts it in the submitter's ``runs/``); None when nothing says."""
    from vitpose.run.cluster import job_working_copy

    copy = job_working_copy()
    if copy is None:
        return resolve_path("runs")
    db = tracking.sqlite_file(tracking_uri)
    return db.parent if db is not None and not db.is_relative_to(copy) else None


def keep_outputs(cfg: Any, tracking_uri: str) -> None:
    """Point a generated (synthetic) dataset's relative ``data.root`` at ``durable_runs`` inside a job copy, in
    ``cfg`` itself so the workers get the same absolute path; refuse, before any work, one that would land in
    the copy with nothing durable to put it in."""
    from vitpose.run.cluster import job_working_copy

    copy = job_working_copy()
    if copy is None:
        return
    entries = [cfg.data, *(getattr(cfg.data, "datasets", None) or [])]
    for data in entries:
        if (data.kind or cfg.data.kind) != "synthetic" or not data.root or Path(data.root).is_absolute():
            continue
        runs = durable_runs(tracking_uri)
        parts = Path(data.root).parts
        if runs is None or parts[:1] != ("runs",):
            raise ConfigError(
                f"data.root={data.root} would be generated inside this job's working-dir copy {copy}, which Ray "
                "deletes when the job ends; give data.root as an absolute path every node sees, or the tracking "
                "URI as sqlite:////abs/path/runs/mlflow.db (outputs then go beside it)")
        if data is cfg.data and data.root == type(data)().root:
            data.synthetic.generate = True  # the default root, moved: generated there as it would be in runs/
        data.root = str(runs.joinpath(*parts[1:]))

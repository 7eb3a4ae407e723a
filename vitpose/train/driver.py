"""A teacher run, driver side: checks before any worker starts, the Ray Train ``TorchTrainer`` over
``vitpose.train.worker``, and the hand-off (best checkpoint registered in MLflow, curves, summary).

``train_teacher(cfg, resume)`` is what ``pipelines/teacher.py`` calls. Everything that can be wrong with the
config, the data, the storage, the tracking store or the cluster raises ``ConfigError`` before training starts.
The run folder (Ray's checkpoints and our side files: MLflow run id, fatal error) lives wherever
``ray.storage_path`` says: a local or shared folder, ``s3://`` or ``gs://`` (``vitpose.run.storage``).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

from vitpose.build import build_datasets, ensure_data
from vitpose.config import ConfigError, TeacherConfig, one_line, to_dict
from vitpose.run import cluster, console, tracking
from vitpose.run.lifecycle import Request, checkpoint_meta, checkpoint_of, open_run
from vitpose.run.storage import Storage
from vitpose.train.deepspeed_config import complete_deepspeed_config
from vitpose.train.worker import (
    WorkerJob,
    clear_fatal,
    read_fatal,
    stop_on_fatal_error,
    train_worker,
    worker_env,
)


def train_teacher(cfg: TeacherConfig, resume: bool = False) -> int:
    """Train, register and summarise; returns the exit code (1 when training failed)."""
    from ray.train import TrainingFailedError

    request = Request(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu, cfg.ray.gpus_per_worker)
    run = open_run(cfg, preflight(cfg), resume, request, check_data=lambda: check_data(cfg))
    run.folder.mkdir()
    clear_fatal(run.folder)
    run_id = run.start_tracking()
    console.say(f"MLflow run {run_id} ({run.tracking_uri}); Ray run folder {run.folder}")

    job = WorkerJob(config=to_dict(cfg), run_dir=run.folder.uri, tracking_uri=run.tracking_uri, mlflow_run_id=run_id)
    try:
        result = fit(cfg, job, run.name, run.storage)
    except TrainingFailedError as err:  # raised once Ray's retries (ray.max_failures) are spent
        return run.fail(f"training failed: {failure_cause(err, run.folder)}")
    return run.close(finish(cfg, result, run.tracking_uri, run_id))


def preflight(cfg: TeacherConfig) -> str:
    """Checks that need no Ray: DeepSpeed JSON, data folders, tracking store. Returns the tracking URI."""
    complete_deepspeed_config(cfg, cfg.ray.num_workers)
    cluster.check_address()
    if cfg.data.kind == "coco":
        root = cfg.data.root_path()
        for key in ("train_ann", "train_images", "val_ann", "val_images"):
            path = root / getattr(cfg.data, key)
            if not path.exists():
                raise ConfigError(f"data.{key}: {path} does not exist; set data.root to your COCO folder "
                                  f"(with annotations/ and images) or data.{key} to the right relative path")
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    return uri


def check_data(cfg: TeacherConfig) -> None:
    """Index the datasets here, once, so bad annotations and missing images stop the run (data.on_bad_sample=
    error) or are counted (skip) before any worker starts. Unreadable images only show while training."""
    from vitpose.data.coco import BadSampleError

    ensure_data(cfg)
    try:
        datasets = build_datasets(cfg, is_local_leader=False)
    except (BadSampleError, FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None
    for split, ds in zip(("train", "val"), datasets, strict=True):
        if ds.index_bad_counts:
            console.say(f"data: {split} set {ds.ann_file}: {len(ds)} instances; skipping bad annotations/images "
                        f"{ds.index_bad_counts} (data.on_bad_sample=skip)")


def failure_cause(error: BaseException, run_dir: Storage) -> str:
    """One line: the worker's own message, not Ray's wrapping of it with every rank's traceback."""
    try:
        recorded = read_fatal(run_dir)
    except OSError:  # the storage itself is what failed (an outage): Ray's error names it
        recorded = None
    if recorded:
        return recorded
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), error)
    cause = getattr(first, "cause", None) or first  # RayTaskError wraps the worker's exception
    return f"{one_line(cause)} (full traceback in the log file)"


def fit(cfg: TeacherConfig, job: WorkerJob, name: str, storage: Storage) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = TorchTrainer(
        functools.partial(train_worker, job),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources, placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage.uri,  # Ray persists checkpoints there itself (pyarrow, as we read it)
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep,
                                               checkpoint_score_attribute="val/AP", checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=[stop_on_fatal_error(Storage.parse(job.run_dir))] if job.run_dir else None,
        ),
    )
    return trainer.fit()


def finish(cfg: TeacherConfig, result: Any, tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Register the best checkpoint, log the curves and final metrics; returns what to print."""
    from vitpose.deploy.serving import register_checkpoint
    from vitpose.visualize import plot_curves

    best_ckpt, best_metrics = checkpoint_of(result, "val/AP", "best")
    latest = result.checkpoint or best_ckpt  # its meta only: on object storage nothing else is fetched
    latest_meta = checkpoint_meta(latest)
    version = register_checkpoint(
        tracking_uri, run_id, best_ckpt, cfg.tracking.registered_model, cfg.tracking.alias,
        tags={"val/AP": f"{best_metrics['val/AP']:.4f}", "epoch": str(best_metrics["epoch"]),
              "precision": latest_meta.get("precision", cfg.train.precision), "preset": cfg.model.preset},
        description=f"{cfg.model.preset} teacher, best val AP {best_metrics['val/AP']:.4f} at epoch "
                    f"{best_metrics['epoch']} of {cfg.train.epochs} (pipelines/teacher.py, run {run_id})")
    with tempfile.TemporaryDirectory(prefix="vp-curves-") as tmp:
        tracking.log_artifact(tracking_uri, run_id, plot_curves(latest_meta["history"],
                                                                Path(tmp) / "training_curves.png"))
    tracking.log_metrics(tracking_uri, run_id, {f"best/{k}": v for k, v in best_metrics.items()
                                                if k.startswith("val/")})
    bad = {k.removeprefix("bad_samples/"): int(v) for k, v in latest_meta["history"][-1].items()
           if k.startswith("bad_samples/")}
    if bad:
        tracking.log_json(tracking_uri, run_id, latest_meta.get("bad_samples", {}), "bad_samples.json")
    return {
        **({"bad samples": ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))} if bad else {}),
        "best val AP": f"{best_metrics['val/AP']:.4f} (epoch {best_metrics['epoch']})",
        "MLflow run": run_id,
        "registered model": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias} (version {version})",
        "best checkpoint": Storage.from_filesystem(best_ckpt.filesystem, best_ckpt.path).uri,
        "tracking URI": tracking_uri,
        "look at it": tracking.ui_link(tracking_uri, run_id),
    }

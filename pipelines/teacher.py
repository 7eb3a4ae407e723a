"""Train a ViTPose teacher with Ray Train + DeepSpeed and register it in MLflow.

    python pipelines/teacher.py                                   # embedded default, local Ray
    python pipelines/teacher.py --config configs/teacher/coco_vitpose_g.yaml --set ray.num_workers=64
    ray job submit --working-dir . -- python pipelines/teacher.py --config ...
    python pipelines/teacher.py --resume                          # continue the latest run of this name

Everything that can be wrong with the config, the tracking server or the cluster is checked before
any worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vitpose import raycluster, tracking
from vitpose.config import ConfigError, TeacherConfig, load_config, one_line, resolve_path, to_dict
from vitpose.dsconfig import complete_deepspeed_config

DEFAULT_CONFIG = "configs/teacher/synthetic_tiny.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the most recent run with this ray.name from its latest checkpoint")
    return p.parse_args(argv)


def preflight(cfg: TeacherConfig) -> str:
    """Checks that need no Ray: DeepSpeed JSON, data folders, tracking store. Returns the tracking URI."""
    from vitpose.tracking import check_tracking_uri, resolve_tracking_uri

    complete_deepspeed_config(cfg, cfg.ray.num_workers)
    raycluster.check_address()
    if cfg.data.kind == "coco":
        root = cfg.data.root_path()
        for key in ("train_ann", "train_images", "val_ann", "val_images"):
            path = root / getattr(cfg.data, key)
            if not path.exists():
                raise ConfigError(f"data.{key}: {path} does not exist; set data.root to your COCO folder "
                                  f"(with annotations/ and images) or data.{key} to the right relative path")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_tracking_uri(uri)
    return uri


def check_data(cfg: TeacherConfig) -> None:
    """Index the datasets here, once, so bad annotations and missing images stop the run (data.on_bad_sample=
    error) or are counted (skip) before any worker starts. Unreadable images only show while training."""
    from vitpose.data.coco import BadSampleError
    from vitpose.engine import build_datasets, ensure_data

    ensure_data(cfg)
    try:
        datasets = build_datasets(cfg, is_local_leader=False)
    except (BadSampleError, FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None
    for split, ds in zip(("train", "val"), datasets, strict=True):
        if ds.index_bad_counts:
            print(f"data: {split} set {ds.ann_file}: {len(ds)} instances; skipping bad annotations/images "
                  f"{ds.index_bad_counts} (data.on_bad_sample=skip)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        tracking_uri = preflight(cfg)
        storage = resolve_path(cfg.ray.storage_path)
        name = raycluster.run_name(storage, cfg.ray.name, args.resume)
        check_data(cfg)
        raycluster.connect()
        raycluster.check_resources(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu,
                                   cfg.ray.gpus_per_worker, cfg.ray.autoscaler)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from vitpose.engine import FATAL_FILE

    run_dir = storage / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FATAL_FILE).unlink(missing_ok=True)  # its cause may be fixed by now: --resume trains again
    id_file = run_dir / "mlflow_run_id.txt"
    resumed_run = id_file.read_text().strip() if id_file.is_file() else None
    run_id = tracking.start_driver_run(cfg, tracking_uri, cfg.tracking.experiment, name, run_id=resumed_run)
    if resumed_run:
        tracking.increment_tag(tracking_uri, run_id, "driver_resumes")
    id_file.write_text(run_id + "\n")
    print(f"MLflow run {run_id} ({tracking_uri}); Ray run folder {run_dir}", flush=True)

    from ray.train import TrainingFailedError

    try:
        result = fit(cfg, name, storage, tracking_uri, run_id)
    except TrainingFailedError as err:  # raised once Ray's retries (ray.max_failures) are spent
        print(f"error: training failed: {failure_cause(err, run_dir / FATAL_FILE)}", file=sys.stderr)
        tracking.end_run(tracking_uri, run_id, "FAILED")
        return 1
    summary = finish(cfg, result, tracking_uri, run_id)
    tracking.end_run(tracking_uri, run_id, "FINISHED")
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
    return 0


def failure_cause(error: BaseException, fatal_file: Path) -> str:
    """One line: the worker's own message, not Ray's wrapping of it with every rank's traceback."""
    if fatal_file.is_file():
        return json.loads(fatal_file.read_text())["message"]
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), error)
    cause = getattr(first, "cause", None) or first  # RayTaskError wraps the worker's exception
    return f"{one_line(cause)} (full traceback in the Ray worker logs above)"


def fit(cfg: TeacherConfig, name: str, storage: Path, tracking_uri: str, run_id: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vitpose.engine import STATUS_DIR_ENV, train_worker
    from vitpose.raycluster import WORKER_ENV

    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                           "run_dir": str(storage / name)},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep,
                                               checkpoint_score_attribute="val/AP", checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": {**WORKER_ENV, **{k: os.environ[k] for k in (STATUS_DIR_ENV,)
                                                               if k in os.environ}}},
        ),
    )
    return trainer.fit()


def finish(cfg: TeacherConfig, result: Any, tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Register the best checkpoint, log the curves and final metrics; returns what to print."""
    from vitpose import tracking
    from vitpose.engine import META_FILE, MODEL_FILE, verify_checkpoint
    from vitpose.serving import log_vitpose_model
    from vitpose.visualize import plot_curves

    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "val/AP" in m]
    if not candidates:
        raise RuntimeError("training finished without an evaluated checkpoint; nothing to register")
    best_ckpt, best_metrics = max(candidates, key=lambda cm: cm[1]["val/AP"])
    with best_ckpt.as_directory() as folder:
        folder = Path(folder)
        meta = verify_checkpoint(folder)
        model_meta = {"spec": meta["spec"], "keypoints": meta["keypoints"], "source_checkpoint": best_ckpt.path}
        version = log_vitpose_model(tracking_uri, run_id, folder / MODEL_FILE, model_meta,
                                    cfg.tracking.registered_model, cfg.tracking.alias)
    latest_meta = meta
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            latest_meta = json.loads((Path(folder) / META_FILE).read_text())
    curves = plot_curves(latest_meta["history"], resolve_path("runs") / "tmp" / f"{run_id}_curves.png")
    tracking.log_artifact(tracking_uri, run_id, curves)
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
        "best checkpoint": best_ckpt.path,
        "tracking URI": tracking_uri,
        "look at it": f"mlflow ui --backend-store-uri {tracking_uri}",
    }


if __name__ == "__main__":
    sys.exit(main())

"""Distill a registered teacher into small students: a Ray Tune sweep over distillation settings.

    python pipelines/distill.py                                       # embedded default, local Ray
    python pipelines/distill.py --config configs/distill/synthetic_tiny.yaml --set tune.num_samples=2
    ray job submit --working-dir . -- python pipelines/distill.py --config ...
    python pipelines/distill.py --resume                              # finish an interrupted sweep

Before any trial: the teacher is fetched once, the knowledge tokens of every token setting in the search
space are learned once, and (output distillation in bank mode) the teacher's heatmaps are stored once in
the view bank. Every trial is an MLflow run nested under the sweep's run; the best student is registered
with the alias from tune.alias (default ``champion``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from vitpose import raycluster, sweep, tracking
from vitpose.config import ConfigError, StudentConfig, load_config, resolve_path, to_dict
from vitpose.dsconfig import complete_deepspeed_config

DEFAULT_CONFIG = "configs/distill/synthetic_tiny.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="complete the latest sweep of this ray.name")
    return p.parse_args(argv)


def preflight(cfg: StudentConfig) -> str:
    complete_deepspeed_config(cfg, 1)
    sweep.search_space(cfg)
    if cfg.train.eval_every != 1:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every}: sweeps evaluate every epoch (ASHA compares "
                          "trials on val AP each epoch); set train.eval_every=1")
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    return uri


def fetch_teacher(cfg: StudentConfig, uri: str, folder: Path) -> tuple[Any, dict[str, Any], str]:
    """The teacher model, its meta, and an id that names exactly these weights (for caches)."""
    from safetensors.torch import save_file

    from vitpose.serving import META, WEIGHTS, load_vitpose

    teacher, meta = load_vitpose(cfg.distill.teacher_uri, uri)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in teacher.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps(meta, indent=1))
    digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()[:12]
    return teacher, meta, f"{cfg.distill.teacher_uri}#{digest}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, schema=StudentConfig)
        tracking_uri = preflight(cfg)
        storage = resolve_path(cfg.ray.storage_path)
        name = raycluster.run_name(storage, cfg.ray.name, args.resume)
        raycluster.connect()
        raycluster.check_resources(1, cfg.tune.cpus_per_trial, cfg.ray.use_gpu, cfg.ray.gpus_per_worker,
                                   cfg.ray.autoscaler, what="tune")
        sweep_dir = storage / name
        from vitpose.engine import ensure_data

        ensure_data(cfg)
        teacher, teacher_meta, teacher_id = fetch_teacher(cfg, tracking_uri, sweep_dir / "teacher")
        shared = prepare(cfg, teacher, teacher_meta, teacher_id, sweep_dir, tracking_uri, name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_sweep(cfg, shared, storage, name, args.resume)
    if results.num_errors and results.num_terminated == 0:
        print(f"error: every trial failed; first error: {results.errors[0]}", file=sys.stderr)
        tracking.end_run(tracking_uri, shared["parent_run_id"], "FAILED")
        return 1
    summary = finish(cfg, results, shared, tracking_uri, sweep_dir)
    tracking.end_run(tracking_uri, shared["parent_run_id"], "FINISHED")
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
    return 0


def prepare(cfg: StudentConfig, teacher: Any, teacher_meta: dict[str, Any], teacher_id: str, sweep_dir: Path,
            tracking_uri: str, name: str) -> dict[str, Any]:
    """Everything the trials share: parent run, tokens per setting, view bank."""
    from vitpose.distill import ViewBank, check_same_keypoints, ensure_knowledge_tokens
    from vitpose.engine import build_datasets

    train_ds, _ = build_datasets(cfg, is_local_leader=True)
    check_same_keypoints(teacher_meta, train_ds, cfg.distill.teacher_uri)
    student_size = tuple(cfg.model.img_size) if cfg.model.img_size else None
    if student_size and tuple(teacher.spec.img_size) != student_size:
        raise ConfigError(f"teacher input {list(teacher.spec.img_size)} differs from model.img_size "
                          f"{list(student_size)}; distillation compares heatmaps of the same crops: set "
                          f"model.img_size={list(teacher.spec.img_size)}")
    id_file = sweep_dir / "mlflow_run_id.txt"
    parent = tracking.start_driver_run(cfg, tracking_uri, cfg.tracking.experiment, name,
                                       extra_tags={"teacher": teacher_id},
                                       run_id=id_file.read_text().strip() if id_file.is_file() else None)
    id_file.write_text(parent + "\n")
    print(f"MLflow sweep run {parent} ({tracking_uri}); sweep folder {sweep_dir}", flush=True)

    token_dir = resolve_path("runs/distill/tokens")
    for setting in sweep.token_settings(cfg):
        path = ensure_knowledge_tokens(teacher, teacher_id, train_ds, setting, token_dir)
        tracking.log_artifact(tracking_uri, parent, path, "knowledge_tokens")
    bank_dir = None
    if sweep.needs_bank(cfg):
        o = cfg.distill.output
        key = hashlib.sha256(f"{teacher_id}|{o.views}|{cfg.train.seed}|{cfg.data.root}".encode()).hexdigest()[:16]
        bank_dir = resolve_path("runs/distill/banks") / key
        bank = ViewBank.build(teacher, train_ds, o.views, cfg.train.seed, bank_dir, teacher_id)
        tracking.log_json(tracking_uri, parent, bank.info, "view_bank.json")
    return {"base": to_dict(cfg), "tracking_uri": tracking_uri, "parent_run_id": parent,
            "teacher_dir": str(sweep_dir / "teacher"), "teacher_id": teacher_id,
            "token_dir": str(token_dir), "bank_dir": str(bank_dir) if bank_dir else None}


def run_sweep(cfg: StudentConfig, shared: dict[str, Any], storage: Path, name: str, resume: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(tune.with_parameters(sweep.run_trial, shared=shared),
                                    {"CPU": cfg.tune.cpus_per_trial})
    path = str(storage / name)
    if resume and tune.Tuner.can_restore(path):
        print(f"resuming sweep {path}: finished trials are kept, unfinished ones continue", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        return tuner.fit()
    t = cfg.tune
    # "epoch", not Tune's own iteration count: a trial restored from a checkpoint Tune had not recorded
    # (see TuneSession.latest_checkpoint) reports epochs its counter has not seen.
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=t.grace_period,
                               reduction_factor=t.reduction_factor) if t.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        param_space=sweep.search_space(cfg),
        tune_config=tune.TuneConfig(metric=t.metric, mode="max", scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=t.metric,
                                                                          checkpoint_score_order="max"),
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    return tuner.fit()


def finish(cfg: StudentConfig, results: Any, shared: dict[str, Any], tracking_uri: str, sweep_dir: Path) -> dict[str, Any]:
    """Results table and plot on the sweep run; the best student registered with the alias."""
    from vitpose.engine import MODEL_FILE, verify_checkpoint
    from vitpose.serving import log_vitpose_model

    metric, parent = cfg.tune.metric, shared["parent_run_id"]
    sweep.close_trial_runs(results, tracking_uri, parent)
    table = results.get_dataframe(filter_metric=metric, filter_mode="max")
    keep = [c for c in table.columns if c.startswith("config/")] + [c for c in (metric, "val/AR", "epoch", "trial_id")
                                                                     if c in table.columns]
    table = table[keep].sort_values(metric, ascending=False)
    table_path = sweep_dir / "results.csv"
    table.to_csv(table_path, index=False)
    tracking.log_artifact(tracking_uri, parent, table_path)
    tracking.log_artifact(tracking_uri, parent, sweep.plot_sweep(table, metric, sweep_dir / "sweep.png"))

    best = results.get_best_result(metric=metric, mode="max", scope="all")
    candidates = [(c, m) for c, m in (best.best_checkpoints or []) if metric in m]
    ckpt, metrics = max(candidates, key=lambda cm: cm[1][metric])
    with ckpt.as_directory() as folder:
        meta = verify_checkpoint(Path(folder))
        model_meta = {"spec": meta["spec"], "keypoints": meta["keypoints"], "source_checkpoint": ckpt.path,
                      "teacher": shared["teacher_id"], "trial_params": best.config}
        version = log_vitpose_model(tracking_uri, parent, Path(folder) / MODEL_FILE, model_meta,
                                    cfg.tune.registered_model, cfg.tune.alias)
    tracking.log_metrics(tracking_uri, parent, {f"best/{metric}": metrics[metric]})
    return {
        "trials": f"{len(results)} ({results.num_errors} failed)",
        "best val AP": f"{metrics[metric]:.4f} with {best.config}",
        "registered model": f"models:/{cfg.tune.registered_model}@{cfg.tune.alias} (version {version})",
        "results table": str(table_path),
        "MLflow sweep run": parent,
        "look at it": f"mlflow ui --backend-store-uri {tracking_uri}",
    }


if __name__ == "__main__":
    sys.exit(main())

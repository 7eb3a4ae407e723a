"""The distillation sweep, driver side: prepare once, run the Tune trials, hand over the champion.

``run_sweep(cfg, resume)`` is what ``pipelines/distill.py`` calls. Before any trial: the teacher is fetched
from the registry to the sweep folder, the knowledge tokens of every token setting in the search space are
learned once, and (bank mode) the views every arm trains on are stored once in the view bank, with the
teacher's heatmaps. Every trial is an MLflow run nested under the sweep's run, which also gets a results table
and a plot; the student with the best val AP after its last epoch is registered with the alias ``tune.alias``.

The sweep folder (Tune's state, the trials' checkpoints, the MLflow run id, results.csv, sweep.png) is wherever
``ray.storage_path`` says: a local or shared folder, ``s3://`` or ``gs://`` (``vitpose.run.storage``). Tokens, view
banks and (with object storage) the teacher's copy stay a local cache under ``runs/distill``: named by what
produced them, rebuilt identically when missing, and read by trials from disk (banks are memory-mapped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitpose.build import build_datasets, ensure_data
from vitpose.config import ConfigError, StudentConfig, resolve_path, to_dict
from vitpose.distill.bank import ViewBank, bank_key, data_identity
from vitpose.distill.report import log_settings, plot_sweep, trial_curves
from vitpose.distill.space import (
    arm_configs,
    asks_for_unlabeled,
    preparation,
    search_space,
    trial_preparations,
    uses_unlabeled,
)
from vitpose.distill.stats import SEED_KEY, Setting, group_by_setting, spread, verdict
from vitpose.distill.teacher import check_same_keypoints, load_teacher, pinned, teacher_identity
from vitpose.distill.tokens import TOKEN_DIR, ensure_knowledge_tokens
from vitpose.distill.trial import TRIAL_DRIVER_CPUS, SweepContext, run_trial
from vitpose.distill.unlabeled import describe, unlabeled_bank_key, unlabeled_dataset, unlabeled_paths
from vitpose.run import console, tracking
from vitpose.run.cluster import check_state_api
from vitpose.run.lifecycle import DriverRun, Request, checkpoint_meta, checkpoint_of, open_run
from vitpose.run.storage import Storage
from vitpose.train.deepspeed_config import complete_deepspeed_config

BANK_DIR = "runs/distill/banks"
TEACHER_CACHE = "runs/distill/teachers"  # the online teacher's copy when the sweep folder is on object storage


def run_sweep(cfg: StudentConfig, resume: bool = False) -> int:
    """Prepare, sweep, register and summarise; returns the exit code (1 when every trial failed)."""
    run = open_run(cfg, preflight(cfg), resume, trial_request(cfg), check_data=lambda: check_inputs(cfg))
    if cfg.tune.workers_per_trial > 1 and cfg.tune.scheduler == "asha":
        # A trial ASHA stops dies with its Train controller; only the cleaner frees its ranks for the next trial.
        check_state_api(f"tune.workers_per_trial={cfg.tune.workers_per_trial} with tune.scheduler=asha "
                        "(to free the ranks of a stopped trial; or set tune.scheduler=fifo)")
    context = prepare(cfg, run)
    results = run_tune(cfg, context, run.storage, run.name, resume)
    if results.num_errors and results.num_terminated == 0:
        return run.fail(f"every trial failed; first error: {results.errors[0]}")
    return run.close(finish(cfg, results, context, run.folder))


def plan_sweep(cfg: StudentConfig, as_json: bool = False) -> int:
    """``--plan``: the sweep's arms as they would train, from the registered teacher; no student is trained."""
    from vitpose.distill.plan import print_plan, sweep_plan

    tracking_uri = preflight(cfg)
    check_inputs(cfg)
    plan = sweep_plan(cfg, tracking_uri)
    print_plan(plan)
    if as_json:
        console.say(json.dumps(plan))
    return 0


def check_inputs(cfg: StudentConfig) -> None:
    """The training data (a synthetic set generated first) and the unlabeled set, before Ray starts."""
    ensure_data(cfg)
    for c in unlabeled_configs(cfg):
        unlabeled_paths(c)


def unlabeled_configs(cfg: StudentConfig) -> list[StudentConfig]:
    """The sweep's arms that ask for the unlabelled set (an unlabelled share of output distillation's crops)."""
    return [c for c in arm_configs(cfg).values() if asks_for_unlabeled(c)]


def trial_request(cfg: StudentConfig) -> Request:
    """What one trial asks of the cluster: its ranks, and beside them its own process when that is not rank 0."""
    t = cfg.tune
    return Request(t.workers_per_trial, t.cpus_per_worker, t.gpus_per_worker > 0, t.gpus_per_worker,
                   keys=("tune.workers_per_trial", "tune.cpus_per_worker"),
                   gpu_request=f"tune.gpus_per_worker={t.gpus_per_worker:g}",
                   gpu_fix="set tune.gpus_per_worker=0 for CPU trials",
                   extra_cpus=TRIAL_DRIVER_CPUS if t.workers_per_trial > 1 else 0.0)


def preflight(cfg: StudentConfig) -> str:
    """Checks that need no Ray and no teacher; returns the tracking URI."""
    complete_deepspeed_config(cfg, cfg.tune.workers_per_trial)
    search_space(cfg)
    trial_preparations(cfg)  # refuses sampled keys that would change the tokens or the bank
    if cfg.ray.use_gpu:
        raise ConfigError("ray.use_gpu is for teacher runs; a sweep's trials get GPUs from tune.gpus_per_worker "
                          "(e.g. 0.25: four students per GPU)")
    with_unlabeled = unlabeled_configs(cfg)
    if any(c.distill.output.mode != "bank" for c in with_unlabeled):
        raise ConfigError("distill.unlabeled needs distill.output.mode=bank: the teacher labels the unlabelled crops "
                          "once, into the view bank")
    if with_unlabeled and cfg.data.datasets:
        raise ConfigError("distill.unlabeled with data.datasets: unlabeled crops have no dataset of their own to be "
                          "labelled for; distill from one dataset (leave data.datasets empty)")
    if cfg.train.eval_every != 1 and cfg.tune.scheduler == "asha":
        raise ConfigError(f"train.eval_every={cfg.train.eval_every}: ASHA compares trials on val AP every epoch; set "
                          "train.eval_every=1, or tune.scheduler=fifo (every trial runs its whole budget)")
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    return uri


def teacher_folder(sweep_dir: Storage) -> Path:
    """Where the sweep keeps its local copy of the teacher for online-teacher trials: in the sweep folder when
    that is local, else in the local cache beside the tokens and banks (trials read it from disk)."""
    return sweep_dir.local_path / "teacher" if sweep_dir.is_local else resolve_path(TEACHER_CACHE) / sweep_dir.name


def fetch_teacher(cfg: StudentConfig, tracking_uri: str, folder: Path) -> tuple[Any, dict[str, Any], str]:
    """The teacher model, its meta, and an id that names exactly these weights (for the token and bank keys);
    kept in ``folder`` so online-teacher trials load it from there, not from the registry."""
    from safetensors.torch import save_file

    from vitpose.models.loading import META, WEIGHTS

    uri = pinned(cfg.distill.teacher_uri, tracking_uri)  # the version the alias names now, kept as it is
    teacher = load_teacher(cfg, tracking_uri, uri)  # a multi-dataset teacher: the student's dataset's
    meta = teacher.meta
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps(meta, indent=1))
    return teacher, meta, teacher_identity(uri, (folder / WEIGHTS).read_bytes())


def prepare(cfg: StudentConfig, run: DriverRun) -> SweepContext:
    """Everything the trials share: the teacher, the sweep's MLflow run, tokens per setting, the view bank."""
    sweep_dir, tracking_uri = run.folder, run.tracking_uri
    teacher, teacher_meta, teacher_id = fetch_teacher(cfg, tracking_uri, teacher_folder(sweep_dir))
    train_ds, _ = build_datasets(cfg, is_local_leader=True)
    check_same_keypoints(teacher_meta, train_ds, cfg.distill.teacher_uri)
    student_size = tuple(cfg.model.img_size) if cfg.model.img_size else None
    if student_size and tuple(teacher.spec.img_size) != student_size:
        raise ConfigError(f"teacher input {list(teacher.spec.img_size)} differs from model.img_size "
                          f"{list(student_size)}; distillation compares heatmaps of the same crops: set "
                          f"model.img_size={list(teacher.spec.img_size)}")
    parent = run.start_tracking(extra_tags={"teacher": teacher_id})
    console.say(f"MLflow sweep run {parent} ({tracking_uri}); sweep folder {sweep_dir}")

    token_dir, bank_root = resolve_path(TOKEN_DIR), resolve_path(BANK_DIR)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the driver's: a GPU head learns on its GPU
    banks: set[str] = set()
    datasets = {(data_identity(cfg), cfg.train.seed): train_ds}  # the crops follow the data and the seed
    trials = trial_preparations(cfg)
    with_tokens = set()  # the banks that also hold the teacher's tokens, for the trials that distill them
    for trial in (t for t in trials if t.distill.feature.weight > 0):
        with_tokens.add(bank_key(teacher_id, trial))
        if uses_unlabeled(trial):
            with_tokens.add(unlabeled_bank_key(teacher_id, trial))
    for trial in trials:
        setting, stream = preparation(trial)
        key = (data_identity(trial), trial.train.seed)
        if key not in datasets:
            datasets[key] = build_datasets(trial, is_local_leader=True)[0]
        trial_train = datasets[key]
        if setting is not None:
            path = ensure_knowledge_tokens(teacher, teacher_id, trial_train, setting, token_dir, device=device)
            tracking.log_artifact(tracking_uri, parent, path, "knowledge_tokens")
        if stream is None:
            continue
        o, seed = trial.distill.output, trial.train.seed
        made = []
        if (key := bank_key(teacher_id, trial)) not in banks:
            flips = trial_train.flip_pairs if o.flip_average else None
            made.append(ViewBank.build(teacher, trial_train, o.views, seed, bank_root / key, teacher_id,
                                       device=device, flip_pairs=flips, features=key in with_tokens))
        if uses_unlabeled(trial) and (key := unlabeled_bank_key(teacher_id, trial)) not in banks:
            unlabeled = unlabeled_dataset(trial, trial_train)
            console.say(describe(unlabeled))
            made.append(ViewBank.build(teacher, unlabeled, o.views, seed, bank_root / key, teacher_id,
                                       device=device, flip_pairs=unlabeled.flip_pairs, features=key in with_tokens))
        for bank in made:
            banks.add(bank.folder.name)
            tracking.log_json(tracking_uri, parent, {**bank.info, "stream": json.loads(stream)},
                              f"view_banks/{bank.folder.name}.json")
    return SweepContext(base_config=to_dict(cfg), tracking_uri=tracking_uri, parent_run_id=parent,
                        teacher_dir=str(teacher_folder(sweep_dir)), teacher_id=teacher_id, token_dir=str(token_dir),
                        bank_dir=str(bank_root) if banks else None, trials_uri=sweep_dir.uri,
                        teacher_width=teacher.spec.embed_dim)


def run_tune(cfg: StudentConfig, context: SweepContext, storage: Storage, name: str, resume: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    one_rank = t.workers_per_trial == 1  # then the trial's process is its rank; else its Train run asks for them
    resources = {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker} if one_rank else {"CPU": TRIAL_DRIVER_CPUS}
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    path = (storage / name).uri  # Tune keeps its state and the trials' checkpoints there (local or a URI)
    if resume and tune.Tuner.can_restore(path):
        console.say(f"resuming sweep {path}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        return tuner.fit()
    # "epoch", not Tune's own iteration count: a trial restored from a checkpoint Tune had not recorded
    # (see TuneSession.latest_checkpoint) reports epochs its counter has not seen.
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=t.grace_period,
                               reduction_factor=t.reduction_factor) if t.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric=t.metric, mode="max", scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=concurrent_trials(cfg)),
        run_config=tune.RunConfig(name=name, storage_path=storage.uri,
                                  # The newest two: a trial's number is its final epoch, never its best on val.
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="epoch",
                                                                          checkpoint_score_order="max"),
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    return tuner.fit()


def concurrent_trials(cfg: StudentConfig) -> int:
    """``tune.max_concurrent_trials``, or fewer when that many multi-rank trials do not fit the cluster at once: a
    Train run that cannot place its ranks waits, retrying, while holding its trial's place."""
    import ray

    t = cfg.tune
    if t.workers_per_trial == 1:
        return t.max_concurrent_trials  # Tune places one-rank trials itself
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0.0) // (t.workers_per_trial * t.cpus_per_worker + TRIAL_DRIVER_CPUS)]
    if t.gpus_per_worker > 0:
        fits.append(total.get("GPU", 0.0) // (t.workers_per_trial * t.gpus_per_worker))
    fit = max(1, int(min(fits)))
    if fit < t.max_concurrent_trials and not cfg.ray.autoscaler:
        console.say(f"tune.max_concurrent_trials={t.max_concurrent_trials}: {fit} trial(s) of "
                    f"{t.workers_per_trial} ranks fit this cluster at once; running {fit} at a time")
        return fit
    return t.max_concurrent_trials


def finish(cfg: StudentConfig, results: Any, context: SweepContext, sweep_dir: Storage) -> dict[str, Any]:
    """Results table and plot on the sweep run; the champion registered with the alias.

    A trial's number is its metric after its last epoch (choosing each trial's best epoch on the validation
    set would select on the data it is measured on); the champion is the trial with the best such number
    among those that trained every epoch (see ``champion``).
    """
    from vitpose.deploy.serving import register_checkpoint

    metric, parent, uri = cfg.tune.metric, context.parent_run_id, context.tracking_uri
    close_trial_runs(results, uri, parent)
    table = results.get_dataframe()  # each trial's last report
    keep = [c for c in table.columns if c.startswith("config/")] + [c for c in (metric, "val/AR", "epoch", "trial_id")
                                                                     if c in table.columns]
    table = table[keep]
    table.insert(len(table.columns), "finished", table["epoch"].astype(int) == cfg.train.epochs)
    table = table.sort_values(["finished", metric], ascending=False)
    finished = finished_trials(results, metric, cfg.train.epochs)
    answer = verdict(group_by_setting([(r.config, r.metrics[metric]) for r in finished]), cfg.tune.baseline)
    with sweep_dir.as_local_dir(contents=False) as out:  # object storage: written here, then uploaded
        table_path = out / "results.csv"
        table.to_csv(table_path, index=False)
        tracking.log_artifact(uri, parent, table_path)
        plot = plot_sweep(table, metric, out / "sweep.png", trial_curves(results, metric), cfg.train.epochs,
                          answer["ranked"])
        tracking.log_artifact(uri, parent, plot)
        if not sweep_dir.is_local:
            sweep_dir.upload(out)
    # Under FIFO a trial short of its budget was interrupted (the sweep stopped, the trial failed), not judged.
    stopper = "ASHA stopped it" if cfg.tune.scheduler == "asha" else "it stopped"
    for _, row in table.iterrows():
        settings = ", ".join(f"{c.removeprefix('config/')}={row[c]}" for c in table.columns if c.startswith("config/"))
        last = f"after epoch {int(row['epoch'])}, its last" if row["finished"] else \
            f"when {stopper} at epoch {int(row['epoch'])} of {cfg.train.epochs}: not compared"
        console.say(f"  trial {row.get('trial_id', '?')}: {metric} {row[metric]:.4f} {last} ({settings})")

    top: Setting = answer["champion"]
    mean, low, high = top.stats
    best = max((r for r in finished if {k: v for k, v in r.config.items() if k != SEED_KEY} == top.params),
               key=lambda r: r.metrics[metric])  # the champion setting's best seed is the model handed over
    log_settings(answer["ranked"], cfg, uri, parent)
    ckpt, metrics = last_checkpoint(best, metric)
    trained_in = checkpoint_meta(ckpt).get("precision", cfg.train.precision)  # what train.precision=auto picked
    tags = {"setting": top.label, "seeds": str(len(top.by_seed)), f"{metric} mean": f"{mean:.4f}",
            f"{metric} interval": spread(top), f"{metric} this seed": f"{metrics[metric]:.4f}",
            "teacher": context.teacher_id, "precision": trained_in}
    version = register_checkpoint(uri, parent, ckpt, cfg.tune.registered_model, cfg.tune.alias,
                                  lineage={"teacher": context.teacher_id, "trial_params": best.config,
                                           "epoch": metrics["epoch"]}, tags=tags,
                                  description=f"student distilled from {context.teacher_id}: {answer['line']}")
    tracking.log_metrics(uri, parent, {f"champion/{metric}": metrics[metric], f"champion/{metric}_mean": mean,
                                       **({f"champion/{metric}_ci_low": low, f"champion/{metric}_ci_high": high}
                                          if len(top.by_seed) > 1 else {})})
    leads = {f"lead {i + 1}": line for i, line in enumerate(answer["leads"])}
    return {
        "trials": f"{len(results)} ({results.num_errors} failed)",
        "champion": answer["line"],
        **leads,
        "registered": f"its best seed, val AP {metrics[metric]:.4f} (last epoch) with {best.config}",
        "registered model": f"models:/{cfg.tune.registered_model}@{cfg.tune.alias} (version {version})",
        "results table": str(sweep_dir / "results.csv"),
        "MLflow sweep run": parent,
        "look at it": tracking.ui_link(uri, parent),
    }


def finished_trials(results: Any, metric: str, epochs: int) -> list[Any]:
    """The trials that trained all ``epochs``: a trial ASHA stopped early reported its number at an earlier
    epoch, which is not comparable with a finished trial's, so it never competes."""
    finished = [r for r in results if r.error is None and r.metrics and metric in r.metrics
                and int(r.metrics.get("epoch", 0)) == epochs]
    if not finished:
        raise RuntimeError(f"no trial trained all {epochs} epochs; nothing to register (see the trials' errors)")
    return finished


def last_checkpoint(result: Any, metric: str) -> tuple[Any, dict[str, Any]]:
    """A finished trial's last checkpoint and the metrics reported with it. A one-rank trial reported it to
    Tune; a multi-rank trial's Train run kept it and Tune has its path (``checkpoint_path``)."""
    from ray.train import Checkpoint
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    if result.best_checkpoints:
        return checkpoint_of(result, metric, "last")
    path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
    if not path:
        raise RuntimeError(f"{result.path} finished without a checkpoint; nothing to register")
    return Checkpoint(path, filesystem=result.filesystem), result.metrics


def champion(results: Any, metric: str, epochs: int) -> Any:
    """The finished trial with the best ``metric``."""
    return max(finished_trials(results, metric, epochs), key=lambda r: r.metrics[metric])


def close_trial_runs(results: Any, tracking_uri: str, parent_run_id: str) -> None:
    """Mark each trial's nested MLflow run FINISHED (or FAILED, for trials that errored)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    by_trial = {r.data.tags.get("trial_id"): r for r in runs}
    for result in results:
        run = by_trial.get((result.metrics or {}).get("trial_id"))
        if run is not None and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED" if result.error else "FINISHED")

"""One trial of the distillation sweep: a student trained by the shared ``Trainer`` under Ray Tune.

A trial of ``tune.workers_per_trial`` = 1 trains in the Tune trial's own process. With more, the trial drives
a Ray Train run of that many ranks (Ray's Tune + Train integration: a ``TorchTrainer`` inside the trial, its
epochs passed to Tune by a ``TuneReportCallback``); Ray Train restarts a lost rank's worker group from the
trial's last checkpoint and the other trials never notice. Starting a Train controller and worker group costs
~30 s per trial on 2 cores (benchmarks/trial_ranks.py), which is why one rank does without.

What a trial needs from the driver's preparation comes in one frozen ``SweepContext``; what Tune sampled
for it comes as ``params``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitpose.build import build_datasets
from vitpose.config import StudentConfig, to_dict
from vitpose.distill.bank import BankedViews, ViewBank, bank_key
from vitpose.distill.space import apply_params, uses_unlabeled
from vitpose.distill.student import build_student, distill_loss
from vitpose.distill.teacher import frozen
from vitpose.distill.tokens import tokens_for
from vitpose.distill.unlabeled import MixedViews, unlabeled_bank_key, unlabeled_dataset
from vitpose.train.session import STATUS_DIR_ENV

TRIAL_DRIVER_CPUS = 0.01  # a multi-rank trial's own process only waits on its Train run (Tune refuses 0)
TRAIN_FOLDER = "train"  # a multi-rank trial's Ray Train run, inside the trial's folder


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep shares, made once by the driver before the trials start.

    Args:
        base_config: the sweep's resolved config as plain data; each trial writes its params into it.
        tracking_uri: the MLflow store; parent_run_id: the sweep's run, parent of every trial's run.
        teacher_dir: the teacher fetched to local storage (model.safetensors + vitpose_meta.json).
        teacher_id: names exactly those weights (registry URI + content digest); keys tokens and bank.
        teacher_width: the teacher's token width (the students' feature projectors map to it).
        token_dir: where the knowledge-token files are; bank_dir: the folder of the view banks (one per
        ``bank_key``), None in online mode.
        trials_uri: the sweep's Tune folder (local or a storage URI), where multi-rank trials keep their
        Train runs.
    """

    base_config: dict[str, Any]
    tracking_uri: str
    parent_run_id: str
    teacher_dir: str
    teacher_id: str
    token_dir: str
    bank_dir: str | None
    trials_uri: str = ""
    teacher_width: int = 0


@dataclass(frozen=True)
class StudentJob:
    """One trial's training, as every rank of it needs it: the trial's config (params applied), the sweep's
    context, the trial's MLflow run and, for a multi-rank trial, its Train run folder."""

    config: dict[str, Any]
    context: SweepContext
    run_id: str
    trial_id: str
    run_dir: str | None = None


def run_trial(params: dict[str, Any], context: SweepContext) -> None:
    """Tune's function trainable (bound with ``tune.with_parameters(run_trial, context=...)``)."""
    from ray import tune

    from vitpose.run.tracking import start_trial_run
    from vitpose.train.session import TuneSession, single_process_env

    logging.basicConfig(level=logging.WARNING)
    params = dict(params)
    cfg = apply_params(StudentConfig.model_validate(context.base_config), params)
    trial = tune.get_context()
    trial_id = trial.get_trial_id()
    run_id = start_trial_run(cfg, context.tracking_uri, context.parent_run_id, trial_id, params)
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if status_dir:  # each trial's ranks write rank<R>.json in a folder of their own
        os.environ[STATUS_DIR_ENV] = str(Path(status_dir) / trial_id)
    job = StudentJob(to_dict(cfg), context, run_id, trial_id)
    if cfg.tune.workers_per_trial == 1:
        # A one-rank process group of its own: its own port, so concurrent trials never meet.
        os.environ.update(single_process_env())
        train_student(job, TuneSession(cfg.tune.metric))
        return
    trial_folder = f"{context.trials_uri.rstrip('/')}/{Path(trial.get_trial_dir()).name}"
    fit_on_workers(cfg, dataclasses.replace(job, run_dir=f"{trial_folder}/{TRAIN_FOLDER}"), trial_folder)


def fit_on_workers(cfg: StudentConfig, job: StudentJob, trial_folder: str) -> None:
    """The trial's Ray Train run: ``tune.workers_per_trial`` ranks, its checkpoints in the trial's folder.
    Run again after the trial was restored (a sweep ``--resume``), it continues from that folder's checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from vitpose.run.storage import Storage
    from vitpose.train.worker import stop_on_fatal_error, worker_env

    t = cfg.tune
    trainer = TorchTrainer(
        functools.partial(student_worker, job),
        scaling_config=ScalingConfig(num_workers=t.workers_per_trial, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker},
                                     placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(
            name=TRAIN_FOLDER, storage_path=trial_folder,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            # The newest two: a trial's number is its final epoch, never its best on val.
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="epoch",
                                               checkpoint_score_order="max"),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=[epochs_to_tune(t.metric), stop_on_fatal_error(Storage.parse(job.run_dir))],
        ),
    )
    trainer.fit()


def student_worker(job: StudentJob) -> None:
    """What Ray Train runs on every rank of a multi-rank trial."""
    from vitpose.train.session import RaySession
    from vitpose.train.worker import recording_fatal_errors

    logging.basicConfig(level=logging.WARNING)
    session = RaySession(job.run_dir)
    with recording_fatal_errors(job.run_dir, session.rank):
        train_student(job, session)


def train_student(job: StudentJob, session: Any) -> None:
    """One rank's training of the trial's student: its data (the bank's views), tokens, teacher and loss."""
    import ray

    from vitpose.models import create
    from vitpose.run.tracking import WorkerTracker
    from vitpose.train.loop import Trainer

    cfg, context = StudentConfig.model_validate(job.config), job.context
    tracker = None
    if session.rank == 0:
        tracker = WorkerTracker(context.tracking_uri, job.run_id, cfg.tracking.outage_patience_s, background=False)
        # Which GPU share Ray gave this trial (tune.gpus_per_worker), as the run's record of where it trained.
        tracker.client.set_tag(job.run_id, "ray_gpu_ids", ",".join(str(g) for g in ray.get_gpu_ids()) or "none")
        tracker.client.set_tag(job.run_id, "workers", str(session.world_size))

    train_ds, val_ds = build_datasets(cfg, is_local_leader=False)
    model = build_student(cfg, tokens_for(cfg, Path(context.token_dir), context.teacher_id), context.teacher_width)
    out, seed, features = cfg.distill.output, cfg.train.seed, cfg.distill.feature.weight > 0
    if out.mode == "bank":
        # Every arm trains on the bank's views, whether or not its loss reads the stored heatmaps: arms of one
        # comparison then differ in their loss only.
        banks = Path(context.bank_dir)
        train_ds = BankedViews(train_ds, ViewBank(banks / bank_key(context.teacher_id, cfg)), seed, features)
        if uses_unlabeled(cfg):
            unlabeled = BankedViews(unlabeled_dataset(cfg, train_ds),
                                    ViewBank(banks / unlabeled_bank_key(context.teacher_id, cfg)), seed, features)
            train_ds = MixedViews(train_ds, unlabeled, cfg.distill.unlabeled.ratio, seed)
    online = (out.enabled or features) and out.mode == "online"
    teacher = frozen(create(context.teacher_dir)) if online else None
    loss = distill_loss(out.weight if out.enabled else 0.0, teacher, schedule=out.schedule,
                        min_confidence=out.min_confidence, feature_weight=cfg.distill.feature.weight,
                        second_stage=(cfg.distill.second_stage.epochs, cfg.distill.second_stage.weight))
    # The run's final status is set by the driver (close_trial_runs): Tune may stop a trial inside its
    # last report, before any code after fit() would run.
    Trainer(cfg, session, model=model, loss_fn=loss, datasets=(train_ds, val_ds), tracker=tracker,
            log_prefix=f"[{job.trial_id}] ").fit()


def epochs_to_tune(metric: str) -> Any:
    """Ray's ``TuneReportCallback`` for the epochs that carry ``metric``: Tune refuses a result without it,
    and an epoch without evaluation (``train.eval_every`` > 1, FIFO sweeps only) has nothing to compare."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EpochsToTune()

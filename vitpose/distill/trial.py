"""One trial of the distillation sweep: a student trained by the shared ``Trainer`` under Ray Tune.

Runs in a Tune trial process. What it needs from the driver's preparation comes in one frozen
``SweepContext``; what Tune sampled for it comes as ``params``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitpose.build import build_datasets
from vitpose.config import StudentConfig
from vitpose.distill.bank import BankedViews, ViewBank, bank_key
from vitpose.distill.space import apply_params
from vitpose.distill.student import build_student, distill_loss
from vitpose.distill.teacher import frozen
from vitpose.distill.tokens import tokens_for


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep shares, made once by the driver before the trials start.

    Args:
        base_config: the sweep's resolved config as plain data; each trial writes its params into it.
        tracking_uri: the MLflow store; parent_run_id: the sweep's run, parent of every trial's run.
        teacher_dir: the teacher fetched to local storage (model.safetensors + vitpose_meta.json).
        teacher_id: names exactly those weights (registry URI + content digest); keys tokens and bank.
        token_dir: where the knowledge-token files are; bank_dir: the folder of the view banks (one per
        ``bank_key``), None in online mode.
    """

    base_config: dict[str, Any]
    tracking_uri: str
    parent_run_id: str
    teacher_dir: str
    teacher_id: str
    token_dir: str
    bank_dir: str | None


def run_trial(params: dict[str, Any], context: SweepContext) -> None:
    """Tune's function trainable (bound with ``tune.with_parameters(run_trial, context=...)``)."""
    import ray
    from ray import tune

    from vitpose.models import create
    from vitpose.run.tracking import WorkerTracker, start_trial_run
    from vitpose.train.loop import Trainer
    from vitpose.train.session import TuneSession, single_process_env

    logging.basicConfig(level=logging.WARNING)
    params = dict(params)
    cfg = apply_params(StudentConfig.model_validate(context.base_config), params)
    # Each trial is its own one-rank process group: its own port, so concurrent trials never meet.
    os.environ.update(single_process_env())
    trial_id = tune.get_context().get_trial_id()
    run_id = start_trial_run(cfg, context.tracking_uri, context.parent_run_id, trial_id, params)
    tracker = WorkerTracker(context.tracking_uri, run_id, cfg.tracking.outage_patience_s, background=False)
    # Which GPU share Ray gave this trial (tune.gpus_per_trial), as the run's record of where it trained.
    tracker.client.set_tag(run_id, "ray_gpu_ids", ",".join(str(g) for g in ray.get_gpu_ids()) or "none")

    train_ds, val_ds = build_datasets(cfg, is_local_leader=False)
    model = build_student(cfg, tokens_for(cfg, Path(context.token_dir), context.teacher_id))
    out = cfg.distill.output
    if out.mode == "bank":
        # Every arm trains on the bank's views, whether or not its loss reads the stored heatmaps: arms of one
        # comparison then differ in their loss only.
        bank = ViewBank(Path(context.bank_dir) / bank_key(context.teacher_id, cfg))
        train_ds = BankedViews(train_ds, bank, cfg.train.seed)
    teacher = frozen(create(context.teacher_dir)) if out.enabled and out.mode == "online" else None
    loss = distill_loss(out.weight if out.enabled else 0.0, teacher)
    # The run's final status is set by the driver (close_trial_runs): Tune may stop a trial inside its
    # last report, before any code after fit() would run.
    Trainer(cfg, TuneSession(cfg.tune.metric), model=model, loss_fn=loss, datasets=(train_ds, val_ds), tracker=tracker,
            log_prefix=f"[{trial_id}] ").fit()

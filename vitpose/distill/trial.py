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
from vitpose.distill.bank import BankedViews, ViewBank
from vitpose.distill.space import apply_params
from vitpose.distill.student import build_student, distill_loss, frozen
from vitpose.distill.tokens import TokenSetting, load_tokens, token_file


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep shares, made once by the driver before the trials start.

    Args:
        base_config: the sweep's resolved config as plain data; each trial writes its params into it.
        tracking_uri: the MLflow store; parent_run_id: the sweep's run, parent of every trial's run.
        teacher_dir: the teacher fetched to local storage (model.safetensors + vitpose_meta.json).
        teacher_id: names exactly those weights (registry URI + content digest); keys tokens and bank.
        token_dir: where the knowledge-token files are; bank_dir: the view bank, None without one.
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
    from ray import tune

    from vitpose.model_store import load_vitpose
    from vitpose.tracking import WorkerTracker, start_trial_run
    from vitpose.train.loop import Trainer
    from vitpose.train.session import TuneSession, single_process_env

    logging.basicConfig(level=logging.WARNING)
    params = dict(params)
    cfg = apply_params(StudentConfig.model_validate(context.base_config), params)
    # Each trial is its own one-rank process group: its own port, so concurrent trials never meet.
    os.environ.update(single_process_env())
    trial_id = tune.get_context().get_trial_id()
    run_id = start_trial_run(cfg, context.tracking_uri, context.parent_run_id, trial_id, params)
    tracker = WorkerTracker(context.tracking_uri, run_id)

    train_ds, val_ds = build_datasets(cfg, is_local_leader=False)
    tokens = None
    if cfg.distill.token.enabled:
        tokens = load_tokens(token_file(Path(context.token_dir), TokenSetting.from_config(cfg), context.teacher_id))
    model = build_student(cfg, tokens)
    teacher = None
    if cfg.distill.output.enabled:
        if cfg.distill.output.mode == "bank":
            train_ds = BankedViews(train_ds, ViewBank(Path(context.bank_dir)), cfg.train.seed)
        else:
            teacher = frozen(load_vitpose(context.teacher_dir)[0])
    loss = distill_loss(cfg.distill.output.weight if cfg.distill.output.enabled else 0.0, teacher)
    # The run's final status is set by the driver (close_trial_runs): Tune may stop a trial inside its
    # last report, before any code after fit() would run.
    Trainer(cfg, TuneSession(), model=model, loss_fn=loss, datasets=(train_ds, val_ds), tracker=tracker,
            log_prefix=f"[{trial_id}] ").fit()

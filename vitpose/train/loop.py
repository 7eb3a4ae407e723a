"""The training loop shared by teacher training and distillation trials: ``Trainer.fit()``.

One ``Trainer`` trains one model on one worker: DeepSpeed (ZeRO stage and precision from config) over the
paper's layer-decayed AdamW groups, the paper's warm-up and step schedule, epochs of sharded batches, COCO
evaluation with the flip test, and a checkpoint plus a report to its ``Session`` after each evaluation.
What it is built from (datasets, model) comes from ``vitpose.build``; where reports and checkpoints go,
from ``vitpose.train.session``; the checkpoint folder's format, from ``vitpose.train.run_folder``.

Resuming is exact at epoch boundaries: data order and augmentation are seeded by (seed, epoch, index)
and the torch RNG by (seed, epoch, rank), so a restored run does what the uninterrupted one would have.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vitpose.build import build_datasets, build_model_from_config, build_partitioned_model
from vitpose.config import TrainingConfig
from vitpose.data.keypoints import keypoint_info
from vitpose.losses import keypoint_mse
from vitpose.models.vitpose import build_model_from_spec, exported_state
from vitpose.run.console import fmt_secs, say
from vitpose.train.bad_samples import BadSampleLedger
from vitpose.train.deepspeed_config import complete_deepspeed_config, zero_stage
from vitpose.train.engine import init_comm, make_engine, quiet_deprecated_collectives
from vitpose.train.heap import return_freed_blocks
from vitpose.train.loaders import build_loaders
from vitpose.train.multi_dataset import evaluate_datasets, is_mixed, mixed_loss
from vitpose.train.precision import with_concrete_precision
from vitpose.train.run_folder import (
    CKPT_TAG,
    META_FILE,
    SAVE_TMP_PREFIX,
    IncompleteCheckpointError,
    gather_fp32_state_dict,
    newest_complete_checkpoint,
    recorded_precision,
    remove_stale_save_dirs,
    resume_mismatch,
    verify_checkpoint,
    write_atomic,
    write_rank_marker,
    write_weights,
)
from vitpose.train.session import Session, WorkerStatus


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss and the config says to stop (train.on_nonfinite_loss=error)."""


def lr_factor(step: int, epoch: int, cfg: TrainingConfig) -> float:
    """mmcv's linear warm-up (per iteration) times step decay (per epoch), as in the paper's recipe."""
    t = cfg.train
    decay = t.lr_gamma ** sum(epoch >= s for s in t.lr_steps)
    if step < t.warmup_iters:
        return decay * (1.0 - (1.0 - step / t.warmup_iters) * (1.0 - t.warmup_ratio))
    return decay


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float, frozen_below: int = 0) -> float:
    """Every group's lr from the schedule and its layer scale; groups of layer ids below ``frozen_below`` get 0
    (frozen: AdamW's step, weight decay included, is a multiple of the lr)."""
    for group in optimizer.param_groups:
        frozen = group.get("layer_id", frozen_below) < frozen_below
        group["lr"] = 0.0 if frozen else base_lr * factor * group.get("lr_scale", 1.0)
    return base_lr * factor


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    skipped_nonfinite: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)


LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


def gt_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    heatmaps = model(batch["image"])
    return keypoint_mse(heatmaps, batch["target"], batch["target_weight"]), {}


class Trainer:
    """DeepSpeed training of one model on one worker; ``fit()`` runs the whole schedule.

    Args:
        cfg: the run's config (teacher or student; ``model``/``data``/``train``/``deepspeed`` are read).
        session: where reports and checkpoints go and where a resume starts from.
        model: a model built by the caller (a student with knowledge tokens); default: ``cfg.model``.
        loss_fn: ``(model, batch) -> (loss, parts)``; default the ground-truth heatmap loss.
        datasets: (train, val) built by the caller (e.g. a view-bank training set); default from ``cfg.data``.
        tracker: rank 0's MLflow handle (per-epoch metrics and pictures), or None.
        log_prefix: put before every console line (a sweep's trial id).
    """

    def __init__(self, cfg: TrainingConfig, session: Session, *, model: torch.nn.Module | None = None,
                 loss_fn: LossFn = gt_loss, datasets: tuple[Any, Any] | None = None, tracker: Any = None,
                 log_prefix: str = ""):
        self.cfg, self.session, self.loss_fn, self.tracker = cfg, session, loss_fn, tracker
        self.prefix = log_prefix
        self.rank, self.world = session.rank, session.world_size
        # Always: DeepSpeed's comm layer must wrap the process group even when Ray already made it.
        init_comm()
        quiet_deprecated_collectives()  # from here on DeepSpeed calls them, ZeRO-3's model build included
        cfg, precision_line = with_concrete_precision(  # "auto": the same answer on every rank and restart
            cfg, self.world, lambda: recorded_precision(session.latest_checkpoint()))
        self.cfg = cfg
        self.ds_config = complete_deepspeed_config(cfg, self.world)
        self.stage = zero_stage(self.ds_config)
        self.train_ds, self.val_ds = datasets or build_datasets(cfg, session.local_rank == 0)
        self.keypoint_info = keypoint_info(self.train_ds)
        if is_mixed(self.train_ds):  # several datasets (train/multi_dataset.py): each sample through its own head
            if loss_fn is not gt_loss:
                raise ValueError("a multi-dataset run (data.datasets) trains with its own per-dataset loss only")
            self.loss_fn = mixed_loss(self.train_ds.names)

        if model is None:
            model = (build_partitioned_model(cfg, self.ds_config, self.rank) if self.stage == 3
                     else build_model_from_config(cfg))
        self.spec = model.spec
        return_freed_blocks(sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()))
        if tracker is not None and getattr(model, "init_report", None) is not None:  # from model.init_checkpoint
            tracker.log_load_report(model.init_report)
        if tracker is not None and getattr(model, "freeze_report", None) is not None:  # model.freeze
            tracker.log_param("model.frozen_params", model.freeze_report.num_params)
        self.engine, self.optimizer, optimized = make_engine(model, cfg, self.ds_config)
        if tracker is not None:  # what training really updates, beside what the config asked for
            for key, value in optimized.items():
                tracker.log_param(key, value)
        if precision_line:
            self._say(precision_line)
        if tracker is not None:  # a tag: the run's params are the config as given (train.precision=auto)
            tracker.set_tag("precision", cfg.train.precision)
        self.device = self.engine.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        self.loaders = build_loaders(cfg, self.train_ds, self.val_ds, self.rank, self.world)

        self.start_epoch = 0
        self.global_step = 0
        self.nonfinite_total = 0
        self.best_ap = -1.0
        self.history: list[dict[str, float]] = []
        self.restored_at_epochs: list[int] = []  # 0-based epochs at which a run continued from a checkpoint
        self.bad_samples = BadSampleLedger({"train": self.train_ds, "val": self.val_ds}, self.world)
        self.status = WorkerStatus(self.rank)

    # ------------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, float]:
        """Resume if there is a checkpoint, then train, evaluate, report and checkpoint epoch by epoch."""
        remove_stale_save_dirs()
        self.restore()
        epochs = self.cfg.train.epochs
        last_metrics: dict[str, float] = {}
        t_start = time.time()
        self.status.update(phase="start", epoch=self.start_epoch, step=0, global_step=self.global_step)
        if self.history and self.start_epoch >= epochs:
            # Restored from the final checkpoint: the run had finished, but whoever records results may not
            # have taken the last report (a driver killed in between), so it is made again, without training.
            self._say(f"all {epochs} epochs were done before the restart; reporting the final result again")
            self._report(epochs - 1, self.history[-1], with_checkpoint=True)
            return dict(self.history[-1])
        for epoch in range(self.start_epoch, epochs):
            stats = self.train_epoch(epoch, epochs)
            metrics = {
                "epoch": epoch + 1,
                "train/loss": stats.loss,
                "train/lr": self.current_lr,
                "train/images_per_sec": stats.images * self.world / max(stats.seconds, 1e-9),
                "train/nonfinite_skipped": self.nonfinite_total,
                **{f"train/{k}": v for k, v in stats.extra.items()},
            }
            is_eval = (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == epochs
            if is_eval:
                self.status.update(phase="eval")
                metrics.update(self.evaluate(epoch))
                self.best_ap = max(self.best_ap, metrics["val/AP"])
            metrics.update(self.bad_samples.metrics())
            self.history.append({k: float(v) for k, v in metrics.items()})
            self._progress_line(epoch, epochs, metrics, t_start)
            if self.tracker is not None and self.rank == 0:
                self.tracker.log_epoch(metrics, step=epoch + 1)
            self._report(epoch, metrics, with_checkpoint=is_eval)
            last_metrics = metrics
        self.status.update(phase="done")
        return last_metrics

    def train_epoch(self, epoch: int, epochs: int, max_steps: int | None = None) -> EpochStats:
        """One epoch of ``loaders.steps_per_epoch`` steps (at most ``max_steps``: tests and benchmarks)."""
        self.engine.train()
        self.loaders.train_sampler.set_epoch(epoch)
        frozen_below = 0
        if hasattr(self.loss_fn, "set_progress"):  # a loss whose terms follow the schedule (distillation weight)
            self.loss_fn.set_progress(epoch, epochs)
            if getattr(self.loss_fn, "frozen_backbone", False):  # a second stage: the head learns, the backbone not
                frozen_below = self.spec.depth + 1  # patch embedding, position embedding, blocks (optim.layer_id)
                if self.loss_fn.own is None:
                    self.loss_fn.begin_second_stage(self.frozen_copy())
        if self.status.path is not None:  # which instances this rank trains on, for outside watchers
            self.status.update(world_size=self.world, shard=shard_head(self.loaders.train_sampler))
        steps = min(self.loaders.steps_per_epoch, max_steps or self.loaders.steps_per_epoch)
        t0 = last_print = time.time()
        batches = iter(self.loaders.train)
        # Seeded after the loader started: whether it started fresh or reused its processes must not move
        # the torch RNG (drop path), or a resumed run would differ from the uninterrupted one.
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + epoch * 1009 + self.rank)
        stats = EpochStats()
        extra_sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            if i >= steps:
                break
            self.status.update(phase="train", epoch=epoch + 1, step=i + 1, global_step=self.global_step)
            self.bad_samples.note("train", batch)
            set_lr(self.optimizer, self.cfg.train.lr, lr_factor(self.global_step, epoch, self.cfg), frozen_below)
            batch = self._to_device(batch)
            loss, parts = self.loss_fn(self.engine, batch)
            if not self._all_finite(loss):
                self._handle_nonfinite(epoch, i, batch)
                stats.skipped_nonfinite += 1
                continue
            self.engine.backward(loss)
            self.engine.step()
            self.global_step += 1
            stats.loss_sum += float(loss.detach())
            stats.steps += 1
            stats.images += batch["image"].shape[0]
            for k, v in parts.items():
                extra_sums[k] = extra_sums.get(k, 0.0) + v
            now = time.time()
            if self.rank == 0 and now - last_print > 30:
                last_print = now
                rate = stats.images * self.world / (now - t0)
                left = (steps - i - 1) * self.cfg.train.batch_size * self.world / max(rate, 1e-9)
                self._say(f"  epoch {epoch + 1}/{epochs} step {i + 1}/{steps} "
                          f"loss {stats.loss:.6f} {rate:.1f} img/s, epoch ETA {fmt_secs(left)}")
        stats.seconds = time.time() - t0
        stats.extra = {k: v / max(stats.steps, 1) for k, v in extra_sums.items()}
        return stats

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """COCO keypoint AP/AR on the val set (flip test per config), gathered over ranks; the same dict on
        every rank. Rank 0 also draws the first batch's predictions to the tracker. Several datasets:
        ``val/<name>/...`` each and ``val/...`` the primary's (train/multi_dataset.py)."""
        if is_mixed(self.train_ds):
            return evaluate_datasets(self, epoch)
        return self.evaluate_one(self.loaders.val[0], self.val_ds, None, epoch)

    @torch.no_grad()
    def evaluate_one(self, loader: DataLoader, val_ds: Any, dataset_index: int | None, epoch: int,
                     draw: bool = True) -> dict[str, float]:
        """``evaluate`` of one val set, through the head (and expert) of ``dataset_index`` (None: the only)."""
        from vitpose.evaluation import CocoKeypointEvaluator, decode_batch_to_predictions

        self.engine.eval()
        predictions: list[dict[str, Any]] = []
        first_batch: tuple[torch.Tensor, np.ndarray, list[dict]] | None = None
        which = () if dataset_index is None else (dataset_index,)
        for batch in loader:
            self.bad_samples.note("val", batch)
            images = batch["image"].to(self.device).to(self.dtype)
            heatmaps = self.engine(images, *which).float().cpu()
            flipped = self.engine(images.flip(3), *which).float().cpu() if self.cfg.train.flip_test else None
            preds = decode_batch_to_predictions(
                heatmaps, batch, flipped, flip_pairs=val_ds.flip_pairs, input_size=val_ds.input_size
            )
            predictions.extend(preds)
            if first_batch is None:
                first_batch = (batch["image"].float(), heatmaps.numpy(), preds)
        gathered: list[list[dict[str, Any]]] = [predictions]
        if dist.is_initialized() and self.world > 1:
            gathered = [None] * self.world  # type: ignore[list-item]
            dist.all_gather_object(gathered, predictions)
        metrics = {}
        if self.rank == 0:
            unique = {p["index"]: p for part in gathered for p in part}  # drop the sampler's padding repeats
            evaluator = CocoKeypointEvaluator(val_ds.ann_file, keypoints=val_ds.keypoint_set)
            metrics = {f"val/{k}": float(v) for k, v in evaluator.evaluate(list(unique.values())).items()}
            if self.tracker is not None and first_batch is not None and self.cfg.tracking.log_images and draw:
                self.tracker.log_predictions(first_batch, self.keypoint_info, epoch + 1, self.cfg.tracking.log_images)
        box = [metrics]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(box, src=0)
        self.engine.train()
        return box[0]

    # ----------------------------------------------------------------------- checkpoint and resume
    def _report(self, epoch: int, metrics: dict[str, float], with_checkpoint: bool) -> None:
        if not with_checkpoint:
            self.status.update(phase="report")
            self.session.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix=f"{SAVE_TMP_PREFIX}{os.getpid()}-") as tmp:
            self.status.update(phase="save")
            self.save_checkpoint(Path(tmp), epoch, metrics)
            self.status.update(phase="report")
            self.session.report(metrics, Path(tmp))

    def frozen_copy(self) -> torch.nn.Module:
        """The model as it is now, as a frozen fp32 copy on this rank's device (gathered under ZeRO-3: every rank
        calls this at the same point)."""
        state = gather_fp32_state_dict(self.engine, self.stage, low_precision=self.dtype != torch.float32)
        copy = build_model_from_spec(self.spec)
        copy.load_state_dict(exported_state(state))
        copy.eval().requires_grad_(False)
        return copy.to(self.device)

    def save_checkpoint(self, out: Path, epoch: int, metrics: dict[str, float]) -> None:
        """DeepSpeed's sharded state (all ranks) + full weights and metadata (rank 0) + completion markers."""
        self.engine.save_checkpoint(str(out), tag=CKPT_TAG)
        state = gather_fp32_state_dict(self.engine, self.stage, low_precision=self.dtype != torch.float32)
        if self.rank == 0:
            if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
                raise NonFiniteLossError(f"refusing to save a checkpoint with NaN/inf weights at epoch {epoch + 1}")
            write_weights(out, exported_state(state), self.spec.to_dict())
            meta = {
                "epoch": epoch,
                "global_step": self.global_step,
                "world_size": self.world,
                "zero_stage": self.stage,
                "precision": self.cfg.train.precision,
                "best_ap": self.best_ap,
                "nonfinite_total": self.nonfinite_total,
                "metrics": metrics,
                "history": self.history,
                "restored_at_epochs": self.restored_at_epochs,
                "keypoints": self.keypoint_info,
                "spec": self.spec.to_dict(),
                "bad_samples": self.bad_samples.to_meta(),
            }
            write_atomic(out / META_FILE, json.dumps(meta, indent=1))
        write_rank_marker(out, self.rank)

    def restore(self) -> bool:
        """Continue from the session's checkpoint, if it has one; True when it did."""
        with self.session.latest_checkpoint() as ckpt_dir:
            if ckpt_dir is None:
                return False
            ckpt_dir, meta = self._usable_checkpoint(Path(ckpt_dir))
            if (problem := resume_mismatch(meta, self.world, self.cfg.train.precision)) is not None:
                raise RuntimeError(f"{ckpt_dir}: {problem}")
            path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=CKPT_TAG)
            if path is None:
                raise RuntimeError(f"{ckpt_dir}: DeepSpeed could not load tag '{CKPT_TAG}'")
            self.start_epoch = meta["epoch"] + 1
            self.global_step = meta["global_step"]
            self.best_ap = meta.get("best_ap", -1.0)
            self.nonfinite_total = meta.get("nonfinite_total", 0)
            self.history = meta.get("history", [])
            self.restored_at_epochs = meta.get("restored_at_epochs", []) + [self.start_epoch]
            self.bad_samples.restore(meta.get("bad_samples", {}))
            self._say(f"resumed from {ckpt_dir} at epoch {self.start_epoch} (step {self.global_step})")
            return True

    def _usable_checkpoint(self, ckpt_dir: Path) -> tuple[Path, dict[str, Any]]:
        """``ckpt_dir`` if complete, else the newest complete checkpoint beside it (same run folder).

        Ray hands back the last checkpoint it registered; if that one was damaged afterwards (a truncated
        file), going back one checkpoint loses an epoch where failing would lose the run.
        """
        try:
            return ckpt_dir, verify_checkpoint(ckpt_dir)
        except IncompleteCheckpointError as err:
            damaged = err
        best = newest_complete_checkpoint(ckpt_dir.parent) if ckpt_dir.parent.is_dir() else None
        if best is None:
            raise damaged
        self._say(f"warning: {damaged}; resuming from {best} instead")
        return best, verify_checkpoint(best)

    # ------------------------------------------------------------------------------ step helpers
    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if k == "image":
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def _all_finite(self, loss: torch.Tensor) -> bool:
        # Every rank must take the same decision, or ZeRO's collectives in backward would hang. The flag lives
        # on the engine's device: NCCL reduces only GPU tensors.
        flag = (~torch.isfinite(loss.detach()).all()).float().reshape(1).to(self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag)
        return flag.item() == 0.0

    def _handle_nonfinite(self, epoch: int, batch_index: int, batch: dict[str, Any]) -> None:
        self.nonfinite_total += 1
        where = (f"epoch {epoch + 1}, step {self.global_step + 1}, batch {batch_index} "
                 f"(instances {batch['index'][:8].tolist() if 'index' in batch else '?'}...)")
        t = self.cfg.train
        if t.on_nonfinite_loss == "error":
            raise NonFiniteLossError(f"non-finite loss at {where}; set train.on_nonfinite_loss=skip to skip such steps")
        if self.nonfinite_total > t.max_nonfinite_skips:
            raise NonFiniteLossError(
                f"non-finite loss at {where}: {self.nonfinite_total} skipped steps exceed "
                f"train.max_nonfinite_skips={t.max_nonfinite_skips}; lower train.lr or check the data"
            )
        self._say(f"warning: non-finite loss at {where}; step skipped ({self.nonfinite_total} so far)")

    # ----------------------------------------------------------------------------------- output
    def _say(self, text: str) -> None:
        if self.rank == 0:
            say(f"{self.prefix}{text}")

    def _progress_line(self, epoch: int, epochs: int, m: dict[str, float], t_start: float) -> None:
        done = epoch + 1 - self.start_epoch
        eta = (time.time() - t_start) / max(done, 1) * (epochs - epoch - 1)
        ap = f"  val AP {m['val/AP']:.3f} AR {m['val/AR']:.3f}" if "val/AP" in m else ""
        self._say(f"epoch {epoch + 1}/{epochs}  loss {m['train/loss']:.6f}  lr {m['train/lr']:.2e}  "
                  f"{m['train/images_per_sec']:.1f} img/s{ap}  ETA {fmt_secs(eta)}")


def shard_head(sampler: Any, count: int = 8) -> list[str]:
    """The first ``count`` keys (instances, or batches of several datasets) of this rank's epoch order."""
    return [str(k) for k in itertools.islice(iter(sampler), count)]

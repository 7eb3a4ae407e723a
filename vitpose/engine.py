"""The per-worker training loop shared by teacher training and distillation trials.

``train_worker(config)`` is what Ray Train runs on every worker: it builds the model, the sharded data
loaders, the paper's optimizer groups and schedule, initialises DeepSpeed (ZeRO stage and precision
from config), trains epoch by epoch, evaluates COCO AP, and reports metrics and a checkpoint through a
``Session``. The same loop runs without Ray through ``LocalSession`` (unit tests, notebooks).

Resuming is exact at epoch boundaries: data order and augmentation are seeded by (seed, epoch, index)
and the torch RNG by (seed, epoch, rank), so a restored run does what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from vitpose.config import TeacherConfig, one_line
from vitpose.dsconfig import complete_deepspeed_config, zero_stage
from vitpose.losses import keypoint_mse

log = logging.getLogger(__name__)

CKPT_TAG = "ds"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
# Written by a worker whose error a retry cannot fix (bad data, NaN loss), read by the driver: the retried
# worker group stops at once instead of training up to the same error again, and the driver prints one line.
FATAL_FILE = "fatal_error.json"
# Prefix of the temp folders checkpoints are written to before Ray takes them, followed by "<pid>-".
SAVE_TMP_PREFIX = "vitpose-ckpt-"
# When set, every rank keeps ``<dir>/rank<R>.json`` current (pid, epoch, step, phase) for outside watchers.
STATUS_DIR_ENV = "VITPOSE_WORKER_STATUS_DIR"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss and the config says to stop (train.on_nonfinite_loss=error)."""


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder that was cut off while saving, or changed after, and cannot be resumed from."""


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class WorkerStatus:
    """Where this rank is, in ``$VITPOSE_WORKER_STATUS_DIR/rank<R>.json``; nothing when the variable is unset.

    Lets something outside the worker (an operator, a stall detector, the fault-injection tests) see the pid,
    phase ('start', 'train', 'eval', 'save', 'report', 'done'), epoch (1-based, the one in progress; at
    'start' the number already done), step in the epoch and global_step (steps finished) without attaching
    to Ray. 'train' is written before each step.
    """

    def __init__(self, rank: int):
        folder = os.environ.get(STATUS_DIR_ENV)
        self.path = Path(folder) / f"rank{rank}.json" if folder else None
        self.fields: dict[str, Any] = {"pid": os.getpid(), "rank": rank}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def update(self, **fields: Any) -> None:
        if self.path is None:
            return
        self.fields.update(fields, time=time.time())
        write_atomic(self.path, json.dumps(self.fields))


# --------------------------------------------------------------------------------------------- session
class Session:
    """Where the loop reports to and resumes from. Ray's and a local one share this surface."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def latest_checkpoint(self) -> Any:
        """A context manager yielding the directory of the checkpoint to resume from, or None."""
        raise NotImplementedError


class LocalSession(Session):
    """Single process, no Ray: checkpoints are copied under ``out_dir``; used by tests and notebooks."""

    def __init__(self, out_dir: str | Path, resume_from: str | Path | None = None):
        self.out_dir = Path(out_dir)
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = self.out_dir / f"checkpoint_{len(self.checkpoints):06d}"
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copytree(checkpoint_dir, tmp)
            os.replace(tmp, dest)  # atomic: a half-copied checkpoint is never visible under its name
            self.checkpoints.append(dest)

    def latest_checkpoint(self) -> Any:
        from contextlib import nullcontext

        return nullcontext(self.resume_from)


class RaySession(Session):
    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def latest_checkpoint(self) -> Any:
        from contextlib import nullcontext

        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else nullcontext(None)


class TuneSession(Session):
    """One Ray Tune trial = one engine worker (students are small); reports go to Tune and ASHA."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)

    def latest_checkpoint(self) -> Any:
        """The newest complete checkpoint in the trial's folder, else the one Tune restored.

        Tune's record of a trial's checkpoints is written by the driver every ~10 s; a driver killed between
        a trial persisting a checkpoint and the next snapshot would restart that trial from an older one (or
        from scratch) and train its last epochs again.
        """
        from contextlib import nullcontext

        from ray import tune

        trial_dir = Path(tune.get_context().get_trial_dir())
        newest = newest_complete_checkpoint(trial_dir) if trial_dir.is_dir() else None
        if newest is not None:
            return nullcontext(newest)
        ckpt = tune.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else nullcontext(None)


# ------------------------------------------------------------------------------------------ schedule
def lr_factor(step: int, epoch: int, cfg: TeacherConfig) -> float:
    """mmcv's linear warm-up (per iteration) times step decay (per epoch), as in the paper's recipe."""
    t = cfg.train
    decay = t.lr_gamma ** sum(epoch >= s for s in t.lr_steps)
    if step < t.warmup_iters:
        return decay * (1.0 - (1.0 - step / t.warmup_iters) * (1.0 - t.warmup_ratio))
    return decay


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)
    return base_lr * factor


# -------------------------------------------------------------------------------------------- data
class EpochShardSampler(Sampler[int]):
    """Shuffled (or ordered) indices, split evenly across ranks; every rank gets the same count.

    Equal counts matter: under ZeRO-3 every forward is a collective, so a rank that ran out of batches
    would hang the others. Padding repeats indices; evaluation drops the repeats by index.
    """

    def __init__(self, size: int, rank: int, world_size: int, shuffle: bool, seed: int, with_epoch: bool = False):
        self.size, self.rank, self.world, self.shuffle, self.seed = size, rank, world_size, shuffle, seed
        self.with_epoch = with_epoch  # yield (epoch, index) keys for an ``EpochKeyed`` dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[int]:
        order = np.arange(self.size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        total = len(self) * self.world
        order = np.concatenate([order, order[: total - self.size]]) if total > self.size else order
        mine = order[self.rank :: self.world].tolist()
        return iter([(self.epoch, i) for i in mine] if self.with_epoch else mine)


class EpochKeyed(Dataset):
    """Items keyed ``(epoch, index)``: the epoch travels with each index to the loader processes.

    Persistent loader workers hold the copy of the dataset made when they started, so a ``set_epoch`` in the
    trainer would never reach them; forking them again every epoch instead cost ~3 s per epoch on 2 cores.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if getattr(self.dataset, "epoch", epoch) != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def ensure_data(cfg: TeacherConfig) -> None:
    """Generate the synthetic dataset of ``cfg`` when it is missing or was made with other knobs."""
    if cfg.data.kind != "synthetic":
        return
    from vitpose.data.synthetic import SynthConfig, ensure_synthetic_dataset

    s = cfg.data.synthetic
    knobs = SynthConfig(clutter=s.clutter, max_figures=s.max_figures, occlusion_prob=s.occlusion_prob,
                        pose_variety=s.pose_variety)
    ensure_synthetic_dataset(cfg.data.root_path(), train_instances=s.train_instances,
                             val_instances=s.val_instances, seed=s.seed, cfg=knobs)


def build_datasets(cfg: TeacherConfig, is_local_leader: bool) -> tuple[Any, Any]:
    from vitpose.data.coco import TopDownCocoDataset
    from vitpose.data.transforms import AugConfig
    from vitpose.models import build_model

    if is_local_leader:
        ensure_data(cfg)
    if dist.is_initialized():
        dist.barrier()
    root = cfg.data.root_path()
    # The model decides the crop and heatmap sizes (heatmaps are 4x its token grid), the data follows.
    spec = build_model(cfg.model.preset, device="meta", **model_spec_kwargs(cfg)).spec
    common = dict(input_size=tuple(spec.img_size), heatmap_size=tuple(spec.heatmap_size),
                  on_bad_sample=cfg.data.on_bad_sample)
    train = TopDownCocoDataset(root / cfg.data.train_ann, root / cfg.data.train_images, train=True,
                               aug=AugConfig(**cfg.data.aug.model_dump()), aug_seed=cfg.train.seed,
                               image_cache_mb=cfg.data.image_cache_mb, **common)
    val = TopDownCocoDataset(
        root / cfg.data.val_ann,
        root / cfg.data.val_images,
        train=False,
        det_file=(root / cfg.data.val_det_file) if cfg.data.val_det_file else None,
        det_score_thr=cfg.data.det_score_thr,
        **common,
    )
    return train, val


# ------------------------------------------------------------------------------------------- model
def model_spec_kwargs(cfg: TeacherConfig) -> dict[str, Any]:
    """Our config's model section as ``build_model`` overrides (None = keep the preset's value)."""
    m = cfg.model
    kw: dict[str, Any] = {
        "decoder": m.decoder,
        "img_size": tuple(m.img_size) if m.img_size else None,
        "patch_size": m.patch_size,
        "deconv_channels": m.deconv_channels,
        "num_keypoints": m.num_keypoints,
        "drop_path_rate": m.drop_path_rate,
    }
    return {k: v for k, v in kw.items() if v is not None}


def build_model_from_config(cfg: TeacherConfig, **extra: Any) -> torch.nn.Module:
    from vitpose.models import build_model, load_checkpoint

    model = build_model(cfg.model.preset, **model_spec_kwargs(cfg), **extra)
    if cfg.model.init_checkpoint:
        load_checkpoint(model, cfg.model.init_checkpoint)
    if cfg.model.activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model


# ------------------------------------------------------------------------------------------ engine
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
    """DeepSpeed training of one model on one worker; ``fit()`` runs the whole schedule."""

    def __init__(
        self,
        cfg: TeacherConfig,
        session: Session,
        *,
        model: torch.nn.Module | None = None,
        loss_fn: LossFn = gt_loss,
        datasets: tuple[Any, Any] | None = None,
        tracker: Any = None,
        log_prefix: str = "",
    ):
        import deepspeed

        self.cfg, self.session, self.loss_fn, self.tracker = cfg, session, loss_fn, tracker
        self.prefix = log_prefix
        self.rank, self.world = session.rank, session.world_size
        # Always: DeepSpeed's comm layer must wrap the process group even when Ray already made it.
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.ds_config = complete_deepspeed_config(cfg, self.world)
        self.stage = zero_stage(self.ds_config)
        train_ds, val_ds = datasets or build_datasets(cfg, session.local_rank == 0)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.keypoint_info = keypoint_info(train_ds)

        if model is None:
            model = self._build_partitioned() if self.stage == 3 else build_model_from_config(cfg)
        self.spec = model.spec
        from vitpose.models import param_groups_layer_decay

        layer_decay = cfg.model.layer_decay if cfg.model.layer_decay is not None else model.spec.layer_decay_rate
        groups = param_groups_layer_decay(model, cfg.train.lr, cfg.train.weight_decay, layer_decay)
        groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config
        )
        load_deepspeed_files_as_weights_only(self.engine)
        self.device = self.engine.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)

        workers = cfg.data.loader_workers
        self.train_sampler = EpochShardSampler(len(train_ds), self.rank, self.world, True, cfg.train.seed,
                                               with_epoch=True)
        self.val_sampler = EpochShardSampler(len(val_ds), self.rank, self.world, False, cfg.train.seed)
        self.train_loader = DataLoader(
            EpochKeyed(train_ds), batch_size=cfg.train.batch_size, sampler=self.train_sampler, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        )
        self.val_loader = DataLoader(val_ds, batch_size=cfg.train.batch_size, sampler=self.val_sampler,
                                     num_workers=workers, persistent_workers=workers > 0)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(train_ds)} instances, fewer than one batch per worker "
                f"({cfg.train.batch_size} x {self.world} workers): lower train.batch_size"
            )
        self.start_epoch = 0
        self.global_step = 0
        self.nonfinite_total = 0
        self.best_ap = -1.0
        self.history: list[dict[str, float]] = []
        self.restored_at_epochs: list[int] = []  # 0-based epochs at which a run continued from a checkpoint
        # Instances skipped while loading (unreadable images), by split: index -> reason, the union over
        # ranks and loader processes, so counts are exact however the data was sharded (and kept on resume).
        self.skipped: dict[str, dict[int, str]] = {"train": {}, "val": {}}
        self.status = WorkerStatus(self.rank)

    def _build_partitioned(self) -> torch.nn.Module:
        """ZeRO-3: build the model already partitioned, so a model larger than one rank's memory fits.

        zero.Init partitions each submodule as soon as it is built, so the model's own initialisation (and
        an init checkpoint) must be applied again on gathered parameters, from rank 0.
        """
        import deepspeed

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
            from vitpose.models import build_model

            model = build_model(cfg.model.preset, **model_spec_kwargs(cfg))
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if self.rank == 0:
                model.init_weights()
                if cfg.model.init_checkpoint:
                    from vitpose.models import load_checkpoint

                    load_checkpoint(model, cfg.model.init_checkpoint)
        if cfg.model.activation_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    # ----------------------------------------------------------------------------------- resume
    def restore(self) -> bool:
        with self.session.latest_checkpoint() as ckpt_dir:
            if ckpt_dir is None:
                return False
            ckpt_dir, meta = self._usable_checkpoint(Path(ckpt_dir))
            if meta["world_size"] != self.world:
                raise RuntimeError(
                    f"{ckpt_dir}: checkpoint was written by {meta['world_size']} workers, this run has {self.world}; "
                    "resume with the same ray.num_workers"
                )
            path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=CKPT_TAG)
            if path is None:
                raise RuntimeError(f"{ckpt_dir}: DeepSpeed could not load tag '{CKPT_TAG}'")
            self.start_epoch = meta["epoch"] + 1
            self.global_step = meta["global_step"]
            self.best_ap = meta.get("best_ap", -1.0)
            self.nonfinite_total = meta.get("nonfinite_total", 0)
            self.history = meta.get("history", [])
            self.restored_at_epochs = meta.get("restored_at_epochs", []) + [self.start_epoch]
            bad = meta.get("bad_samples", {})
            self.skipped = {split: {int(i): r for i, r in bad.get(split, {}).get("skipped", {}).items()}
                            for split in ("train", "val")}
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

    # ------------------------------------------------------------------------------------ train
    def fit(self) -> dict[str, float]:
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
            stats = self.train_epoch(epoch, epochs, t_start)
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
            metrics.update(self.bad_sample_metrics())
            self.history.append({k: float(v) for k, v in metrics.items()})
            self._progress_line(epoch, epochs, metrics, t_start)
            if self.tracker is not None and self.rank == 0:
                self.tracker.log_epoch(metrics, step=epoch + 1)
            self._report(epoch, metrics, with_checkpoint=is_eval)
            last_metrics = metrics
        self.status.update(phase="done")
        return last_metrics

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

    # ------------------------------------------------------------------------------ bad samples
    def _note_skipped(self, split: str, batch: dict[str, Any]) -> None:
        """Record what the dataset skipped to build this batch ("index:reason,..." per item)."""
        for text in batch.get("skipped", ()):
            for entry in filter(None, text.split(",")):
                index, _, reason = entry.partition(":")
                self.skipped[split][int(index)] = reason

    def bad_sample_metrics(self) -> dict[str, float]:
        """Bad samples per split and reason: the index's (same on every rank) plus those skipped while
        loading, merged over ranks. A collective: every rank calls it once per epoch."""
        if dist.is_initialized() and self.world > 1:
            parts: list[dict[str, dict[int, str]]] = [None] * self.world  # type: ignore[list-item]
            dist.all_gather_object(parts, self.skipped)
            self.skipped = {split: {i: r for part in parts for i, r in part[split].items()} for split in self.skipped}
        metrics: dict[str, float] = {}
        for split, ds in (("train", self.train_ds), ("val", self.val_ds)):
            counts: dict[str, int] = dict(getattr(ds, "index_bad_counts", {}))
            for reason in self.skipped[split].values():
                counts[reason] = counts.get(reason, 0) + 1
            for reason, n in counts.items():
                metrics[f"bad_samples/{split}/{reason}"] = float(n)
            if counts:
                metrics[f"bad_samples/{split}/total"] = float(sum(counts.values()))
        return metrics

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

    def train_epoch(self, epoch: int, epochs: int, t_start: float) -> EpochStats:
        self.engine.train()
        self.train_sampler.set_epoch(epoch)
        t0 = last_print = time.time()
        batches = iter(self.train_loader)
        # Seeded after the loader started: whether it started fresh or reused its processes must not move
        # the torch RNG (drop path), or a resumed run would differ from the uninterrupted one.
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + epoch * 1009 + self.rank)
        stats = EpochStats()
        extra_sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            if i >= self.steps_per_epoch:
                break
            self.status.update(phase="train", epoch=epoch + 1, step=i + 1, global_step=self.global_step)
            self._note_skipped("train", batch)
            set_lr(self.optimizer, self.cfg.train.lr, lr_factor(self.global_step, epoch, self.cfg))
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
                left = (self.steps_per_epoch - i - 1) * self.cfg.train.batch_size * self.world / max(rate, 1e-9)
                self._say(f"  epoch {epoch + 1}/{epochs} step {i + 1}/{self.steps_per_epoch} "
                          f"loss {stats.loss:.6f} {rate:.1f} img/s, epoch ETA {_fmt_secs(left)}")
        stats.seconds = time.time() - t0
        stats.extra = {k: v / max(stats.steps, 1) for k, v in extra_sums.items()}
        return stats

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

    # ------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        from vitpose.evaluation import CocoKeypointEvaluator, decode_batch_to_predictions

        self.engine.eval()
        predictions: list[dict[str, Any]] = []
        first_batch: tuple[torch.Tensor, np.ndarray, list[dict]] | None = None
        for batch in self.val_loader:
            self._note_skipped("val", batch)
            images = batch["image"].to(self.device).to(self.dtype)
            heatmaps = self.engine(images).float().cpu()
            flipped = self.engine(images.flip(3)).float().cpu() if self.cfg.train.flip_test else None
            preds = decode_batch_to_predictions(
                heatmaps, batch, flipped, flip_pairs=self.val_ds.flip_pairs, input_size=self.val_ds.input_size
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
            evaluator = CocoKeypointEvaluator(self.val_ds.ann_file)
            metrics = {f"val/{k}": float(v) for k, v in evaluator.evaluate(list(unique.values())).items()}
            if self.tracker is not None and first_batch is not None and self.cfg.tracking.log_images:
                self.tracker.log_predictions(first_batch, self.keypoint_info, epoch + 1, self.cfg.tracking.log_images)
        box = [metrics]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(box, src=0)
        self.engine.train()
        return box[0]

    # ------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, out: Path, epoch: int, metrics: dict[str, float]) -> None:
        """DeepSpeed's sharded state (all ranks) + full weights and metadata (rank 0) + completion markers."""
        self.engine.save_checkpoint(str(out), tag=CKPT_TAG)
        state = self.full_state_dict()
        if self.rank == 0:
            if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
                raise NonFiniteLossError(f"refusing to save a checkpoint with NaN/inf weights at epoch {epoch + 1}")
            from safetensors.torch import save_file

            from vitpose.models.checkpoints import SPEC_KEY

            save_file({k: v.contiguous() for k, v in state.items()}, str(out / MODEL_FILE),
                      metadata={"format": "pt", SPEC_KEY: json.dumps(self.spec.to_dict())})
            meta = {
                "epoch": epoch,
                "global_step": self.global_step,
                "world_size": self.world,
                "zero_stage": self.stage,
                "best_ap": self.best_ap,
                "nonfinite_total": self.nonfinite_total,
                "metrics": metrics,
                "history": self.history,
                "restored_at_epochs": self.restored_at_epochs,
                "keypoints": self.keypoint_info,
                "spec": self.spec.to_dict(),
                "bad_samples": {split: {"index": dict(getattr(ds, "index_bad_counts", {})),
                                        "skipped": {str(i): r for i, r in sorted(self.skipped[split].items())}}
                                for split, ds in (("train", self.train_ds), ("val", self.val_ds))},
            }
            write_atomic(out / META_FILE, json.dumps(meta, indent=1))
        # Last, and listing the size of every file this rank wrote: verify_checkpoint can then tell a folder
        # cut off while saving (or truncated later) from a complete one.
        files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                 if p.is_file() and not p.name.endswith((".complete", ".tmp"))}
        write_atomic(out / f"rank{self.rank}.complete", json.dumps(files, indent=0))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered float32 weights (a collective under ZeRO-3: every rank must call it).

        Trained in bf16/fp16 under ZeRO 1-3, the weights saved are the optimizer's fp32 master copy, not the
        low-precision copy the model computes with (which would round every weight to 8 bits of mantissa).
        DeepSpeed's bf16 optimizer without ZeRO (stage 0) keeps its masters out of reach: bf16 values there.
        """
        module = self.engine.module
        masters: dict[str, torch.Tensor] = {}
        if self.dtype != torch.float32 and self.stage >= 1:
            from deepspeed.utils import safe_get_full_fp32_param

            for name, param in module.named_parameters():
                full = safe_get_full_fp32_param(param)  # a collective under ZeRO-3, same order on every rank
                if full is not None:
                    masters[name] = full

        def gathered() -> dict[str, torch.Tensor]:
            return {k: masters.get(k, v).detach().float().cpu().clone() for k, v in module.state_dict().items()}

        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return gathered()
        return gathered()

    # ----------------------------------------------------------------------------------- output
    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(f"{self.prefix}{text}", flush=True)

    def _progress_line(self, epoch: int, epochs: int, m: dict[str, float], t_start: float) -> None:
        done = epoch + 1 - self.start_epoch
        eta = (time.time() - t_start) / max(done, 1) * (epochs - epoch - 1)
        ap = f"  val AP {m['val/AP']:.3f} AR {m['val/AR']:.3f}" if "val/AP" in m else ""
        self._say(f"epoch {epoch + 1}/{epochs}  loss {m['train/loss']:.6f}  lr {m['train/lr']:.2e}  "
                  f"{m['train/images_per_sec']:.1f} img/s{ap}  ETA {_fmt_secs(eta)}")


def remove_stale_save_dirs() -> None:
    """Delete the temp folders of saves cut off by a killed worker (a ViT-g save is gigabytes). Only those
    whose process is gone: concurrent trainers on this machine keep theirs."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SAVE_TMP_PREFIX}*-*"):
        pid = folder.name[len(SAVE_TMP_PREFIX):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The checkpoint directly under ``folder`` with the highest epoch that passes ``verify_checkpoint``."""
    usable = []
    for sub in folder.iterdir():
        if sub.is_dir() and (sub / META_FILE).is_file():
            try:
                usable.append((verify_checkpoint(sub)["epoch"], sub.name, sub))
            except IncompleteCheckpointError:
                continue
    return max(usable)[2] if usable else None


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """A checkpoint is usable only if its metadata and every rank's completion marker are there, and every
    file a marker lists has the size it was written with. Returns the metadata."""
    ckpt_dir = Path(ckpt_dir)
    fix = "it was cut off while saving or changed afterwards; resume from an earlier checkpoint"
    meta_path = ckpt_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint (no {META_FILE}); {fix}") from None
    except (OSError, ValueError) as err:
        raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint ({META_FILE} unreadable: {err}); "
                                        f"{fix}") from None
    missing = [r for r in range(meta["world_size"]) if not (ckpt_dir / f"rank{r}.complete").is_file()]
    if missing or not (ckpt_dir / MODEL_FILE).is_file():
        raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint (ranks {missing} did not finish "
                                        f"saving); {fix}")
    for r in range(meta["world_size"]):
        text = (ckpt_dir / f"rank{r}.complete").read_text()
        if text.strip() == "ok":  # written before markers listed file sizes
            continue
        try:
            written = json.loads(text)
        except ValueError:
            raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint (rank{r}.complete unreadable); "
                                            f"{fix}") from None
        for name, size in written.items():
            path = ckpt_dir / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                state = "is missing" if actual is None else f"has {actual} bytes, {size} were written"
                raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint ({name} of rank {r} {state}); "
                                                f"{fix}")
    return meta


def load_deepspeed_files_as_weights_only(engine: Any) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)``.

    Its own loader passes ``weights_only=False``, so a crafted ``.pt`` dropped into a checkpoint folder would
    run code on resume. Its files hold tensors, plain containers and a few DeepSpeed classes, allowed here
    (found by saving ZeRO 0-3 in fp32 and bf16).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from vitpose.models.checkpoints import _torch_load

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return _torch_load(Path(path))

    engine.checkpoint_engine.load = load


def keypoint_info(dataset: Any) -> dict[str, Any]:
    """Names, flip pairs and (1-based, COCO-style) skeleton of a dataset's keypoints, as plain lists."""
    return {
        "names": list(dataset.keypoint_names),
        "flip_pairs": [list(p) for p in dataset.flip_pairs],
        "skeleton": [[a + 1, b + 1] for a, b in dataset.skeleton],
    }


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------ ray entry
def unretryable_errors() -> tuple[type[BaseException], ...]:
    from vitpose.config import ConfigError
    from vitpose.data.coco import BadSampleError
    from vitpose.models.checkpoints import CheckpointError

    return (BadSampleError, NonFiniteLossError, IncompleteCheckpointError, ConfigError, CheckpointError)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: config carries the resolved TeacherConfig as a dict.

    ``run_dir`` (optional) is the run's storage folder, where an error that a retry would only meet again
    is recorded in ``FATAL_FILE`` (see there).
    """
    logging.basicConfig(level=logging.WARNING)
    fatal = Path(config["run_dir"]) / FATAL_FILE if config.get("run_dir") else None
    if fatal is not None and fatal.is_file():
        raise RuntimeError(f"not retried: {json.loads(fatal.read_text())['message']}")
    cfg = TeacherConfig.model_validate(config["cfg"])
    session = RaySession()
    tracker = None
    if session.rank == 0 and config.get("mlflow_run_id"):
        from vitpose.tracking import WorkerTracker

        tracker = WorkerTracker(config["tracking_uri"], config["mlflow_run_id"])
    try:
        Trainer(cfg, session, tracker=tracker).fit()
    except unretryable_errors() as err:
        if fatal is not None:
            write_atomic(fatal, json.dumps({"rank": session.rank, "type": type(err).__name__,
                                            "message": one_line(err)}))
        raise
    finally:
        if tracker is not None:
            tracker.close()

"""The data loaders of one training worker: its shard of the training set in epoch-seeded order, and one
validation loader per validation set (a single dataset is a list of one; several datasets, ``data.datasets``,
give mixed training batches by ratio and each dataset's own val set)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from vitpose.config import TrainingConfig
from vitpose.data.sampling import EpochKeyed, EpochShardSampler
from vitpose.train.multi_dataset import is_mixed


@dataclass
class Loaders:
    train: Any  # DataLoader of training batches (an iterable of batches)
    train_sampler: Any  # ``set_epoch(epoch)`` before each epoch: the epoch's order and augmentation seeds
    val: list[DataLoader]  # one per validation set, in the datasets' order
    steps_per_epoch: int


def build_loaders(cfg: TrainingConfig, train_ds: Any, val_ds: Any, rank: int, world: int) -> Loaders:
    workers, batch = cfg.data.loader_workers, cfg.train.batch_size
    keep = {"num_workers": workers, "persistent_workers": workers > 0}
    if is_mixed(train_ds):
        sampler = train_ds.batch_sampler(batch, rank, world, cfg.train.seed)
        train = DataLoader(train_ds, batch_sampler=sampler, collate_fn=train_ds.collate,
                           pin_memory=torch.cuda.is_available(), **keep)
        val_sets = list(val_ds.datasets)
    else:
        sampler = EpochShardSampler(len(train_ds), rank, world, True, cfg.train.seed, with_epoch=True)
        train = DataLoader(EpochKeyed(train_ds), batch_size=batch, sampler=sampler, drop_last=True,
                           pin_memory=torch.cuda.is_available(), **keep)
        val_sets = [val_ds]
    val = [DataLoader(ds, batch_size=batch, sampler=EpochShardSampler(len(ds), rank, world, False, cfg.train.seed),
                      **keep) for ds in val_sets]
    steps = len(train)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps == 0:
        raise ValueError(f"the training set has {len(train_ds)} instances, fewer than one batch per worker "
                         f"({batch} x {world} workers): lower train.batch_size")
    return Loaders(train, sampler, val, steps)

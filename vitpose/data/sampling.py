"""Which training items each rank sees, epoch by epoch, so that a resumed run sees what the uninterrupted
one would have: shuffles are seeded by (seed, epoch), and the epoch travels with each index."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler


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

"""Several top-down datasets in one run: mixed training batches by ratio, per-dataset val sets.

Every training batch holds every dataset: ``batch_counts`` splits the micro batch by the ratios (largest
remainder, at least one sample each), so each head and expert runs on every step on every rank (ZeRO-3's
collectives need the same modules called everywhere, and a BatchNorm never sees an empty batch). Dataset d
draws from its own stream of seeded shuffles, (seed, epoch, d, pass): a small dataset is passed over again
within an epoch, a large one only partly, and ranks take interleaved slices, so a resumed run sees what the
uninterrupted one would have. An epoch is ``total instances // (batch x world)`` steps.

Items carry ``dataset_index``; their per-keypoint arrays (target, target_weight, keypoints) are padded with
zeros to the largest keypoint count, so one batch is one dict of tensors; a dataset's own channels are the
first K of its rows. ``index`` is offset by the datasets before it (unique over the mix, for the bad-sample
ledger).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

PADDED = ("target", "target_weight", "keypoints")


class SeveralDatasets:
    """What the trainer and the driver's data check read of a dataset, over ``self.datasets``."""

    datasets: list[Any]

    @property
    def index_bad_counts(self) -> dict[str, int]:
        """What the datasets' indexes refused up front, summed by reason."""
        total: Counter[str] = Counter()
        for d in self.datasets:
            total.update(getattr(d, "index_bad_counts", {}))
        return dict(total)

    @property
    def ann_file(self) -> str:  # for messages
        return ", ".join(str(d.ann_file) for d in self.datasets)


def batch_counts(ratios: list[float], batch_size: int) -> list[int]:
    """Samples of each dataset in a batch of ``batch_size``: proportional (largest remainder), each at least 1."""
    if batch_size < len(ratios):
        raise ValueError(f"train.batch_size {batch_size} is smaller than the {len(ratios)} datasets of "
                         "data.datasets: every batch holds every dataset; raise it")
    want = np.asarray(ratios, float) / sum(ratios) * batch_size
    counts = np.maximum(np.floor(want).astype(int), 1)
    while counts.sum() < batch_size:  # the largest remainders get the rest
        counts[int(np.argmax(want - counts))] += 1
    while counts.sum() > batch_size:  # the floor of one lifted a small share: the largest gives it back
        counts[int(np.argmax(np.where(counts > 1, counts - want, -np.inf)))] -= 1
    return counts.tolist()


class MixedTrainSet(SeveralDatasets, Dataset):
    """The training sets of a multi-dataset run, items keyed ``(epoch, dataset, index)``."""

    def __init__(self, names: list[str], datasets: list[Any], ratios: list[float]):
        self.names, self.datasets, self.ratios = list(names), list(datasets), list(ratios)
        self.offsets = np.cumsum([0] + [len(d) for d in datasets]).tolist()
        self.keypoint_set = datasets[0].keypoint_set  # the primary's: what the model's keypoint_head predicts
        self.max_keypoints = max(d.num_keypoints for d in datasets)

    @property
    def keypoint_sets(self) -> list[tuple[str, Any]]:
        return [(n, d.keypoint_set) for n, d in zip(self.names, self.datasets, strict=True)]

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, d, index = key
        ds = self.datasets[d]
        if getattr(ds, "epoch", epoch) != epoch:
            ds.set_epoch(epoch)
        item = ds[index]
        off = self.offsets[d]
        item["skipped"] = ",".join(f"{int(i) + off}:{r}" for i, _, r in
                                   (e.partition(":") for e in filter(None, item.get("skipped", "").split(","))))
        item["index"] = int(item["index"]) + off
        item["dataset_index"] = d
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """``default_collate`` after padding the per-keypoint arrays to ``max_keypoints`` rows."""
        for item in items:
            for key in PADDED:
                a = item[key]
                pad = self.max_keypoints - a.shape[0]
                if pad:
                    zeros = (torch.zeros if isinstance(a, torch.Tensor) else np.zeros)((pad, *a.shape[1:]), dtype=a.dtype)
                    item[key] = torch.cat([a, zeros]) if isinstance(a, torch.Tensor) else np.concatenate([a, zeros])
        return default_collate(items)

    def batch_sampler(self, batch_size: int, rank: int, world: int, seed: int) -> MixedBatchSampler:
        return MixedBatchSampler([len(d) for d in self.datasets], batch_counts(self.ratios, batch_size), rank,
                                 world, seed)


class MixedBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batches of ``(epoch, dataset, index)`` keys, ``counts[d]`` of dataset d in each (see the module doc)."""

    def __init__(self, sizes: list[int], counts: list[int], rank: int, world: int, seed: int):
        self.sizes, self.counts, self.rank, self.world, self.seed = sizes, counts, rank, world, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(sum(self.sizes) // (sum(self.counts) * self.world), 1)

    def _stream(self, d: int, length: int) -> np.ndarray:
        passes = -(-length // self.sizes[d])
        return np.concatenate([np.random.default_rng([self.seed, self.epoch, d, p]).permutation(self.sizes[d])
                               for p in range(passes)])

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        steps = len(self)
        streams = [self._stream(d, steps * self.world * c) for d, c in enumerate(self.counts)]
        for t in range(steps):
            batch = []
            for d, c in enumerate(self.counts):
                start = (t * self.world + self.rank) * c
                batch += [(self.epoch, d, int(i)) for i in streams[d][start:start + c]]
            yield batch


class MultiValSet(SeveralDatasets):
    """The val sets of a multi-dataset run, by name; the first is the primary (``val/AP``)."""

    def __init__(self, names: list[str], datasets: list[Any]):
        self.names, self.datasets = list(names), list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)


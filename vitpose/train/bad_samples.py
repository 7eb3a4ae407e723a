"""The count of bad samples a run met, by split and reason, exact however the data was sharded.

Two sources: what the dataset index refused up front (the same on every rank) and what a loader skipped
while reading (an unreadable image), reported per batch as ``"index:reason,..."`` strings. The ledger keeps
the second kind by instance index, merges it over ranks once per epoch, and travels in checkpoint metadata
so a resumed run keeps its counts.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

SPLITS = ("train", "val")


class BadSampleLedger:
    def __init__(self, datasets: dict[str, Any], world_size: int):
        self.datasets, self.world = datasets, world_size
        self.skipped: dict[str, dict[int, str]] = {split: {} for split in SPLITS}

    def note(self, split: str, batch: dict[str, Any]) -> None:
        """Record what the dataset skipped to build this batch."""
        for text in batch.get("skipped", ()):
            for entry in filter(None, text.split(",")):
                index, _, reason = entry.partition(":")
                self.skipped[split][int(index)] = reason

    def metrics(self) -> dict[str, float]:
        """``bad_samples/<split>/<reason>`` and ``.../total``, merged over ranks. A collective: every rank calls
        it once per epoch."""
        if dist.is_initialized() and self.world > 1:
            parts: list[dict[str, dict[int, str]]] = [None] * self.world  # type: ignore[list-item]
            dist.all_gather_object(parts, self.skipped)
            self.skipped = {split: {i: r for part in parts for i, r in part[split].items()} for split in SPLITS}
        metrics: dict[str, float] = {}
        for split in SPLITS:
            counts: dict[str, int] = dict(getattr(self.datasets[split], "index_bad_counts", {}))
            for reason in self.skipped[split].values():
                counts[reason] = counts.get(reason, 0) + 1
            for reason, n in counts.items():
                metrics[f"bad_samples/{split}/{reason}"] = float(n)
            if counts:
                metrics[f"bad_samples/{split}/total"] = float(sum(counts.values()))
        return metrics

    def to_meta(self) -> dict[str, Any]:
        return {split: {"index": dict(getattr(self.datasets[split], "index_bad_counts", {})),
                        "skipped": {str(i): r for i, r in sorted(self.skipped[split].items())}}
                for split in SPLITS}

    def restore(self, meta: dict[str, Any]) -> None:
        self.skipped = {split: {int(i): r for i, r in meta.get(split, {}).get("skipped", {}).items()}
                        for split in SPLITS}

"""Data loading throughput: crops/second for the training transform (augmentation on) and the evaluation
transform on the synthetic dataset, in a single process and through a torch DataLoader with workers.

    python -m benchmarks.data_throughput [--root DIR] [--items 400] [--workers 2] [--batch-size 32]

Everything a training step needs is included: JPEG decode, affine warp, photometrics (train), normalisation
and UDP target encoding. Per-worker numbers are the DataLoader total divided by the worker count.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Run, add_json_option, clock, timed
from vitpose.data.coco import TopDownCocoDataset
from vitpose.data.synthetic import ensure_synthetic_dataset


def single_process(ds: TopDownCocoDataset, n: int) -> float:
    ds[0]  # warm-up: imports, first file-system access
    return n / timed(lambda: [ds[i % len(ds)] for i in range(n)])


def with_loader(ds: TopDownCocoDataset, n: int, workers: int, batch_size: int) -> float:
    subset = torch.utils.data.Subset(ds, [i % len(ds) for i in range(n)])
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, shuffle=False)
    it = iter(loader)
    first = next(it)  # worker start-up is not throughput
    t0 = clock()
    count = sum(len(batch["index"]) for batch in it)
    dt = clock() - t0
    del first
    return count / dt


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=None, help="synthetic dataset folder (default: a temp dir)")
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    add_json_option(p, "data_throughput")
    a = p.parse_args()
    torch.set_num_threads(1)  # the transforms are numpy/cv2; keep torch from competing for the cores
    run = Run("data_throughput", a.json)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.root or Path(tmp) / "synthetic"
        t0 = time.perf_counter()
        paths = ensure_synthetic_dataset(root, train_instances=max(a.items, 400), val_instances=200)
        print(f"dataset ready in {time.perf_counter() - t0:.1f}s at {root}")
        rows = []
        for name, ds in (
            ("train (aug)", TopDownCocoDataset(paths.train_ann, paths.train_images, train=True, aug_seed=0)),
            ("val", TopDownCocoDataset(paths.val_ann, paths.val_images, train=False)),
        ):
            single = single_process(ds, a.items)
            loader = with_loader(ds, a.items, a.workers, a.batch_size)
            rows.append((name, single, loader))
        print(
            f"{'transform':<12} {'1 process':>12} {f'DataLoader x{a.workers}':>16} {'per worker':>12}  (crops/s)"
        )
        for name, single, loader in rows:
            print(f"{name:<12} {single:12.0f} {loader:16.0f} {loader / max(a.workers, 1):12.0f}")
    run.finish(items=a.items, workers=a.workers, batch_size=a.batch_size,
               crops_per_s={name: {"1 process": single, "DataLoader": loader} for name, single, loader in rows})


if __name__ == "__main__":
    main()

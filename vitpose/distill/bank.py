"""The view bank: the teacher's heatmaps for V seeded augmented views of every training instance, stored
once per sweep with the parameters of each view (fast knowledge distillation, Shen & Xing 2022), so trials
pay for the teacher once instead of on every step. ``BankedViews`` makes a dataset draw its augmentation
from those views; in bank mode every arm of a sweep trains on them, so arms differ only in their loss.

``view_stream`` says what identifies the views a student trains on; ``bank_key`` names a bank by
everything that produced it (teacher, data, crop size, augmentation, seed, views per instance).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vitpose.build import model_spec
from vitpose.config import StudentConfig
from vitpose.data.coco import BadSampleError
from vitpose.data.transforms import AugParams
from vitpose.distill.teacher import frozen
from vitpose.run.console import say as console_say

# Data settings that change how crops are loaded, never which crops there are.
LOADING_ONLY = {"loader_workers", "image_cache_mb"}


def data_identity(cfg: StudentConfig) -> str:
    """A digest of everything that decides the training crops of ``cfg``: the data section (files,
    augmentation, synthetic knobs) and the crop and heatmap sizes, not how the crops are loaded."""
    # A single-dataset section digests as it did before data.datasets existed (cached banks stay valid).
    data = cfg.data.model_dump(mode="json", exclude=LOADING_ONLY | (set() if cfg.data.datasets else {"datasets"}))
    data["root"] = str(cfg.data.root_path())
    spec = model_spec(cfg)
    text = json.dumps({"data": data, "img_size": list(spec.img_size), "heatmap": list(spec.heatmap_size)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def view_stream(cfg: StudentConfig) -> dict[str, Any]:
    """What identifies the training views of a student of ``cfg`` (the same for every arm of a comparison):
    bank mode, V stored views per instance; online mode, a fresh seeded draw per (epoch, instance)."""
    o = cfg.distill.output
    return {"source": o.mode, "data": data_identity(cfg), "seed": cfg.train.seed,
            "views_per_instance": o.views if o.mode == "bank" else None}


def bank_key(teacher_id: str, cfg: StudentConfig) -> str:
    """The folder name of the bank a trial of ``cfg`` trains on."""
    text = json.dumps({"teacher": teacher_id, **view_stream(cfg)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ViewBank:
    """Teacher heatmaps for V augmented views per training instance, memory-mapped from ``folder``.

    ``heatmaps.npy`` (N, V, K, h, w) float16, ``params.npy`` (N, V, P) float64 (``AugParams`` arrays),
    ``valid.npy`` (N,) bool, ``bank.json`` (what built it). A bank is written to a temporary folder and
    renamed into place, so a half-built bank is never opened.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not (self.folder / "bank.json").is_file():
            raise FileNotFoundError(f"{self.folder}: no view bank here (bank.json missing); the sweep builds it "
                                    "before the trials (run the sweep again, or with --resume)")
        self.info = json.loads((self.folder / "bank.json").read_text())
        self.heatmaps = np.load(self.folder / "heatmaps.npy", mmap_mode="r")
        self.params = np.load(self.folder / "params.npy")
        self.valid = np.load(self.folder / "valid.npy")
        self.views = int(self.info["views"])

    @staticmethod
    def view_params(dataset: Any, index: int, view: int, seed: int) -> Any:
        return dataset.sample_params(index, rng=np.random.default_rng([seed, 7919, view, index]))

    @classmethod
    def build(cls, teacher: torch.nn.Module, dataset: Any, views: int, seed: int, folder: Path,
              teacher_id: str, batch_size: int = 64, say: Callable[[str], None] = console_say,
              device: torch.device | str = "cpu") -> ViewBank:
        folder = Path(folder)
        if (folder / "bank.json").is_file():
            bank = cls(folder)
            if bank.info.get("teacher") == teacher_id and bank.views == views and bank.info.get("seed") == seed \
                    and bank.info.get("instances") == len(dataset):
                say(f"view bank reused from {folder}")
                return bank
        teacher = frozen(teacher).to(device)
        n, k = len(dataset), teacher.spec.num_keypoints
        h, w = teacher.spec.heatmap_size
        tmp = folder.with_name(folder.name + ".building")
        tmp.mkdir(parents=True, exist_ok=True)
        heat = np.lib.format.open_memmap(tmp / "heatmaps.npy", mode="w+", dtype=np.float16, shape=(n, views, k, h, w))
        params = np.zeros((n, views, AugParams.ARRAY_SIZE), dtype=np.float64)
        valid = np.ones(n, dtype=bool)
        t0, done = time.time(), 0
        pending: list[tuple[int, int, torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            with torch.no_grad():
                out = teacher(torch.stack([p[2] for p in pending]).to(device)).float().cpu().numpy()
            for (i, v, _), hm in zip(pending, out, strict=True):
                heat[i, v] = hm.astype(np.float16)
            pending.clear()

        for v in range(views):
            for i in range(n):
                p = cls.view_params(dataset, i, v, seed)
                params[i, v] = p.to_array()
                try:
                    item = dataset.load(i, p)
                except BadSampleError:
                    if dataset.on_bad_sample == "error":
                        raise
                    valid[i] = False
                    continue
                pending.append((i, v, item["image"]))
                if len(pending) == batch_size:
                    flush()
                done += 1
                if done % 1000 == 0:
                    say(f"  view bank: {done}/{n * views} views ({done / (time.time() - t0):.0f}/s)")
            flush()
        heat.flush()
        np.save(tmp / "params.npy", params)
        np.save(tmp / "valid.npy", valid)
        info = {"teacher": teacher_id, "views": views, "seed": seed, "instances": n, "keypoints": k,
                "heatmap_size": [h, w], "seconds": round(time.time() - t0, 1), "teacher_forwards": done}
        (tmp / "bank.json").write_text(json.dumps(info, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        say(f"view bank built: {n} instances x {views} views in {info['seconds']}s -> {folder}")
        return cls(folder)


class BankedViews(Dataset):
    """A training dataset whose every item is one of the bank's views, with the teacher's heatmaps.

    The view of (epoch, index) is drawn from (seed, epoch, index), so a resumed epoch replays exactly.
    Everything else (keypoint names, flip pairs, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset: Any, bank: ViewBank, seed: int):
        if len(dataset) != bank.heatmaps.shape[0]:
            raise ValueError(f"view bank {bank.folder} has {bank.heatmaps.shape[0]} instances, dataset {len(dataset)}")
        self.dataset, self.bank, self.seed, self.epoch = dataset, bank, seed, 0
        self.valid = np.flatnonzero(bank.valid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["dataset"], name)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.bank.valid[index]:
            # A bad sample the bank skipped: substitute the next valid instance, deterministically.
            index = int(self.valid[np.searchsorted(self.valid, index) % len(self.valid)])
        view = int(np.random.default_rng([self.seed, self.epoch, index]).integers(self.bank.views))
        item = self.dataset.load(index, AugParams.from_array(self.bank.params[index, view]))
        item["teacher_heatmaps"] = torch.from_numpy(np.asarray(self.bank.heatmaps[index, view], dtype=np.float32))
        item["view"] = view
        return item

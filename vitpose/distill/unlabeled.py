"""Distillation from unlabelled images (``distill.unlabeled``): person boxes a detector found, labelled by the
teacher once into a view bank of their own, mixed into the student's training crops.

An epoch keeps the labelled set's length, so a sweep's arms take the same optimizer steps with or without the
unlabelled set; a share ``ratio`` of its crops come from the unlabelled bank (the ground-truth loss of those is
zero: their keypoints are unknown), drawn in a seeded order that goes through every unlabelled crop before any
repeats. Arms without output distillation train on the labelled crops alone (nothing would teach them from the
others).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vitpose.build import model_spec
from vitpose.config import ConfigError, StudentConfig, resolve_path
from vitpose.data.unlabeled import UnlabeledBoxes, images_by_id
from vitpose.run.storage import Storage

CACHE = "runs/distill/unlabeled"  # local copies of unlabelled sets kept on object storage


def unlabeled_paths(cfg: StudentConfig) -> tuple[Path, Path]:
    """(image folder, box file) on this machine: relative paths from ``data.root``; a storage URI is copied
    into ``runs/distill/unlabeled/`` once per machine."""
    u = cfg.distill.unlabeled
    assert u.images is not None and u.boxes is not None
    return _local(u.images, cfg, "distill.unlabeled.images", folder=True), _local(u.boxes, cfg, "distill.unlabeled.boxes")


def _local(where: str, cfg: StudentConfig, key: str, folder: bool = False) -> Path:
    if "://" not in where:
        path = Path(where).expanduser()
        path = path if path.is_absolute() else cfg.data.root_path() / path
        if not (path.is_dir() if folder else path.is_file()):
            raise ConfigError(f"{key}={where}: no {'folder' if folder else 'file'} at {path}")
        return path
    source = Storage.parse(where)
    if not (source.is_dir() if folder else source.is_file()):
        raise ConfigError(f"{key}={where}: no {'folder' if folder else 'file'} there")
    # Keyed by what is there now: a folder by its files' names and sizes, a file by its bytes.
    content = json.dumps(source.file_sizes(), sort_keys=True).encode() if folder else source.read_bytes()
    digest = hashlib.sha256(where.encode() + b"\0" + content).hexdigest()[:16]
    copy = resolve_path(CACHE) / digest / source.name
    if copy.exists():
        return copy
    copy.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=".part-", dir=copy.parent)) / source.name  # trials may fetch at once
    if folder:
        source.download(part)
    else:
        part.write_bytes(content)
    try:
        part.rename(copy)
    except OSError:  # another process put its copy there first
        if not copy.exists():
            raise
    shutil.rmtree(part.parent, ignore_errors=True)
    return copy


def unlabeled_dataset(cfg: StudentConfig, labeled: Any) -> UnlabeledBoxes:
    """The unlabelled person crops, cut and augmented as ``labeled`` (the labelled training set) is."""
    images, boxes = unlabeled_paths(cfg)
    u = cfg.distill.unlabeled
    try:
        return UnlabeledBoxes(images, boxes, keypoints=labeled.keypoint_set, score_thr=u.score_thr,
                              category_id=u.category_id, input_size=labeled.input_size,
                              heatmap_size=labeled.heatmap_size, aug=labeled.aug, aug_seed=cfg.train.seed,
                              sigma=labeled.sigma, padding=labeled.padding)
    except ValueError as err:  # e.g. a box file that is not a detection list, or no usable box
        raise ConfigError(f"distill.unlabeled: {err}") from None


def describe(dataset: UnlabeledBoxes) -> str:
    """One line on what the unlabelled set gave: crops, images, and what was skipped."""
    skipped = dict(dataset.index_bad_counts)
    names = {inst.image_id for inst in dataset.instances}
    line = f"unlabelled set: {len(dataset)} person boxes on {len(names)} images of {dataset.image_dir}"
    if skipped.get("unknown_image_id"):
        line += (f"; {skipped.pop('unknown_image_id')} boxes of {dataset.ann_file.name} name images that are not in "
                 "the folder (skipped)")
    if skipped:
        line += f"; skipped {skipped}"
    return line


def unlabeled_bank_key(teacher_id: str, cfg: StudentConfig) -> str:
    """The folder name of the unlabelled set's bank: teacher, box file contents, image names, crop, augmentation,
    seed and views."""
    images, boxes = unlabeled_paths(cfg)
    u, spec = cfg.distill.unlabeled, model_spec(cfg)
    text = json.dumps({"teacher": teacher_id, "boxes": hashlib.sha256(boxes.read_bytes()).hexdigest(),
                       "images": sorted(im["file_name"] for im in images_by_id(images).values()),
                       "score_thr": u.score_thr, "category_id": u.category_id, "img_size": list(spec.img_size),
                       "heatmap": list(spec.heatmap_size), "aug": cfg.data.aug.model_dump(mode="json"),
                       "seed": cfg.train.seed, "views": cfg.distill.output.views}, sort_keys=True)
    return "unlabeled-" + hashlib.sha256(text.encode()).hexdigest()[:16]


class MixedViews(Dataset):
    """The labelled views with a share ``ratio`` of each epoch's slots taken by unlabelled views (see the
    module docstring); both are ``BankedViews``. Attributes not found here are the labelled set's."""

    def __init__(self, labeled: Any, unlabeled: Any, ratio: float, seed: int):
        self.labeled, self.unlabeled, self.ratio, self.seed = labeled, unlabeled, float(ratio), int(seed)
        self.epoch, self._slots = 0, self._assign(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["labeled"], name)

    def __len__(self) -> int:
        return len(self.labeled)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.labeled.set_epoch(epoch)
        self.unlabeled.set_epoch(epoch)
        self._slots = self._assign(self.epoch)

    def _assign(self, epoch: int) -> np.ndarray:
        """Per slot of ``epoch``: -1 for a labelled view (of the slot's own instance), else the unlabelled
        instance it shows."""
        n, m = len(self.labeled), int(round(self.ratio * len(self.labeled)))
        chosen = np.random.default_rng([self.seed, 4099, epoch]).permutation(n)[:m]
        slots = np.full(n, -1, dtype=np.int64)
        slots[np.sort(chosen)] = self._stream(epoch * m, m)
        return slots

    def _stream(self, start: int, count: int) -> np.ndarray:
        """Positions ``start .. start + count`` of the unlabelled order: a fresh seeded permutation per pass."""
        total = len(self.unlabeled)
        positions = np.arange(start, start + count)
        passes = positions // total
        out = np.empty(count, dtype=np.int64)
        for p in np.unique(passes):
            order = np.random.default_rng([self.seed, 8191, int(p)]).permutation(total)
            out[passes == p] = order[positions[passes == p] % total]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = int(self._slots[index])
        item = self.labeled[index] if source < 0 else self.unlabeled[source]
        item["unlabeled"] = source >= 0
        return item

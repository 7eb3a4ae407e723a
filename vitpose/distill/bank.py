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
from vitpose.data.codec import flip_back
from vitpose.data.transforms import AugParams
from vitpose.distill.teacher import frozen
from vitpose.run.console import say as console_say
from vitpose.train.run_folder import write_atomic

PROGRESS = "progress.json"  # in a bank being built: the build's identity and the views written so far
FEATURES = "features.npy"  # the teacher's last tokens per view, in banks built for feature distillation
# Data settings that change how crops are loaded, never which crops there are.
LOADING_ONLY = {"loader_workers", "image_cache_mb"}


def data_identity(cfg: StudentConfig) -> str:
    """A digest of everything that decides the training crops of ``cfg``: the data section (files,
    augmentation, synthetic knobs) and the crop and heatmap sizes, not how the crops are loaded."""
    # A single-dataset section digests as it did before data.datasets existed (cached banks stay valid).
    data = cfg.data.model_dump(mode="json", exclude=LOADING_ONLY | (set() if cfg.data.datasets else {"datasets"}))
    del data["synthetic"]["unlabeled_instances"]  # the unlabelled split changes no labelled crop
    data["root"] = str(cfg.data.root_path())
    spec = model_spec(cfg)
    text = json.dumps({"data": data, "img_size": list(spec.img_size), "heatmap": list(spec.heatmap_size)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def view_stream(cfg: StudentConfig) -> dict[str, Any]:
    """What identifies the training views of a student of ``cfg`` (the same for every arm of a comparison):
    bank mode, V stored views per instance; online mode, a fresh seeded draw per (epoch, instance)."""
    o = cfg.distill.output
    stream = {"source": o.mode, "data": data_identity(cfg), "seed": cfg.train.seed,
              "views_per_instance": o.views if o.mode == "bank" else None}
    if o.mode == "bank" and o.flip_average:  # only when on: banks made before the option keep their names
        stream["flip_averaged"] = True
    return stream


def bank_key(teacher_id: str, cfg: StudentConfig) -> str:
    """The folder name of the bank a trial of ``cfg`` trains on."""
    text = json.dumps({"teacher": teacher_id, **view_stream(cfg)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ViewBank:
    """Teacher heatmaps for V augmented views per training instance, memory-mapped from ``folder``.

    ``heatmaps.npy`` (N, V, K, h, w) float16, ``params.npy`` (N, V, P) float64 (``AugParams`` arrays),
    ``valid.npy`` (N,) bool, ``bank.json`` (what built it); built for feature distillation, also
    ``features.npy`` (N, V, C, Hp, Wp) float16, the teacher's last tokens. A bank is written to a temporary
    folder and renamed into place, so a half-built bank is never opened.
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
        tokens = self.folder / FEATURES
        self.features = np.load(tokens, mmap_mode="r") if tokens.is_file() else None

    @staticmethod
    def view_params(dataset: Any, index: int, view: int, seed: int) -> Any:
        return dataset.sample_params(index, rng=np.random.default_rng([seed, 7919, view, index]))

    @classmethod
    def build(cls, teacher: torch.nn.Module, dataset: Any, views: int, seed: int, folder: Path,
              teacher_id: str, batch_size: int = 64, say: Callable[[str], None] = console_say,
              device: torch.device | str = "cpu", flip_pairs: list[tuple[int, int]] | None = None,
              features: bool = False) -> ViewBank:
        """The bank of ``dataset`` in ``folder``: reused when it holds these views (and, with ``features``, the
        teacher's tokens), else built. With ``flip_pairs`` each view's heatmaps average the teacher's on the crop
        and, flipped back, on its mirror (the flip test); tokens are the crop's own (a mirrored crop's tokens do
        not map back). A build that stops part-way goes on from its last written batch when run again."""
        folder = Path(folder)
        build = {"teacher": teacher_id, "views": views, "seed": seed, "instances": len(dataset),
                 "flip_averaged": flip_pairs is not None}
        if (folder / "bank.json").is_file():
            bank = cls(folder)
            if {k: bank.info.get(k, False) for k in build} == build and (bank.features is not None or not features):
                say(f"view bank reused from {folder}")
                return bank
        build["features"] = features
        teacher = frozen(teacher).to(device)
        n, k = len(dataset), teacher.spec.num_keypoints
        h, w = teacher.spec.heatmap_size
        tmp = folder.with_name(folder.name + ".building")
        start = _resume_point(tmp, build)
        if start == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        else:
            say(f"view bank: going on from view {start}/{n * views} of the interrupted build in {tmp}")
        mode = "r+" if start else "w+"
        heat = np.lib.format.open_memmap(tmp / "heatmaps.npy", mode=mode, dtype=np.float16, shape=(n, views, k, h, w))
        valid = np.lib.format.open_memmap(tmp / "valid.npy", mode=mode, dtype=bool, shape=(n,))
        tokens = None
        if features:
            grid = teacher.backbone.grid_size
            tokens = np.lib.format.open_memmap(tmp / FEATURES, mode=mode, dtype=np.float16,
                                               shape=(n, views, teacher.spec.embed_dim, *grid))
        if not start:
            valid[:] = True
        params = np.zeros((n, views, AugParams.ARRAY_SIZE), dtype=np.float64)
        t0, loaded = time.time(), 0
        pending: list[tuple[int, int, torch.Tensor]] = []

        def flush(position: int) -> None:
            """Label the pending crops, then record that every view before ``position`` is written."""
            if pending:
                crops = torch.stack([p[2] for p in pending]).to(device)
                out, feats = teacher_outputs(teacher, crops, flip_pairs, features)
                out = out.cpu().numpy().astype(np.float16)  # one device-to-host copy per batch
                feats = feats.cpu().numpy().astype(np.float16) if tokens is not None else None
                for j, (i, v, _) in enumerate(pending):
                    heat[i, v] = out[j]
                    if tokens is not None:
                        tokens[i, v] = feats[j]
                pending.clear()
            heat.flush()
            if tokens is not None:
                tokens.flush()
            valid.flush()
            write_atomic(tmp / PROGRESS, json.dumps({**build, "done": position}))

        for position in range(n * views):
            v, i = divmod(position, n)
            p = cls.view_params(dataset, i, v, seed)
            params[i, v] = p.to_array()
            if position < start:
                continue  # labelled before the interruption; its parameters are recomputed, not stored
            try:
                item = dataset.load(i, p)
            except BadSampleError:
                if dataset.on_bad_sample == "error":
                    raise
                valid[i] = False
                continue
            pending.append((i, v, item["image"]))
            loaded += 1
            if len(pending) == batch_size:
                flush(position + 1)
            if loaded % 1000 == 0:
                say(f"  view bank: {position + 1}/{n * views} views ({loaded / (time.time() - t0):.0f}/s)")
        flush(n * views)
        np.save(tmp / "params.npy", params)
        forwards = (n * views - start) * (2 if flip_pairs is not None else 1)
        info = {**build, "keypoints": k, "heatmap_size": [h, w], "seconds": round(time.time() - t0, 1),
                "teacher_forwards": forwards, "invalid_instances": int((~valid).sum())}
        (tmp / "bank.json").write_text(json.dumps(info, indent=1))
        (tmp / PROGRESS).unlink()
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        say(f"view bank built: {n} instances x {views} views in {info['seconds']}s -> {folder}")
        return cls(folder)


def teacher_heatmaps(teacher: torch.nn.Module, crops: torch.Tensor,
                     flip_pairs: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """The teacher's heatmaps of ``crops`` (float32); with ``flip_pairs``, averaged with those of the mirrored
    crops mapped back (the flip test)."""
    return teacher_outputs(teacher, crops, flip_pairs)[0]


def teacher_outputs(teacher: torch.nn.Module, crops: torch.Tensor, flip_pairs: list[tuple[int, int]] | None = None,
                    features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``teacher_heatmaps`` and, with ``features``, the teacher's last tokens of the crops themselves."""
    with torch.no_grad():
        if features:
            out, tokens = teacher(crops, with_features=True)
            out, tokens = out.float(), tokens.float()
        else:
            out, tokens = teacher(crops).float(), None
        if flip_pairs is not None:
            out = 0.5 * (out + flip_back(teacher(crops.flip(-1)).float(), flip_pairs))
    return out, tokens


def _resume_point(tmp: Path, build: dict[str, Any]) -> int:
    """The first view an interrupted build of ``build`` in ``tmp`` has not written (0: start afresh)."""
    try:
        progress = json.loads((tmp / PROGRESS).read_text())
    except (FileNotFoundError, ValueError):
        return 0
    done = progress.pop("done", 0)
    return int(done) if progress == build and (tmp / "heatmaps.npy").is_file() else 0


class BankedViews(Dataset):
    """A training dataset whose every item is one of the bank's views, with the teacher's heatmaps.

    The view of (epoch, index) is drawn from (seed, epoch, index), so a resumed epoch replays exactly; with
    ``features`` an item also carries the teacher's tokens of its view. Everything else (keypoint names, flip
    pairs, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset: Any, bank: ViewBank, seed: int, features: bool = False):
        if len(dataset) != bank.heatmaps.shape[0]:
            raise ValueError(f"view bank {bank.folder} has {bank.heatmaps.shape[0]} instances, dataset {len(dataset)}")
        if features and bank.features is None:
            raise ValueError(f"view bank {bank.folder} holds no teacher tokens ({FEATURES}); the sweep builds them "
                             "when a trial sets distill.feature.weight > 0 (run it again to rebuild the bank)")
        self.dataset, self.bank, self.seed, self.epoch = dataset, bank, seed, 0
        self.features = features
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
        item["teacher_heatmaps"] = as_float32(self.bank.heatmaps[index, view])
        if self.features:
            item["teacher_features"] = as_float32(self.bank.features[index, view])
        item["view"] = view
        return item


def as_float32(stored: np.ndarray) -> torch.Tensor:
    """A float16 array read from the bank, as a float32 tensor: copied as it is stored, then widened by torch,
    whose vectorised conversion is ~20x numpy's (0.46 ms per 17x64x48 heatmap, a tenth of a demo trial's step)."""
    return torch.from_numpy(np.array(stored)).float()

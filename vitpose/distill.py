"""Knowledge-token and output distillation (ViTPose paper §3.4), and the teacher-output view bank.

1. ``learn_knowledge_tokens``: K learnable tokens appended to a *frozen* teacher's patch tokens, trained
   alone on the ground-truth heatmap loss. Cached on disk per (teacher, setting) so every trial that asks
   for the same setting reuses them.
2. ``build_student``: a student whose backbone carries the frozen tokens, through a learnable projection
   when the widths differ (identity when they match).
3. ``distill_loss``: ground-truth MSE plus weighted MSE to the teacher's heatmaps, either read from the
   view bank (``batch["teacher_heatmaps"]``) or computed online by the teacher.
4. ``ViewBank``: the teacher's heatmaps (float16) for V seeded augmented views of every training
   instance, stored with the view parameters, built once per sweep (fast knowledge distillation, Shen &
   Xing 2022). ``BankedViews`` makes a dataset draw its augmentation from those views, so trials pay for
   the teacher once instead of on every step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitpose.config import ConfigError
from vitpose.losses import heatmap_distill_mse, keypoint_mse

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- teacher
def check_same_keypoints(teacher_meta: dict[str, Any], dataset: Any, teacher_uri: str) -> None:
    names = (teacher_meta.get("keypoints") or {}).get("names")
    if names is not None and list(names) != list(dataset.keypoint_names):
        raise ConfigError(
            f"teacher {teacher_uri} predicts keypoints {names[:4]}... ({len(names)}) but the dataset "
            f"{dataset.ann_file} has {list(dataset.keypoint_names)[:4]}... ({len(dataset.keypoint_names)}); "
            "distill on data with the teacher's keypoint set"
        )


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BatchNorm statistics and drop path fixed) and no gradients anywhere."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------- knowledge tokens
@dataclass(frozen=True)
class TokenSetting:
    num_tokens: int
    epochs: int
    lr: float
    seed: int = 0
    batch_size: int = 32

    def key(self, teacher_id: str) -> str:
        text = json.dumps({"teacher": teacher_id, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def learn_knowledge_tokens(teacher: torch.nn.Module, train_ds: Dataset, setting: TokenSetting,
                           say: Any = print) -> torch.Tensor:
    """Train K tokens on a frozen copy of ``teacher``; returns them (K, C_teacher). Teacher untouched."""
    model = frozen(copy.deepcopy(teacher))
    tokens = model.backbone.add_knowledge_tokens(setting.num_tokens)
    for p in tokens.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setting.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(setting.seed)
    loader = DataLoader(train_ds, batch_size=setting.batch_size, shuffle=True, generator=gen, drop_last=True)
    for epoch in range(setting.epochs):
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        t0, total, steps = time.time(), 0.0, 0
        for batch in loader:
            loss = keypoint_mse(model(batch["image"]), batch["target"], batch["target_weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss), steps + 1
        say(f"  knowledge tokens epoch {epoch + 1}/{setting.epochs}: loss {total / max(steps, 1):.6f} "
            f"({time.time() - t0:.0f}s)")
    return model.backbone.knowledge_tokens.tokens.detach().clone()


def ensure_knowledge_tokens(teacher: torch.nn.Module, teacher_id: str, train_ds: Dataset,
                            setting: TokenSetting, cache_dir: Path, say: Any = print) -> Path:
    """The cached token file for (teacher, setting), learning it first when missing."""
    from safetensors.torch import save_file

    path = Path(cache_dir) / f"tokens-{setting.key(teacher_id)}.safetensors"
    if path.is_file():
        say(f"knowledge tokens {setting} reused from {path}")
        return path
    say(f"learning knowledge tokens {setting} on the frozen teacher")
    tokens = learn_knowledge_tokens(teacher, train_ds, setting, say)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"tokens": tokens.contiguous()}, str(tmp),
              metadata={"teacher": teacher_id, "setting": json.dumps(asdict(setting))})
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half file under the real name
    return path


def load_tokens(path: str | Path) -> torch.Tensor:
    """Tokens from a safetensors file only: a pickle (``.pt``/``.pth``) is refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path}: not a knowledge-token file ({err}); token files are safetensors written "
                          "by ensure_knowledge_tokens, other formats are not read") from None
    if "tokens" not in tensors or tensors["tokens"].ndim != 2:
        raise ConfigError(f"{path}: not a knowledge-token file (expected a 2-D 'tokens' tensor)")
    return tensors["tokens"]


# -------------------------------------------------------------------------------------- student
def build_student(cfg: Any, tokens: torch.Tensor | None) -> torch.nn.Module:
    """The student of ``cfg.model`` with frozen knowledge tokens (projected to its width) when given."""
    from vitpose.engine import build_model_from_config

    if tokens is None:
        return build_model_from_config(cfg)
    model = build_model_from_config(cfg, num_knowledge_tokens=tokens.shape[0], knowledge_token_dim=tokens.shape[1])
    model.backbone.set_knowledge_tokens(tokens, trainable=False)
    return model


def distill_loss(output_weight: float, teacher: torch.nn.Module | None = None):
    """GT loss + ``output_weight`` x MSE to teacher heatmaps (from the batch, else ``teacher`` online)."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        heatmaps = model(batch["image"])
        gt = keypoint_mse(heatmaps, batch["target"], batch["target_weight"])
        if output_weight <= 0:
            return gt, {"gt_loss": float(gt)}
        if "teacher_heatmaps" in batch:
            target = batch["teacher_heatmaps"]
        elif teacher is not None:
            with torch.no_grad():
                target = teacher(batch["image"].float())
        else:
            raise RuntimeError("output distillation needs a view bank or an online teacher")
        kd = heatmap_distill_mse(heatmaps, target, output_weight)
        return gt + kd, {"gt_loss": float(gt), "kd_loss": float(kd)}

    return loss_fn


# ------------------------------------------------------------------------------------- view bank
class ViewBank:
    """Teacher heatmaps for V augmented views per training instance, memory-mapped from ``folder``.

    ``heatmaps.npy`` (N, V, K, h, w) float16, ``params.npy`` (N, V, P) float64 (``AugParams`` arrays),
    ``valid.npy`` (N,) bool, ``bank.json`` (what built it). A bank is written to a temporary folder and
    renamed into place, so a half-built bank is never opened.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
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
              teacher_id: str, batch_size: int = 64, say: Any = print) -> ViewBank:
        from vitpose.data.coco import BadSampleError

        folder = Path(folder)
        if (folder / "bank.json").is_file():
            bank = cls(folder)
            if bank.info.get("teacher") == teacher_id and bank.views == views and bank.info.get("seed") == seed \
                    and bank.info.get("instances") == len(dataset):
                say(f"view bank reused from {folder}")
                return bank
        teacher = frozen(teacher)
        n, k = len(dataset), teacher.spec.num_keypoints
        h, w = teacher.spec.heatmap_size
        tmp = folder.with_name(folder.name + ".building")
        tmp.mkdir(parents=True, exist_ok=True)
        heat = np.lib.format.open_memmap(tmp / "heatmaps.npy", mode="w+", dtype=np.float16, shape=(n, views, k, h, w))
        params = np.zeros((n, views, _params_size()), dtype=np.float64)
        valid = np.ones(n, dtype=bool)
        t0, done = time.time(), 0
        pending: list[tuple[int, int, torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            with torch.no_grad():
                out = teacher(torch.stack([p[2] for p in pending])).float().numpy()
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
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)
        say(f"view bank built: {n} instances x {views} views in {info['seconds']}s -> {folder}")
        return cls(folder)


def _params_size() -> int:
    from vitpose.data.transforms import AugParams

    return AugParams.ARRAY_SIZE


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
        from vitpose.data.transforms import AugParams

        if not self.bank.valid[index]:
            # A bad sample the bank skipped: substitute the next valid instance, deterministically.
            index = int(self.valid[np.searchsorted(self.valid, index) % len(self.valid)])
        view = int(np.random.default_rng([self.seed, self.epoch, index]).integers(self.bank.views))
        item = self.dataset.load(index, AugParams.from_array(self.bank.params[index, view]))
        item["teacher_heatmaps"] = torch.from_numpy(np.asarray(self.bank.heatmaps[index, view], dtype=np.float32))
        item["view"] = view
        return item

"""Knowledge tokens (ViTPose paper §3.4): learned once on a frozen teacher, stored, handed to students.

``learn_knowledge_tokens`` appends K learnable tokens to a frozen copy of the teacher's patch tokens and
trains them alone on the ground-truth heatmap loss. The tokens live in the *student's* width: when the teacher
is wider (or narrower) they enter it through a fixed, seeded matrix with orthonormal columns (``fixed_lift``),
never trained. So a student receives exactly the tokens that were optimised, with nothing trainable on the way
(a learnable projection would make the "teacher's token" a freely learned student token). With equal widths
there is no lift: the paper's method as written. ``random_tokens`` are the same tokens before learning, the
control arm that never saw the teacher.

``ensure_knowledge_tokens`` caches the result as a safetensors file named by ``token_file``'s key of
everything that produced it (teacher, setting, student width, seed, batch, training data); ``load_tokens``
reads it back without unpickling anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vitpose.build import model_spec
from vitpose.config import ConfigError, StudentConfig
from vitpose.distill.bank import data_identity
from vitpose.distill.teacher import frozen
from vitpose.losses import keypoint_mse
from vitpose.models.backbone import fixed_lift, initial_knowledge_tokens
from vitpose.run.console import say as console_say

TOKEN_DIR = "runs/distill/tokens"  # the learned token files, shared by sweeps and plans


@dataclass(frozen=True)
class TokenSetting:
    """Everything that decides a set of learned tokens, but the teacher (the key adds its id).

    ``width``: the student's width, the tokens' width (None: the teacher's); ``data``: ``data_identity`` of the
    crops they were learned on.
    """

    num_tokens: int
    epochs: int
    lr: float
    seed: int = 0
    batch_size: int = 32
    width: int | None = None
    data: str = ""

    @classmethod
    def from_config(cls, cfg: StudentConfig) -> TokenSetting:
        """The setting a run of ``cfg`` asks for: the one place a token file's key is read from a config."""
        t = cfg.distill.token
        return cls(num_tokens=t.num_tokens, epochs=t.epochs, lr=t.lr, seed=cfg.train.seed,
                   batch_size=cfg.train.batch_size, width=model_spec(cfg).embed_dim, data=data_identity(cfg))

    def key(self, teacher_id: str) -> str:
        text = json.dumps({"teacher": teacher_id, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def token_file(folder: Path, setting: TokenSetting, teacher_id: str) -> Path:
    """Where the tokens of ``setting`` learned on the teacher ``teacher_id`` are kept."""
    return Path(folder) / f"tokens-{setting.key(teacher_id)}.safetensors"


def random_tokens(setting: TokenSetting, width: int | None = None) -> torch.Tensor:
    """The control arm's tokens: where learning of ``setting`` starts, never trained on the teacher (``width``
    stands in for ``setting.width`` when that is None: the teacher's own)."""
    return initial_knowledge_tokens(setting.num_tokens, setting.width or width, setting.seed)


def learn_knowledge_tokens(teacher: torch.nn.Module, train_ds: Dataset, setting: TokenSetting,
                           say: Callable[[str], None] = console_say,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """Train K tokens (width ``setting.width``) on a frozen copy of ``teacher``; returns them (K, width) on
    the CPU. The teacher is untouched."""
    model = frozen(copy.deepcopy(teacher)).to(device)
    teacher_width = model.backbone.embed_dim
    width = setting.width or teacher_width
    lift = None if width == teacher_width else fixed_lift(width, teacher_width, setting.seed)
    tokens = model.backbone.set_knowledge_tokens(random_tokens(setting, width), trainable=True, lift=lift)
    opt = torch.optim.AdamW([tokens.tokens], lr=setting.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(setting.seed)
    loader = DataLoader(train_ds, batch_size=setting.batch_size, shuffle=True, generator=gen, drop_last=True)
    for epoch in range(setting.epochs):
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        t0, total, steps = time.time(), 0.0, 0
        for batch in loader:
            heatmaps = model(batch["image"].to(device))
            loss = keypoint_mse(heatmaps, batch["target"].to(device), batch["target_weight"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        say(f"  knowledge tokens epoch {epoch + 1}/{setting.epochs}: loss {total / max(steps, 1):.6f} "
            f"({time.time() - t0:.0f}s)")
    return tokens.tokens.detach().float().cpu().clone()


def token_effect(teacher: torch.nn.Module, val_ds: Dataset, setting: TokenSetting, learned: torch.Tensor,
                 batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:
    """The frozen teacher's ground-truth heatmap loss on ``val_ds`` with the control's random tokens and with the
    ``learned`` ones (keys ``random``, ``learned``), and ``change``, learned / random - 1: what token learning
    did to the teacher itself, the most a student can get from those tokens."""
    loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False)
    losses = {}
    for name, tokens in (("random", None), ("learned", learned)):
        model = frozen(copy.deepcopy(teacher)).to(device)
        width = setting.width or model.backbone.embed_dim
        lift = None if width == model.backbone.embed_dim else fixed_lift(width, model.backbone.embed_dim, setting.seed)
        model.backbone.set_knowledge_tokens(random_tokens(setting, width) if tokens is None else tokens, lift=lift)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                heatmaps = model(batch["image"].to(device))
                n = batch["image"].shape[0]
                loss = keypoint_mse(heatmaps, batch["target"].to(device), batch["target_weight"].to(device))
                total, count = total + float(loss) * n, count + n
        losses[name] = total / max(count, 1)
    return {**losses, "change": losses["learned"] / losses["random"] - 1.0}


def ensure_knowledge_tokens(teacher: torch.nn.Module, teacher_id: str, train_ds: Dataset,
                            setting: TokenSetting, cache_dir: Path, say: Callable[[str], None] = console_say,
                            device: torch.device | str = "cpu") -> Path:
    """The cached token file for (teacher, setting), learning it first when missing."""
    from safetensors.torch import save_file

    path = token_file(cache_dir, setting, teacher_id)
    if path.is_file():
        say(f"knowledge tokens reused from {path}")
        return path
    say(f"learning knowledge tokens on the frozen teacher: {setting.num_tokens} token(s) of width "
        f"{setting.width}, {setting.epochs} epoch(s), lr {setting.lr:g}, seed {setting.seed}")
    tokens = learn_knowledge_tokens(teacher, train_ds, setting, say, device)
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


def tokens_for(cfg: StudentConfig, token_dir: Path, teacher_id: str) -> torch.Tensor | None:
    """The frozen tokens a student of ``cfg`` receives: none, the control's random ones, or the stored
    ones learned on the teacher (made by the sweep's preparation)."""
    t = cfg.distill.token
    if not t.enabled:
        return None
    setting = TokenSetting.from_config(cfg)
    if t.random:
        return random_tokens(setting)
    path = token_file(token_dir, setting, teacher_id)
    if not path.is_file():
        raise ConfigError(f"{path}: no knowledge tokens for {setting} on {teacher_id}; the sweep learns them "
                          "before the trials (run the sweep again, or with --resume)")
    return load_tokens(path)

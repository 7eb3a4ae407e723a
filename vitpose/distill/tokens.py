"""Knowledge tokens (ViTPose paper §3.4): learned once on a frozen teacher, stored, handed to students.

``learn_knowledge_tokens`` appends K learnable tokens to a frozen copy of the teacher's patch tokens and
trains them alone on the ground-truth heatmap loss. ``ensure_knowledge_tokens`` caches the result as a
safetensors file whose name is ``token_file``'s key of (teacher, setting), so every trial that asks for the
same setting reuses it, and ``load_tokens`` reads it back without unpickling anything.
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

from vitpose.config import ConfigError, StudentConfig
from vitpose.console import say as console_say
from vitpose.distill.student import frozen
from vitpose.losses import keypoint_mse


@dataclass(frozen=True)
class TokenSetting:
    num_tokens: int
    epochs: int
    lr: float
    seed: int = 0
    batch_size: int = 32

    @classmethod
    def from_config(cls, cfg: StudentConfig) -> TokenSetting:
        """The setting a run of ``cfg`` asks for: the one place a token file's key is read from a config."""
        t = cfg.distill.token
        return cls(num_tokens=t.num_tokens, epochs=t.epochs, lr=t.lr, seed=cfg.train.seed,
                   batch_size=cfg.train.batch_size)

    def key(self, teacher_id: str) -> str:
        text = json.dumps({"teacher": teacher_id, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def token_file(folder: Path, setting: TokenSetting, teacher_id: str) -> Path:
    """Where the tokens of ``setting`` learned on the teacher ``teacher_id`` are kept."""
    return Path(folder) / f"tokens-{setting.key(teacher_id)}.safetensors"


def learn_knowledge_tokens(teacher: torch.nn.Module, train_ds: Dataset, setting: TokenSetting,
                           say: Callable[[str], None] = console_say) -> torch.Tensor:
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
                            setting: TokenSetting, cache_dir: Path, say: Callable[[str], None] = console_say) -> Path:
    """The cached token file for (teacher, setting), learning it first when missing."""
    from safetensors.torch import save_file

    path = token_file(cache_dir, setting, teacher_id)
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

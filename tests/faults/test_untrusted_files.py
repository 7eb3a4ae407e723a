"""Untrusted files: a pickle whose ``__reduce__`` would run code (here: create a marker file), planted
where the pipelines read checkpoints and knowledge tokens, is refused and never runs. Each test first
shows that the payload is live (an unguarded loader does create the marker), so it cannot pass vacuously.

The model-checkpoint reader itself (vitpose.models.weights) is covered by
tests/test_checkpoints.py::test_non_tensor_pickle_refused; here are the other ways in.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_config
from tests.faults.procs import PY
from vitpose.config import ConfigError
from vitpose.models.weights import UnsafeCheckpointError


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, obj: object, marker: Path) -> None:
    """Write ``obj`` with a Payload inside to ``path``, and check an unguarded torch.load runs it."""
    torch.save(obj, path)
    with path.open("rb") as f:  # a file object: torch.load reads a *.safetensors path as safetensors
        torch.load(f, weights_only=False)
    assert marker.exists(), "the payload does not run: the test would prove nothing"
    marker.unlink()


def test_deepspeed_shard_with_a_payload_is_refused_on_resume(synthetic_root, tmp_path):
    """DeepSpeed reads its own checkpoint files with weights_only=False; resuming from a checkpoint folder
    where one shard was replaced (and the size list rewritten to match) must refuse, not run the payload."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from vitpose.train.loop import Trainer
    from vitpose.train.run_folder import verify_checkpoint
    from vitpose.train.session import LocalSession

    cfg = tiny_config(synthetic_root, "train.epochs=1", "train.max_steps_per_epoch=1", "deepspeed.zero_stage=1")
    session = LocalSession(tmp_path / "run")
    Trainer(cfg, session).fit()
    ckpt = session.checkpoints[-1]
    shard = next((ckpt / "ds").glob("*optim_states.pt"))
    marker = tmp_path / "code_ran"
    state = TorchCheckpointEngine().load(str(shard))  # DeepSpeed's own loader, for the original content
    plant(shard, {**state, "extra": Payload(marker)}, marker)
    listed = json.loads((ckpt / "rank0.complete").read_text())
    listed[str(shard.relative_to(ckpt))] = shard.stat().st_size
    (ckpt / "rank0.complete").write_text(json.dumps(listed))
    verify_checkpoint(ckpt)

    trainer = Trainer(cfg, LocalSession(tmp_path / "resumed", resume_from=ckpt))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*optim_states\.pt: .*references [^)]*pathlib"):
        trainer.restore()
    assert not marker.exists()


def test_knowledge_token_file_with_a_payload_is_refused(tmp_path):
    """Token files are read as safetensors only: a pickle under that name is an error, never unpickled."""
    from vitpose.distill.tokens import load_tokens

    marker = tmp_path / "code_ran"
    path = tmp_path / "tokens-0123456789abcdef.safetensors"
    plant(path, {"tokens": Payload(marker)}, marker)
    with pytest.raises(ConfigError, match="not a knowledge-token file"):
        load_tokens(path)
    assert not marker.exists()


@pytest.mark.slow
def test_model_file_with_a_payload_is_refused_by_the_cli(synthetic_root, tmp_path):
    """pipelines/evaluate.py --model evil.pth: one error line, exit code 2, the payload never runs."""
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    plant(evil, {"state_dict": {"backbone.pos_embed": torch.zeros(1, 13, 32)}, "meta": Payload(marker)}, marker)
    out = subprocess.run([PY, "pipelines/evaluate.py", "--model", str(evil), "--data-root", str(synthetic_root),
                          "--out", str(tmp_path / "eval")], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert f"refusing to load {evil}: it contains pickled objects" in line and "pathlib" in line
    assert not marker.exists()

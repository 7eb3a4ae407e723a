"""The run-folder format of a training checkpoint: what files it holds, how a complete one is told from a
cut-off one, and how it is read back without unpickling anything.

A checkpoint folder holds DeepSpeed's sharded state under ``ds/`` (every rank), the gathered fp32 weights
``model.safetensors`` with the model spec in its header and ``meta.json`` (rank 0), and one
``rank<R>.complete`` marker per rank, written last, listing the size of every file that rank wrote.
``verify_checkpoint`` accepts a folder only when all markers are there and every listed file has its size.
Serving, the pipelines and the tests take these names from here. Checkpoints are written to a local
folder and handed to Ray, which persists them to ``ray.storage_path`` (local, NFS or object storage);
``verify_checkpoint`` and ``newest_complete_checkpoint`` read either kind (``vitpose.run.storage``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from vitpose.models.loading import CHECKPOINT_META as META_FILE
from vitpose.models.loading import WEIGHTS as MODEL_FILE
from vitpose.run.storage import Storage

CKPT_TAG = "ds"
# Prefix of the temp folders checkpoints are written to before Ray takes them, followed by "<pid>-".
SAVE_TMP_PREFIX = "vitpose-ckpt-"


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder that was cut off while saving, or changed after, and cannot be resumed from."""


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_weights(out: Path, state: dict[str, torch.Tensor], spec: dict[str, Any]) -> None:
    """``model.safetensors`` with the spec in its header, so the file alone rebuilds the model."""
    from safetensors.torch import save_file

    from vitpose.models.weights import SPEC_KEY

    save_file({k: v.contiguous() for k, v in state.items()}, str(out / MODEL_FILE),
              metadata={"format": "pt", SPEC_KEY: json.dumps(spec)})


def write_rank_marker(out: Path, rank: int) -> None:
    """Last step of a rank's save: the marker lists the size of every file in the folder, so a folder cut
    off while saving (or truncated later) is told from a complete one."""
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and not p.name.endswith((".complete", ".tmp"))}
    write_atomic(out / f"rank{rank}.complete", json.dumps(files, indent=0))


def verify_checkpoint(ckpt_dir: Path | Storage) -> dict[str, Any]:
    """A checkpoint is usable only if its metadata and every rank's completion marker are there, and every
    file a marker lists has the size it was written with. Returns the metadata. ``ckpt_dir`` is a local
    folder or a ``Storage`` folder (object storage: one listing and a few small reads, nothing downloaded)."""
    where = Storage.of(ckpt_dir)
    fix = "it was cut off while saving or changed afterwards; resume from an earlier checkpoint"
    try:
        meta = json.loads((where / META_FILE).read_text())
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint (no {META_FILE}); {fix}") from None
    except (OSError, ValueError) as err:
        raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint ({META_FILE} unreadable: {err}); "
                                        f"{fix}") from None
    sizes = where.file_sizes()
    missing = [r for r in range(meta["world_size"]) if f"rank{r}.complete" not in sizes]
    if missing or MODEL_FILE not in sizes:
        raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint (ranks {missing} did not finish "
                                        f"saving); {fix}")
    for r in range(meta["world_size"]):
        try:
            written = json.loads((where / f"rank{r}.complete").read_text())
        except ValueError:
            raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint (rank{r}.complete unreadable); "
                                            f"{fix}") from None
        for name, size in written.items():
            actual = sizes.get(name)
            if actual != size:
                state = "is missing" if actual is None else f"has {actual} bytes, {size} were written"
                raise IncompleteCheckpointError(f"{ckpt_dir}: incomplete checkpoint ({name} of rank {r} {state}); "
                                                f"{fix}")
    return meta


def resume_mismatch(meta: dict[str, Any], world: int, precision: str) -> str | None:
    """Why a checkpoint with ``meta`` cannot continue in a run of ``world`` workers training in ``precision``
    (DeepSpeed's files hold per-rank shards and, in bf16, fp32 master weights), or None when it can."""
    if meta["world_size"] != world:
        return (f"checkpoint was written by {meta['world_size']} workers, this run has {world}; "
                "resume with the same ray.num_workers")
    written = meta.get("precision", precision)  # checkpoints from before the key: as configured
    if written != precision:
        return (f"checkpoint was trained in {written}, this run trains in {precision}; resume with --set "
                f"train.precision={written} (or auto, which keeps a checkpoint's precision)")
    return None


def recorded_precision(latest: AbstractContextManager[Any]) -> str | None:
    """The precision the checkpoint ``latest`` (a session's ``latest_checkpoint()``) was trained in; None when
    there is none, or it predates the record, or its meta cannot be read (restore then says what is wrong)."""
    with latest as ckpt_dir:
        try:
            return json.loads((Path(ckpt_dir) / META_FILE).read_text()).get("precision") if ckpt_dir else None
        except (OSError, ValueError):
            return None


def newest_complete_checkpoint(folder: Path | Storage) -> Path | Storage | None:
    """The checkpoint directly under ``folder`` with the highest epoch that passes ``verify_checkpoint``
    (a ``Path`` for a local folder given as one, else a ``Storage``)."""
    usable = []
    for sub in Storage.of(folder).iterdir():
        if (sub / META_FILE).is_file():
            try:
                usable.append((verify_checkpoint(sub)["epoch"], sub.name, sub))
            except IncompleteCheckpointError:
                continue
    if not usable:
        return None
    best = max(usable, key=lambda u: u[:2])[2]
    return best.local_path if isinstance(folder, Path) else best


def remove_stale_save_dirs() -> None:
    """Delete the temp folders of saves cut off by a killed worker (a ViT-g save is gigabytes). Only those
    whose process is gone: concurrent trainers on this machine keep theirs."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SAVE_TMP_PREFIX}*-*"):
        pid = folder.name[len(SAVE_TMP_PREFIX):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def load_deepspeed_files_as_weights_only(engine: Any) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)``.

    Its own loader passes ``weights_only=False``, so a crafted ``.pt`` dropped into a checkpoint folder would
    run code on resume. Its files hold tensors, plain containers and a few DeepSpeed classes, allowed here
    (found by saving ZeRO 0-3 in fp32 and bf16).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from vitpose.models.weights import torch_load_weights_only

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch_load_weights_only(Path(path))

    engine.checkpoint_engine.load = load


def gather_fp32_state_dict(engine: Any, stage: int, low_precision: bool) -> dict[str, torch.Tensor]:
    """The model's full float32 weights from a DeepSpeed engine (a collective under ZeRO-3: every rank calls).

    Trained in bf16/fp16 under ZeRO 1-3, the weights are the optimizer's fp32 master copy, not the
    low-precision copy the model computes with (which would round every weight to 8 bits of mantissa).
    DeepSpeed's bf16 optimizer without ZeRO (stage 0) keeps its masters out of reach: bf16 values there.
    """
    module = engine.module
    masters: dict[str, torch.Tensor] = {}
    if low_precision and stage >= 1:
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in module.named_parameters():
            full = safe_get_full_fp32_param(param)  # a collective under ZeRO-3, same order on every rank
            if full is not None:
                masters[name] = full

    def gathered() -> dict[str, torch.Tensor]:
        return {k: masters.get(k, v).detach().float().cpu().clone() for k, v in module.state_dict().items()}

    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return gathered()
    return gathered()

"""Section 4 of ``benchmarks.compare_peer``: keypoint AP of a trained small model in fp32 and under bf16
autocast (flip test on), the model trained here by the real engine when no checkpoint is given."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO
from benchmarks.peer.common import CACHE, TINY_TEACHER, autocast, set_dist_env, tiny_config
from vitpose.train.session import free_port


def train_ap_model(epochs: int, say: Callable[[str], None]) -> Path:
    """The embedded default teacher trained by the engine (one process, ZeRO-0); cached by model and epochs."""
    m = tiny_config([]).model
    out = CACHE / f"ap-model-{m.preset}-p{m.patch_size or 16}-{epochs}ep"
    weights = out / "model.safetensors"
    if weights.is_file():
        say(f"trained model: cached {weights.relative_to(REPO)}")
        return weights
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    set_dist_env(0, 1, free_port())
    cfg = tiny_config([f"train.epochs={epochs}", f"train.eval_every={epochs}", "deepspeed.zero_stage=0",
                       "data.loader_workers=1"])
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    session = LocalSession(out / "run")
    trainer = Trainer(cfg, session)
    trainer.fit()
    torch.set_num_threads(threads)
    last = session.checkpoints[-1]
    shutil.copy(last / "model.safetensors", weights)
    (out / "train.json").write_text(json.dumps({"config": str(TINY_TEACHER.relative_to(REPO)), "epochs": epochs,
                                                "seconds": time.perf_counter() - t0, "reports": session.reports}))
    shutil.rmtree(out / "run", ignore_errors=True)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    say(f"trained model: {epochs} epochs of {m.preset} in {time.perf_counter() - t0:.0f}s -> {weights.relative_to(REPO)}")
    return weights


def bf16_accuracy(checkpoint: Path | None, epochs: int, say: Callable[[str], None]) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from vitpose.build import build_datasets, ensure_data
    from vitpose.evaluation import CocoKeypointEvaluator, decode_batch_to_predictions
    from vitpose.models import create

    path = Path(checkpoint) if checkpoint else train_ap_model(epochs, say)
    model = create(path).eval()
    # The val crops follow the model (its input and heatmap sizes).
    cfg = tiny_config([f"model.img_size={list(model.spec.img_size)}", f"model.patch_size={model.spec.patch_size}"])
    ensure_data(cfg)
    _, val = build_datasets(cfg, True)
    loader = DataLoader(val, batch_size=32, num_workers=0)
    result: dict[str, Any] = {"model": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                              "preset": model.spec.to_dict(), "val instances": len(val)}
    for precision in ("fp32", "bf16"):
        preds = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in loader:
                images = batch["image"]
                with autocast(precision == "bf16"):
                    hm, hm_flip = model(images).float(), model(images.flip(3)).float()
                preds.extend(decode_batch_to_predictions(hm, batch, hm_flip, flip_pairs=val.flip_pairs,
                                                         input_size=val.input_size))
        result[f"{precision} seconds"] = time.perf_counter() - t0
        ap = CocoKeypointEvaluator(val.ann_file).evaluate(preds)
        result[precision] = {k: float(v) for k, v in ap.items()}
    with torch.inference_mode():
        images = next(iter(loader))["image"]
        ref = model(images)
        with autocast(True):
            max_diff = float((model(images).float() - ref).abs().max())
        result["max abs heatmap"] = float(ref.abs().max())
    result["bf16 vs fp32 max abs heatmap diff (one batch)"] = max_diff
    result["AP difference (points)"] = 100 * (result["bf16"]["AP"] - result["fp32"]["AP"])
    say(f"AP fp32 {100 * result['fp32']['AP']:.2f}, bf16 {100 * result['bf16']['AP']:.2f} "
        f"(difference {result['AP difference (points)']:+.2f} points)")
    return result


"""Train, evaluate, export and register the embedded default's person detector (``pipelines/detector.py``).

One process (all its CPU threads, or one GPU: ``train.device``); every epoch writes an atomic checkpoint in the run
folder, so ``--resume`` continues the newest run of ``name`` from its last finished epoch. Val box AP is
pycocotools' bbox COCOeval on the val split; the val detections are written in COCO results format (what
``pipelines/evaluate.py --det-file`` takes), the network as ONNX (``model.onnx``, the ``torchvision`` layout of
``vitpose.deploy.detector``), and both, with the metrics and a picture of val detections, go to MLflow, where the
ONNX model is registered as ``tracking.registered_model@tracking.alias``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitpose.config import resolve_path
from vitpose.detection.config import DetectorConfig
from vitpose.detection.data import PersonBoxes, collate
from vitpose.detection.evaluate import box_ap, detect_split, pick_score_threshold
from vitpose.detection.model import build_detector, export_onnx
from vitpose.run.console import fmt_secs, say

CHECKPOINT = "checkpoint.pt"


def run_folder(cfg: DetectorConfig, resume: bool) -> Path:
    """A new ``<output>/<name>-<time>`` folder, or with ``resume`` the newest one of ``name`` with a checkpoint."""
    out = resolve_path(cfg.output)
    if resume:
        done = sorted(p.parent for p in out.glob(f"{cfg.name}-2*/{CHECKPOINT}"))
        if done:
            return done[-1]
        say(f"no run of {cfg.name} with a checkpoint under {out}: starting a new one")
    folder = out / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the previous epoch's checkpoint whole


def pick_device(asked: str) -> torch.device:
    if asked == "cuda" and not torch.cuda.is_available():
        from vitpose.config import ConfigError

        raise ConfigError("train.device: cuda asked for but torch sees no GPU; use auto or cpu")
    return torch.device("cuda" if asked != "cpu" and torch.cuda.is_available() else "cpu")


def train_detector(cfg: DetectorConfig, resume: bool = False) -> int:
    from vitpose.build import ensure_data
    from vitpose.run import tracking

    ensure_data(cfg)  # type: ignore[arg-type]  # it reads cfg.data only
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_uri(uri)
    device = pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    root, t = cfg.data.root_path(), cfg.train
    spec = cfg.model.model_dump()
    train_set = PersonBoxes(root / cfg.data.train_ann, root / cfg.data.train_images, spec["input_size"], train=True,
                            flip_prob=t.flip_prob, zoom_out_prob=t.zoom_out_prob, seed=t.seed)
    val_ann = root / cfg.data.val_ann
    val_set = PersonBoxes(val_ann, root / cfg.data.val_images, spec["input_size"], train=False)
    torch.manual_seed(t.seed)
    model = build_detector(spec).to(device)
    steps_per_epoch = len(train_set) // t.batch_size
    if steps_per_epoch == 0:
        from vitpose.config import ConfigError

        raise ConfigError(f"train.batch_size: {t.batch_size} is more than the {len(train_set)} training images")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_iters) if t.warmup_iters else 1.0
        return warm * 0.1 ** sum(step >= e * steps_per_epoch for e in t.lr_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    folder = run_folder(cfg, resume)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "run_id": None}
    if (folder / CHECKPOINT).exists():
        state = torch.load(folder / CHECKPOINT, map_location=device, weights_only=False)
        model.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        say(f"resuming {folder.name} after epoch {state['epoch']}")
    if state["run_id"] is None:
        state["run_id"] = tracking.start_driver_run(cfg, uri, cfg.tracking.experiment, folder.name)
    run_id = state["run_id"]
    say(f"MLflow run {run_id} ({uri}); run folder {folder}")
    say(f"detector: FCOS, {sum(p.numel() for p in model.parameters()):,} parameters, input {spec['input_size']}, "
        f"{len(train_set)} train / {len(val_set)} val images, {t.epochs} epochs on {device}")
    loader = torch.utils.data.DataLoader(train_set, batch_size=t.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, num_workers=cfg.data.loader_workers,
                                         generator=torch.Generator().manual_seed(t.seed))
    started, first = time.time(), state["epoch"]
    for epoch in range(state["epoch"], t.epochs):
        train_set.set_epoch(epoch)
        loader.generator.manual_seed(t.seed * 1000 + epoch)  # the epoch's order, the same after a resume
        model.train()
        t0, losses = time.time(), []
        for images, targets in loader:
            parts = model([im.to(device) for im in images], [{k: v.to(device) for k, v in tg.items()} for tg in targets])
            loss = sum(parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        metrics = {"train/loss": float(np.mean(losses)), "train/lr": optimizer.param_groups[0]["lr"],
                   "train/images_per_sec": len(losses) * t.batch_size / (time.time() - t0)}
        last = epoch + 1 == t.epochs
        if (epoch + 1) % t.eval_every == 0 or last:
            results = detect_split(model, val_set, device, t.batch_size)
            metrics.update({f"val/{k}": v for k, v in box_ap(val_ann, results).items()})
            if state["best"] is None or metrics["val/AP"] > state["best"]["val/AP"]:
                state["best"] = {"epoch": epoch + 1, "val/AP": metrics["val/AP"], "val/AP50": metrics["val/AP50"],
                                 "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                                 "results": results}
        tracking.log_metrics(uri, run_id, metrics, step=epoch + 1)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, **metrics})
        save_atomic({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}, folder / CHECKPOINT)
        eta = (time.time() - started) / (epoch + 1 - first) * (t.epochs - epoch - 1)
        ap = f"  val AP {metrics['val/AP']:.3f} AP50 {metrics['val/AP50']:.3f}" if "val/AP" in metrics else ""
        say(f"epoch {epoch + 1}/{t.epochs}  loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
            f"{metrics['train/images_per_sec']:.1f} img/s{ap}  ETA {fmt_secs(eta)}")
    return finish(cfg, uri, run_id, folder, model, state, val_set)


def finish(cfg: DetectorConfig, uri: str, run_id: str, folder: Path, model: torch.nn.Module, state: dict[str, Any],
           val_set: PersonBoxes) -> int:
    """The best epoch's weights to ONNX, its val detections to a COCO results file, both to MLflow; registered."""
    from vitpose.run import tracking

    best = state["best"]
    model.load_state_dict(best["state"])
    model.cpu().eval()
    score_thr, f1 = pick_score_threshold(val_set, best["results"])
    tracking.log_metrics(uri, run_id, {"val/score_thr": score_thr, "val/count_F1": f1}, step=best["epoch"])
    onnx_file = folder / "model.onnx"
    export_onnx(model, cfg.model.input_size, str(onnx_file), score_thr)
    detections = folder / "val_detections.json"
    detections.write_text(json.dumps(best["results"]))
    tracking.log_artifact(uri, run_id, detections)
    tracking.log_json(uri, run_id, state["history"], "history.json")
    log_picture(uri, run_id, val_set, best["results"])
    version = register(uri, run_id, onnx_file, cfg)
    tracking.end_run(uri, run_id, "FINISHED")
    model_uri = f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"
    for key, value in (("best val box AP", f"{best['val/AP']:.4f} (AP50 {best['val/AP50']:.4f}, epoch {best['epoch']})"),
                       ("score threshold", f"{score_thr:.2f} (val F1 {f1:.3f} of boxes matched to people one to "
                                           "one at IoU 0.5), stored in the ONNX file for predict and serving"),
                       ("MLflow run", run_id), ("registered model", f"{model_uri} (version {version})"),
                       ("ONNX file", onnx_file), ("val detections", detections),
                       ("pose AP on them", f"python pipelines/evaluate.py --model MODEL --det-file {detections}"),
                       ("use it", f"python pipelines/predict.py --model MODEL --detector {model_uri} IMAGE_OR_VIDEO"),
                       ("look at it", tracking.ui_link(uri, run_id))):
        say(f"{key:>18}: {value}")
    return 0


def register(uri: str, run_id: str, onnx_file: Path, cfg: DetectorConfig) -> str:
    """The ONNX file as an MLflow ``onnx`` model of the run, registered with the config's name and alias."""
    from importlib.metadata import version

    import mlflow
    import onnx

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_file)), name="detector",
                                     registered_model_name=cfg.tracking.registered_model,
                                     save_as_external_data=False,  # one file: export copies it into pose models
                                     pip_requirements=[f"onnxruntime=={version('onnxruntime')}",
                                                       f"onnx=={version('onnx')}"])
    number = str(info.registered_model_version)
    mlflow.MlflowClient(uri).set_registered_model_alias(cfg.tracking.registered_model, cfg.tracking.alias, number)
    return number


def log_picture(uri: str, run_id: str, val_set: PersonBoxes, results: list[dict[str, Any]], count: int = 4) -> None:
    """The first val images with their ground-truth boxes (green) and the detections over 0.3 (orange)."""
    import mlflow
    from PIL import Image, ImageDraw

    from vitpose.data.files import load_image

    tiles = []
    for i in range(min(count, len(val_set))):
        info = val_set.image_info(i)
        tile = Image.fromarray(load_image(val_set.image_dir / info["file_name"]))
        draw = ImageDraw.Draw(tile)
        for x1, y1, x2, y2 in val_set.boxes[info["id"]].tolist():
            draw.rectangle([x1, y1, x2, y2], outline=(40, 200, 40), width=2)
        for r in results:
            if r["image_id"] == info["id"] and r["score"] >= 0.3:
                x, y, w, h = r["bbox"]
                draw.rectangle([x, y, x + w, y + h], outline=(255, 140, 0), width=2)
        tiles.append(tile)
    if tiles:
        strip = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
        for i, t in enumerate(tiles):
            strip.paste(t, (sum(x.width for x in tiles[:i]), 0))
        mlflow.MlflowClient(uri).log_image(run_id, np.asarray(strip), "val_detections.png")

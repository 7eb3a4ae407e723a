"""Shared pieces of the serving, CLI and export tests: the mini COCO fixture, a registered model in a
private SQLite MLflow store, a trained tiny model, and an ``mlflow models serve`` process.

Run as a script (``python tests/helpers_serving.py OUT``) it trains the tiny model: the tests start it in
a subprocess so DeepSpeed's process group and globals never leak into the pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitpose.train.session import free_port, single_process_env

REPO = Path(__file__).resolve().parents[1]
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"

# The tiny model the CLI tests train (about a minute on two cores). It learns little in that time (val AP
# near 0); the tests need a real checkpoint of the engine and its own evaluation, not a good model.
TINY_OVERRIDES = [
    "model.preset=vitpose_nano", "model.img_size=[128,96]",
    "data.synthetic.train_instances=640", "data.synthetic.val_instances=48", "data.synthetic.unlabeled_instances=0",
    "data.loader_workers=0",
    "train.epochs=4", "train.batch_size=16", "train.lr=2e-3", "train.warmup_iters=5", "train.eval_every=4",
    "train.lr_steps=[]",
    "deepspeed.config=configs/deepspeed/zero0.json",
    # fp32: the CLI's AP must equal the engine's to 1e-6, and the engine evaluates in the training precision.
    "train.precision=fp32",
]  # fmt: skip



def sqlite_store(root: Path) -> tuple[str, str]:
    """A private tracking URI and an experiment whose artifacts live under ``root``."""
    import mlflow

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = mlflow.MlflowClient(uri).create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
    return uri, exp


def register_trained(model: Any, dataset: Any, root: Path, name: str = "vitpose-student",
                     alias: str = "champion") -> tuple[str, str]:
    """``model`` (with ``dataset``'s keypoint set) registered as ``models:/NAME@ALIAS`` in a private store under
    ``root``; returns (tracking URI, run id)."""
    from vitpose.data.keypoints import keypoint_info
    from vitpose.models import save_safetensors

    uri, exp = sqlite_store(root)
    weights = save_safetensors(model, root / "model.safetensors")
    meta = {"spec": model.spec.to_dict(), "keypoints": keypoint_info(dataset)}
    return uri, register_model(uri, exp, weights, meta, name, alias)


def register_model(uri: str, experiment_id: str, weights: Path, meta: dict[str, Any], name: str, alias: str) -> str:
    """Log + register through the production path (``log_vitpose_model``); returns the run id."""
    import mlflow

    from vitpose.deploy.serving import log_vitpose_model

    run_id = mlflow.MlflowClient(uri).create_run(experiment_id).info.run_id
    log_vitpose_model(uri, run_id, weights, meta, name, alias)
    mlflow.MlflowClient(uri).set_terminated(run_id)
    return run_id


def random_model(path: Path, *, preset: str = "vitpose_nano", img_size: tuple[int, int] = (128, 96),
                 knowledge_tokens: int = 0, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """An untrained model's weights (safetensors with its spec) and a meta with COCO keypoints."""
    import torch

    from vitpose.deploy.inference import default_keypoint_info
    from vitpose.models import build_model, save_safetensors

    torch.manual_seed(seed)
    model = build_model(preset, img_size=img_size)
    if knowledge_tokens:
        model.backbone.add_knowledge_tokens(knowledge_tokens)
    save_safetensors(model, path)
    return path, {"spec": model.spec.to_dict(), "keypoints": default_keypoint_info(model.spec.num_keypoints)}


# ------------------------------------------------------------------------------------- trained model
@dataclass
class TrainedModel:
    checkpoint: Path  # engine checkpoint folder: model.safetensors + meta.json
    data_root: Path  # synthetic dataset (COCO layout: annotations/person_keypoints_val.json, images/val)
    val_metrics: dict[str, float]  # the engine's own evaluation of that checkpoint


def train_tiny_model(out: Path, timeout: float = 600) -> TrainedModel:
    """Train ``TINY_OVERRIDES`` in a subprocess (see the module docstring) and return what it made."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **single_process_env(), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny training failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    return TrainedModel(Path(result["checkpoint"]), Path(result["data_root"]), result["metrics"])


def _train_main(out: Path) -> None:
    from vitpose.config import load_config
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    data_root = out / "data"
    cfg = load_config(REPO / "configs/teacher/synthetic_tiny.yaml",
                      [*TINY_OVERRIDES, f"data.root={data_root}", "data.synthetic.generate=true"])
    session = LocalSession(out / "checkpoints")
    Trainer(cfg, session).fit()
    evaluated = [(ckpt, rep) for ckpt, rep in zip(session.checkpoints, [r for r in session.reports if "val/AP" in r],
                                                   strict=True)]
    ckpt, metrics = evaluated[-1]
    (out / "result.json").write_text(json.dumps({
        "checkpoint": str(ckpt), "data_root": str(data_root),
        "metrics": {k: v for k, v in metrics.items() if k.startswith("val/")},
    }))


# ------------------------------------------------------------------------------------------- server
class ModelServer:
    """``mlflow models serve`` on 127.0.0.1 (free port, own working dir); ``stop()`` ends only this process
    and its children (it runs in its own session, so its process group is exactly what it started)."""

    def __init__(self, model_uri: str, tracking_uri: str, workdir: Path, ready_timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "serve.log"
        # The server execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv.
        path = os.pathsep.join([str(MLFLOW_BIN.parent), os.environ.get("PATH", "")])
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONWARNINGS": "ignore", "PATH": path}
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [str(MLFLOW_BIN), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(self.port), "--workers", "1"],
            cwd=workdir, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mlflow models serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow models serve not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def post(self, body: bytes | dict | list, content_type: str = "application/json") -> tuple[int, Any]:
        """POST /invocations; returns (HTTP status, parsed JSON or text)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + "/invocations", data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def stop(self) -> None:
        pgid = self.proc.pid  # a session leader: its process group id is its pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break  # nothing of ours is left
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _group_alive(pgid):
                self.proc.poll()  # reap the leader so it does not linger as a zombie in the group
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.proc.poll()
        self._log_file.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False

if __name__ == "__main__":
    _train_main(Path(sys.argv[1]))

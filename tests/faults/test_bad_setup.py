"""Bad configs and environments through the real CLI (``python pipelines/teacher.py`` in a subprocess):
each fails fast with one ``error:`` line naming the key or value and the fix, no traceback, exit code 2,
and no training started (no run folder, no MLflow run)."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.faults.procs import PY, cli_args
from vitpose.train.session import free_port

pytestmark = pytest.mark.slow


@dataclass
class Case:
    args: list[str]
    env: dict[str, str]
    expect: list[str]  # fragments of the error line: what is wrong (key, value) and the fix


def cases(root: Path, tmp: Path) -> dict[str, Case]:
    mlflow_port, ray_port = free_port(), free_port()
    return {
        "unknown key": Case(["--set", "train.epochz=3"], {},
                            ["train.epochz: unknown key (did you mean 'train.epochs'?)", "allowed keys here:"]),
        "wrong type": Case(["--set", "train.epochs=three"], {},
                           ["train.epochs: Input should be a valid integer", "(got 'three')"]),
        "missing config file": Case(["--config", str(tmp / "nope.yaml")], {},
                                    ["nope.yaml: config file not found", "give a path like"]),
        "missing deepspeed json": Case(["--set", f"deepspeed.config={tmp / 'nope.json'}"], {},
                                       ["deepspeed.config:", "nope.json not found", "use one of configs/deepspeed"]),
        "more workers than CPUs": Case(["--set", "ray.num_workers=64"], {},
                                       ["ray.num_workers=64 x ray.cpus_per_worker=1 needs 64 CPUs but the Ray cluster "
                                        "has", "lower ray.num_workers", "ray.autoscaler=true"]),
        "GPUs on a CPU cluster": Case(["--set", "ray.use_gpu=true", "--set", "ray.gpus_per_worker=8"], {},
                                      ["ray.use_gpu=true asks for 16 GPUs but the Ray cluster has 0",
                                       "set ray.use_gpu=false"]),
        "unreachable MLflow": Case([], {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"},
                                   [f"MLflow tracking server http://127.0.0.1:{mlflow_port} is not reachable",
                                    "unset MLFLOW_TRACKING_URI"]),
        "silent Ray address": Case([], {"RAY_ADDRESS": f"127.0.0.1:{ray_port}"},
                                   [f"RAY_ADDRESS=127.0.0.1:{ray_port}: nothing answers", "unset RAY_ADDRESS"]),
        "typo in the synthetic root": Case(["--set", f"data.root={tmp / 'no-such-folder'}"], {},
                                           [f"data.root: {tmp / 'no-such-folder'} does not exist",
                                            "--set data.synthetic.generate=true"]),
        "missing dataset folder": Case(["--set", "data.kind=coco", "--set", f"data.root={tmp / 'no-coco'}"], {},
                                       [f"data.train_ann: {tmp / 'no-coco'}/annotations/person_keypoints_train.json "
                                        "does not exist", "set data.root to your COCO folder"]),
    }


@pytest.fixture(scope="module")
def outcomes(synthetic_root, tmp_path_factory):
    """Every case run once, two at a time (they mostly wait on imports and on Ray starting)."""
    tmp = tmp_path_factory.mktemp("bad-setup")
    todo = cases(synthetic_root, tmp)
    base_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    base_env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"

    def run(item):
        name, case = item
        storage = tmp / name.replace(" ", "-")
        t0 = time.time()
        out = subprocess.run([PY, "pipelines/teacher.py", *cli_args(synthetic_root, storage), *case.args],
                             cwd=REPO, env={**base_env, **case.env}, capture_output=True, text=True, timeout=300)
        return name, (out, time.time() - t0, storage)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, todo.items())), todo


@pytest.mark.parametrize("name", list(cases(Path("ROOT"), Path("TMP"))))
def test_bad_setup_fails_fast_with_one_clear_line(outcomes, name):
    results, todo = outcomes
    out, seconds, storage = results[name]
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    for fragment in todo[name].expect:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert "MLflow run" not in out.stdout and not storage.exists(), "training was started"
    assert not (storage.parent / "no-such-folder").exists(), "a dataset was generated at the typo"
    assert seconds < 60
    print(f"\nFAULT bad setup ({name}): exit 2 after {seconds:.1f}s: {errors[0][:150]}")

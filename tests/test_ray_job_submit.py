"""docs/cluster.md's two `ray job submit` forms of pipelines/teacher.py against a `ray start --head` the test starts and
stops; then, with that head gone and its temp folder removed, the registered teacher is loaded and served from
each registry.

The "repository" is a copy of the project's sources in a temp folder (so nothing lands in the real runs/); its
python path points at the copy, as the project's own `pip install -e .` points at the real one. In its own
module so no other Ray of this test session is alive while the head runs."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MINI_IMAGES, REPO, TEST_IMG
from tests.helpers_ray import LOOPBACK_IPS, RAY, listening_sockets, ray_head
from tests.helpers_serving import ModelServer

pytestmark = pytest.mark.slow

VENV_PY = Path(sys.executable)
# Small and quick; none of these moves a path (data root, storage, store and log stay the documented defaults).
SMALL = ["data.synthetic.train_instances=64", "data.synthetic.val_instances=16",
         "data.synthetic.unlabeled_instances=48", "model.preset=vitpose_nano",
         f"model.img_size={TEST_IMG}", "train.batch_size=8", "train.epochs=1", "train.eval_every=1",
         "train.warmup_iters=2", "train.lr_steps=[]", "data.loader_workers=0", "tracking.log_images=2"]
SETS = [a for s in SMALL for a in ("--set", s)]


def repo_copy(dest: Path) -> Path:
    """The project's files as a fresh clone has them (tracked and new ones, not what .gitignore leaves out)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "vitpose", "pipelines",
                             "configs", ".gitignore", "pyproject.toml"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def submit(head, env: dict[str, str], cwd: Path, command: list[str], deadline: float) -> subprocess.CompletedProcess:
    """``ray job submit --address <head> COMMAND`` from ``cwd``, waiting for the job agent."""
    while True:
        done = subprocess.run([str(RAY), "job", "submit", "--address", head.dashboard, *command], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        # The dashboard answers before its job agent is up; that refusal comes at once, so retry it.
        if "No available agent" not in done.stdout + done.stderr or time.time() > deadline + 240:
            return done
        time.sleep(3)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_both_readme_job_forms_leave_everything_in_runs_and_the_teacher_serves(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    runs = repo / "runs"
    runs.mkdir()  # docs/cluster.md: `mkdir -p runs` (a sqlite store's folder must exist)
    # `python` on the head's PATH is the project's (docs/cluster.md); the tracking URI reaches a job only through its
    # runtime env (docs/cluster.md's first form), never from the head's environment.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env |= {"RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_PY.parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(repo)}
    store_a = f"sqlite:///{runs / 'jobs.db'}"
    with ray_head(env, cwd=repo) as head:
        head_tmp = Path(head.temp_dir)
        deadline = time.time() + 90
        while subprocess.run([str(RAY), "job", "list", "--address", head.dashboard], env=env,
                             capture_output=True).returncode:
            assert time.time() < deadline, "Ray job server did not come up"
            time.sleep(2)
        # Relative storage resolves inside the job's working-dir copy, which Ray deletes: refused before any work.
        lost = submit(head, env, repo, ["--working-dir", ".", "--", str(VENV_PY), "pipelines/teacher.py",
                                        "--set", "ray.storage_path=runs/job-test"], deadline)
        assert lost.returncode != 0 and "working-dir copy" in lost.stdout, lost.stdout[-2000:]
        assert "Traceback" not in lost.stdout, lost.stdout[-2000:]

        # Form 1, as docs/cluster.md writes it: --working-dir ., the store in the runtime env, absolute storage.
        form1 = submit(head, env, repo, [
            "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": store_a}}),
            "--", str(VENV_PY), "pipelines/teacher.py", "--set", f"ray.storage_path={runs / 'ray'}", *SETS], deadline)
        assert form1.returncode == 0, form1.stdout[-3000:] + form1.stderr[-3000:]
        assert "registered model: models:/vitpose-teacher@current (version 1)" in form1.stdout
        assert f"full log in {runs / 'logs'}/teacher-" in form1.stdout, form1.stdout[:2000]
        copies = list(head_tmp.glob("session_*/runtime_resources/working_dir_files/*"))
        assert copies, "the job did not run from a working-dir copy"
        in_copies = [p for c in copies for p in files_under(c / "runs")]
        assert not in_copies, f"outputs inside Ray's working-dir copy: {in_copies[:5]}"

        # Form 2, the plain one: no --working-dir, the head started in the repository, every default.
        form2 = submit(head, env, repo, ["--", "python", "pipelines/teacher.py", *SETS], deadline)
        assert form2.returncode == 0, form2.stdout[-3000:] + form2.stderr[-3000:]
        assert "registered model: models:/vitpose-teacher@current (version 1)" in form2.stdout
        assert f"full log in {runs / 'logs'}/teacher-" in form2.stdout, form2.stdout[:2000]

        bound = listening_sockets(head.pid)
        assert {"gcs_server", "raylet"} <= {name for _, name in bound}, bound
        assert not [b for b in bound if b[0] not in LOOPBACK_IPS], f"the head listens beyond the loopback: {bound}"
    assert not head_tmp.exists()  # the head is stopped and its temp folder (with the jobs' copies) is gone

    # Where docs/cluster.md says: runs/{logs,data/synthetic,ray,mlartifacts} and both stores, in the repository.
    assert len(list((runs / "logs").glob("teacher-*.log"))) == 2
    assert (runs / "data" / "synthetic" / "annotations" / "person_keypoints_train.json").is_file()
    assert len(list((runs / "ray").glob("*/checkpoint_*/meta.json"))) == 2  # one epoch of each form
    assert (runs / "mlflow.db").is_file() and (runs / "jobs.db").is_file()
    print("in the repository's runs/:", sorted(str(p.relative_to(runs)) for p in runs.glob("*/*")))
    import mlflow

    from tests.test_serving import picture

    image = picture(140, 100, 6)
    for store in (store_a, f"sqlite:///{runs / 'mlflow.db'}"):
        client = mlflow.MlflowClient(store)
        version = client.get_model_version_by_alias("vitpose-teacher", "current")
        run = client.get_run(version.run_id)
        assert run.info.artifact_uri.startswith((runs / "mlartifacts").as_uri()), run.info.artifact_uri
        # The registered model's files: its logged model's folder (source models:/m-<id>), or a run path.
        if version.source.startswith("models:/"):
            files = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
        elif version.source.startswith("runs:/"):
            files = f"{run.info.artifact_uri}/{version.source.split('/', 2)[2]}"
        else:
            files = version.source
        assert files.startswith((runs / "mlartifacts").as_uri()), files
        print(f"{store}: run artifacts {run.info.artifact_uri}, registered model's files {files}")
        mlflow.set_tracking_uri(store)
        model = mlflow.pyfunc.load_model("models:/vitpose-teacher@current")
        out = model.predict([{"image": image, "boxes": [[10, 10, 50, 100, 0.9]]}])
        assert out["num_persons"][0] == 1 and len(out["persons"][0][0]["keypoints"]) == 17
    server = ModelServer("models:/vitpose-teacher@current", store_a, tmp_path / "serve")
    try:
        jpeg = (MINI_IMAGES / "000000196141.jpg").read_bytes()
        status, body = server.post({"dataframe_records": [{"image": base64.b64encode(jpeg).decode(),
                                                            "boxes": [[100, 50, 120, 300, 0.9]]}]})
        assert status == 200 and body["predictions"][0]["num_persons"] == 1, body
    finally:
        server.stop()

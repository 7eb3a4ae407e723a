"""Bad data and numerical faults through the real pipeline (Ray, DeepSpeed on gloo, MLflow on SQLite):
a synthetic dataset with 5% of its images missing or corrupt and 5% of its annotations malformed, and a
learning rate that blows the loss up to NaN."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import REPO
from tests.faults.procs import PY, cli_args
from vitpose.config import one_line
from vitpose.data.coco import BadSampleError, TopDownCocoDataset
from vitpose.train.worker import FATAL_FILE

sys.path.insert(0, str(REPO / "pipelines"))
import teacher  # noqa: E402

pytestmark = pytest.mark.slow

TRAIN_ANN = "annotations/person_keypoints_train.json"


class Corrupted:
    """A copy of the synthetic set, damaged on purpose; ``expected`` = bad train instances by reason."""

    def __init__(self, source: Path, root: Path, batch: int = 4, workers: int = 2):
        shutil.copytree(source, root)
        self.root = root
        data = json.loads((root / TRAIN_ANN).read_text())
        images = data["images"]
        per_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            per_image.setdefault(ann["image_id"], []).append(ann)
        n_bad_images = math.ceil(0.05 * len(images))
        # Every 16th image (a spread, deterministic): half deleted, half overwritten with garbage.
        bad = images[3::16][:n_bad_images]
        self.missing = bad[: n_bad_images // 2]
        self.corrupt = bad[n_bad_images // 2 :]
        image_dir = root / "images" / "train"
        for im in self.missing:
            (image_dir / im["file_name"]).unlink()
        for i, im in enumerate(self.corrupt):
            path = image_dir / im["file_name"]
            path.write_bytes(b"not a jpeg " * 40 if i % 2 == 0 else path.read_bytes()[:300])
        self.expected = {"missing_image": sum(len(per_image[im["id"]]) for im in self.missing),
                         "unreadable_image": sum(len(per_image[im["id"]]) for im in self.corrupt)}

        # 5% of the annotations malformed (each kind once, then more wrong keypoint counts), all on good
        # images, and enough of them that every rank's shard is whole batches: then each instance is
        # asked for every epoch and the count of unreadable images is exact.
        bad_ids = {im["id"] for im in bad}
        good = [a for a in data["annotations"] if a["image_id"] not in bad_ids]
        kept = len(data["annotations"]) - self.expected["missing_image"]
        n_malformed = math.ceil(0.05 * len(data["annotations"]))
        while (kept - n_malformed) % (batch * workers):
            n_malformed += 1
        breakers = [
            ("bad_keypoint_count", lambda a: a.update(keypoints=a["keypoints"][:-3])),
            ("bad_keypoint_values", lambda a: a["keypoints"].__setitem__(0, math.nan)),
            ("zero_area_box", lambda a: a.update(bbox=[a["bbox"][0], a["bbox"][1], 0, a["bbox"][3]])),
            ("unknown_image_id", lambda a: a.update(image_id=999_999)),
            ("box_outside_image", lambda a: a.update(bbox=[400.0, 400.0, 30.0, 30.0])),
        ]
        for j, ann in enumerate(good[5::7][:n_malformed]):
            reason, breaker = breakers[j] if j < len(breakers) else breakers[0]
            breaker(ann)
            self.expected[reason] = self.expected.get(reason, 0) + 1
        assert sum(self.expected.values()) - self.expected["unreadable_image"] == len(data["annotations"]) - (
            kept - n_malformed)
        (root / TRAIN_ANN).write_text(json.dumps(data))  # NaN is written as the bare NaN JSON allows
        self.instances = kept - n_malformed
        bad_anns = {a["id"] for a in data["annotations"] if a["image_id"] in {im["id"] for im in self.missing}}
        bad_anns |= {a["id"] for a in good[5::7][:n_malformed]}
        self.first_bad = next(a for a in data["annotations"] if a["id"] in bad_anns)


@pytest.fixture(scope="module")
def corrupted(synthetic_root, tmp_path_factory) -> Corrupted:
    return Corrupted(synthetic_root, tmp_path_factory.mktemp("corrupted") / "data")


def bad_data_args(data: Corrupted, storage: Path, mode: str, *extra: str) -> list[str]:
    return cli_args(data.root, storage, "data.kind=coco", f"data.on_bad_sample={mode}", "train.batch_size=4",
                    "train.epochs=2", "deepspeed.zero_stage=0", "ray.name=bad-data", *extra)


def test_bad_samples_skipped_and_counted_exactly(corrupted, ray_local, tracking, tmp_path, capsys):
    """data.on_bad_sample=skip: training completes; the pipeline prints, and MLflow records, exactly how
    many samples of each kind were skipped, merged over 2 Ray workers and their DataLoader processes."""
    t0 = time.time()
    assert teacher.main(bad_data_args(corrupted, tmp_path, "skip", "data.loader_workers=1")) == 0
    elapsed = time.time() - t0
    out = capsys.readouterr().out
    expected = {f"train/{k}": v for k, v in corrupted.expected.items()}
    expected["train/total"] = sum(corrupted.expected.values())
    printed = next(line for line in out.splitlines() if line.strip().startswith("bad samples:"))
    assert printed.split(":", 1)[1].strip() == ", ".join(f"{k} {v}" for k, v in sorted(expected.items()))
    index_line = next(line for line in out.splitlines() if line.startswith("data: train set"))
    count, _, reasons = index_line.partition(" instances; skipping bad annotations/images ")
    assert count.endswith(f": {corrupted.instances}")
    assert ast.literal_eval(reasons.split(" (")[0]) == {k: v for k, v in corrupted.expected.items()
                                                        if k != "unreadable_image"}

    client = mlflow.MlflowClient(tracking)
    (run_id_file,) = tmp_path.glob("bad-data-*/mlflow_run_id.txt")
    run = client.get_run(run_id_file.read_text().strip())
    logged = {k.removeprefix("bad_samples/"): int(v) for k, v in run.data.metrics.items() if k.startswith("bad_samples/")}
    assert logged == expected
    listed = client.download_artifacts(run.info.run_id, "bad_samples.json", str(tmp_path))
    skipped = json.loads(Path(listed).read_text())["train"]["skipped"]
    assert sorted(skipped.values()) == ["unreadable_image"] * corrupted.expected["unreadable_image"]
    print(f"\nFAULT bad data (skip): {len(corrupted.missing)} images missing, {len(corrupted.corrupt)} corrupt; "
          f"skipped and counted {corrupted.expected} of 96 train annotations; run {elapsed:.1f}s")


def test_bad_sample_in_error_mode_stops_at_the_first_one(corrupted, tracking, tmp_path):
    """data.on_bad_sample=error: the driver indexes the data before any worker starts and stops at the
    first bad annotation, naming the annotation id and the file, in one line."""
    t0 = time.time()
    out = subprocess.run([PY, "pipelines/teacher.py", *bad_data_args(corrupted, tmp_path / "ray", "error")],
                         cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": tracking}, capture_output=True,
                         text=True, timeout=300)
    elapsed = time.time() - t0
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    (line,) = [ln for ln in out.stderr.splitlines() if ln.strip()]
    first = corrupted.first_bad
    assert line.startswith("error: data: ") and f"annotation id {first['id']} " in line
    assert str(corrupted.root / TRAIN_ANN) in line or str(corrupted.root / "images" / "train") in line
    assert "--set data.on_bad_sample=skip" in line
    assert not (tmp_path / "ray").exists(), "a run was started"
    print(f"\nFAULT bad data (error): stopped in {elapsed:.1f}s at annotation {first['id']}")


def test_unreadable_image_in_error_mode_names_file_and_annotation(corrupted):
    """An undecodable image is only found when loaded, inside a DataLoader worker process: the error that
    reaches the trainer keeps its type and, on one line, the file and the annotation id."""
    ds = TopDownCocoDataset(corrupted.root / TRAIN_ANN, corrupted.root / "images" / "train", train=False,
                            input_size=(64, 48), on_bad_sample="skip")  # skip: index past the missing ones
    ds.on_bad_sample = "error"
    victim = corrupted.corrupt[0]
    index = next(i for i, inst in enumerate(ds.instances) if inst.image_id == victim["id"])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [index]), num_workers=1)
    with pytest.raises(BadSampleError) as err:
        next(iter(loader))
    line = one_line(err.value)
    assert f"images/train/{victim['file_name']}" in line and f"annotation id {ds.instances[index].ann_id})" in line
    assert "cannot be decoded" in line and "--set data.on_bad_sample=skip" in line


def test_nan_loss_stops_the_run_naming_step_and_batch(ray_local, tracking, synthetic_root, tmp_path, capsys):
    """A learning rate that drives the loss to NaN, on_nonfinite_loss=error: both workers stop at the
    first non-finite step; the driver prints that step and batch on one line; no checkpoint and no model
    is saved, and the retry Ray makes after a worker error does not train up to the same NaN again."""
    storage = tmp_path / "ray"
    t0 = time.time()
    rc = teacher.main(cli_args(synthetic_root, storage, "ray.name=nan", "train.lr=1e30",
                               "train.on_nonfinite_loss=error"))
    elapsed = time.time() - t0
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 1
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: training failed: non-finite loss at epoch 1, step ")
    # Stopped the first time: Ray Train's controller started one worker group (it would otherwise start another).
    log = Path(captured.out.split("full log in ", 1)[1].split("\n", 1)[0]).read_text()
    assert len(re.findall(r"TrainController pid=\d+\)[^\n]*Started training worker group", log)) == 1
    assert ", batch " in line and "(instances [" in line and "train.on_nonfinite_loss=skip" in line
    (run_dir,) = storage.glob("nan-*")
    assert json.loads((run_dir / FATAL_FILE).read_text())["type"] == "NonFiniteLossError"
    assert not list(run_dir.glob("checkpoint_*")), "a checkpoint was saved"

    client = mlflow.MlflowClient(tracking)
    run = client.get_run((run_dir / "mlflow_run_id.txt").read_text().strip())
    assert run.info.status == "FAILED"
    assert run.data.tags["worker_group_starts"] == "1", "the retried worker group trained again"
    assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")
    print(f"\nFAULT NaN loss: {line.removeprefix('error: training failed: ')[:60]}...; run ended in {elapsed:.1f}s")

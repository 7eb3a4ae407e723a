"""Multi-dataset training (issue 20 item 4) and distillation from a multi-dataset teacher (item 5's teacher
side): two synthetic datasets with different keypoint sets (COCO 17, and CrowdPose 14 remapped from another
synthetic seed) in one run, one backbone, one head each (and a ViTPose+ expert each under ZeRO-3), mixed
batches by ratio, per-dataset val metrics; the config's errors; the mixed sampler's promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vitpose.build import build_datasets, dataset_configs, model_spec_kwargs
from vitpose.config import ConfigError
from vitpose.config import to_dict as to_config_dict
from vitpose.data.multi_dataset import MixedBatchSampler, batch_counts


def two_datasets(root: Path, ratio_b: float = 1.0, train: int = 96, val: int = 32) -> str:
    synth = f"{{train_instances: {train}, val_instances: {val}, generate: true, seed: %d}}"
    return (f"data.datasets=[{{name: coco, root: {root / 'a'}, synthetic: {synth % 0}}}, "
            f"{{name: crowd, keypoints: crowdpose, ratio: {ratio_b}, root: {root / 'b'}, synthetic: {synth % 1}}}]")


def multi_config(root: Path, *extra: str, student: bool = False, **kw):
    return tiny_config(root / "unused", two_datasets(root, **kw), "deepspeed.zero_stage=0", "train.precision=fp32",
                       "tracking.log_images=0", *extra, student=student)


# ------------------------------------------------------------------------------------------- config
def test_config_entries_inherit_name_their_keys_and_leave_single_runs_alone(tmp_path):
    cfg = multi_config(tmp_path, ratio_b=3.0)
    entries = dataset_configs(cfg)
    assert [(n, r, c.data.keypoints) for n, r, c in entries] == [("coco", 0.25, "coco"), ("crowd", 0.75, "crowdpose")]
    assert entries[1][2].data.train_ann == "annotations/person_keypoints_train.crowdpose.json"  # the remapped file
    assert entries[1][2].data.aug == cfg.data.aug and entries[1][2].data.synthetic.seed == 1
    assert model_spec_kwargs(cfg)["datasets"] == (("coco", 17), ("crowd", 14))
    moe = model_spec_kwargs(multi_config(tmp_path, "model.moe={}"))
    assert moe["moe_part_features"] == 96 // 4 and moe["num_keypoints"] == 17
    single = model_spec_kwargs(tiny_config(tmp_path))
    assert "datasets" not in single and "moe_part_features" not in single  # the single-dataset spec as before

    with pytest.raises(ConfigError, match=r"data.datasets.1.keypoint: unknown key \(did you mean "
                                          r"'data.datasets.1.keypoints'\?\)"):
        tiny_config(tmp_path, "data.datasets=[{name: a}, {name: b, keypoint: crowdpose}]")
    with pytest.raises(ConfigError, match=r"datasets.1.keypoints \(b\): .*did you mean 'crowdpose'"):
        tiny_config(tmp_path, "data.datasets=[{name: a}, {name: b, keypoints: crowdpos}]")
    with pytest.raises(ConfigError, match="names must be unique"):
        tiny_config(tmp_path, "data.datasets=[{name: a}, {name: a}]")
    with pytest.raises(ConfigError, match="one entry"):
        tiny_config(tmp_path, "data.datasets=[{name: a}]")
    with pytest.raises(ConfigError, match="ratio"):
        tiny_config(tmp_path, "data.datasets=[{name: a, ratio: 0}, {name: b}]")
    with pytest.raises(ConfigError, match="model.moe: ViTPose\\+ has one expert per dataset"):
        model_spec_kwargs(tiny_config(tmp_path, "model.moe={part_features: 8}"))


# ------------------------------------------------------------------------------------------ sampling
def test_mixed_batches_hold_every_dataset_by_ratio_and_ranks_split_the_streams():
    assert batch_counts([0.25, 0.75], 8) == [2, 6]
    assert batch_counts([0.01, 0.99], 8) == [1, 7]  # every dataset in every batch
    assert batch_counts([1 / 3] * 3, 8) == [3, 3, 2]
    with pytest.raises(ValueError, match="smaller than the 3 datasets"):
        batch_counts([1 / 3] * 3, 2)
    sizes, counts = [10, 50], [2, 6]
    ranks = [list(MixedBatchSampler(sizes, counts, r, 2, seed=0)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 60 // 16
    for batch in ranks[0]:
        assert [d for _, d, _ in batch] == [0, 0, 1, 1, 1, 1, 1, 1]
    taken = [(d, i) for r in ranks for b in r for _, d, i in b]
    assert len({i for d, i in taken if d == 1}) == 36  # no repeats within a pass of the large dataset
    again = MixedBatchSampler(sizes, counts, 0, 2, seed=0)
    assert list(again) == ranks[0]  # seeded by (seed, epoch)
    again.set_epoch(1)
    assert list(again) != ranks[0]


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def two_dataset_run(tmp_path_factory):
    """(trainer, session, cfg): the tiny model trained on both datasets in one run (ZeRO-0, fp32)."""
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    root = tmp_path_factory.mktemp("multi")
    cfg = multi_config(root, "train.epochs=10", "train.batch_size=16", "train.lr=2e-3", "train.warmup_iters=10",
                       "train.eval_every=10", "model.moe={}", train=240, val=40)
    session = LocalSession(root / "run")
    trainer = Trainer(cfg, session)
    trainer.fit()
    return trainer, session, cfg


def test_two_datasets_train_in_one_run_each_through_its_own_head(two_dataset_run):
    trainer, session, _ = two_dataset_run
    first, last = session.reports[0], session.reports[-1]
    model = trainer.engine.module
    assert model.spec.datasets == (("coco", 17), ("crowd", 14)) and model.spec.moe_part_features == 24
    for name in ("coco", "crowd"):
        assert np.isfinite(last[f"val/{name}/AP"]) and last[f"val/{name}/AP"] > 0.1, last
        assert last[f"train/{name}/loss"] < first[f"train/{name}/loss"]
    assert last["val/AP"] == last["val/coco/AP"] and last["val/AR"] == last["val/coco/AR"]  # the primary's
    meta = json.loads((session.checkpoints[-1] / "meta.json").read_text())
    assert meta["keypoints"]["set"] == "coco"
    assert [(d["name"], d["set"], len(d["names"])) for d in meta["keypoints"]["datasets"]] == [
        ("coco", "coco", 17), ("crowd", "crowdpose", 14)]
    assert meta["spec"]["datasets"] == [["coco", 17], ["crowd", 14]]


def test_a_dataset_exported_from_the_run_evaluates_as_in_the_run(two_dataset_run, tmp_path):
    """The crowd head's single-expert export, saved and loaded by the single-dataset loader, scores the crowd
    val set as the run did."""
    from vitpose.evaluation import CocoKeypointEvaluator, decode_batch_to_predictions
    from vitpose.models import create, save_safetensors
    from vitpose.models.multi_dataset import export_dataset

    trainer, session, _ = two_dataset_run
    model = create(str(session.checkpoints[-1]))
    single = create(str(save_safetensors(export_dataset(model, "crowd"), tmp_path / "crowd.safetensors")))
    val = trainer.val_ds.datasets[1]
    batch = next(iter(torch.utils.data.DataLoader(val, batch_size=len(val))))
    with torch.no_grad():
        heatmaps, flipped = single(batch["image"]), single(batch["image"].flip(3))
        torch.testing.assert_close(heatmaps, model(batch["image"], 1), atol=1e-5, rtol=0)
    preds = decode_batch_to_predictions(heatmaps, batch, flipped, flip_pairs=val.flip_pairs, input_size=val.input_size)
    ap = CocoKeypointEvaluator(val.ann_file, keypoints=val.keypoint_set).evaluate(preds)["AP"]
    assert ap == pytest.approx(session.reports[-1]["val/crowd/AP"], abs=1e-6)


def test_zero3_trains_and_resumes_a_moe_model(tmp_path):
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    cfg = multi_config(tmp_path, "deepspeed.zero_stage=3", "train.precision=bf16", "model.moe={part_features: 16}",
                       "train.epochs=2", "train.max_steps_per_epoch=3", "train.eval_every=1", train=48, val=8)
    session = LocalSession(tmp_path / "run")
    trainer = Trainer(cfg, session)
    trainer.fit()
    assert np.isfinite(session.reports[-1]["val/crowd/AP"]) and np.isfinite(session.reports[-1]["train/loss"])
    cfg3 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})
    resumed = Trainer(cfg3, LocalSession(tmp_path / "resumed", resume_from=session.checkpoints[-1]))
    resumed.fit()  # DeepSpeed's ZeRO-3 shards of every expert and head restored, one more epoch trained
    assert resumed.restored_at_epochs == [2] and np.isfinite(resumed.history[-1]["val/coco/AP"])


# ------------------------------------------------------------------------------------- distillation
def test_a_multi_dataset_teacher_teaches_a_single_dataset_student(two_dataset_run, tmp_path):
    from vitpose.distill.student import distill_loss
    from vitpose.distill.teacher import frozen, load_teacher
    from vitpose.train.loop import Trainer
    from vitpose.train.session import LocalSession

    _, session, _ = two_dataset_run
    root = tmp_path / "data"
    student_cfg = tiny_config(root, "data.keypoints=crowdpose", f"distill.teacher_uri={session.checkpoints[-1]}",
                              "model.preset=vitpose_pico", "deepspeed.zero_stage=0", "train.precision=fp32",
                              "train.epochs=1", "tracking.log_images=0", student=True)
    teacher = load_teacher(student_cfg, None)
    assert teacher.spec.num_keypoints == 14 and not teacher.spec.datasets and teacher.meta["keypoints"]["set"] == "crowdpose"
    # The student's data: the crowd dataset of the teacher's run (its remapped files).
    crowd = dataset_configs(two_dataset_run[2])[1][2].data
    student_cfg = student_cfg.model_copy(update={"data": student_cfg.data.model_copy(update={
        "root": crowd.root, "train_ann": crowd.train_ann, "val_ann": crowd.val_ann, "synthetic": crowd.synthetic})})
    datasets = build_datasets(student_cfg, is_local_leader=True)
    trainer = Trainer(student_cfg, LocalSession(tmp_path / "student"), loss_fn=distill_loss(1.0, frozen(teacher)),
                      datasets=datasets)
    last = trainer.fit()
    assert np.isfinite(last["train/kd_loss"]) and last["train/kd_loss"] > 0 and np.isfinite(last["val/AP"])

    with pytest.raises(ConfigError, match=r"datasets coco \(coco\), crowd \(crowdpose\): none has the student's "
                                          r"keypoint set 'mpii'"):
        load_teacher(student_cfg.model_copy(update={"data": student_cfg.data.model_copy(update={"keypoints": "mpii"})}),
                     None)


# ------------------------------------------------------------------------------ Ray Train, two workers

def _worker_side_error(cfg) -> str | None:
    """What building each dataset's model spec says on a worker, which gets the config as ``to_dict`` (None: fine)."""
    again = type(cfg).model_validate(to_config_dict(cfg))
    try:
        for one in [one for _, _, one in dataset_configs(again)] if again.data.datasets else [again]:
            model_spec_kwargs(one)
    except ConfigError as err:
        return str(err)
    return None


def test_configs_survive_the_trip_to_the_workers(tmp_path):
    assert _worker_side_error(multi_config(tmp_path)) is None
    assert _worker_side_error(tiny_config(tmp_path, "data.keypoints=crowdpose")) is None


def _record_batches() -> None:
    """Ray worker setup hook: every mixed batch a rank draws, one JSON line in ``$VP_TEST_BATCHES/rank<r>.jsonl``."""
    import json
    import os

    from vitpose.data import multi_dataset

    folder = os.environ.get("VP_TEST_BATCHES")
    if not folder or getattr(multi_dataset.MixedBatchSampler, "_recorded", False):
        return
    drawn = multi_dataset.MixedBatchSampler.__iter__

    def recorded(self):
        for batch in drawn(self):
            with open(os.path.join(folder, f"rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps(batch) + "\n")
            yield batch

    multi_dataset.MixedBatchSampler.__iter__ = recorded
    multi_dataset.MixedBatchSampler._recorded = True


def _drawn(folder: Path, rank: int) -> list[list[tuple[int, int, int]]]:
    return [[tuple(key) for key in json.loads(line)] for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ray_workers_train_two_datasets_through_the_teacher_pipeline_and_resume(tmp_path, monkeypatch):
    """pipelines/teacher.py with data.datasets at 2 Ray Train workers (ZeRO-3, gloo, ViTPose+ experts): per-dataset
    val AP in MLflow showing learning; in every step each rank's batch holds both datasets and the two ranks'
    samples are disjoint; --resume continues the run (same MLflow run) with the batches an unbroken run draws."""
    import shutil
    import sys
    import tempfile

    import cloudpickle
    import mlflow
    import ray

    from tests.conftest import REPO
    from vitpose.run.cluster import WORKER_ENV

    sys.path.insert(0, str(REPO / "pipelines"))
    import teacher

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    drawn = tmp_path / "batches"
    drawn.mkdir()
    for pickler in (cloudpickle, ray.cloudpickle):  # Ray pickles the setup hook with its own copy
        pickler.register_pickle_by_value(sys.modules[__name__])
    ray_tmp = tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp,
             runtime_env={"env_vars": {**WORKER_ENV, "VP_TEST_BATCHES": str(drawn)},
                          "worker_process_setup_hook": _record_batches})
    try:
        # Plain figures on a plain background (the generator's knobs): learnt in a few epochs, so a short run shows
        # it; the two datasets still differ (seeds 0 and 1) and have different keypoint sets (17 and 14).
        easy = "generate: true, clutter: 0.0, occlusion_prob: 0.0, pose_variety: 0.1"
        sets = [two_datasets(tmp_path / "data", train=240, val=32).replace("generate: true", easy),
                "model.preset=vitpose_nano",
                "model.img_size=[64, 48]", "model.moe={}", "deepspeed.zero_stage=3", "train.precision=bf16",
                "train.batch_size=8", "train.lr=2e-3", "train.warmup_iters=5", "train.lr_steps=[]",
                "train.eval_every=1", "data.loader_workers=0", "ray.num_workers=2", "ray.name=multi",
                f"ray.storage_path={tmp_path / 'storage'}", "tracking.log_images=0", "tracking.alias=multi"]

        def run(epochs: int, *extra: str) -> int:
            return teacher.main([a for s in [*sets, f"train.epochs={epochs}"] for a in ("--set", s)] + list(extra))

        assert run(3) == 0
        first = {r: _drawn(drawn, r) for r in (0, 1)}
        assert run(4, "--resume") == 0
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    client = mlflow.MlflowClient(uri)
    run_id = client.get_model_version_by_alias("vitpose-teacher", "multi").run_id
    got = client.get_run(run_id).data
    assert got.tags.get("driver_resumes") == "1"  # the resumed driver logged to the first run
    for name in ("coco", "crowd"):
        history = client.get_metric_history(run_id, f"val/{name}/AP")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert history[-1].value > 0.1 and history[-1].value > history[0].value, (name, [m.value for m in history])
        losses = [m.value for m in client.get_metric_history(run_id, f"train/{name}/loss")]
        assert losses[-1] < losses[0], (name, losses)
    assert got.metrics["val/AP"] == got.metrics["val/coco/AP"]

    meta = json.loads(max((tmp_path / "storage").glob("multi-*/checkpoint_*/meta.json"),
                          key=lambda p: p.stat().st_mtime).read_text())
    assert meta["world_size"] == 2 and meta["restored_at_epochs"] == [3]
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]

    # What each rank drew: both datasets in every batch (2 of 8 from each: ratio 1:1 -> 4 + 4), no sample twice in
    # a step across the ranks, the same number of steps on both; after --resume, epoch 4 is what an unbroken
    # run's sampler gives it.
    both = {r: _drawn(drawn, r) for r in (0, 1)}
    assert len(both[0]) == len(both[1]) and len(first[0]) == len(first[1]) and len(both[0]) > len(first[0])
    for b0, b1 in zip(both[0], both[1], strict=True):
        assert [d for _, d, _ in b0] == [d for _, d, _ in b1] == [0] * 4 + [1] * 4
        assert len(set(b0) | set(b1)) == 16
    from vitpose.build import build_datasets
    from vitpose.config import load_config

    cfg = load_config(teacher.DEFAULT_CONFIG, sets + ["train.epochs=4"])
    train = build_datasets(cfg, is_local_leader=False)[0]
    per_epoch = len(first[0]) // 3
    for rank in (0, 1):
        sampler = train.batch_sampler(8, rank, 2, cfg.train.seed)
        sampler.set_epoch(3)
        assert len(sampler) == per_epoch
        assert both[rank][len(first[rank]):] == [[tuple(k) for k in b] for b in sampler]
    for epoch in range(4):  # within an epoch a dataset is passed over once before any sample comes again
        for d, size in enumerate(len(ds) for ds in train.datasets):
            keys = [k for r in (0, 1) for b in both[r] for k in b if k[0] == epoch and k[1] == d]
            assert len(set(keys)) == min(len(keys), size), (epoch, d)

"""Config loading: defaults, overrides, round trip, and a clear error for each kind of bad input."""

import json
from pathlib import Path

import pytest

from vitpose.config import (
    REPO_ROOT,
    ConfigError,
    StudentConfig,
    TeacherConfig,
    dump_config,
    flatten,
    load_config,
)
from vitpose.train.deepspeed_config import complete_deepspeed_config, offload_devices

TINY = REPO_ROOT / "configs" / "teacher" / "synthetic_tiny.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    for path in sorted((REPO_ROOT / "configs" / "teacher").glob("*.yaml")):
        assert isinstance(load_config(path), TeacherConfig), path
    for path in sorted((REPO_ROOT / "configs" / "distill").glob("*.yaml")):
        assert isinstance(load_config(path, schema=StudentConfig), StudentConfig), path
    cluster = {p.name: p for p in (REPO_ROOT / "configs" / "cluster").glob("*.yaml")}
    assert set(cluster) == {"teacher_gpu_s3.yaml", "teacher_gpu_shared_folder.yaml", "distill_gpu_s3.yaml"}
    gpu = load_config(cluster["teacher_gpu_s3.yaml"])
    assert gpu.ray.use_gpu and gpu.ray.storage_path.startswith("s3://") and gpu.model.preset == "vitpose_l"
    assert load_config(cluster["teacher_gpu_shared_folder.yaml"]).ray.storage_path == "/shared/vitpose/runs"
    sweep = load_config(cluster["distill_gpu_s3.yaml"], schema=StudentConfig)
    assert sweep.tune.gpus_per_worker == 0.25 and sweep.ray.storage_path.startswith("s3://")


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["train.epochs=3", "model.preset=vitpose_s", "model.img_size=[128, 96]",
                             "train.lr=2e-4", "ray.use_gpu=false"])
    assert cfg.train.epochs == 3 and cfg.model.preset == "vitpose_s"
    assert cfg.model.img_size == (128, 96)
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.ray.use_gpu is False


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(TINY, ["train.epochs=5"])
    out = dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(out) == cfg
    flat = flatten(cfg)
    assert flat["train.epochs"] == 5 and flat["train.lr_steps"] == json.dumps(cfg.train.lr_steps)


def test_unknown_key_names_file_path_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.epoch" in msg and "did you mean 'train.epochs'" in msg
    assert "batch_size" in msg  # the allowed keys are listed


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_config(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  epochs: many\n"))
    assert "train.epochs" in str(err.value) and "'many'" in str(err.value)


def test_out_of_range_and_literal_list_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs: Input should be greater than or equal to 1"):
        load_config(TINY, ["train.epochs=0"])
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.precision=fp8"])
    assert "train.precision" in str(err.value) and "'bf16'" in str(err.value)
    with pytest.raises(ConfigError, match="choose one of: .*vitpose_b"):
        load_config(TINY, ["model.preset=vitpose_xxl"])


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match="--set 'train.epochs'"):
        load_config(TINY, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"(?s)--set train.epoch=3.*unknown key"):
        load_config(TINY, ["train.epoch=3"])


def test_a_renamed_sweep_key_names_its_new_name():
    with pytest.raises(ConfigError, match=r"tune\.cpus_per_trial is now tune\.cpus_per_worker.*tune\.workers_per_trial"):
        load_config("configs/distill/synthetic_tiny.yaml", ["tune.cpus_per_trial=2"], StudentConfig)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_deepspeed_config_is_completed_from_ours():
    cfg = load_config(TINY, ["train.batch_size=4", "train.grad_accum=2", "train.precision=bf16",
                             "deepspeed.zero_stage=2"])
    ds = complete_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr


def test_deepspeed_config_that_contradicts_ours_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64, "zero_optimization": {"stage": 3}}))
    cfg = load_config(TINY, [f"deepspeed.config={bad}", "train.batch_size=4"])
    with pytest.raises(ConfigError) as err:
        complete_deepspeed_config(cfg, world_size=2)
    assert str(bad) in str(err.value) and "train_micro_batch_size_per_gpu" in str(err.value)
    assert "64" in str(err.value) and "4" in str(err.value)
    bf16 = tmp_path / "bf16.json"
    bf16.write_text(json.dumps({"bf16": {"enabled": True}}))
    auto = load_config(TINY, [f"deepspeed.config={bf16}", "train.precision=auto"])
    with pytest.raises(ConfigError, match=r"bf16\.json: train\.precision=auto picks bf16 or fp32.*'bf16\.enabled'"):
        complete_deepspeed_config(auto, world_size=2)  # at preflight, before any worker starts


def test_offload_configs_complete_and_impossible_offloads_are_refused(tmp_path):
    for name, parts in [("zero3_offload", {"offload_optimizer"}), ("zero3_offload_params", {"offload_optimizer", "offload_param"})]:
        cfg = load_config(TINY, [f"deepspeed.config=configs/deepspeed/{name}.json"])
        ds = complete_deepspeed_config(cfg, world_size=2)
        assert set(offload_devices(ds)) == parts and "torch_adam" not in ds["optimizer"].get("params", {})

    def refused(ds_json: dict, *sets: str) -> str:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds_json))
        with pytest.raises(ConfigError) as err:
            complete_deepspeed_config(load_config(TINY, [f"deepspeed.config={path}", *sets]), world_size=2)
        assert str(path) in str(err.value)
        return str(err.value)

    cpu = {"device": "cpu"}
    assert "needs ZeRO stage 3" in refused({"zero_optimization": {"stage": 3, "offload_param": cpu}},
                                           "deepspeed.zero_stage=2")
    assert "needs ZeRO stage 1-3" in refused({"zero_optimization": {"stage": 0, "offload_optimizer": cpu}})
    assert "remove optimizer.params.torch_adam" in refused(
        {"zero_optimization": {"stage": 3, "offload_optimizer": cpu}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    # torch's fused AdamW (the shipped non-offload configs) would reach DeepSpeed's CPU Adam as an unknown argument.
    assert "remove optimizer.params.torch_adam and fused" in refused(
        {"zero_optimization": {"stage": 3, "offload_optimizer": cpu},
         "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": True}}})
    assert "device must be cpu, nvme or none" in refused({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}})
    nvme = {"device": "nvme", "nvme_path": str(tmp_path / "missing")}
    assert "is not a writable folder" in refused({"zero_optimization": {"stage": 3, "offload_param": nvme}})
    nvme_json = json.loads((REPO_ROOT / "configs/deepspeed/zero3_offload_nvme.json").read_text())
    for part in ("offload_optimizer", "offload_param"):
        nvme_json["zero_optimization"][part]["nvme_path"] = str(tmp_path)
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):  # this machine: no libaio
        assert "needs libaio" in refused(nvme_json)


def test_a_config_inherits_its_base_and_overrides_it(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "data.yaml").write_text("data:\n  loader_workers: 3\n  aug:\n    flip_prob: 0.1\n"
                                                   "train:\n  lr_steps: [1, 2]\n")
    (tmp_path / "run.yaml").write_text("_base_: base/data.yaml\ndata:\n  aug:\n    rotation_factor: 5.0\n"
                                       "train:\n  lr_steps: [7]\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.loader_workers == 3 and cfg.data.aug.flip_prob == 0.1  # from the base
    assert cfg.data.aug.rotation_factor == 5.0  # sections merge key by key
    assert cfg.train.lr_steps == [7]  # a list replaces the base's


def test_shipped_configs_share_their_data_block_through_a_base():
    teacher = load_config(REPO_ROOT / "configs/teacher/synthetic_tiny.yaml")
    student = load_config(REPO_ROOT / "configs/distill/synthetic_tiny.yaml", schema=StudentConfig)
    assert teacher.data == student.data and teacher.data.image_cache_mb == 512
    for size in "blhg":
        cfg = load_config(REPO_ROOT / f"configs/teacher/coco_vitpose_{size}.yaml")
        assert cfg.model.preset == f"vitpose_{size}" and cfg.train.lr_steps == [170, 200] and cfg.data.kind == "coco"


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: _base_ 'nowhere.yaml' not found"):
        load_config(tmp_path / "c.yaml")

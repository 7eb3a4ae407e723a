"""Typed run configuration: YAML in, validated sections out, YAML back.

Every entry point (teacher, distill, evaluate) loads its configuration here, so a typo in a key, a wrong
type or an out-of-range value stops the run before any work starts, with a message that names the file,
the dotted key path and what is allowed. Validation is pydantic's (already pulled in by Ray and MLflow);
this module only shapes its errors and handles files and ``--set key=value`` overrides.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from vitpose.config_sections import (
    CustomKeypointsSection,
    DatasetEntry,
    DistillConfig,
    MoeSection,
    Section,
    SyntheticDataConfig,
    known_keypoint_set,
    resolve_entries,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and how to fix it."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line; for errors re-raised by DataLoader workers, the original's."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if "Original Traceback" in str(err) and lines:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines) or type(err).__name__


Tokens = Annotated[int, Field(ge=1)]


class AttentionSection(Section):  # which keys each query sees (vitpose.models.attention): same weights as full
    kind: Literal["full", "window", "shift_window", "pool_window", "shift_pool_window"] = "full"
    window: tuple[Tokens, Tokens] = Field((8, 8), description="window (h, w) in tokens, clamped to the grid")
    pool: tuple[Tokens, Tokens] | None = Field(None, description="pool cell in tokens (None: the window)")
    full_blocks: list[int] = Field([], description="blocks that keep full attention (ViTDet-style global blocks)")


class FreezeSection(Section):  # partial fine-tuning (vitpose.models.freeze): no gradient, no optimizer group
    attention: list[int] | Literal["all"] = Field([], description='blocks whose norm1 + attn freeze, or "all"')
    mlp: list[int] | Literal["all"] = Field([], description='blocks whose norm2 + mlp freeze, or "all"')
    embed: bool = Field(False, description="freeze the patch and position embeddings")


class ModelConfig(Section):
    preset: str = "vitpose_tiny"
    # None keeps the preset's own value; everything else overrides it.
    decoder: Literal["classic", "simple"] | None = None
    img_size: tuple[int, int] | None = Field(None, description="input (height, width)")
    patch_size: int | None = Field(None, ge=2, le=64)
    deconv_channels: int | None = Field(None, ge=1, description="classic decoder width (the paper's is 256)")
    num_keypoints: int | None = Field(None, ge=1, description="the heads' width; default: the keypoint set's")
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    activation_checkpointing: bool = False
    init_checkpoint: str | None = Field(None, description="official ViTPose .pth / .safetensors to start from")
    attention: AttentionSection = AttentionSection()
    freeze: FreezeSection = FreezeSection()
    moe: MoeSection | None = Field(None, description="ViTPose+ experts, one per data.datasets entry")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from vitpose.models import list_presets

        presets = list_presets()
        if value not in presets:
            raise ValueError(f"unknown preset {value!r}; choose one of: {', '.join(presets)}")
        return value

    @model_validator(mode="after")
    def _fits_the_preset(self) -> ModelConfig:
        from vitpose.models.config_checks import check_against_preset

        check_against_preset(self)  # img_size, block indices: here, with the key, not later in the build
        return self


class AugSection(Section):
    """Training augmentation (vitpose.data.transforms.AugConfig); the defaults are the paper's recipe."""

    scale_factor: float = Field(0.5, ge=0.0, lt=1.0)
    rotation_factor: float = Field(40.0, ge=0.0, le=90.0)
    rotation_prob: float = Field(0.6, ge=0.0, le=1.0)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    half_body_prob: float = Field(0.3, ge=0.0, le=1.0)
    photometric_prob: float = Field(0.0, ge=0.0, le=1.0)


class DataConfig(Section):
    kind: Literal["synthetic", "coco"] = "synthetic"
    # Which keypoints the files hold and the model predicts: a built-in set (python -m vitpose.data.keypoints
    # --list) or "custom" (custom_keypoints). A file whose keypoints are not the set's is refused when loaded.
    keypoints: str = "coco"
    custom_keypoints: CustomKeypointsSection | None = Field(None, validate_default=True)
    joint_weights: bool = Field(False, description="weight each joint's loss by the set's joint_weights (mmpose's "
                                "use_different_joint_weights; ViTPose's own configs leave it off)")
    # Relative paths resolve against the repository root, so runs from any folder (and Ray workers) agree.
    root: str = "runs/data/synthetic"
    train_ann: str = "annotations/person_keypoints_train.json"
    train_images: str = "images/train"
    val_ann: str = "annotations/person_keypoints_val.json"
    val_images: str = "images/val"
    val_det_file: str | None = Field(None, description="COCO results json of person detections for val")
    det_score_thr: float = Field(0.0, ge=0.0, le=1.0)
    on_bad_sample: Literal["error", "skip"] = "error"
    loader_workers: int = Field(1, ge=0)
    image_cache_mb: float = Field(0.0, ge=0.0, description="decoded images kept per loading process (0: none)")
    aug: AugSection = AugSection()
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    datasets: list[DatasetEntry] = Field([], description="multi-dataset run (config_sections.py); [] = this section")

    _known_set = field_validator("keypoints")(known_keypoint_set)

    @model_validator(mode="after")
    def _entries_usable(self) -> DataConfig:
        if self.datasets:
            resolve_entries(self, DataConfig)
        return self

    @field_validator("custom_keypoints")
    @classmethod
    def _custom_set_usable(cls, value: CustomKeypointsSection | None, info: Any) -> CustomKeypointsSection | None:
        # Runs on the default too (validate_default), so keypoints: custom without a description is caught here.
        from vitpose.data.keypoints import CUSTOM, custom_keypoint_set

        chosen = info.data.get("keypoints")
        if value is None and chosen == CUSTOM:
            raise ValueError("keypoints is 'custom' but custom_keypoints is not given; describe the set here "
                             "(names, sigmas, flip_pairs, skeleton)")
        if value is not None and chosen not in (CUSTOM, None):
            raise ValueError(f"given while keypoints is {chosen!r}; set data.keypoints=custom to use it, or remove it")
        if value is not None:
            custom_keypoint_set(value.model_dump(exclude_none=True))  # names the problem: a pair naming no keypoint...
        return value

    def keypoint_set(self) -> Any:
        """The ``KeypointSet`` this section chooses (``vitpose.data.keypoints.set.KeypointSet``)."""
        from vitpose.data.keypoints import get_keypoint_set

        custom = self.custom_keypoints.model_dump(exclude_none=True) if self.custom_keypoints else None
        return get_keypoint_set(self.keypoints, custom)

    def root_path(self) -> Path:
        return resolve_path(self.root)


class TrainSettings(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="micro batch per worker")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    warmup_iters: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0.0, le=1.0)
    lr_steps: list[int] = [170, 200]
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="auto: bf16 or fp32, whichever trains faster where the run trains (vitpose/train/precision.py)")
    seed: int = 0
    eval_every: int = Field(1, ge=1, description="epochs between evaluations")
    flip_test: bool = True
    max_steps_per_epoch: int | None = Field(None, ge=1)
    on_nonfinite_loss: Literal["skip", "error"] = "skip"
    max_nonfinite_skips: int = Field(10, ge=0)

    @model_validator(mode="after")
    def _steps_increase(self) -> TrainSettings:
        if self.lr_steps != sorted(self.lr_steps):
            raise ValueError(f"lr_steps {self.lr_steps} must be increasing epochs")
        return self


class DeepSpeedConfig(Section):
    config: str = "configs/deepspeed/zero3.json"
    zero_stage: Literal[0, 1, 2, 3] | None = Field(None, description="overrides the JSON's stage")


class RayConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    storage_path: str = "runs/ray"
    name: str = "vitpose-teacher"
    max_failures: int = Field(1, ge=-1)
    num_to_keep: int = Field(2, ge=1)
    autoscaler: bool = Field(False, description="the cluster adds nodes on demand: don't refuse bigger requests")
    # Ray's placement of the workers: PACK fills a node first; SPREAD puts them on different nodes where it
    # can (and still packs when nodes are lost); STRICT_* refuse to run otherwise.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


def _alias_not_reserved(value: str) -> str:
    if value.lower() == "latest" or value.lower().startswith("v") and value[1:].isdigit():
        raise ValueError(f"alias {value!r} is reserved by MLflow ('latest', 'v<N>'); use e.g. 'current' or 'champion'")
    return value


class TrackingConfig(Section):
    # None: MLFLOW_TRACKING_URI, else a SQLite file under runs/ (the registry needs a database store).
    tracking_uri: str | None = None
    experiment: str = "vitpose-teacher"
    registered_model: str = "vitpose-teacher"
    alias: str = "current"
    log_images: int = Field(8, ge=0, description="val crops drawn with predicted skeletons per eval")
    outage_patience_s: float = Field(600.0, gt=0, description="after training, how long to wait for an "
                                     "unreachable tracking server before giving up on what is still held")

    _alias = field_validator("alias")(_alias_not_reserved)


class TrainingConfig(Section):
    """Everything one training run needs, teacher or student: the trainer and the builders take this."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainSettings = TrainSettings()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()


class TuneConfig(Section):
    # Each entry: {"grid": [...]} or {"choice": [...]} or {"uniform"|"loguniform": [low, high]}.
    search_space: dict[str, dict[str, list[Any]]] = {}
    arm_settings: dict[str, dict[str, Any]] = Field({}, description="settings of one distill.parts arm only, e.g. "
                                                    "{unlabeled: {distill.feature.weight: 0.001}}: an arm's recipe")
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    metric: str = "val/AP"
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early; fifo runs all")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    workers_per_trial: int = Field(1, ge=1, description="ranks of each trial's training run (Ray Train under the "
                                   "trial, data-parallel, ZeRO stage from deepspeed.*); 1 trains in the trial's process")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0, description="GPUs per rank; a fraction shares one GPU (0.25: four "
                                   "small students per GPU)")
    seeds: int = Field(1, ge=1, description="seeds per setting (train.seed, train.seed + 1, ...): the same seeds "
                       "for every setting, each fixing initial weights, views and data order")
    baseline: str | None = Field(None, description="the setting paired differences are taken against, as "
                                 "key=value[,key=value], e.g. distill.parts=none")
    registered_model: str = "vitpose-student"
    alias: str = "champion"

    _alias = field_validator("alias")(_alias_not_reserved)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        for old in {"cpus_per_trial", "gpus_per_trial"} & set(data if isinstance(data, dict) else ()):
            raise ValueError(f"tune.{old} is now tune.{old[:4]}_per_worker: a trial trains on tune.workers_per_trial "
                             f"ranks (default 1), each with tune.{old[:4]}_per_worker")
        return data


# A teacher run is a plain training run; the name says which pipeline a config file is for.
TeacherConfig = TrainingConfig


class StudentConfig(TrainingConfig):
    """A training run of a student plus the distillation settings and the sweep around it."""

    distill: DistillConfig = DistillConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _second_stage_inside_training(self) -> StudentConfig:
        if self.distill.second_stage.epochs >= self.train.epochs:
            raise ValueError(f"distill.second_stage.epochs={self.distill.second_stage.epochs} must be below "
                             f"train.epochs={self.train.epochs}: the second stage is the last epochs of training")
        return self


ConfigT = TypeVar("ConfigT", bound=Section)


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """Absolute path; relative ones are taken from the repository root, not the current folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | None = None,
    schema: type[ConfigT] = TeacherConfig,  # type: ignore[assignment]
) -> ConfigT:
    """Read YAML (or start from defaults when ``path`` is None), apply ``key.path=value`` overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        file = resolve_path(path) if not Path(path).exists() else Path(path)
        if not file.is_file():
            raise ConfigError(f"{path}: config file not found (give a path like configs/teacher/synthetic_tiny.yaml)")
        raw = _read_with_bases(file, chain=())
    for item in overrides or []:
        _apply_override(raw, item, schema)
    if overrides:
        source += " (with --set " + " ".join(overrides) + ")"
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, source, schema)) from None


BASE_KEY = "_base_"


def _read_with_bases(file: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A YAML file's mapping, on top of the files its ``_base_`` names (a path or a list, relative to it).

    Sections merge key by key; a value (lists included) replaces the base's.
    """
    if file.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, file.resolve()))
        raise ConfigError(f"{file}: {BASE_KEY} files include each other ({loop}); remove one {BASE_KEY}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop(BASE_KEY, [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_file = (file.parent / base).resolve()
        if not base_file.is_file():
            raise ConfigError(f"{file}: {BASE_KEY} {base!r} not found (looked for {base_file}); paths are "
                              "relative to the file that names them")
        _merge(merged, _read_with_bases(base_file, (*chain, file.resolve())))
    _merge(merged, raw)
    return merged


def _merge(into: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict[str, Any], item: str, schema: type[Section]) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.epochs=3")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    # YAML parsing gives ints, floats, bools, lists ([256,192]) and null the way a config file would.
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def _explain(err: ValidationError, source: str, schema: type[Section]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(schema, loc[:-1])
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f" (did you mean '{'.'.join(loc[:-1] + close)}'?)" if close else ""
            lines.append(f"  {dotted}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        else:
            got = e.get("input")  # a whole section as the input says nothing the message does not
            lines.append(f"  {dotted}: {e['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    if len(lines) == 1:  # the common case reads as one line: file, key, what is wrong, the fix
        return f"{source}: invalid configuration:{lines[0][1:]}"
    return "\n".join([f"{source}: invalid configuration ({len(lines)} problems):", *lines])


def _fields_at(schema: type[Section], loc: list[str]) -> list[str]:
    model: Any = schema
    for part in loc:
        if part.isdigit():  # an item of a list of sections (data.datasets.1)
            model = getattr(model, "__args__", (model,))[0]
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def to_dict(cfg: Section) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_config(cfg: Section, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML that ``load_config`` reads back to an equal object."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def flatten(cfg: Section | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys → scalar values (lists and dicts as JSON), the shape MLflow params want."""
    data = to_dict(cfg) if isinstance(cfg, Section) else cfg
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat

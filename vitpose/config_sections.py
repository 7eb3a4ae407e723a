"""Config sections that live beside ``vitpose.config`` (which imports them): the base ``Section``, the data
sections a multi-dataset run repeats per dataset, the ViTPose+ mixture-of-experts switch and the distillation
sections of a student's config.

Multi-dataset runs: ``data.datasets`` lists two or more datasets. Each entry has a ``name`` (the
metric prefix ``val/<name>/...`` and the head's name in the model spec), a ``ratio`` (its share of every
training batch) and any of the per-dataset keys of the data section (``kind``, ``keypoints``,
``custom_keypoints``, ``root``, ``*_ann``, ``*_images``, ``val_det_file``, ``synthetic``); a key it leaves out
takes the data section's value. The first entry is the primary dataset: its keypoint set is the model's
``keypoint_head`` and its AP is ``val/AP``. ``resolve_entries`` turns the entries into one plain
``DataConfig`` each (validated as a data section, so every single-dataset check applies per dataset). An empty
list (the default) is today's single-dataset run, unchanged.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticDataConfig(Section):
    """Knobs of the generated dataset (vitpose.data.synthetic.SynthConfig); changing one regenerates it."""

    train_instances: int = Field(2000, ge=1)
    val_instances: int = Field(400, ge=1)
    seed: int = 0
    clutter: float = Field(0.2, ge=0.0, le=1.0)
    max_figures: int = Field(2, ge=1, le=8)
    occlusion_prob: float = Field(0.15, ge=0.0, le=1.0)
    pose_variety: float = Field(0.5, ge=0.0, le=1.0)
    unlabeled_instances: int = Field(0, ge=0, description="people in an unlabelled split (images and noisy "
                                     "person detections, no keypoints) for distill.unlabeled")
    generate: bool = Field(False, description="generate into a data.root folder that does not exist yet (the "
                                              "default root is always generated)")


class CustomKeypointsSection(Section):
    """A keypoint set of your own (``data.keypoints: custom``); pairs are given by name, not index."""

    name: str = Field("custom", description="what models and ONNX files call the set")
    names: list[str] = Field(min_length=1)
    flip_pairs: list[tuple[str, str]] = Field([], description="left/right partners, e.g. [left_eye, right_eye]")
    skeleton: list[tuple[str, str]] = Field([], description="links drawn in pictures")
    sigmas: list[float] = Field(min_length=1, description="OKS sigma per keypoint (COCO's range: 0.025-0.107)")
    joint_weights: list[float] | None = Field(None, description="loss weight per keypoint (data.joint_weights)")
    parts: list[tuple[str, int]] | None = Field(None, description="annotation fields and their keypoint counts, "
                                                "in order (default: all in 'keypoints')")


def known_keypoint_set(value: str) -> str:
    """``data.keypoints``: a built-in set or "custom"; a typo gets the closest name."""
    from vitpose.data.keypoints import BUILTIN_SETS, CUSTOM

    if value != CUSTOM and value not in BUILTIN_SETS:
        close = difflib.get_close_matches(value, list(BUILTIN_SETS), n=1)
        raise ValueError(f"unknown keypoint set{f' (did you mean {close[0]!r}?)' if close else ''}; choose one "
                         f"of {', '.join([*BUILTIN_SETS, CUSTOM])} (python -m vitpose.data.keypoints --list)")
    return value


class DatasetEntry(Section):
    """One dataset of a multi-dataset run (``data.datasets``); a key left out (None) takes the data section's."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="metric prefix val/<name>/AP; unique")
    ratio: float = Field(1.0, gt=0.0, description="share of every training batch (normalised over the entries)")
    kind: Literal["synthetic", "coco"] | None = None
    keypoints: str | None = Field(None, description="its keypoint set; synthetic data is remapped from COCO's "
                                  "(vitpose.data.remap: coco, crowdpose)")
    custom_keypoints: CustomKeypointsSection | None = None
    root: str | None = None
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    val_det_file: str | None = None
    synthetic: SyntheticDataConfig | None = Field(None, description="replaces the data section's, as a whole")


class MoeSection(Section):
    """ViTPose+ mixture of experts (``model.moe``): each MLP's fc2 split into shared outputs and one expert per
    dataset of ``data.datasets`` (the last ``part_features`` outputs), as the released ViTPose+ files."""

    part_features: int | None = Field(None, ge=1, description="outputs of each expert (None: a quarter of the "
                                      "width, ViTPose+'s choice)")


def resolve_entries(data: Any, data_cls: type) -> list[tuple[str, float, Any]]:
    """(name, ratio normalised to sum 1, the dataset's own ``data_cls`` section) per ``data.datasets`` entry.

    Raises ValueError naming ``datasets.<i>.<key>`` for an entry that is not a usable data section.
    """
    entries = list(data.datasets)
    if len(entries) == 1:
        raise ValueError("datasets has one entry: list two or more datasets, or none (the data section itself)")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"datasets: names must be unique, got {names}")
    base = data.model_dump(exclude={"datasets"})
    total = sum(e.ratio for e in entries)
    out = []
    for i, e in enumerate(entries):
        own = e.model_dump(exclude={"name", "ratio"}, exclude_none=True)
        if "keypoints" in own:
            own.setdefault("custom_keypoints", None)  # the data section's custom set is not this one's
        kind, kset = own.get("kind", base["kind"]), own.get("keypoints", base["keypoints"])
        if kind == "synthetic" and kset != "coco":  # the generator draws COCO people; remapped files beside them
            own.setdefault("train_ann", f"annotations/person_keypoints_train.{kset}.json")
            own.setdefault("val_ann", f"annotations/person_keypoints_val.{kset}.json")
        try:
            section = data_cls.model_validate({**base, **own})
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"datasets.{i}.{key} ({e.name}): {first['msg']}") from None
        out.append((e.name, e.ratio / total, section))
    return out


class TokenConfig(Section):
    enabled: bool = True
    random: bool = Field(False, description="control arm: the tokens at their seeded initialisation, never "
                         "trained on the teacher (the token's effect is token minus this)")
    num_tokens: int = Field(1, ge=1)
    epochs: int = Field(2, ge=1, description="epochs of token learning on the frozen teacher")
    lr: float = Field(1e-3, gt=0.0)


class OutputDistillConfig(Section):
    enabled: bool = True
    flip_average: bool = Field(False, description="the bank's teacher heatmaps of labelled crops averaged with "
                               "those of the mirrored crop, as the flip test does (unlabelled crops always are)")
    weight: float = Field(1.0, ge=0.0)
    mode: Literal["bank", "online"] = Field("bank", description="the training views of EVERY arm: bank = V stored "
                                            "views per instance with the teacher's heatmaps (GT-only arms ignore "
                                            "them); online = a fresh seeded draw per epoch, the teacher run per batch")
    views: int = Field(4, ge=1, description="augmented views per instance stored in the view bank")
    schedule: Literal["constant", "linear_decay"] = Field("constant", description="the teacher terms' "
                                                          "weights (output and feature) over training: constant, "
                                                          "or falling linearly towards 0 (DWPose)")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="joints whose teacher heatmap peaks below this "
                                  "are left out of the distillation loss (0: every joint)")


class FeatureDistillConfig(Section):
    """Feature distillation (FitNets; DWPose's feature term): the student's last backbone tokens, through a trainable
    1x1 projector to the teacher's width (dropped at export), pulled by MSE towards the teacher's last tokens."""

    weight: float = Field(0.0, ge=0.0, description="the term's weight (0: off; the distill.parts 'none' arm never "
                          "uses it); the teacher's tokens are layer-normed, so their MSE is ~1000x a heatmap MSE: "
                          "start near 1e-3")


class SecondStageConfig(Section):
    """DWPose's second stage (head-aware self-distillation), inside ``train.epochs``: for its last ``epochs`` epochs
    the backbone's patch embedding and blocks are frozen (learning rate 0) and the rest (its final norm, the head)
    trains on the ground truth plus ``weight`` x the MSE to the student's own heatmaps at the stage's start, in
    place of the teacher terms."""

    epochs: int = Field(0, ge=0, description="the last epochs of train.epochs that are the second stage (0: off)")
    weight: float = Field(1.0, ge=0.0, description="weight of the MSE to the student's own heatmaps")


class UnlabeledConfig(Section):
    """Person crops without keypoints, labelled by the teacher once into the view bank: ``images`` (a folder) and
    ``boxes`` (person detections in COCO's detection-results format, what a detector writes: a json list of
    ``{"image_id", "bbox": [x, y, w, h], "score", "category_id"}``, ``image_id`` the number in the image's file
    name as COCO names its images). Relative paths are taken from ``data.root``."""

    images: str | None = None
    boxes: str | None = None
    ratio: float = Field(0.5, ge=0.0, le=1.0, description="share of every epoch's crops drawn from the unlabelled "
                         "set (0: none, 1: teacher-labelled crops only); an epoch keeps the labelled set's length")
    score_thr: float = Field(0.3, ge=0.0, le=1.0, description="detections below this score are not used")
    category_id: int = Field(1, description="the detections' person category; other categories are not used")

    @model_validator(mode="after")
    def _both_or_neither(self) -> UnlabeledConfig:
        if (self.images is None) != (self.boxes is None):
            given, missing = ("images", "boxes") if self.images is not None else ("boxes", "images")
            raise ValueError(f"distill.unlabeled.{given} is set but distill.unlabeled.{missing} is not: give the "
                             "image folder and its person-detection file together")
        return self

    @property
    def enabled(self) -> bool:
        return self.images is not None


class DistillConfig(Section):
    teacher_uri: str = "models:/vitpose-teacher@current"
    token: TokenConfig = TokenConfig()
    output: OutputDistillConfig = OutputDistillConfig()
    feature: FeatureDistillConfig = FeatureDistillConfig()
    second_stage: SecondStageConfig = SecondStageConfig()
    unlabeled: UnlabeledConfig = UnlabeledConfig()

"""The detector pipeline's typed config (``configs/detector/*.yaml``): unknown keys are errors, as everywhere."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vitpose.config import DataConfig, TrackingConfig
from vitpose.config_sections import Section


class DetectorModelSection(Section):
    width: int = Field(32, ge=8, description="channels at stride 4; the backbone's stages have 2x and 4x that")
    fpn_channels: int = Field(64, ge=64, multiple_of=32, description="width of the feature pyramid and of FCOS's "
                              "head (its GroupNorm has 32 groups; 64 keeps 2 values per group at P7's 1x1)")
    head_convs: int = Field(2, ge=1, le=4, description="3x3 convolutions per FCOS head branch (torchvision: 4)")
    input_size: int = Field(192, ge=128, description="the square network input; images are letterboxed into it "
                            "(FCOS's coarsest level has stride 128)")


class DetectorTrainSection(Section):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(50, ge=0)
    lr_steps: list[int] = Field([6], description="epochs after which the lr drops 10x")
    seed: int = 0
    eval_every: int = Field(2, ge=1, description="val box AP every N epochs, and after the last")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default, all cores)")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    zoom_out_prob: float = Field(0.5, ge=0.0, le=1.0, description="chance an image is shrunk to 40-100% and placed "
                                 "at a random spot of the input: people smaller than the dataset's own")


class DetectorConfig(Section):
    name: str = "synthetic-detector"
    output: str = Field("runs/detector", description="run folders (checkpoints, val detections, the ONNX file)")
    data: DataConfig = DataConfig()
    model: DetectorModelSection = DetectorModelSection()
    train: DetectorTrainSection = DetectorTrainSection()
    tracking: TrackingConfig = TrackingConfig(experiment="vitpose-detector", registered_model="vitpose-detector")

"""The ``--config`` of predict (``configs/predict/*.yaml``): which person detector finds people in bare
images and video frames, and how video keypoints are smoothed. A flag given on the command line wins over the
file; unknown keys are errors, as in every config here.

    detector:  {model: models:/vitpose-detector@current, format: auto, score_thr: null}
    smoothing: {enabled: true, min_cutoff: 1.0, beta: 0.05}
"""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field, model_validator

from vitpose.config_sections import Section
from vitpose.deploy.detector import FORMATS


class DetectorSection(Section):
    model: str | None = Field(None, description="ONNX person detector: a file or an MLflow model URI (None: none)")
    format: Literal[FORMATS] = "auto"  # type: ignore[valid-type]  # vitpose.deploy.detector's layouts
    score_thr: float | None = Field(None, ge=0.0, le=1.0, description="None: the file's own threshold, else 0.3")


class SmoothingSection(Section):
    enabled: bool = True
    min_cutoff: float = Field(1.0, description="One-Euro cutoff of a still joint, Hz")
    beta: float = Field(0.05, description="One-Euro speed coefficient, per pixel/s")

    @model_validator(mode="after")
    def _usable(self) -> SmoothingSection:
        from vitpose.deploy.smoothing import OneEuroParams

        OneEuroParams(self.min_cutoff, self.beta)  # its own checks, its own message
        return self


class PredictConfig(Section):
    detector: DetectorSection = DetectorSection()
    smoothing: SmoothingSection = SmoothingSection()


FLAGS = {  # argparse destination -> (section, key) of the config it overrides
    "detector": ("detector", "model"), "detector_format": ("detector", "format"),
    "detector_score_thr": ("detector", "score_thr"), "smooth_min_cutoff": ("smoothing", "min_cutoff"),
    "smooth_beta": ("smoothing", "beta"),
}


def fill_from_config(args: argparse.Namespace) -> None:
    """Every detector / smoothing flag left unset (None) takes the value of ``args.config`` (or the default)."""
    from vitpose.config import load_config

    cfg = load_config(args.config, [], schema=PredictConfig) if getattr(args, "config", None) else PredictConfig()
    for dest, (section, key) in FLAGS.items():
        if hasattr(args, dest) and getattr(args, dest) is None:
            setattr(args, dest, getattr(getattr(cfg, section), key))
    if hasattr(args, "no_smooth"):
        args.no_smooth = args.no_smooth or not cfg.smoothing.enabled

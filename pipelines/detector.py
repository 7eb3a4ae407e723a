"""Train the embedded default's person detector on the synthetic data, export it to ONNX and register it in MLflow.

    python pipelines/detector.py                                    # configs/detector/synthetic.yaml
    python pipelines/detector.py --set train.epochs=4 --set model.input_size=160
    python pipelines/detector.py --resume                           # the newest run of this name, last epoch on

Then predict and serve find people without boxes: ``python pipelines/predict.py --model
models:/vitpose-student@champion --detector models:/vitpose-detector@current IMAGE_OR_VIDEO``, and
``python pipelines/evaluate.py --det-file <run folder>/val_detections.json`` scores poses on the detector's boxes.
Real footage needs a real detector's ONNX file instead (vitpose.deploy.detector: YOLOX, RTMDet, ultralytics).
"""

from __future__ import annotations

import argparse
import sys

from vitpose.cli import common_args, run_with_config

DEFAULT_CONFIG = "configs/detector/synthetic.yaml"


def main(argv: list[str] | None = None) -> int:
    from vitpose.detection.config import DetectorConfig
    from vitpose.detection.train import train_detector

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common_args(parser, DEFAULT_CONFIG).parse_args(argv)
    return run_with_config(args, DetectorConfig, lambda cfg: train_detector(cfg, args.resume), "detector")


if __name__ == "__main__":
    sys.exit(main())

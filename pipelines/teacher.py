"""Train a ViTPose teacher with Ray Train + DeepSpeed and register it in MLflow.

    python pipelines/teacher.py                                   # embedded default, local Ray
    python pipelines/teacher.py --config configs/teacher/coco_vitpose_g.yaml --set ray.num_workers=64
    ray job submit --working-dir . -- python pipelines/teacher.py --config ...
    python pipelines/teacher.py --resume                          # continue the latest run of this name

Everything that can be wrong with the config, the tracking server or the cluster is checked before
any worker starts. The console shows one line per epoch and the result; everything else (Ray, DeepSpeed,
torch) goes to the log file named on the first line, or to the console too with --verbose.
"""

from __future__ import annotations

import argparse
import sys

from vitpose.cli import common_args, run_with_config
from vitpose.config import TeacherConfig
from vitpose.train.driver import train_teacher

DEFAULT_CONFIG = "configs/teacher/synthetic_tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common_args(parser, DEFAULT_CONFIG).parse_args(argv)
    # The config first: a tracking URI it names decides where the log file goes inside a `ray job submit`.
    return run_with_config(args, TeacherConfig, lambda cfg: train_teacher(cfg, args.resume), "teacher")


if __name__ == "__main__":
    sys.exit(main())

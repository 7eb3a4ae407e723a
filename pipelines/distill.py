"""Distill a registered teacher into small students: a Ray Tune sweep over distillation settings.

    python pipelines/distill.py                                       # embedded default, local Ray
    python pipelines/distill.py --config configs/distill/synthetic_tiny.yaml --set tune.num_samples=2
    ray job submit --working-dir . -- python pipelines/distill.py --config ...
    python pipelines/distill.py --resume                              # finish an interrupted sweep

Before any trial: the teacher is fetched once, the knowledge tokens of every token setting in the search
space are learned once, and (output distillation in bank mode) the teacher's heatmaps are stored once in
the view bank. Every trial is an MLflow run nested under the sweep's run; the best student is registered
with the alias from tune.alias (default ``champion``).
"""

from __future__ import annotations

import argparse
import sys

from vitpose.config import StudentConfig, load_config
from vitpose.distill.sweep import run_sweep
from vitpose.pipeline import common_args, run

DEFAULT_CONFIG = "configs/distill/synthetic_tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = common_args(parser, DEFAULT_CONFIG).parse_args(argv)
    return run(lambda: run_sweep(load_config(args.config, args.set, schema=StudentConfig), args.resume),
               "distill", args.verbose)


if __name__ == "__main__":
    sys.exit(main())

"""Distill a registered teacher into small students: a Ray Tune sweep over distillation settings.

    python pipelines/distill.py                                       # embedded default, local Ray
    python pipelines/distill.py --config configs/distill/synthetic_tiny.yaml --set tune.num_samples=2
    ray job submit --working-dir . -- python pipelines/distill.py --config ...
    python pipelines/distill.py --resume                              # finish an interrupted sweep
    python pipelines/distill.py --plan [--json]                       # what each arm would do; no student trained

Before any trial: the teacher is fetched once, the knowledge tokens of every token setting in the search
space are learned once, and (bank mode, the default) the views every arm trains on are stored once in the
view bank with the teacher's heatmaps. Every trial is an MLflow run nested under the sweep's run; the
student with the best val AP after its last epoch is registered with the alias from tune.alias (default
``champion``).
"""

from __future__ import annotations

import argparse
import sys

from vitpose.cli import common_args, run
from vitpose.config import StudentConfig, load_config
from vitpose.distill.sweep import plan_sweep, run_sweep

DEFAULT_CONFIG = "configs/distill/synthetic_tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser, DEFAULT_CONFIG)
    parser.add_argument("--plan", action="store_true",
                        help="print what each arm would train (parameters, tokens, teacher heatmaps, views) and what the "
                        "learned tokens do to the frozen teacher's val loss (learning them if needed), and stop")
    parser.add_argument("--json", action="store_true", help="with --plan: the plan as one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.json and not args.plan:
        parser.error("--json goes with --plan")

    def body() -> int:
        cfg = load_config(args.config, args.set, schema=StudentConfig)
        return plan_sweep(cfg, args.json) if args.plan else run_sweep(cfg, args.resume)

    return run(body, "distill", args.verbose)


if __name__ == "__main__":
    sys.exit(main())

"""The embedded default, end to end: teacher, then the distillation sweep, both on synthetic data.

`make demo` runs this. Each stage is the same command a user would run by hand:
    python pipelines/teacher.py    (configs/teacher/synthetic_tiny.yaml)
    python pipelines/distill.py    (configs/distill/synthetic_tiny.yaml)
"""

from __future__ import annotations

import sys
import time

import distill
import teacher

from vitpose.run.console import say


def main(argv: list[str] | None = None) -> int:
    verbose = ["--verbose"] if "--verbose" in (argv if argv is not None else sys.argv[1:]) else []
    t0 = time.time()
    say("== 1/2 teacher: python pipelines/teacher.py")
    rc = teacher.main(verbose)
    if rc:
        return rc
    say(f"== 2/2 distillation sweep: python pipelines/distill.py ({time.time() - t0:.0f} s so far)")
    rc = distill.main(verbose)
    if rc:
        return rc
    say(f"== demo finished in {time.time() - t0:.0f} s; look at it: .venv/bin/mlflow ui --backend-store-uri "
        "sqlite:///runs/mlflow.db, then http://127.0.0.1:5000/#/?workflowType=machine_learning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

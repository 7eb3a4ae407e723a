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


def main() -> int:
    t0 = time.time()
    print("== 1/2 teacher: python pipelines/teacher.py", flush=True)
    rc = teacher.main([])
    if rc:
        return rc
    print(f"== 2/2 distillation sweep: python pipelines/distill.py ({time.time() - t0:.0f} s so far)", flush=True)
    rc = distill.main([])
    if rc:
        return rc
    print(f"== demo finished in {time.time() - t0:.0f} s; look at it: .venv/bin/mlflow ui "
          "--backend-store-uri sqlite:///runs/mlflow.db", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

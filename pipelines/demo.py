"""The embedded default, end to end: tiny teacher on synthetic data, registered in a local MLflow.

`make demo` runs this. Each stage is the same command a user would run by hand.
"""

from __future__ import annotations

import sys
import time

import teacher


def main() -> int:
    t0 = time.time()
    print("== 1/1 teacher: python pipelines/teacher.py (configs/teacher/synthetic_tiny.yaml)", flush=True)
    rc = teacher.main([])
    if rc:
        return rc
    print(f"== demo finished in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

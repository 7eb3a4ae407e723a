"""The C heap's policy by model size (vitpose/train/heap.py), seen in what the process does: page faults.

With blocks over 128 KiB mapped on their own, every 4 MiB buffer allocated and freed is a fresh mapping whose
pages fault in again (~1,000 per buffer); on glibc's default heap the freed buffer is reused and almost nothing
faults. Each case runs in a fresh interpreter, since the setting is per process and cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from vitpose.train.heap import return_freed_blocks
was_set = return_freed_blocks(int(sys.argv[1]))
for _ in range(5):
    torch.ones(1 << 20)  # warm: allocator state, torch's first-call work
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    torch.ones(1 << 20)  # 4 MiB, allocated, touched and freed
print(json.dumps({"set": was_set, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(num_params: int, extra_env: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (extra_env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, str(num_params)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_models_return_freed_blocks_small_ones_reuse_them():
    small, big = probe(1_000_000), probe(100_000_000)
    assert not small["set"] and big["set"]
    # 50 buffers of 1,024 pages each: mapped anew every time for the big model (51,200 faults), reused for the
    # small one (a few thousand, while glibc's own threshold adapts to the buffer size).
    assert big["faults"] > 40_000, big
    assert small["faults"] < 12_000, small


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_environment_wins():
    out = probe(1_000_000, {"MALLOC_MMAP_THRESHOLD_": "131072"})  # a small model, but the user asked for mapped blocks
    assert not out["set"] and out["faults"] > 40_000, out

"""How a training process's C heap hands freed memory back: by model size.

glibc keeps freed blocks in the process and reuses them; under DeepSpeed's big flat buffers that fragments, and
ViT-H at ZeRO-3 on 2 CPU ranks was killed at 22 GiB where, with every block over 128 KiB mapped on its own and
returned when freed (``M_MMAP_THRESHOLD``), it peaked at 10.5 GiB per rank (../shared/STACK-NOTES.md). The same
setting makes every activation of a small model a fresh mapping, page-faulted in and zeroed at each step: the
demo teacher's step took 1.5x as long with it (benchmarks/demo_profile.py). So big models get it and small ones
keep glibc's default; a ``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc reads it at start) wins over both.
"""

from __future__ import annotations

import ctypes
import os
import sys

LARGE_MODEL_PARAMS = 50_000_000  # ViTPose-B (86M) and up; the CPU presets are all under 10M
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_blocks(num_params: int) -> bool:
    """Set glibc's mmap threshold for a model of ``num_params`` parameters; True when it was set here."""
    if num_params < LARGE_MODEL_PARAMS or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to set
        return False
    return libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1

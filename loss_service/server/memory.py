r"""glibc ``malloc`` tuning for large requests.

Each large request allocates fresh buffers of tens of MB (the request bytes, the loss values).
glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB, adapting up to 32 MiB) with ``mmap`` and
returns them to the kernel on ``free``; the next request page-faults every page again, which on
this VM costs more than the loss itself. Raising the mmap threshold and the trim threshold keeps
freed memory in the heap for reuse. ``bench/`` applies the same setting to its bare server so the
comparison stays fair.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

# From <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Above the largest tensor a default-limited request carries (5e7 float32 = 200 MB), so that even
# the biggest buffers come from the reusable heap. mallopt returns 0 if glibc refuses the value.
DEFAULT_MMAP_THRESHOLD = 256 * 1024 * 1024
DEFAULT_TRIM_THRESHOLD = 1024 * 1024 * 1024

log = logging.getLogger(__name__)


def tune_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    r"""Set ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with ``mallopt``; ``False`` off glibc.

    Call it once, early in the process. Blocks up to ``mmap_threshold`` bytes then come from the
    heap and up to ``trim_threshold`` bytes of free heap stay mapped, so repeated large requests
    reuse warm pages instead of faulting in fresh ones.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    if not ok:
        log.warning("mallopt refused mmap_threshold=%d trim_threshold=%d", mmap_threshold, trim_threshold)
    return ok

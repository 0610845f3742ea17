r"""The server's memory: glibc ``malloc`` tuning, giving memory back at rest, the in-flight budget.

Each large request allocates fresh buffers of tens of MB (the request bytes, the loss values).
glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB, adapting up to 32 MiB) with ``mmap`` and
returns them to the kernel on ``free``; the next request page-faults every page again, which on
this VM costs more than the loss itself. Raising the mmap threshold and the trim threshold keeps
freed memory in the heap for reuse (:func:`tune_malloc`; ``bench/`` applies the same setting to
its bare server so the comparison stays fair), and :class:`IdleTrim` gives it back once the
server is at rest. :class:`RequestBudget` bounds the request bytes being processed at once.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from concurrent.futures import Executor
from typing import Callable, Optional

from .errors import over_budget

# From <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Above the largest tensor a default-limited request carries (5e7 float32 = 200 MB), so that even
# the biggest buffers come from the reusable heap. mallopt returns 0 if glibc refuses the value.
DEFAULT_MMAP_THRESHOLD = 256 * 1024 * 1024
DEFAULT_TRIM_THRESHOLD = 1024 * 1024 * 1024
# One arena for every thread: glibc returns a thread arena's free top only as it frees (which the
# trim threshold above prevents), never on malloc_trim, so memory freed by a worker thread would
# stay resident; the main arena gives everything back on trim_malloc().
DEFAULT_ARENA_MAX = 1
# Below this many request bytes since the last trim, there is little to give back.
IDLE_TRIM_MIN_BYTES = 16 * 1024 * 1024

log = logging.getLogger(__name__)


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_malloc(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    arena_max: int = DEFAULT_ARENA_MAX,
) -> bool:
    r"""Set ``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD`` and ``M_ARENA_MAX`` with ``mallopt``; ``False`` off glibc.

    Call it once, early in the process, before it starts threads. Blocks up to ``mmap_threshold``
    bytes then come from the heap and up to ``trim_threshold`` bytes of free heap stay mapped, so
    repeated large requests reuse warm pages instead of faulting in fresh ones, until
    :func:`trim_malloc` gives them back when the server is idle.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_ARENA_MAX, arena_max))
    ok = all([bool(mallopt(option, int(value))) for option, value in settings])
    if not ok:
        log.warning("mallopt refused mmap_threshold=%d trim_threshold=%d arena_max=%d", mmap_threshold, trim_threshold,
                    arena_max)
    return ok


def trim_malloc() -> bool:
    r"""Give the free memory of every glibc arena back to the kernel (``malloc_trim(0)``); ``False`` off glibc.

    With :func:`tune_malloc`'s thresholds freed request buffers stay mapped for the next large
    request; once the server is idle they are returned (:class:`RequestBudget`'s ``on_idle``).
    ctypes releases the GIL for the call, which walks the heap: call it off the event loop.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.malloc_trim(0)
    return True


class RequestBudget:
    r"""Bytes of the requests being processed, held against ``limit`` (use from the event loop only).

    :meth:`acquire` refuses at once (``RESOURCE_EXHAUSTED``) a request that would take the total
    over the limit, before anything is decoded: the server never holds more than the limit for
    requests it computes, and nothing for those it refuses. ``on_idle`` runs when the total
    returns to zero after at least :data:`IDLE_TRIM_MIN_BYTES` went through since it last ran;
    ``idle_since`` is the ``time.monotonic()`` of that return (``None`` while requests are in flight).
    """

    def __init__(self, limit: int, on_idle: Optional[Callable[[], None]] = None) -> None:
        self.limit = limit
        self.in_use = 0
        self.idle_since: Optional[float] = time.monotonic()
        self._since_idle = 0
        self.on_idle = on_idle

    def acquire(self, size: int) -> None:
        if self.in_use + size > self.limit:
            if size > self.limit:
                raise over_budget(f"request: {size} bytes exceed the server's in-flight request budget of {self.limit} bytes")
            raise over_budget(
                f"request: {size} bytes would exceed the server's in-flight request budget ({self.in_use} of "
                f"{self.limit} bytes in use); retry later"
            )
        self.in_use += size
        self.idle_since = None
        self._since_idle += size

    def release(self, size: int) -> None:
        self.in_use -= size
        if self.in_use:
            return
        self.idle_since = time.monotonic()
        if self._since_idle >= IDLE_TRIM_MIN_BYTES:
            self._since_idle = 0
            if self.on_idle is not None:
                self.on_idle()

    def holding(self, size: int) -> "_Held":
        r"""``with budget.holding(size):``: :meth:`acquire` on entry, :meth:`release` on exit."""
        return _Held(self, size)


class IdleTrim:
    r"""Gives freed memory back (:func:`trim_malloc`, in ``executor``) once ``budget`` has had no
    request in flight for ``seconds``.

    Under load, memory a request freed is what the next one reuses (:func:`tune_malloc`): trimming
    between back-to-back large requests would make each page-fault its buffers afresh. So a trim
    waits for a server at rest: the budget's ``on_idle`` schedules one check at a time, which trims
    after ``seconds`` of idleness, waits out the rest of them, or gives up when requests are in
    flight again (their end schedules the next check).
    """

    def __init__(self, budget: RequestBudget, executor: Executor, seconds: float) -> None:
        self._budget = budget
        self._executor = executor
        self._seconds = seconds
        self._scheduled = False
        self.closed = False
        budget.on_idle = self.schedule

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._seconds, self._check)

    def _check(self) -> None:
        idle_since = self._budget.idle_since
        if self.closed or idle_since is None:
            self._scheduled = False
            return
        remaining = idle_since + self._seconds - time.monotonic()
        if remaining > 0:
            asyncio.get_running_loop().call_later(remaining, self._check)
            return
        self._scheduled = False
        asyncio.get_running_loop().run_in_executor(self._executor, trim_malloc)


class _Held:
    r"""The context manager of :meth:`RequestBudget.holding` (a class: once per request, it must be cheap)."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: RequestBudget, size: int) -> None:
        self.budget = budget
        self.size = size

    def __enter__(self) -> None:
        self.budget.acquire(self.size)

    def __exit__(self, *exc_info: object) -> None:
        self.budget.release(self.size)

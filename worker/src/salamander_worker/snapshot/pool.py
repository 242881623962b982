"""One small, process-wide thread pool for bulk memory work that releases the GIL (crc32 of
large buffers, tensor copies).

Invariants: at most ``min(8, cores this process may run on)`` threads; the pool is created on
first use and re-created in a forked child (a pool inherited across ``fork`` has no threads and
would hang); :func:`run` never nests (work submitted from a pool thread runs inline), so it
cannot deadlock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 8

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pid: int | None = None
_local = threading.local()


def threads() -> int:
    """How many threads bulk work may use in this process: the cores it may run on (its CPU
    affinity, which a container's cpuset narrows; 1 on a single core), at most ``MAX_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


def _executor() -> ThreadPoolExecutor:
    global _pool, _pid
    with _lock:
        if _pool is None or _pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="salamander-bulk",
                                       initializer=_mark_worker)
            _pid = os.getpid()
        return _pool


def _mark_worker() -> None:
    _local.worker = True


def run(func: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[func(x) for x in items]``, on the pool when there is more than one item and more
    than one thread; results in order. The first exception raised by ``func`` propagates
    (after every item has finished, so no work outlives the call)."""
    items = list(items)
    if len(items) < 2 or threads() < 2 or getattr(_local, "worker", False):
        return [func(x) for x in items]
    futures = [_executor().submit(func, x) for x in items]
    results: list[R] = []
    error: BaseException | None = None
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised once every item is done
            error = error or exc
    if error is not None:
        raise error
    return results

"""Threads and compiled kernels of the condition stage's numerics.

The conditioning work is many small matrix products and LAPACK calls per
star: it runs in chunks of stars on a shared thread pool (numpy, BLAS, LAPACK
and the numba kernels release the GIL) with BLAS itself single-threaded, and
its inner loops are compiled once by numba and cached on disk.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

__all__ = ["default_threads", "single_threaded_blas", "run_chunks", "jit_kernel"]

logger = logging.getLogger(__name__)


def default_threads() -> int:
    """Threads :func:`xpcat.sample_xp` and the conditioning use by default: the CPUs this process may run on, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # threadpoolctl comes with scikit-learn; without it BLAS keeps its threads
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread inside the block (xpcat parallelises over stars instead).

    The products here are many small ones: BLAS's own threads spin more than
    they compute, which on a shared machine costs CPU time and gains nothing.
    """
    ctl = _blas_controller()
    if ctl is None:
        yield
        return
    with ctl.limit(limits=1, user_api="blas"):
        yield


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _forget_executor() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool when needed."""
    global _EXECUTOR, _EXECUTOR_LOCK
    _EXECUTOR = None
    _EXECUTOR_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


def run_chunks(work: Callable[[tuple[int, int]], None], chunks: list[tuple[int, int]], threads: int) -> None:
    """Call ``work(chunk)`` for every chunk, on up to ``threads`` threads (numpy releases the GIL)."""
    global _EXECUTOR
    if threads <= 1 or len(chunks) <= 1:
        for c in chunks:
            work(c)
        return
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR._max_workers < threads:
            _EXECUTOR = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="xpcat-sample")
        ex = _EXECUTOR
    # consume the iterator so that exceptions propagate
    list(ex.map(work, chunks))



@functools.lru_cache(maxsize=None)
def jit_kernel(func: Callable) -> Callable:
    """``numba.njit(cache=True, nogil=True)(func)``, built on first use (numba's import costs ~1 s).

    numba comes with hats (a dependency); the compiled code is cached on disk.
    ``func`` is a plain-Python loop kernel over arrays (named ``*_py``); the
    compiled function is cached per ``func``.
    """
    import numba

    return numba.njit(cache=True, nogil=True)(func)

"""One progress-bar helper for every stage (tqdm), and the futures loop that drives it."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "progress_enabled", "timed"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_STAGE_WIDTH = 12


def progress_enabled() -> bool:
    """Bars are shown unless ``XPCAT_PROGRESS=0``."""
    return os.environ.get("XPCAT_PROGRESS", "1") != "0"


def progress(iterable: Iterable[T], stage: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar labelled with the stage name (aligned)."""
    return iter(
        tqdm(
            iterable,
            desc=stage.ljust(_STAGE_WIDTH),
            total=total,
            unit=unit,
            disable=not progress_enabled(),
            dynamic_ncols=True,
        )
    )


@contextlib.contextmanager
def timed(times: dict[str, float] | None, step: str) -> Iterator[None]:
    """Add the seconds of the block to ``times[step]`` (nothing when ``times`` is None)."""
    if times is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[step] = times.get(step, 0.0) + time.perf_counter() - t0

"""Worker preload (``dask worker --preload xpcat.jobs.preload``): heavy imports before the worker starts.

A job-queue worker with ``--lifetime`` has a limited time to work; importing
pyarrow, hats and the stage modules inside the first task of every fresh
worker costs seconds of that time (many seconds on a busy node). Importing
them while the worker process starts, before it registers with the
scheduler, keeps the lifetime for tasks.
"""

from __future__ import annotations

import importlib
import logging
import time

logger = logging.getLogger(__name__)

#: Modules every stage task needs.
MODULES = (
    "pyarrow.parquet",
    "pyarrow.compute",
    "hats.pixel_math.spatial_index",
    "xpcat.production.partitions",
    "xpcat.production.run",
    "xpcat.production.catalog",
    "xpcat.production.condition.stage",
    "jax",
    "xpcat.production.infer",
)


def dask_setup(worker) -> None:  # noqa: D401 - distributed preload hook
    """Import :data:`MODULES`; a module that fails to import is reported and left to the task."""
    t0 = time.perf_counter()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:  # the task that needs it will raise with the full context
            logger.warning("preload: cannot import %s: %s", name, err)
    logger.info("preload: imported %d modules in %.1f s", len(MODULES), time.perf_counter() - t0)

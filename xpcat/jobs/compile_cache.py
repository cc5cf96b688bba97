"""JAX's persistent compilation cache in the run directory, shared by all workers of a run.

Inference jit-compiles its kernels once per batch shape (start screen, LM loop
at each compaction size, summary, Jacobian): about 7-40 s per process on a CPU,
more than a worker spends fitting a small partition. Every worker pays it again
(``adapt`` starting jobs, ``--lifetime`` rotating them, a resumed run), unless
the compiled executables are kept on disk. :func:`enable_compilation_cache`
points JAX's persistent cache (``jax_compilation_cache_dir``) at
``RUN_DIR/state/jax-cache`` — on a cluster the run directory is on the shared
filesystem, so the first worker's compilations serve every later one.

JAX keys each entry by the computation, the compile options, the backend and
the jax/jaxlib versions, so a CPU and a GPU worker, or two jax versions, never
load each other's executables. A cache entry that cannot be read is recompiled
(JAX warns); the cache is an accelerator, never an input of the results.

The cache directory is a process-wide JAX setting: the first call in a process
wins, and a directory set through ``JAX_COMPILATION_CACHE_DIR`` (the user's own)
is left as it is. ``[inference] compilation_cache = false`` turns it off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["enable_compilation_cache"]

logger = logging.getLogger(__name__)

def enable_compilation_cache(cache_dir: str | os.PathLike) -> Path | None:
    """Use the run's persistent compilation cache in this process (idempotent).

    Parameters
    ----------
    cache_dir : path-like
        The cache folder (a run's is :attr:`xpcat.production.run_dir.RunPaths.jax_cache`).

    Returns
    -------
    Path or None
        The cache directory in use in this process (which may be an earlier
        call's or the user's own), or None when it could not be created (then
        JAX compiles as usual; the reason is logged).
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        logger.warning("no JAX compilation cache (cannot create %s: %s); workers compile their own kernels", path, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # every inference kernel is worth keeping: small ones compile in well under the 1 s default threshold
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("JAX compilation cache: %s", path)
    return path

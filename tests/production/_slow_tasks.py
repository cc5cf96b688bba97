"""Worker preload for the SLURM lifetime test: each inference partition takes :data:`EXTRA_SECONDS` longer.

The real ``xpcat run`` of the test finishes in well under a minute on a quiet
machine (its inference settings are small and the workers share the run's
compilation cache), so without help it can end before any worker reaches its
``--lifetime``, and the test would prove nothing. ``dask worker --preload
_slow_tasks`` makes every infer task sleep first, then run the real
:func:`xpcat.production.infer.infer_partition`, so the run outlasts the
lifetime on any machine while the stages, the outputs and the rotation stay real.
"""

from __future__ import annotations

import functools
import time

#: Seconds added to every inference partition.
EXTRA_SECONDS = 8.0


def dask_setup(worker) -> None:  # noqa: D401 - distributed preload hook
    """Wrap the infer stage function of this worker process with a sleep."""
    from xpcat.production import infer as fitting
    real = fitting.infer_partition

    @functools.wraps(real)
    def slow(*args, **kwargs):
        time.sleep(EXTRA_SECONDS)
        return real(*args, **kwargs)

    fitting.infer_partition = slow

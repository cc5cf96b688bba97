"""Peak memory of this process, as the run summaries and benchmarks report it."""

from __future__ import annotations

import resource

__all__ = ["peak_rss_mib"]


def peak_rss_mib() -> float:
    """Peak resident memory of this process image [MiB].

    ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` would also count the
    parent's memory at the fork that preceded this interpreter's exec (a Dask
    worker spawned from a client holding GBs reported the client's peak).
    Falls back to ``ru_maxrss`` where /proc is not there.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

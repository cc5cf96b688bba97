"""The few lines a stage command prints when it ends (the whole summary stays in ``state/last_run.json``)."""

from __future__ import annotations

import logging
from typing import Any

from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = ["LAST_RUN", "format_run_summary"]

#: The engine's full summary of the latest run, inside ``RUN_DIR/state``.
LAST_RUN = "last_run.json"


def format_run_summary(summary: dict[str, Any]) -> str:
    """A short text of the summary :func:`xpcat.production.run.run_stages` returns.

    Stars and partitions, per stage the partitions done, run now and failed,
    the catalog, the wall time, the log and where the full summary is.

    Parameters
    ----------
    summary : dict
        ``run_dir``, ``stars``, ``partitions``, ``resumed``, ``stages``,
        ``seconds``, ``workers``, ``log`` as the engine returns them.

    Returns
    -------
    str
    """
    paths = RunPaths.of(summary["run_dir"])
    n = int(summary.get("partitions", 0))
    kind = "resumed" if summary.get("resumed") else "new"
    head = (f"{kind} run {paths.root}: {int(summary.get('stars', 0)):,} stars in {n} partitions, "
            f"{float(summary.get('seconds', 0.0)):.1f} s on {summary.get('workers', '?')} workers")
    lines = [head]
    blocked: set[str] = set()
    for name, st in summary.get("stages", {}).items():
        if name == "catalog":
            continue
        pending = set(st.get("pending", ()))
        failed = list(st.get("failed_partitions", ()))
        done = n - len(pending) - len(blocked)
        line = f"  {name:<10} {done}/{n} done ({int(st.get('completed', 0))} run now, {len(failed)} failed"
        lines.append(line + (f", {len(blocked)} waiting for an earlier stage)" if blocked else ")"))
        blocked |= pending | set(failed)
    cat = summary.get("stages", {}).get("catalog")
    if cat:
        state = "up to date" if cat.get("skipped") else "built"
        lines.append(f"  {'catalog':<10} {int(cat.get('rows', 0)):,} rows in {cat.get('pixels')} HATS pixels at "
                     f"{paths.catalog} ({state})")
    lines.append(f"log:     {summary.get('log')}")
    lines.append(f"details: {paths.state / LAST_RUN}")
    return "\n".join(lines)

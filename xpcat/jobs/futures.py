"""Tasks on a Dask cluster, collected as they complete, with one progress bar.

:func:`run_tasks` is the one way xpcat submits work: every stage task and
every catalog task goes through it. Results are taken as each future
completes and the future is released at once, so no result lingers in
worker memory; a task that still raises after its retries is handed back as
an error (its exception text and traceback), never lost.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from xpcat.progress import progress

logger = logging.getLogger(__name__)

__all__ = ["TaskOutcome", "run_tasks"]


@dataclass(frozen=True)
class TaskOutcome:
    """The outcome of one task.

    Attributes
    ----------
    tag : Any
        What the caller attached to the task (e.g. its partition).
    result : Any
        The task's return value (None when it failed).
    error : str
        ``"ExceptionType: message"`` when it failed, else ``""``.
    traceback : str
        The remote traceback when it failed.
    """

    tag: Any
    result: Any = None
    error: str = ""
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def _format_exception(fut: Any) -> tuple[str, str]:
    try:
        exc = fut.exception()
        tb = fut.traceback()
    except Exception as err:  # noqa: BLE001 - a lost future still gets reported
        return f"{type(err).__name__}: {err}", ""
    text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""
    return f"{type(exc).__name__}: {exc}", text


def run_tasks(client: Any, fn: Callable[..., Any], calls: Sequence[tuple[Any, tuple]], label: str, *,
              retries: int = 0, resources: dict | None = None, unit: str = "task") -> Iterator[TaskOutcome]:
    """Submit ``fn(*args)`` for every ``(tag, args)`` and yield outcomes in completion order.

    Parameters
    ----------
    client : distributed.Client
    fn : callable
        Importable on the workers; returns something small.
    calls : sequence of (tag, args)
    label : str
        Progress-bar label and task-key prefix.
    retries : int
        Dask retries of a task that raised.
    resources : dict, optional
        Worker resources per task (``{"GPU": 1}``).
    unit : str
        Progress-bar unit.

    Yields
    ------
    TaskOutcome
    """
    from distributed import as_completed

    if not calls:
        return
    futures = {}
    stamp = time.time_ns()
    for i, (tag, args) in enumerate(calls):
        fut = client.submit(fn, *args, key=f"{label}-{i}-{stamp}", pure=False, retries=retries, resources=resources)
        futures[fut.key] = (fut, tag)
    for fut in progress(as_completed([f for f, _ in futures.values()]), label, total=len(futures), unit=unit):
        _, tag = futures.pop(fut.key)
        if fut.status == "finished":
            outcome = TaskOutcome(tag, result=fut.result())
        else:
            err, tb = _format_exception(fut)
            outcome = TaskOutcome(tag, error=err, traceback=tb)
        fut.release()
        yield outcome

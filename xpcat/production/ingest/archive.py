"""``xpcat fetch``: every source_id range of a run from a Gaia archive, resumable.

:func:`fetch_run` checks that the archive can be reached at all (a host name
that does not resolve or a refused connection ends the fetch at once, naming
the URL: :func:`~xpcat.production.ingest.client.check_reachable`), asks the
census for the non-empty pixels, and fetches every range not yet done with
:func:`~xpcat.production.ingest.ranges.fetch_range` (queries, DataLink XP,
raw partitions), ``FetchOptions.workers`` at a time in worker processes.

Each request (job submission, phase poll, result download, DataLink batch)
is retried on HTTP 5xx, timeouts and dropped or short answers with
exponential backoff up to ``FetchOptions.max_attempts``. A range that keeps
failing, or whose answer is wrong, is recorded as failed with the reason and
the run goes on. A range that failed (not permanently) or left stars without
XP is queued again at once, up to ``FetchOptions.resume_attempts`` times (for
the latter, only the missing ids are asked again): the resume a rerun would
do. The summary says whether the fetch is ``complete``; when it is
not, its ``incomplete`` line names how many stars are missing and the command
that resumes (``xpcat fetch`` exits non-zero).

The client is built explicitly (:func:`build_client`): astroquery's
module-level ``Gaia`` object contacts the archive at import and is never used.
astroquery's TAP connections have no timeout, so every fetch runs under
``socket.setdefaulttimeout(FetchOptions.timeout_s)`` (restored afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import socket
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from xpcat.config import RunConfig
from xpcat.errors import InputError
from xpcat.fileio import write_json_atomic
from xpcat.production.ingest.client import (
    FetchOptions,
    RangeFailed,
    build_client,
    check_reachable,
    load_xp,
    run_query,
    socket_timeout,
)
from xpcat.production.ingest.ranges import (
    CENSUS_ADQL,
    GAIA_SOURCE_ADQL,
    TMASS_ADQL,
    RangeResult,
    census_counts,
    fetch_missing_xp,
    fetch_range,
    fetched_tables,
    range_done,
    read_range_state,
    write_range_state,
)
from xpcat.production.run_dir import RunPaths
from xpcat.production.partitions import partition_name
from xpcat.progress import progress

__all__ = [
    "GAIA_SOURCE_ADQL",
    "TMASS_ADQL",
    "CENSUS_ADQL",
    "FetchOptions",
    "RangeFailed",
    "build_client",
    "socket_timeout",
    "fetch_missing_xp",
    "fetch_options",
    "fetch_range",
    "fetch_run",
    "load_xp",
    "run_query",
]

logger = logging.getLogger(__name__)

_Task = tuple[int, "int | None", tuple[int, ...]]  # (pixel, census count, XP ids to ask again; () = whole range)
_WORKER_CLIENT: dict[tuple[str, bool], Any] = {}


def fetch_options(config: RunConfig) -> FetchOptions:
    """The run's :class:`FetchOptions` (``[fetch] workers`` and ``xp``)."""
    return FetchOptions(workers=config.fetch.workers, xp=config.fetch.xp)


def _run_task(client: Any, task: _Task, level: int, raw_root: Path, state_dir: Path, options: FetchOptions,
              archive_url: str) -> RangeResult:
    pix, expected, missing = task
    if missing:
        return fetch_missing_xp(client, pix, level, raw_root, state_dir, options, list(missing))
    return fetch_range(client, pix, level, raw_root, state_dir, options, expected_rows=expected,
                       archive_url=archive_url)


def _worker_task(task: _Task, level: int, raw_root: Path, state_dir: Path, options: FetchOptions, archive_url: str,
                 login: bool) -> RangeResult:
    """One task in a worker process (its own client, timeout and working directory)."""
    socket.setdefaulttimeout(options.timeout_s)
    key = (archive_url, login)
    if key not in _WORKER_CLIENT:
        _WORKER_CLIENT[key] = build_client(archive_url, login=login)
    return _run_task(_WORKER_CLIENT[key], task, level, raw_root, state_dir, options, archive_url)


class _Runner:
    """Runs tasks here, or in a pool of spawned worker processes; results as they finish."""

    def __init__(self, client: Any, pool: ProcessPoolExecutor | None, args: tuple, login: bool) -> None:
        self._client, self._pool, self._args, self._login = client, pool, args, login
        self._queue: deque[_Task] = deque()
        self._futures: dict[Future, _Task] = {}

    def submit(self, task: _Task) -> None:
        if self._pool is None:
            self._queue.append(task)
        else:
            self._futures[self._pool.submit(_worker_task, task, *self._args, self._login)] = task

    def results(self) -> Iterator[tuple[_Task, RangeResult]]:
        """(task, result) of every task submitted, also of those submitted while this runs."""
        while self._queue or self._futures:
            if self._pool is None:
                task = self._queue.popleft()
                yield task, _run_task(self._client, task, *self._args)
                continue
            done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
            for fut in done:
                task = self._futures.pop(fut)
                try:
                    yield task, fut.result()
                except (OSError, RuntimeError, ValueError, EOFError) as err:  # a worker died: record the range, go on
                    yield task, self._worker_died(task, err)

    def _worker_died(self, task: _Task, err: BaseException) -> RangeResult:
        level, state_dir = self._args[0], self._args[2]
        name, reason = partition_name(task[0], level), f"worker failed: {type(err).__name__}: {err}"
        if task[2]:  # asking again for missing XP: the range itself stays done
            return RangeResult(partition=name, status="done", missing_xp_ids=list(task[2]), reason=reason)
        result = RangeResult(partition=name, status="failed", reason=reason)
        write_range_state(state_dir, name, result)
        return result


@contextlib.contextmanager
def _task_runner(client: Any, n_tasks: int, level: int, raw_root: Path, state_dir: Path, options: FetchOptions,
                 archive_url: str, login: bool) -> Iterator[_Runner]:
    """Tasks run here, or ``options.workers`` at a time in spawned processes."""
    args = (level, raw_root, state_dir, options, archive_url)
    if options.workers == 1 or n_tasks <= 1:
        yield _Runner(client, None, args, login)
        return
    with ProcessPoolExecutor(max_workers=min(options.workers, n_tasks), mp_context=mp.get_context("spawn")) as pool:
        yield _Runner(client, pool, args, login)


def _fetch_all(runner: _Runner, todo: list[_Task], options: FetchOptions,
               summary: dict) -> dict[str, tuple[_Task, RangeResult]]:
    """Every task to its end; the last result per range.

    A range that failed (not permanently) or left stars without XP is queued
    again as soon as its result comes (for the latter, only the missing ids),
    up to ``options.resume_attempts`` times: the resume a rerun would do,
    without waiting for the other ranges.
    """
    final: dict[str, tuple[_Task, RangeResult]] = {}

    def finished() -> Iterator[RangeResult]:
        rounds: Counter[str] = Counter()
        for task in todo:
            runner.submit(task)
        for task, res in runner.results():
            final[res.partition] = (task, res)
            for t, k in res.rows.items():
                summary["rows"][t] += k
            if res.status in ("done", "empty") and not task[2]:
                summary[res.status] += 1
            again = None
            if res.status == "failed" and not res.permanent:
                again = task
            elif res.missing_xp_ids:
                again = (task[0], task[1], tuple(res.missing_xp_ids))
            rounds[res.partition] += 1
            if again is not None and rounds[res.partition] <= options.resume_attempts:
                logger.warning("%s: %s; asking again (%d of %d)", res.partition,
                               "failed" if res.status == "failed" else f"{len(res.missing_xp_ids)} star(s) without XP",
                               rounds[res.partition], options.resume_attempts)
                runner.submit(again)
            else:
                yield res

    for _ in progress(finished(), "fetch", total=len(todo), unit="range"):
        pass
    return final


def _incomplete(summary: dict, final: dict[str, tuple[_Task, RangeResult]], census: dict[int, int] | None,
                rerun: str, state_dir: Path) -> str | None:
    """One line naming the stars left unfetched and how to resume, or None when the fetch is complete."""
    failed = [task[0] for task, res in final.values() if res.status == "failed"]
    n_xp = summary["missing_xp"]
    if not failed and not n_xp:
        return None
    n_failed = None if census is None else sum(census.get(p, 0) for p in failed)
    total = None if n_failed is None else n_failed + n_xp
    parts = []
    if failed:
        parts.append(f"{'the' if n_failed is None else n_failed} star(s) of {len(failed)} failed range(s)")
    if n_xp:
        parts.append(f"{n_xp} star(s) without XP spectra")
    summary["unfetched_stars"] = total
    return (f"fetch incomplete: {'some' if total is None else total} star(s) not fetched ({' and '.join(parts)}); "
            f"rerun `{rerun}` to resume: done ranges are kept, only what is missing is asked again "
            f"(reasons in {state_dir})")


def fetch_run(run_dir: Path, config: RunConfig, archive_url: str = "https://gea.esac.esa.int/", login: bool = False,
              *, options: FetchOptions | None = None, pixels: list[int] | None = None) -> dict:
    """Fetch every range of a run from a Gaia archive (``xpcat fetch``).

    Parameters
    ----------
    run_dir : Path
        Run directory; raw tables go to ``RUN_DIR/<config.data.raw_dir>/<table>/``.
    config : RunConfig
        Uses ``data.partition_level``, ``data.pixels`` (empty: every non-empty
        pixel, from the census; or every pixel of the level when
        ``options.census`` is off) and the partner-table paths of ``[data]``.
    archive_url : str
        Base URL of the archive.
    login : bool
        Log in with ``GAIA_USER`` / ``GAIA_PASSWORD``.
    pixels : list of int, optional
        Overrides ``config.data.pixels``.

    options : FetchOptions, optional
        Default: :func:`fetch_options` of ``config``.

    Returns
    -------
    dict
        Summary: ranges asked, done, skipped (already done), empty, failed
        (partition and reason each), rows per table written by this call,
        missing XP count, seconds, rows per second, ``complete`` (no failed
        range, no star without XP), ``unfetched_stars`` (None when a failed
        range was not counted by a census) and ``incomplete`` (the line
        naming them and the command that resumes, or None); also written to
        ``RUN_DIR/state/fetch/summary.json``.

    Raises
    ------
    ArchiveUnreachable
        The archive's host does not resolve or refuses connections.
    InputError
        Missing or refused credentials, pixels out of range, a partner file
        that does not exist. A failing range raises nothing: it is recorded
        (``failed`` in the summary, ``state/fetch/<partition>.json``), queued
        again (``options.resume_attempts``), and a rerun retries it.
    """
    from xpcat.production.ingest.partner_tables import (
        ingest_partner_tables,
        resolve_partner_paths,
    )

    options = options or fetch_options(config)
    run_dir = Path(run_dir)
    level = config.data.partition_level
    paths = RunPaths.of(run_dir, config)
    raw_root = paths.raw
    state_dir = paths.state / "fetch"
    state_dir.mkdir(parents=True, exist_ok=True)
    resolve_partner_paths(run_dir, config)  # a missing partner file fails before any fetching
    chosen = list(pixels if pixels is not None else config.data.pixels)
    n_pix = 12 * 4**level
    bad_pix = [p for p in chosen if not 0 <= int(p) < n_pix]
    if bad_pix:
        raise InputError(f"[data] pixels {bad_pix[:5]} out of range 0..{n_pix - 1} at partition_level {level}")
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"archive": archive_url, "level": level, "failed": [], "skipped": 0, "done": 0,
                               "empty": 0, "missing_xp": 0, "unreadable_xp": 0, "workers": options.workers,
                               "rows": {t: 0 for t in fetched_tables(options.xp)}, "census": None,
                               "xp": options.xp}
    census: dict[int, int] | None = None
    with socket_timeout(options.timeout_s):
        check_reachable(archive_url, options.timeout_s)  # a wrong URL or no network: one line, now
        client = build_client(archive_url, login=login)
        if not chosen and options.census:
            try:
                census = census_counts(client, level, options)
                chosen = sorted(census)
                summary["census"] = {"pixels": len(census), "sources": int(sum(census.values()))}
            except RangeFailed as err:
                logger.warning("census query failed (%s); fetching all %d pixels of level %d", err, n_pix, level)
        if not chosen and census is None:
            chosen = list(range(n_pix))
        summary["ranges"] = len(chosen)
        todo: list[_Task] = []
        for pix in chosen:
            name = partition_name(pix, level)
            if range_done(raw_root, state_dir, name, options.xp):
                summary["skipped"] += 1
                missing = read_range_state(state_dir, name).get("missing_xp_ids") or []
                if missing:
                    todo.append((int(pix), None, tuple(int(i) for i in missing)))
            else:
                todo.append((int(pix), None if census is None else census.get(int(pix), 0), ()))
        with _task_runner(client, len(todo), level, raw_root, state_dir, options, archive_url, login) as runner:
            final = _fetch_all(runner, todo, options, summary)
    for _, res in final.values():
        if res.status == "failed":
            summary["failed"].append({"partition": res.partition, "reason": res.reason})
        summary["missing_xp"] += len(res.missing_xp_ids)
        summary["unreadable_xp"] += len(res.unreadable_xp)
    summary["partner_tables"] = ingest_partner_tables(run_dir, config)
    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 3)
    summary["rows_per_s"] = round(summary["rows"]["gaia_source"] / seconds, 1) if seconds > 0 else None
    rerun = f"xpcat fetch {run_dir} --archive {archive_url}" + (" --login" if login else "")
    summary["unfetched_stars"] = 0
    summary["incomplete"] = _incomplete(summary, final, census, rerun, state_dir)
    summary["complete"] = summary["incomplete"] is None
    write_json_atomic(state_dir / "summary.json", summary)
    if summary["incomplete"]:
        logger.error("%s", summary["incomplete"])
    return summary

"""astroquery plumbing for the fetcher: the client, timeouts, retries, one job, one DataLink batch.

- :func:`build_client`: ``GaiaClass`` built explicitly (astroquery's
  module-level ``Gaia`` contacts the archive at import; :func:`_gaia_class`
  imports the class with connections refused), optional login.
- :func:`socket_timeout`: astroquery's TAP connections have no timeout; this
  sets the process default for a block.
- :func:`_with_retries`: HTTP 500/502, timeouts, dropped connections and
  unparsable answers retried with exponential backoff and a cap; an ADQL
  error (:class:`_Permanent`) is not retried.
- :func:`run_query`: one async ADQL job, polled with a deadline, removed
  from the server afterwards.
- :func:`load_xp`: one DataLink ``XP_CONTINUOUS`` request parsed into raw rows.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.raw import XP_CONTINUOUS
from xpcat.errors import InputError, XpcatError
from xpcat.production.ingest.formats import astropy_to_arrow, conform_rows

__all__ = [
    "FetchOptions",
    "RangeFailed",
    "build_client",
    "socket_timeout",
    "run_query",
    "load_xp",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class FetchOptions:
    """How the fetcher talks to the archive.

    Attributes
    ----------
    timeout_s : float
        Socket timeout of every connection [s] (astroquery sets none).
    job_timeout_s : float
        Longest wait for one async job to finish [s] (the archive's own limit
        is about 90 min anonymous, 120 min logged in).
    poll_s : float
        Interval between phase polls of an async job [s].
    max_attempts : int
        Attempts per request before the range is recorded as failed.
    backoff_s, backoff_max_s : float
        First retry delay and its cap [s]; the delay doubles each attempt.
    datalink_batch : int
        Ids per DataLink request (the archive allows at most 5000).
    missing_rounds : int
        How many times ids that DataLink left out are asked again.
    data_structure : str
        DataLink ``DATA_STRUCTURE``: ``"RAW"`` (one file per request) or
        ``"INDIVIDUAL"`` (one file per source); astroquery 0.4.11 names.
    output_format : str
        TAP result format.
    census : bool
        With no pixel list, run the census query first to find the non-empty
        pixels and their row counts (checked against each range).
    workers : int
        Ranges fetched at once, each in its own process (astroquery's
        DataLink unpacks under the working directory and the socket timeout
        is process-wide, so threads would interfere).
    """

    timeout_s: float = 300.0
    job_timeout_s: float = 7200.0
    poll_s: float = 0.5
    max_attempts: int = 5
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    datalink_batch: int = 5000
    missing_rounds: int = 2
    data_structure: str = "RAW"
    output_format: str = "votable_gzip"
    census: bool = True
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1; got {self.workers}")
        if not 1 <= self.datalink_batch <= 5000:
            raise ValueError(f"datalink_batch must be in 1..5000 (the archive's limit); got {self.datalink_batch}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1; got {self.max_attempts}")
        if self.timeout_s <= 0 or self.job_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0; got {self.timeout_s}, {self.job_timeout_s}")
        if self.data_structure not in ("RAW", "INDIVIDUAL"):
            raise ValueError(f"data_structure must be 'RAW' or 'INDIVIDUAL'; got {self.data_structure!r}")


class RangeFailed(XpcatError, RuntimeError):
    """A source_id range could not be fetched; the message says why."""


class _Permanent(RangeFailed):
    """A failure that retrying cannot fix (an ADQL error, a wrong answer)."""


def _retryable() -> tuple[type[BaseException], ...]:
    import requests

    return (
        requests.exceptions.RequestException,  # HTTPError (500/502), ConnectionError, Timeout
        http.client.HTTPException,  # RemoteDisconnected, IncompleteRead, BadStatusLine
        ConnectionError,
        TimeoutError,  # socket.timeout
        OSError,  # connection refused/reset, gzip/zip trouble
        EOFError,
        zipfile.BadZipFile,
        ValueError,  # an answer the VOTable/CSV parser rejects (e.g. cut short)
    )


def _with_retries(what: str, fn: Callable[[], T], options: FetchOptions,
                  sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors with backoff.

    Raises
    ------
    RangeFailed
        After ``options.max_attempts`` failures (message: the last error), or
        at once for a :class:`_Permanent` failure.
    """
    retryable = _retryable()
    delay = options.backoff_s
    for attempt in range(1, options.max_attempts + 1):
        try:
            return fn()
        except _Permanent:
            raise
        except SystemError as err:  # astroquery: the async job ended in phase ERROR (ADQL error)
            raise _Permanent(f"{what}: the archive rejected the query: {err}") from err
        except retryable as err:
            reason = f"{type(err).__name__}: {str(err).strip()[:300] or 'no message'}"
            if attempt == options.max_attempts:
                raise RangeFailed(f"{what}: gave up after {attempt} attempts; last error {reason}") from err
            logger.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", what, attempt,
                           options.max_attempts, reason, delay)
            sleep(delay)
            delay = min(delay * 2, options.backoff_max_s)
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Set the process-wide default socket timeout for the duration of the block.

    astroquery opens ``http.client.HTTPConnection(host, port)`` without a
    timeout, so this is the only way to bound a stalled archive.
    """
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """astroquery's ``load_data`` unpacks into a temp folder under the cwd."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _gaia_class() -> type:
    """astroquery's ``GaiaClass``, imported without letting the import reach the network.

    ``astroquery/gaia/core.py`` ends with ``Gaia = GaiaClass()``, which asks
    the ESA archive for status messages as the module is imported. During that
    first import, connections are refused (and the resulting "could not be
    retrieved" line is swallowed), so nothing leaves the machine.
    """
    import sys

    if "astroquery.gaia.core" not in sys.modules:
        def refuse(self, *args, **kwargs):
            raise OSError("xpcat: no network while importing astroquery.gaia")

        original = http.client.HTTPConnection.connect
        http.client.HTTPConnection.connect = refuse  # type: ignore[method-assign]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                import astroquery.gaia.core  # noqa: F401
        finally:
            http.client.HTTPConnection.connect = original  # type: ignore[method-assign]
    from astroquery import log as astroquery_log
    from astroquery.gaia.core import GaiaClass

    # astroquery reports every removed job at INFO on stdout; stdout is the user's
    if astroquery_log.getEffectiveLevel() < logging.WARNING:
        astroquery_log.setLevel(logging.WARNING)
    return GaiaClass


def build_client(archive_url: str, *, login: bool = False):
    """An astroquery ``GaiaClass`` for one archive, built without touching the network.

    Parameters
    ----------
    archive_url : str
        Base URL of the TAP and data servers, e.g. ``https://gea.esac.esa.int/``
        or a :class:`~xpcat.production.synthetic.archive_server.LocalArchive` URL.
    login : bool
        Log in with ``GAIA_USER`` / ``GAIA_PASSWORD`` from the environment
        (larger quotas and timeouts; needs HTTPS, so the real archive only).

    Returns
    -------
    astroquery.gaia.core.GaiaClass

    Raises
    ------
    InputError
        When ``login`` is set and the credentials are missing or refused.
    """
    GaiaClass = _gaia_class()  # never astroquery.gaia.Gaia: it calls the archive at import
    url = archive_url if archive_url.endswith("/") else archive_url + "/"
    client = GaiaClass(gaia_tap_server=url, gaia_data_server=url, show_server_messages=False)
    if login:
        user, password = os.environ.get("GAIA_USER"), os.environ.get("GAIA_PASSWORD")
        if not user or not password:
            raise InputError("--login needs the environment variables GAIA_USER and GAIA_PASSWORD")
        try:
            client.login(user=user, password=password)
        except (OSError, http.client.HTTPException) as err:
            raise InputError(f"login to {url} failed: {err} (login needs the archive's HTTPS endpoint)") from err
        # GaiaClass.login logs and swallows a refused login; check the TapPlus flag it sets.
        if not getattr(client, "_TapPlus__isLoggedIn", True):
            raise InputError(f"login to {url} as {user!r} failed (check GAIA_USER / GAIA_PASSWORD)")
    return client


def run_query(client: Any, adql: str, options: FetchOptions) -> pa.Table:
    """Run one async ADQL job and return its result as a pyarrow Table.

    The job is launched in the background and polled every ``options.poll_s``
    up to ``options.job_timeout_s``; it is removed from the server afterwards.

    Raises
    ------
    SystemError
        When the job ends in phase ERROR (astroquery's convention).
    TimeoutError
        When the job does not finish in time.
    """
    job = client.launch_job_async(adql, output_format=options.output_format, background=True)
    deadline = time.monotonic() + options.job_timeout_s
    try:
        while True:
            phase = str(job.get_phase(update=True)).strip().upper()
            if phase not in ("PENDING", "QUEUED", "EXECUTING", "RUN"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job.jobid} still {phase} after {options.job_timeout_s:.0f} s")
            time.sleep(options.poll_s)
        if phase != "COMPLETED":
            raise SystemError(f"job {job.jobid} ended in phase {phase}: {_job_error(job)}")
        return astropy_to_arrow(job.get_results())
    finally:
        _remove_job(client, job)


def _job_error(job: Any) -> str:
    try:
        return str(job.get_error())
    except _retryable() as err:
        return f"(error text unavailable: {err})"


def _remove_job(client: Any, job: Any) -> None:
    jobid = getattr(job, "jobid", None)
    if not jobid:
        return
    try:
        client.remove_jobs([str(jobid)])
    except _retryable() as err:  # results expire on the server anyway; don't fail the range for this
        logger.debug("could not remove job %s: %s", jobid, err)


def load_xp(client: Any, source_ids: np.ndarray, options: FetchOptions, workdir: Path) -> tuple[pa.Table, list[dict]]:
    """One DataLink ``XP_CONTINUOUS`` request, parsed into raw XP rows.

    Parameters
    ----------
    client : GaiaClass
    source_ids : (n,) int64, n <= 5000
    options : FetchOptions
    workdir : Path
        Writable folder astroquery unpacks the zip in.

    Returns
    -------
    (rows, bad) : (pyarrow.Table in XP_CONTINUOUS, list of dicts of unreadable rows)
    """
    with _working_directory(workdir):
        files = client.load_data(
            ids=[int(s) for s in source_ids], data_release="Gaia DR3", retrieval_type="XP_CONTINUOUS",
            data_structure=options.data_structure, format="csv",
        )
    groups: dict[pa.Schema, list[pa.Table]] = {}
    if files and not any(k.startswith("XP_CONTINUOUS") for k in files):
        raise _Permanent(f"DataLink answer holds no XP_CONTINUOUS file; got {', '.join(sorted(files)[:5])}")
    for key in sorted(files):
        if not key.startswith("XP_CONTINUOUS"):
            continue
        value = files[key]
        for tab in value if isinstance(value, list) else [value]:
            arrow = astropy_to_arrow(tab)
            groups.setdefault(arrow.schema, []).append(arrow)
    parts, bad = [], []
    for tables in groups.values():
        good, rejected = conform_rows(pa.concat_tables(tables), XP_CONTINUOUS, what="DataLink XP_CONTINUOUS")
        parts.append(good)
        bad.extend(b.as_dict() for b in rejected)
    rows = pa.concat_tables(parts) if parts else XP_CONTINUOUS.empty_table()
    return rows, bad

"""astroquery plumbing for the fetcher: the client, timeouts, retries, one job, one DataLink batch.

- :func:`check_reachable`: the archive's host resolves and accepts a
  connection, or :class:`ArchiveUnreachable` at once (no retries: a wrong URL
  or no network is not a transient fault).
- :func:`build_client`: ``GaiaClass`` built explicitly (astroquery's
  module-level ``Gaia`` contacts the archive at import; :func:`_gaia_class`
  imports the class with connections refused), optional login.
- :func:`socket_timeout`: astroquery's TAP connections have no timeout; this
  sets the process default for a block.
- :func:`with_retries`: one request retried on HTTP 5xx, timeouts, dropped
  connections and unparsable (short) answers, with exponential backoff and a
  cap; a :class:`PermanentFailure` (an ADQL error, a wrong answer) is not.
- :func:`run_query`: one async ADQL job, polled with a deadline, removed
  afterwards; with ``retry_requests`` each of its requests (submit, phase
  polls, result download) is retried on its own, so a failed poll or
  download does not cost the job.
- :func:`load_xp`: one DataLink ``XP_CONTINUOUS`` request parsed into raw rows.
"""

from __future__ import annotations

import contextlib
import errno
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
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.raw import XP_CONTINUOUS
from xpcat.errors import InputError, XpcatError
from xpcat.production.ingest.formats import astropy_to_arrow, conform_rows

__all__ = [
    "DEFAULT_WORKERS",
    "MAX_WORKERS",
    "ArchiveUnreachable",
    "FetchOptions",
    "PermanentFailure",
    "RangeFailed",
    "build_client",
    "check_reachable",
    "with_retries",
    "socket_timeout",
    "run_query",
    "load_xp",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_WORKERS = 6
"""Ranges fetched at once by default. ESA publishes no concurrency limit for
anonymous TAP/DataLink use (``recipes/gaia-archive.md``); each worker has at
most one request in flight, so this is at most 6 open requests to the
archive, the per-host connection count web browsers keep to."""
MAX_WORKERS = 8
"""Upper bound on concurrent ranges, to stay polite to the shared archive."""


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
        Ranges fetched at once (1..:data:`MAX_WORKERS`), each in its own
        process when more than one (astroquery's DataLink unpacks under the
        working directory and the socket timeout is process-wide, so threads
        would interfere).
    resume_attempts : int
        Times, within the same command, a range that failed (not permanently)
        or left stars without XP is queued again (for the latter, only the
        missing ids): the resume a rerun would do, done at once.
    xp : str
        The DataLink XP product: ``"continuous"`` (``XP_CONTINUOUS``, raw
        ``xp_continuous_mean_spectrum``) or ``"sampled"`` (``XP_SAMPLED``, raw
        ``xp_sampled_spectrum``; :mod:`xpcat.production.ingest.sampled_fetch`).
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
    workers: int = DEFAULT_WORKERS
    resume_attempts: int = 2
    xp: str = "continuous"

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in 1..{MAX_WORKERS} (the archive is shared); got {self.workers}")
        if self.xp not in ("continuous", "sampled"):
            raise ValueError(f"xp must be 'continuous' or 'sampled'; got {self.xp!r}")
        if self.resume_attempts < 0:
            raise ValueError(f"resume_attempts must be >= 0; got {self.resume_attempts}")
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


class PermanentFailure(RangeFailed):
    """A failure that retrying cannot fix (an ADQL error, a wrong answer): never retried."""


class ArchiveUnreachable(InputError):
    """The archive's host name does not resolve, or its host refuses or cannot route connections."""


_UNREACHABLE_ERRNOS = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)


def check_reachable(archive_url: str, timeout_s: float = 30.0) -> None:
    """Fail at once, naming the URL, when the archive cannot be reached at all.

    Resolves the host and opens (and closes) one TCP connection to it. A name
    that does not resolve, a refused connection or no route to the host ends
    the fetch before any range is tried: retrying those only delays the
    message. A probe that times out is logged and the fetch goes on (a slow
    archive is what the retries are for).

    Parameters
    ----------
    archive_url : str
        Base URL of the archive (``http`` or ``https``).
    timeout_s : float
        Longest wait for the connection [s].

    Raises
    ------
    ArchiveUnreachable
    """
    parts = urlsplit(archive_url)
    host = parts.hostname
    if not host:
        raise ArchiveUnreachable(f"archive URL {archive_url!r} has no host name; e.g. https://gea.esac.esa.int/")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ArchiveUnreachable(f"cannot reach the Gaia archive at {archive_url}: host name {host!r} does not "
                                 f"resolve ({err.strerror}); check the URL and the network") from err
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        if err.errno in _UNREACHABLE_ERRNOS:
            raise ArchiveUnreachable(f"cannot reach the Gaia archive at {archive_url}: {host}:{port} "
                                     f"{err.strerror or err} (is the archive, or `xpcat archive serve`, "
                                     "running there?)") from err
        logger.warning("%s: no answer to a connection probe (%s); going on, requests are retried", archive_url, err)


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


def with_retries(what: str, fn: Callable[[], T], options: FetchOptions,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn`` (one request) until it succeeds, retrying transient errors with backoff.

    Parameters
    ----------
    what : str
        What is asked, for messages (e.g. ``"range L05-00012 [lo, hi) gaia_source"``).
    fn : callable
        The request; it should do one thing the archive can fail, so that a
        retry repeats only that.
    options : FetchOptions
        ``max_attempts``, ``backoff_s`` (first delay, doubled each attempt),
        ``backoff_max_s`` (cap).
    sleep : callable
        Waits that long [s] (tests pass a recorder).

    Raises
    ------
    RangeFailed
        After ``options.max_attempts`` failures (message: the last error), or
        at once as :class:`PermanentFailure` for an ADQL error (astroquery's
        ``SystemError``) or a :class:`PermanentFailure` raised by ``fn``.
    """
    retryable = _retryable()
    delay = options.backoff_s
    for attempt in range(1, options.max_attempts + 1):
        try:
            return fn()
        except PermanentFailure:
            raise
        except SystemError as err:  # astroquery: the async job ended in phase ERROR (ADQL error)
            raise PermanentFailure(f"{what}: the archive rejected the query: {err}") from err
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


def _call_once(what: str, fn: Callable[[], T], options: FetchOptions) -> T:
    return fn()


def run_query(client: Any, adql: str, options: FetchOptions, what: str = "query", *,
              retry_requests: bool = False) -> pa.Table:
    """Run one async ADQL job and return its result as a pyarrow Table.

    The job is submitted in the background, polled every ``options.poll_s``
    up to ``options.job_timeout_s``, its result downloaded, and it is removed
    from the server afterwards.

    Parameters
    ----------
    client : GaiaClass
    adql : str
    options : FetchOptions
    what : str
        What the query is for, in messages.
    retry_requests : bool
        Retry the submission, each poll and the download on their own
        (:func:`with_retries`): a failed poll or download asks again for the
        same job instead of costing it. Off, the first failure is raised as
        astroquery raised it.

    Raises
    ------
    RangeFailed
        With ``retry_requests``: a request still failing after ``options.max_attempts``.
    SystemError
        The job ended in phase ERROR (an ADQL error), ABORTED or another end
        phase (astroquery's convention; :func:`with_retries` makes it a
        :class:`PermanentFailure`).
    TimeoutError
        The job did not finish within ``options.job_timeout_s`` (a caller may
        submit it again), or, without ``retry_requests``, a request timed out.
    """
    request = with_retries if retry_requests else _call_once
    job = request(f"{what}: submitting the job",
                  lambda: client.launch_job_async(adql, output_format=options.output_format, background=True), options)
    deadline = time.monotonic() + options.job_timeout_s
    try:
        while True:
            phase = request(f"{what}: phase of job {job.jobid}",
                            lambda: str(job.get_phase(update=True)).strip().upper(), options)
            if phase not in ("PENDING", "QUEUED", "EXECUTING", "RUN"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job.jobid} still {phase} after {options.job_timeout_s:.0f} s")
            time.sleep(options.poll_s)
        if phase != "COMPLETED":
            raise SystemError(f"job {job.jobid} ended in phase {phase}: {_job_error(job)}")
        return request(f"{what}: result of job {job.jobid}", lambda: astropy_to_arrow(job.get_results()), options)
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
    with contextlib.chdir(workdir):  # astroquery's load_data unpacks into a temp folder under the cwd
        files = client.load_data(
            ids=[int(s) for s in source_ids], data_release="Gaia DR3", retrieval_type="XP_CONTINUOUS",
            data_structure=options.data_structure, format="csv",
        )
    groups: dict[pa.Schema, list[pa.Table]] = {}
    if files and not any(k.startswith("XP_CONTINUOUS") for k in files):
        raise PermanentFailure(f"DataLink answer holds no XP_CONTINUOUS file; got {', '.join(sorted(files)[:5])}")
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

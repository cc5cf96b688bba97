"""The local Gaia archive: astroquery's endpoints over a universe's raw tables.

A loopback HTTP server that answers the requests astroquery's
``GaiaClass`` makes, so the real client code path (``launch_job_async``,
``load_data``) runs in tests, in the demo and in CI without the network:

- TAP (``/tap-server/tap``): ``POST async`` creates a job and answers
  ``303`` to ``async/<id>``; ``GET async/<id>/phase`` gives ``COMPLETED`` or
  ``ERROR``; ``GET async/<id>/results/result`` the table (VOTable, gzipped
  for ``votable_gzip``; also ``votable_plain``, ``csv``, ``ecsv``);
  ``GET async/<id>/error`` the error VOTable; ``POST deletejobs``;
  ``POST sync`` runs a query and answers the table directly.
- DataLink (``/data-server/data``): ``RETRIEVAL_TYPE=XP_CONTINUOUS`` answers a
  zip of CSVs in the archive's format (arrays as ``"(a, b, ...)"``), one file
  per source (``DATA_STRUCTURE=INDIVIDUAL``, ``XP_CONTINUOUS-Gaia DR3 <id>.csv``)
  or one file for all (``RAW``, ``XP_CONTINUOUS_RAW.csv``); ``XP_SAMPLED``
  the same for the sampled spectra (long form, 343 samples 336-1020 nm,
  :meth:`ArchiveDatabase.xp_sampled`). Unknown ids are left out, as the
  archive does.

The incoming ADQL is run by DuckDB over the universe's tables under the
archive's names (:mod:`xpcat.production.synthetic.archive_db`); XP spectra are served
by DataLink only, as at ESA.

Fault injection (seeded): ``error_rate`` answers that fraction of requests
with HTTP 500; ``stall_rate`` holds that fraction for ``stall_seconds``
before answering (past a client's timeout); ``short_rate`` drops a random
part of that fraction of DataLink answers.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import re
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpcat.production.synthetic.archive_db import ARCHIVE_TABLES, AdqlError, ArchiveDatabase, adql_to_duckdb
from xpcat.production.ingest.formats import xp_to_archive_csv
from xpcat.production.ingest.sampled_format import xp_sampled_to_archive_csv

__all__ = [
    "ARCHIVE_TABLES",
    "AdqlError",
    "ArchiveDatabase",
    "FaultConfig",
    "LocalArchive",
    "adql_to_duckdb",
    "serve_forever",
]

logger = logging.getLogger(__name__)

_MAX_JOBS = 256
_MAX_DATALINK_IDS = 5000


@dataclass
class FaultConfig:
    """Fault injection of the local archive.

    Attributes
    ----------
    error_rate : float
        Fraction of requests answered with HTTP 500.
    short_rate : float
        Fraction of DataLink answers from which a random part of the sources is dropped.
    stall_rate : float
        Fraction of requests held ``stall_seconds`` before being answered.
    stall_seconds : float
        How long a stalled request is held [s].
    seed : int
        Seed of the fault draws.
    """

    error_rate: float = 0.0
    short_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "short_rate", "stall_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {v!r}")
        if self.stall_seconds < 0:
            raise ValueError(f"stall_seconds must be >= 0; got {self.stall_seconds!r}")


@dataclass
class _Job:
    jobid: str
    phase: str
    body: bytes = b""
    content_type: str = "application/x-votable+xml"
    error: str = ""
    rows: int = 0


@dataclass
class _State:
    db: ArchiveDatabase
    faults: FaultConfig
    rng: np.random.Generator
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: "OrderedDict[str, _Job]" = field(default_factory=OrderedDict)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "requests": 0, "errors_injected": 0, "stalls_injected": 0, "short_answers": 0,
            "jobs": 0, "adql_errors": 0, "datalink_requests": 0, "datalink_sources": 0,
        }
    )

    def draw(self) -> tuple[float, float, float]:
        with self.lock:
            return tuple(float(x) for x in self.rng.random(3))  # type: ignore[return-value]

    def bump(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n


def _error_votable(message: str) -> bytes:
    from xml.sax.saxutils import escape

    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        f'<RESOURCE type="results">\n<INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>\n'
        "</RESOURCE>\n</VOTABLE>\n"
    ).encode()


def _encode_table(table: pa.Table, fmt: str) -> tuple[bytes, str]:
    """Serialise a query result as the archive would for TAP ``FORMAT=fmt``."""
    from astropy.table import MaskedColumn, Table

    cols = []
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        mask = arr.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            data = np.array([("" if v is None else v) for v in arr.to_pylist()], dtype=str)
        elif pa.types.is_boolean(arr.type):
            data = pc.fill_null(arr, False).to_numpy(zero_copy_only=False)
        else:
            data = pc.fill_null(arr, pa.scalar(0, arr.type)).to_numpy(zero_copy_only=False)
        cols.append(MaskedColumn(data, name=name, mask=mask))
    at = Table(cols, masked=True)
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("votable", "votable_gzip", "votable_plain"):
        at.write(buf, format="votable", tabledata_format="binary2")
        body = buf.getvalue()
        if fmt != "votable_plain":
            body = gzip.compress(body, compresslevel=1)
        return body, "application/x-votable+xml"
    if fmt == "csv":
        at.write(buf, format="ascii.csv")
        return buf.getvalue(), "text/csv"
    if fmt == "ecsv":
        at.write(buf, format="ascii.ecsv")
        return gzip.compress(buf.getvalue(), compresslevel=1), "text/plain"
    raise AdqlError(f"unsupported FORMAT {fmt!r}; use votable, votable_gzip, votable_plain, csv or ecsv")


def _datalink_zip(rows: pa.Table, structure: str, rtype: str = "XP_CONTINUOUS",
                  db: ArchiveDatabase | None = None) -> bytes:
    if rtype == "XP_SAMPLED":
        s = db.xp_sampled(rows)
        csv = lambda i: xp_sampled_to_archive_csv(s.source_id[i], s.solution_id[i], s.ra[i], s.dec[i], s.wavelength,
                                                  s.flux[i], s.flux_error[i])
    else:
        csv = lambda i: xp_to_archive_csv(rows.take(pa.array(np.atleast_1d(i))))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        if structure in ("RAW", "COMBINED", "DATAMODEL_GAIA"):
            if rows.num_rows:
                zf.writestr(f"{rtype}_RAW.csv", csv(np.arange(rows.num_rows)))
        else:
            for i, sid in enumerate(rows.column("source_id").to_pylist()):
                zf.writestr(f"{rtype}-Gaia DR3 {sid}.csv", csv(np.array([i])))
    return buf.getvalue()


def _make_handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        server_version = "xpcat-local-archive/1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            logger.debug("%s %s", self.address_string(), format % args)

        # -- plumbing ---------------------------------------------------
        def _send(self, status: int, body: bytes, content_type: str = "text/plain",
                  headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                logger.debug("client went away before the answer was sent")

        def _params(self) -> dict[str, str]:
            parts = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            if self.command == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                params.update({k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()})
            return {k.upper() if k.upper() in _UPPER_PARAMS else k: v for k, v in params.items()}

        def _base_url(self) -> str:
            host, port = self.server.server_address[:2]
            return f"http://{host}:{port}"

        def _faults(self, datalink: bool) -> tuple[bool, bool]:
            """Apply error / stall injection; returns (answered, short)."""
            e, s, sh = state.draw()
            f = state.faults
            if s < f.stall_rate:
                state.bump("stalls_injected")
                logger.debug("stalling %s for %.1f s", self.path, f.stall_seconds)
                state.stop.wait(f.stall_seconds)
            if e < f.error_rate:
                state.bump("errors_injected")
                self._send(500, b"<html><body><h1>HTTP Status 500</h1><p>null</p></body></html>", "text/html")
                return True, False
            return False, bool(datalink and sh < f.short_rate)

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        # -- routing ----------------------------------------------------
        def _dispatch(self) -> None:
            state.bump("requests")
            path = urlsplit(self.path).path.rstrip("/")
            params = self._params()
            datalink = path.endswith("/data-server/data")
            answered, short = self._faults(datalink)
            if answered:
                return
            try:
                if datalink:
                    self._datalink(params, short)
                elif path.endswith("/tap/async") and self.command == "POST":
                    self._create_job(params)
                elif path.endswith("/tap/sync"):
                    self._sync(params)
                elif path.endswith("/tap/deletejobs"):
                    self._delete(params)
                elif re.search(r"/(login|logout)$", path):
                    self._send(200, b"OK", headers={"Set-Cookie": "JSESSIONID=local-archive; Path=/"})
                elif m := re.search(r"/tap/async/([^/]+)(/.*)?$", path):
                    self._job(m.group(1), (m.group(2) or "").strip("/"))
                else:
                    self._send(404, f"no such endpoint: {path}".encode())
            except AdqlError as err:
                self._send(400, _error_votable(str(err)), "application/x-votable+xml")
            except Exception as err:  # noqa: BLE001 - a server answers 500 and logs, rather than dropping the connection
                logger.exception("local archive: internal error on %s", path)
                self._send(500, _error_votable(f"internal error: {type(err).__name__}: {err}"), "application/x-votable+xml")

        def _create_job(self, params: dict[str, str]) -> None:
            query = params.get("QUERY", "")
            fmt = params.get("FORMAT", "votable")
            jobid = f"{int(time.time() * 1000)}{next(state.counter):06d}O"
            job = _Job(jobid=jobid, phase="EXECUTING")
            try:
                table = state.db.query(query)
                job.body, job.content_type = _encode_table(table, fmt)
                job.rows, job.phase = table.num_rows, "COMPLETED"
            except AdqlError as err:
                state.bump("adql_errors")
                job.phase, job.error = "ERROR", str(err)
                logger.info("job %s: %s", jobid, err)
            with state.lock:
                state.jobs[jobid] = job
                state.stats["jobs"] += 1
                while len(state.jobs) > _MAX_JOBS:
                    state.jobs.popitem(last=False)
            location = f"{self._base_url()}/tap-server/tap/async/{jobid}"
            self._send(303, b"", headers={"Location": location})

        def _sync(self, params: dict[str, str]) -> None:
            table = state.db.query(params.get("QUERY", ""))
            body, ctype = _encode_table(table, params.get("FORMAT", "votable"))
            self._send(200, body, ctype)

        def _delete(self, params: dict[str, str]) -> None:
            ids = [j for j in params.get("JOB_IDS", "").split(",") if j]
            with state.lock:
                for j in ids:
                    state.jobs.pop(j, None)
            self._send(200, b"OK")

        def _job(self, jobid: str, sub: str) -> None:
            with state.lock:
                job = state.jobs.get(jobid)
            if job is None:
                self._send(404, _error_votable(f"job {jobid} not found"), "application/x-votable+xml")
            elif sub == "phase":
                self._send(200, job.phase.encode())
            elif sub == "results/result":
                if job.phase == "ERROR":
                    self._send(400, _error_votable(job.error), "application/x-votable+xml")
                else:
                    self._send(200, job.body, job.content_type)
            elif sub == "error":
                self._send(200, _error_votable(job.error or "no error"), "application/x-votable+xml")
            elif sub == "":
                xml = (f'<?xml version="1.0"?><uws:job xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0">'
                       f"<uws:jobId>{jobid}</uws:jobId><uws:phase>{job.phase}</uws:phase></uws:job>")
                self._send(200, xml.encode(), "text/xml")
            else:
                self._send(404, f"no such job resource: {sub}".encode())

        def _datalink(self, params: dict[str, str], short: bool) -> None:
            rtype = params.get("RETRIEVAL_TYPE", "")
            fmt = params.get("FORMAT", "").lower()
            structure = params.get("DATA_STRUCTURE", "INDIVIDUAL").upper()
            rtype = rtype.upper()
            if rtype not in ("XP_CONTINUOUS", "XP_SAMPLED"):
                raise AdqlError(f"the local archive serves RETRIEVAL_TYPE=XP_CONTINUOUS or XP_SAMPLED; got {rtype!r}")
            if fmt != "csv":
                raise AdqlError(f"the local archive serves FORMAT=csv only; got {fmt!r}")
            try:
                ids = np.array([int(re.sub(r"\D", "", t)) for t in params.get("ID", "").split(",") if t.strip()],
                               dtype=np.int64)
            except ValueError as err:
                raise AdqlError(f"bad ID list: {err}") from err
            if len(ids) > _MAX_DATALINK_IDS:
                raise AdqlError(f"at most {_MAX_DATALINK_IDS} ids per DataLink request; got {len(ids)}")
            state.bump("datalink_requests")
            rows = state.db.xp_rows(ids)
            if short and rows.num_rows:
                with state.lock:
                    n_drop = int(state.rng.integers(1, max(2, rows.num_rows // 2 + 1)))
                    drop = state.rng.choice(rows.num_rows, size=min(n_drop, rows.num_rows), replace=False)
                keep = np.ones(rows.num_rows, dtype=bool)
                keep[drop] = False
                rows = rows.filter(pa.array(keep))
                state.bump("short_answers")
            state.bump("datalink_sources", rows.num_rows)
            self._send(200, _datalink_zip(rows, structure, rtype, state.db), "application/zip")

    return Handler


_UPPER_PARAMS = {"QUERY", "FORMAT", "REQUEST", "LANG", "PHASE", "MAXREC", "ID", "RETRIEVAL_TYPE",
                 "DATA_STRUCTURE", "RELEASE", "VALID_DATA", "USE_ZIP_ALWAYS", "JOB_IDS"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class LocalArchive:
    """The local archive running in a background thread.

    Parameters
    ----------
    universe_dir : path
        Universe (or run directory) with ``raw/<table>/*.parquet``.
    port : int
        TCP port on 127.0.0.1; 0 picks a free one.
    error_rate, short_rate, stall_rate, stall_seconds, seed
        Fault injection, see :class:`FaultConfig`.

    Examples
    --------
    >>> with LocalArchive(universe_dir) as archive:          # doctest: +SKIP
    ...     fetch_run(run_dir, config, archive_url=archive.url, login=False)
    """

    def __init__(self, universe_dir: str | Path, port: int = 0, *, error_rate: float = 0.0, short_rate: float = 0.0,
                 stall_rate: float = 0.0, stall_seconds: float = 30.0, seed: int = 0) -> None:
        faults = FaultConfig(error_rate, short_rate, stall_rate, stall_seconds, seed)
        self._state = _State(db=ArchiveDatabase(universe_dir), faults=faults, rng=np.random.default_rng(seed))
        self._server = _Server(("127.0.0.1", int(port)), _make_handler(self._state))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL to pass as ``gaia_tap_server`` / ``gaia_data_server``."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, injected faults, jobs, DataLink sources served."""
        with self._state.lock:
            return dict(self._state.stats)

    @property
    def faults(self) -> FaultConfig:
        return self._state.faults

    def start(self) -> "LocalArchive":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="xpcat-local-archive", daemon=True)
            self._thread.start()
            logger.info("local archive at %s", self.url)
        return self

    def stop(self) -> None:
        self._state.stop.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "LocalArchive":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(universe_dir: str | Path, port: int = 8765, error_rate: float = 0.0, short_rate: float = 0.0,
                  stall_rate: float = 0.0, seed: int = 0, stall_seconds: float = 30.0) -> None:
    """Serve a universe on 127.0.0.1:``port`` until interrupted (``xpcat archive serve``).

    Parameters
    ----------
    universe_dir : path
    port : int
    error_rate, short_rate, stall_rate : float
        Fault injection fractions, see :class:`FaultConfig`.
    seed : int
    stall_seconds : float
        How long a stalled request is held [s].
    """
    archive = LocalArchive(universe_dir, port, error_rate=error_rate, short_rate=short_rate, stall_rate=stall_rate,
                           stall_seconds=stall_seconds, seed=seed)
    logger.info("serving %s at %s (Ctrl-C to stop)", universe_dir, archive.url)
    try:
        archive._server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        archive._state.stop.set()
        archive._server.server_close()

"""Fetch raw tables from a Gaia archive by HEALPix-aligned source_id range.

For every partition ``p`` at ``config.data.partition_level`` (the source_id
range ``[lo, hi)`` of :func:`xpcat.production.partitions.source_id_range`):

1. the Appendix A gaia_source + astrometric-fidelity query (:data:`GAIA_SOURCE_ADQL`)
   and the 2MASS best-neighbour query with its ph_qual / ext_key cuts
   (:data:`TMASS_ADQL`) run as async ADQL jobs (``launch_job_async``);
2. the XP continuous mean spectra of the returned sources come through
   DataLink (``load_data(retrieval_type="XP_CONTINUOUS", format="csv")``) in
   batches of at most 5000 ids. Returned ids are compared with the requested
   ones; the missing ones are asked again (``FetchOptions.missing_rounds``
   times) and those still missing are recorded (marker ``info`` and
   ``RUN_DIR/state/fetch/<partition>.json``), so they reach the catalog as
   sources without XP data;
3. the three tables are written as ``RUN_DIR/raw/<table>/<partition>.parquet``
   with :func:`~xpcat.production.partitions.atomic_write_parquet` (verified,
   done marker). A range whose files are all done is not fetched again.

HTTP 500/502, timeouts and dropped connections are retried with exponential
backoff up to ``FetchOptions.max_attempts``; a range that keeps failing, or
whose answer is wrong (an ADQL error, rows outside the range, duplicated
source_ids, a row count that disagrees with the census) is recorded as failed
with the reason and the run goes on with the next range.

The client is built explicitly (:func:`build_client`): astroquery's
module-level ``Gaia`` object contacts the archive at import and is never used.
astroquery's TAP connections have no timeout, so every fetch runs under
``socket.setdefaulttimeout(FetchOptions.timeout_s)`` (restored afterwards).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.raw import GAIA_SOURCE, TMASS, XP_CONTINUOUS
from xpcat.config import RunConfig
from xpcat.errors import InputError
from xpcat.progress import progress
from xpcat.production.ingest.client import (
    FetchOptions,
    RangeFailed,
    _Permanent,
    _with_retries,
    build_client,
    load_xp,
    run_query,
    socket_timeout,
)
from xpcat.production.ingest.formats import conform_rows
from xpcat.production.partitions import atomic_write_parquet, is_done, partition_name, source_id_range

__all__ = [
    "GAIA_SOURCE_ADQL",
    "TMASS_ADQL",
    "CENSUS_ADQL",
    "FetchOptions",
    "RangeFailed",
    "build_client",
    "socket_timeout",
    "fetch_range",
    "fetch_run",
    "load_xp",
    "run_query",
]

logger = logging.getLogger(__name__)

#: Appendix A: gaia_source joined with the astrometric fidelity table, one range.
GAIA_SOURCE_ADQL = """SELECT
  g.random_index, g.source_id, g.ref_epoch,
  g.ra, g.ra_error, g.dec, g.dec_error,
  g.parallax, g.parallax_error,
  g.pmra, g.pmra_error, g.pmdec, g.pmdec_error,
  g.ruwe, g.astrometric_excess_noise,
  spur.fidelity_v2, spur.norm_dg,
  g.phot_g_mean_mag, g.phot_g_mean_flux, g.phot_g_mean_flux_error,
  g.phot_bp_mean_mag, g.phot_bp_mean_flux, g.phot_bp_mean_flux_error,
  g.phot_rp_mean_mag, g.phot_rp_mean_flux, g.phot_rp_mean_flux_error,
  g.has_xp_continuous,
  g.phot_bp_n_obs, g.phot_rp_n_obs,
  g.phot_bp_rp_excess_factor,
  g.visibility_periods_used
FROM gaiadr3.gaia_source AS g
  JOIN gaiadr3.astrophysical_parameters AS p ON g.source_id = p.source_id
  LEFT OUTER JOIN external.gaiaedr3_spurious AS spur ON g.source_id = spur.source_id
WHERE (g.has_xp_continuous = 'True')
  AND (g.source_id BETWEEN {lo} AND {hi})
ORDER BY g.source_id"""

#: Appendix A: 2MASS best neighbours with an 'A' in some band and no extended-source key.
TMASS_ADQL = """SELECT
  g.random_index, g.source_id, g.ra, g.dec,
  tmass.designation, tmass.ra AS tm_ra, tmass.dec AS tm_dec,
  tmass.j_m, tmass.j_msigcom, tmass.h_m, tmass.h_msigcom, tmass.ks_m, tmass.ks_msigcom,
  tmass.ph_qual, tmass.ext_key,
  xmatch.angular_distance AS gaia_tmass_angular_distance
FROM gaiadr3.gaia_source AS g
  JOIN gaiadr3.tmass_psc_xsc_best_neighbour AS xmatch USING (source_id)
  JOIN gaiadr3.tmass_psc_xsc_join AS xjoin USING (clean_tmass_psc_xsc_oid)
  JOIN gaiadr1.tmass_original_valid AS tmass ON xjoin.original_psc_source_id = tmass.designation
WHERE (g.has_xp_continuous = 'True')
  AND ((tmass.ph_qual LIKE 'A__') OR (tmass.ph_qual LIKE '_A_') OR (tmass.ph_qual LIKE '__A'))
  AND (tmass.ext_key IS NULL)
  AND (g.source_id BETWEEN {lo} AND {hi})
ORDER BY g.source_id"""

#: Sources with XP spectra per pixel at a level: which ranges exist and how many rows each must have.
CENSUS_ADQL = """SELECT gaia_healpix_index({level}, g.source_id) AS pix, COUNT(*) AS n
FROM gaiadr3.gaia_source AS g
  JOIN gaiadr3.astrophysical_parameters AS p ON g.source_id = p.source_id
WHERE g.has_xp_continuous = 'True'
GROUP BY gaia_healpix_index({level}, g.source_id)"""

_TABLES = ("gaia_source", "tmass", "xp_continuous_mean_spectrum")


def _conform_answer(table: pa.Table, schema: pa.Schema, what: str, lo: int, hi: int) -> pa.Table:
    good, bad = conform_rows(table, schema, what=what)
    if bad:
        b = bad[0]
        raise _Permanent(f"{what}: {len(bad)} unreadable row(s), e.g. source_id {b.source_id} column {b.column}: {b.reason}")
    sid = good.column("source_id").to_numpy()
    outside = sid[(sid < lo) | (sid >= hi)]
    if outside.size:
        raise _Permanent(f"{what}: {outside.size} source_id(s) outside the range [{lo}, {hi}), e.g. {outside[0]}")
    uniq, counts = np.unique(sid, return_counts=True)
    if (counts > 1).any():
        raise _Permanent(f"{what}: duplicated source_id(s), e.g. {uniq[counts > 1][0]}")
    return good


@dataclass
class _RangeResult:
    partition: str
    status: str
    rows: dict[str, int] = field(default_factory=dict)
    missing_xp_ids: list[int] = field(default_factory=list)
    unreadable_xp: list[dict] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0


def _paths(raw_root: Path, name: str) -> dict[str, Path]:
    return {t: raw_root / t / f"{name}.parquet" for t in _TABLES}


def _range_done(raw_root: Path, state_dir: Path, name: str) -> bool:
    state = state_dir / f"{name}.json"
    try:
        ok = json.loads(state.read_text()).get("status") in ("done", "empty")
    except (OSError, ValueError):
        return False
    return ok and all(is_done(p) for p in _paths(raw_root, name).values())


def fetch_range(client: Any, pix: int, level: int, raw_root: Path, state_dir: Path, options: FetchOptions, *,
                expected_rows: int | None = None, archive_url: str = "") -> _RangeResult:
    """Fetch one HEALPix-aligned source_id range and write its raw partitions.

    Parameters
    ----------
    client : GaiaClass
    pix, level : int
        The partition (nested HEALPix pixel at ``level``).
    raw_root : Path
        ``RUN_DIR/raw``.
    state_dir : Path
        ``RUN_DIR/state/fetch``; gets ``<partition>.json``.
    options : FetchOptions
    expected_rows : int, optional
        Row count from the census; a different gaia_source count is retried.
    archive_url : str
        Recorded in the markers.

    Returns
    -------
    _RangeResult
        ``status`` "done", "empty" or "failed" (with ``reason``).
    """
    t0 = time.perf_counter()
    name = partition_name(pix, level)
    lo, hi = source_id_range(pix, level)
    what = f"range {name} [{lo}, {hi})"
    result = _RangeResult(partition=name, status="failed")
    try:
        def gaia() -> pa.Table:
            table = _conform_answer(run_query(client, GAIA_SOURCE_ADQL.format(lo=lo, hi=hi - 1), options),
                                    GAIA_SOURCE, f"{what} gaia_source", lo, hi)
            if expected_rows is not None and table.num_rows != expected_rows:
                raise ValueError(f"{what}: gaia_source answer has {table.num_rows} rows, the census counted {expected_rows}")
            return table

        g = _with_retries(f"{what} gaia_source", gaia, options)
        ids = g.column("source_id").to_numpy()
        if g.num_rows:
            tm = _with_retries(
                f"{what} tmass",
                lambda: _conform_answer(run_query(client, TMASS_ADQL.format(lo=lo, hi=hi - 1), options),
                                        TMASS, f"{what} tmass", lo, hi),
                options,
            )
            strays = np.setdiff1d(tm.column("source_id").to_numpy(), ids)
            if strays.size:
                raise _Permanent(f"{what}: tmass answer has {strays.size} source_id(s) not in gaia_source, e.g. {strays[0]}")
            xp, missing, unreadable = _fetch_xp(client, ids, options, state_dir, what)
        else:
            tm, xp, missing, unreadable = TMASS.empty_table(), XP_CONTINUOUS.empty_table(), [], []
    except RangeFailed as err:
        result.reason = str(err)
        result.seconds = time.perf_counter() - t0
        logger.error("%s failed: %s", what, err)
        _write_state(state_dir, name, result)
        return result
    info = {"pixel": int(pix), "level": int(level), "source_id_range": [lo, hi], "archive": archive_url,
            "missing_xp_ids": [int(i) for i in missing]}
    paths = _paths(raw_root, name)
    for table, key, schema in ((xp, "xp_continuous_mean_spectrum", XP_CONTINUOUS), (tm, "tmass", TMASS),
                               (g, "gaia_source", GAIA_SOURCE)):
        atomic_write_parquet(table, paths[key], schema=schema, expected_rows=table.num_rows, info=info)
    result.status = "done" if g.num_rows else "empty"
    result.rows = {"gaia_source": g.num_rows, "tmass": tm.num_rows, "xp_continuous_mean_spectrum": xp.num_rows}
    result.missing_xp_ids = [int(i) for i in missing]
    result.unreadable_xp = unreadable
    result.seconds = time.perf_counter() - t0
    _write_state(state_dir, name, result)
    if missing:
        logger.warning("%s: %d source(s) without XP after %d re-requests, e.g. %s", what, len(missing),
                       options.missing_rounds, missing[0])
    return result


def _fetch_xp(client: Any, ids: np.ndarray, options: FetchOptions, state_dir: Path,
              what: str) -> tuple[pa.Table, list[int], list[dict]]:
    """XP rows for ``ids`` with reconciliation: re-ask what DataLink left out."""
    wanted = set(int(i) for i in ids)
    got: dict[int, int] = {}
    parts: list[pa.Table] = []
    unreadable: dict[int, dict] = {}
    pending = np.asarray(ids, dtype=np.int64)
    workdir = state_dir / "tmp"
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for round_ in range(options.missing_rounds + 1):
            for start in range(0, len(pending), options.datalink_batch):
                batch = pending[start:start + options.datalink_batch]
                rows, bad = _with_retries(f"{what} DataLink batch of {len(batch)}",
                                          lambda b=batch: load_xp(client, b, options, Path(tmp)), options)
                for b in bad:
                    with contextlib.suppress(ValueError):  # a source_id that is not even a number
                        unreadable[int(b["source_id"])] = b
                sid = rows.column("source_id").to_numpy()
                keep = np.zeros(len(sid), dtype=bool)
                for i, s in enumerate(sid.tolist()):
                    if s in wanted and s not in got:
                        keep[i] = True
                        got[s] = 1
                    elif s not in wanted:
                        logger.warning("%s: DataLink returned source_id %d that was not asked for; ignored", what, s)
                if keep.any():
                    parts.append(rows.filter(pa.array(keep)))
            pending = np.array(sorted(wanted - set(got)), dtype=np.int64)
            if not len(pending):
                break
            if round_ < options.missing_rounds:
                logger.info("%s: DataLink left out %d source(s); asking again", what, len(pending))
    xp = pa.concat_tables(parts) if parts else XP_CONTINUOUS.empty_table()
    xp = xp.sort_by("source_id")
    return xp, [int(i) for i in pending], [unreadable[k] for k in sorted(unreadable) if k in set(pending.tolist())]


def _write_state(state_dir: Path, name: str, result: _RangeResult) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1, default=str))
    os.replace(tmp, path)


def _census(client: Any, level: int, options: FetchOptions) -> dict[int, int]:
    table = _with_retries(f"census at level {level}",
                          lambda: run_query(client, CENSUS_ADQL.format(level=level), options), options)
    pix = table.column("pix").to_numpy(zero_copy_only=False).astype(np.int64)
    n = table.column("n").to_numpy(zero_copy_only=False).astype(np.int64)
    return {int(p): int(c) for p, c in zip(pix, n) if c > 0}


_WORKER_CLIENT: dict[tuple[str, bool], Any] = {}


def _fetch_worker(pix: int, expected: int | None, level: int, raw_root: Path, state_dir: Path, options: FetchOptions,
                  archive_url: str, login: bool) -> _RangeResult:
    """One range in a worker process (its own client, timeout and working directory)."""
    socket.setdefaulttimeout(options.timeout_s)
    key = (archive_url, login)
    if key not in _WORKER_CLIENT:
        _WORKER_CLIENT[key] = build_client(archive_url, login=login)
    return fetch_range(_WORKER_CLIENT[key], pix, level, raw_root, state_dir, options, expected_rows=expected,
                       archive_url=archive_url)


def _fetch_in_processes(todo: list[tuple[int, int | None]], level: int, raw_root: Path, state_dir: Path,
                        options: FetchOptions, archive_url: str, login: bool) -> Iterator[_RangeResult]:
    """Fetch ranges ``options.workers`` at a time in spawned processes, yielding results as they finish."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=ctx) as pool:
        futures = {pool.submit(_fetch_worker, pix, expected, level, raw_root, state_dir, options, archive_url, login): pix
                   for pix, expected in todo}
        for fut in as_completed(futures):
            pix = futures[fut]
            try:
                yield fut.result()
            except (OSError, RuntimeError, ValueError, EOFError) as err:  # a worker died: record the range, go on
                name = partition_name(pix, level)
                result = _RangeResult(partition=name, status="failed", reason=f"worker failed: {type(err).__name__}: {err}")
                _write_state(state_dir, name, result)
                yield result


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
    options : FetchOptions, optional
    pixels : list of int, optional
        Overrides ``config.data.pixels``.

    Returns
    -------
    dict
        Summary: ranges asked, done, skipped (already done), empty, failed
        (partition and reason each), rows per table, missing XP count,
        seconds, rows per second; also written to
        ``RUN_DIR/state/fetch/summary.json``.

    Raises
    ------
    InputError
        Missing or refused credentials, pixels out of range, a partner file
        that does not exist. A failing range raises nothing: it is recorded
        (``failed`` in the summary, ``state/fetch/<partition>.json``) and a
        rerun retries it.
    """
    from xpcat.production.ingest.partner_tables import ingest_partner_tables, resolve_partner_paths

    options = options or FetchOptions()
    run_dir = Path(run_dir)
    level = config.data.partition_level
    raw_root = Path(config.data.raw_dir) if Path(config.data.raw_dir).is_absolute() else run_dir / config.data.raw_dir
    state_dir = run_dir / "state" / "fetch"
    state_dir.mkdir(parents=True, exist_ok=True)
    resolve_partner_paths(run_dir, config)  # a missing partner file fails before any fetching
    chosen = list(pixels if pixels is not None else config.data.pixels)
    n_pix = 12 * 4**level
    bad_pix = [p for p in chosen if not 0 <= int(p) < n_pix]
    if bad_pix:
        raise InputError(f"[data] pixels {bad_pix[:5]} out of range 0..{n_pix - 1} at partition_level {level}")
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"archive": archive_url, "level": level, "failed": [], "skipped": 0, "done": 0,
                               "empty": 0, "missing_xp": 0, "unreadable_xp": 0,
                               "rows": {t: 0 for t in _TABLES}, "census": None}
    census: dict[int, int] | None = None
    with socket_timeout(options.timeout_s):
        client = build_client(archive_url, login=login)
        if not chosen and options.census:
            try:
                census = _census(client, level, options)
                chosen = sorted(census)
                summary["census"] = {"pixels": len(census), "sources": int(sum(census.values()))}
            except RangeFailed as err:
                logger.warning("census query failed (%s); fetching all %d pixels of level %d", err, n_pix, level)
        if not chosen and census is None:
            chosen = list(range(n_pix))
        summary["ranges"] = len(chosen)
        todo = []
        for pix in chosen:
            if _range_done(raw_root, state_dir, partition_name(pix, level)):
                summary["skipped"] += 1
            else:
                todo.append((int(pix), None if census is None else census.get(int(pix), 0)))
        if options.workers > 1 and len(todo) > 1:
            results = _fetch_in_processes(todo, level, raw_root, state_dir, options, archive_url, login)
        else:
            results = (fetch_range(client, pix, level, raw_root, state_dir, options, expected_rows=expected,
                                   archive_url=archive_url) for pix, expected in todo)
        for res in progress(results, "fetch", total=len(todo), unit="range"):
            if res.status == "failed":
                summary["failed"].append({"partition": res.partition, "reason": res.reason})
                continue
            summary[res.status] += 1
            for t, n in res.rows.items():
                summary["rows"][t] += n
            summary["missing_xp"] += len(res.missing_xp_ids)
            summary["unreadable_xp"] += len(res.unreadable_xp)
    summary["partner_tables"] = ingest_partner_tables(run_dir, config)
    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 3)
    summary["rows_per_s"] = round(summary["rows"]["gaia_source"] / seconds, 1) if seconds > 0 else None
    out = state_dir / "summary.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    if summary["failed"]:
        logger.error("fetch: %d of %d range(s) failed; rerun `xpcat fetch` to retry them (reasons in %s)",
                     len(summary["failed"]), summary["ranges"], state_dir)
    return summary

"""One HEALPix-aligned source_id range from a Gaia archive: queries, XP reconciliation, raw partitions.

For the partition ``p`` at ``config.data.partition_level`` (the source_id
range ``[lo, hi)`` of :func:`xpcat.production.partitions.source_id_range`),
:func:`fetch_range` does:

1. the Appendix A gaia_source + astrometric-fidelity query (:data:`GAIA_SOURCE_ADQL`)
   and the 2MASS best-neighbour query with its ph_qual / ext_key cuts
   (:data:`TMASS_ADQL`) as async ADQL jobs (``launch_job_async``);
2. the XP spectra of the returned sources through DataLink in batches of at
   most 5000 ids: ``XP_CONTINUOUS`` coefficients, or with ``FetchOptions.xp =
   "sampled"`` the ``XP_SAMPLED`` product
   (:func:`~xpcat.production.ingest.sampled_fetch.load_xp_sampled`, raw
   ``xp_sampled_spectrum``; ``[fetch] xp`` of the run config). Returned ids are compared with the requested ones;
   the missing ones are asked again (``FetchOptions.missing_rounds`` times)
   and those still missing are recorded (marker ``info`` and
   ``RUN_DIR/state/fetch/<partition>.json``). :func:`fetch_missing_xp` asks
   for those ids alone later and merges what comes into the partition; stars
   still without XP reach the catalog as sources without XP data;
3. the three tables (:func:`fetched_tables`) are written as ``RUN_DIR/raw/<table>/<partition>.parquet``
   with :func:`~xpcat.production.partitions.atomic_write_parquet` (verified,
   done marker); :func:`range_done` tells a range that needs no fetching.

A wrong answer (an ADQL error, rows outside the range, duplicated source_ids)
fails the range permanently; a request that keeps failing fails it for now
(:class:`RangeResult` ``permanent``). :func:`census_counts` counts the
sources per pixel, which each range's gaia_source answer must match.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.raw import GAIA_SOURCE, TMASS, XP_CONTINUOUS, XP_SAMPLED, XP_SAMPLED_TABLE
from xpcat.fileio import write_json_atomic
from xpcat.production.ingest.client import (
    FetchOptions,
    PermanentFailure,
    RangeFailed,
    load_xp,
    run_query,
    with_retries,
)
from xpcat.production.ingest.formats import conform_rows
from xpcat.production.partitions import (
    atomic_write_parquet,
    is_done,
    partition_name,
    read_marker,
    read_table,
    source_id_range,
    stamp_marker,
)

__all__ = [
    "CENSUS_ADQL",
    "GAIA_SOURCE_ADQL",
    "RAW_TABLES",
    "TMASS_ADQL",
    "RangeResult",
    "census_counts",
    "fetch_missing_xp",
    "fetch_range",
    "fetched_tables",
    "range_done",
    "range_paths",
    "read_range_state",
    "write_range_state",
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

RAW_TABLES = ("gaia_source", "tmass", "xp_continuous_mean_spectrum")
#: The raw XP table and its schema of each ``FetchOptions.xp``.
XP_FETCHED = {"continuous": ("xp_continuous_mean_spectrum", XP_CONTINUOUS), "sampled": (XP_SAMPLED_TABLE, XP_SAMPLED)}


def fetched_tables(xp: str = "continuous") -> tuple[str, str, str]:
    """The raw tables a range fetch writes: gaia_source, tmass and the XP table of ``xp``."""
    return ("gaia_source", "tmass", XP_FETCHED[xp][0])


def _conform_answer(table: pa.Table, schema: pa.Schema, what: str, lo: int, hi: int) -> pa.Table:
    good, bad = conform_rows(table, schema, what=what)
    if bad:
        b = bad[0]
        raise PermanentFailure(f"{what}: {len(bad)} unreadable row(s), e.g. source_id {b.source_id} column {b.column}: {b.reason}")
    sid = good.column("source_id").to_numpy()
    outside = sid[(sid < lo) | (sid >= hi)]
    if outside.size:
        raise PermanentFailure(f"{what}: {outside.size} source_id(s) outside the range [{lo}, {hi}), e.g. {outside[0]}")
    uniq, counts = np.unique(sid, return_counts=True)
    if (counts > 1).any():
        raise PermanentFailure(f"{what}: duplicated source_id(s), e.g. {uniq[counts > 1][0]}")
    return good


@dataclass
class RangeResult:
    """What became of one range (also its ``state/fetch/<partition>.json``).

    ``status`` is "done", "empty" or "failed" (``reason`` says why;
    ``permanent`` when retrying cannot help); ``rows`` the rows written per
    table; ``missing_xp_ids`` the stars DataLink left out; ``seconds`` the
    wall time.
    """

    partition: str
    status: str
    rows: dict[str, int] = field(default_factory=dict)
    missing_xp_ids: list[int] = field(default_factory=list)
    unreadable_xp: list[dict] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    permanent: bool = False  # failed for a reason retrying cannot fix


def range_paths(raw_root: Path, name: str, xp: str = "continuous") -> dict[str, Path]:
    """``RUN_DIR/raw/<table>/<name>.parquet`` for each table of :func:`fetched_tables`."""
    return {t: raw_root / t / f"{name}.parquet" for t in fetched_tables(xp)}


def read_range_state(state_dir: Path, name: str) -> dict:
    """The range's ``state/fetch/<name>.json`` ({} when absent or unreadable)."""
    try:
        return json.loads((state_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def range_done(raw_root: Path, state_dir: Path, name: str, xp: str = "continuous") -> bool:
    """Whether the range was fetched (done or empty) and its three partitions (``xp``'s XP table) are intact."""
    ok = read_range_state(state_dir, name).get("status") in ("done", "empty")
    return ok and all(is_done(p) for p in range_paths(raw_root, name, xp).values())


def fetch_range(client: Any, pix: int, level: int, raw_root: Path, state_dir: Path, options: FetchOptions, *,
                expected_rows: int | None = None, archive_url: str = "") -> RangeResult:
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
    RangeResult
        ``status`` "done", "empty" or "failed" (with ``reason``).
    """
    t0 = time.perf_counter()
    name = partition_name(pix, level)
    lo, hi = source_id_range(pix, level)
    what = f"range {name} [{lo}, {hi})"
    result = RangeResult(partition=name, status="failed")
    xp_table, xp_schema = XP_FETCHED[options.xp]
    try:
        def gaia() -> pa.Table:
            answer = run_query(client, GAIA_SOURCE_ADQL.format(lo=lo, hi=hi - 1), options, f"{what} gaia_source",
                               retry_requests=True)
            table = _conform_answer(answer, GAIA_SOURCE, f"{what} gaia_source", lo, hi)
            if expected_rows is not None and table.num_rows != expected_rows:
                raise ValueError(f"{what}: gaia_source answer has {table.num_rows} rows, the census counted {expected_rows}")
            return table

        g = with_retries(f"{what} gaia_source", gaia, options)  # a wrong count or a job past its deadline: again
        ids = g.column("source_id").to_numpy()
        if g.num_rows:
            tm = with_retries(f"{what} tmass", lambda: _conform_answer(
                run_query(client, TMASS_ADQL.format(lo=lo, hi=hi - 1), options, f"{what} tmass", retry_requests=True),
                TMASS, f"{what} tmass", lo, hi), options)  # only a job past its deadline is submitted again
            strays = np.setdiff1d(tm.column("source_id").to_numpy(), ids)
            if strays.size:
                raise PermanentFailure(f"{what}: tmass answer has {strays.size} source_id(s) not in gaia_source, e.g. {strays[0]}")
            xp, missing, unreadable = _fetch_xp(client, ids, options, state_dir, what)
        else:
            tm, xp, missing, unreadable = TMASS.empty_table(), xp_schema.empty_table(), [], []
    except RangeFailed as err:
        result.reason = str(err)
        result.permanent = isinstance(err, PermanentFailure)
        result.seconds = time.perf_counter() - t0
        logger.error("%s failed: %s", what, err)
        write_range_state(state_dir, name, result)
        return result
    info = {"pixel": int(pix), "level": int(level), "source_id_range": [lo, hi], "archive": archive_url,
            "missing_xp_ids": [int(i) for i in missing], "xp": options.xp}
    paths = range_paths(raw_root, name, options.xp)
    for table, key, schema in ((xp, xp_table, xp_schema), (tm, "tmass", TMASS),
                               (g, "gaia_source", GAIA_SOURCE)):
        atomic_write_parquet(table, paths[key], schema=schema, expected_rows=table.num_rows, info=info)
    result.status = "done" if g.num_rows else "empty"
    result.rows = {"gaia_source": g.num_rows, "tmass": tm.num_rows, xp_table: xp.num_rows}
    result.missing_xp_ids = [int(i) for i in missing]
    result.unreadable_xp = unreadable
    result.seconds = time.perf_counter() - t0
    write_range_state(state_dir, name, result)
    if missing:
        logger.warning("%s: %d source(s) without XP after %d re-requests, e.g. %s", what, len(missing),
                       options.missing_rounds, missing[0])
    return result


def _fetch_xp(client: Any, ids: np.ndarray, options: FetchOptions, state_dir: Path,
              what: str) -> tuple[pa.Table, list[int], list[dict]]:
    """XP rows for ``ids`` (``options.xp``'s product) with reconciliation: re-ask what DataLink left out."""
    from xpcat.production.ingest.sampled_fetch import load_xp_sampled

    load = load_xp_sampled if options.xp == "sampled" else load_xp
    wanted = {int(i) for i in ids}
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
                rows, bad = with_retries(f"{what} DataLink batch of {len(batch)}",
                                          lambda b=batch: load(client, b, options, Path(tmp)), options)
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
    xp = pa.concat_tables(parts) if parts else XP_FETCHED[options.xp][1].empty_table()
    xp = xp.sort_by("source_id")
    return xp, [int(i) for i in pending], [unreadable[k] for k in sorted(unreadable) if k in set(pending.tolist())]


def fetch_missing_xp(client: Any, pix: int, level: int, raw_root: Path, state_dir: Path, options: FetchOptions,
                     missing: list[int]) -> RangeResult:
    """Ask DataLink again for the XP of a done range's stars it left out, and merge what comes.

    The range's other tables are not fetched again; new XP rows are added to
    its ``xp_continuous_mean_spectrum`` partition (rewritten atomically), and
    the markers and ``state/fetch/<partition>.json`` get the ids still missing.

    Parameters
    ----------
    missing : list of int
        source_ids of the range recorded as without XP.

    Returns
    -------
    RangeResult
        ``status`` "done" (the range stays done even when DataLink fails
        again; ``reason`` says so), ``rows`` the XP rows added,
        ``missing_xp_ids`` those still missing.
    """
    t0 = time.perf_counter()
    name = partition_name(pix, level)
    what = f"range {name} XP of {len(missing)} star(s) left out before"
    state = read_range_state(state_dir, name)
    result = RangeResult(partition=name, status="done", missing_xp_ids=[int(i) for i in missing])
    try:
        xp_new, still, unreadable = _fetch_xp(client, np.asarray(missing, dtype=np.int64), options, state_dir, what)
    except RangeFailed as err:
        result.reason, result.seconds = str(err), time.perf_counter() - t0
        logger.warning("%s: %s", what, err)
        return result
    xp_table, xp_schema = XP_FETCHED[options.xp]
    paths = range_paths(raw_root, name, options.xp)
    if xp_new.num_rows:
        xp_path = paths[xp_table]
        old = read_table(xp_path, what=f"raw {xp_table}").cast(xp_schema)
        merged = pa.concat_tables([old, xp_new.cast(xp_schema)]).sort_by("source_id")
        info = {**((read_marker(xp_path) or {}).get("info") or {}), "missing_xp_ids": still}
        atomic_write_parquet(merged, xp_path, schema=xp_schema, expected_rows=merged.num_rows, info=info)
        for t in ("gaia_source", "tmass"):
            stamp_marker(paths[t], missing_xp_ids=still)
    result.rows = {xp_table: xp_new.num_rows}
    result.missing_xp_ids, result.unreadable_xp = still, unreadable
    result.seconds = time.perf_counter() - t0
    rows = dict(state.get("rows") or {})
    rows[xp_table] = rows.get(xp_table, 0) + xp_new.num_rows
    write_range_state(state_dir, name, RangeResult(partition=name, status=state.get("status", "done"), rows=rows,
                                               missing_xp_ids=still, unreadable_xp=unreadable,
                                               seconds=result.seconds))
    logger.info("%s: %d found, %d still missing", what, xp_new.num_rows, len(still))
    return result


def write_range_state(state_dir: Path, name: str, result: RangeResult) -> None:
    """Write ``state/fetch/<name>.json`` atomically."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_dir / f"{name}.json", asdict(result))


def census_counts(client: Any, level: int, options: FetchOptions) -> dict[int, int]:
    """Sources with XP per non-empty pixel at ``level`` (:data:`CENSUS_ADQL`): {pixel: count}."""
    what = f"census at level {level}"
    table = with_retries(what, lambda: run_query(client, CENSUS_ADQL.format(level=level), options, what,
                                                 retry_requests=True), options)
    pix = table.column("pix").to_numpy(zero_copy_only=False).astype(np.int64)
    n = table.column("n").to_numpy(zero_copy_only=False).astype(np.int64)
    return {int(p): int(c) for p, c in zip(pix, n) if c > 0}

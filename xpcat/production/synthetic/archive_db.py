"""The local archive's database: a universe's raw tables under the Gaia archive's names, in DuckDB.

Tables (:data:`ARCHIVE_TABLES`): ``gaiadr3.gaia_source``,
``external.gaiaedr3_spurious`` (fidelity_v2, norm_dg),
``gaiadr3.astrophysical_parameters`` (source_id), the 2MASS chain
``gaiadr3.tmass_psc_xsc_best_neighbour`` -> ``gaiadr3.tmass_psc_xsc_join`` ->
``gaiadr1.tmass_original_valid``, and the function
``gaia_healpix_index(level, source_id)``. ADQL's ``SELECT TOP n`` becomes
``LIMIT n`` (:func:`adql_to_duckdb`); the rest of the Appendix A subset
(joins, ``USING``, ``BETWEEN``, ``LIKE``, ``IS NULL``, ``ORDER BY``,
``= 'True'`` on booleans) is DuckDB SQL as is. The tables are loaded into
memory and DuckDB's file access is then switched off, so a query reads
nothing but the universe. XP spectra are not in the database (as at ESA, only
DataLink serves them): :meth:`ArchiveDatabase.xp_rows` reads them from Parquet,
and :meth:`ArchiveDatabase.xp_sampled` samples them as DataLink ``XP_SAMPLED``
does (GaiaXPy's bases on :data:`SAMPLED_GRID_NM`, flux_error from the
coefficient errors and correlations; a missing band's samples are NaN).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from xpcat.catalog_schema.raw import GAIA_SOURCE, TMASS, XP_CONTINUOUS
from xpcat.errors import InputError, XpcatError
from xpcat.production.ingest.sampled import SAMPLED_GRID_NM  # the grid served (tests replace it to serve a wrong one)

__all__ = ["ARCHIVE_TABLES", "AdqlError", "ArchiveDatabase", "SAMPLED_GRID_NM", "SampledRows", "adql_to_duckdb"]

logger = logging.getLogger(__name__)

#: Archive table names the local archive answers for.
ARCHIVE_TABLES = (
    "gaiadr3.gaia_source",
    "external.gaiaedr3_spurious",
    "gaiadr3.astrophysical_parameters",
    "gaiadr3.tmass_psc_xsc_best_neighbour",
    "gaiadr3.tmass_psc_xsc_join",
    "gaiadr1.tmass_original_valid",
)

_SPURIOUS_COLS = ("fidelity_v2", "norm_dg")


@dataclass(frozen=True)
class SampledRows:
    """XP spectra as DataLink ``XP_SAMPLED`` serves them.

    Attributes
    ----------
    source_id, solution_id : (n,) int64
    ra, dec : (n,) float64, deg (gaia_source)
    wavelength : (m,) float64, nm
    flux, flux_error : (n, m) float64, W m^-2 nm^-1
    """

    source_id: np.ndarray
    solution_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    wavelength: np.ndarray
    flux: np.ndarray
    flux_error: np.ndarray


class AdqlError(XpcatError, ValueError):
    """An ADQL query the local archive cannot run; the message says why."""


def adql_to_duckdb(adql: str) -> str:
    """Translate the ADQL subset xpcat uses into DuckDB SQL.

    Parameters
    ----------
    adql : str
        One ADQL ``SELECT`` statement.

    Returns
    -------
    str
        DuckDB SQL: ``SELECT [DISTINCT] TOP n ...`` becomes ``... LIMIT n``,
        typographic quotes become ``'``; the rest is passed through.

    Raises
    ------
    AdqlError
        When the text is empty, not a ``SELECT`` or holds several statements.
    """
    text = adql.strip().replace("\u2019", "'").replace("\u2018", "'")
    text = text.rstrip(";").strip()
    if not text:
        raise AdqlError("empty ADQL query")
    if not re.match(r"(?is)^select\b", text):
        raise AdqlError(f"only SELECT queries are supported; got {text[:60]!r}")
    if ";" in re.sub(r"'[^']*'", "''", text):
        raise AdqlError("only one statement per query is supported (found ';')")
    m = re.match(r"(?is)^select\s+(distinct\s+)?top\s+(\d+)\s+(.*)$", text)
    if m:
        distinct, n, rest = m.group(1) or "", int(m.group(2)), m.group(3)
        text = f"SELECT {distinct}{rest}\nLIMIT {n}"
    return text


def _scan(folder: Path) -> pa.Table | None:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return None
    return pads.dataset([str(f) for f in files], format="parquet").to_table()


def _raw_root(universe_dir: Path) -> Path:
    universe_dir = Path(universe_dir)
    root = universe_dir / "raw"
    if not (root / "gaia_source").is_dir():
        raise InputError(
            f"{universe_dir} is not a universe: {root / 'gaia_source'} is missing "
            "(make one with `xpcat simulate DIR`)"
        )
    return root


class ArchiveDatabase:
    """The universe's tables under the archive's names, queried with DuckDB.

    Parameters
    ----------
    universe_dir : path
        Folder with ``raw/gaia_source/*.parquet`` (required), and optionally
        ``raw/tmass/*.parquet`` and ``raw/xp_continuous_mean_spectrum/*.parquet``.

    Raises
    ------
    InputError
        When ``raw/gaia_source`` is missing or empty.
    """

    def __init__(self, universe_dir: str | Path) -> None:
        import duckdb

        root = _raw_root(Path(universe_dir))
        gaia = _scan(root / "gaia_source")
        if gaia is None:
            raise InputError(f"{root / 'gaia_source'} holds no Parquet files")
        tmass = _scan(root / "tmass")
        if tmass is None:
            tmass = TMASS.empty_table()
        self.n_sources = gaia.num_rows
        order = np.argsort(gaia.column("source_id").to_numpy())
        self._pos = {c: gaia.column(c).to_numpy(zero_copy_only=False)[order] for c in ("source_id", "ra", "dec")}
        xp_dir = root / "xp_continuous_mean_spectrum"
        xp_files = sorted(xp_dir.glob("*.parquet")) if xp_dir.is_dir() else []
        self._xp = pads.dataset([str(f) for f in xp_files], format="parquet", schema=XP_CONTINUOUS) if xp_files else None
        self._lock = threading.Lock()
        con = duckdb.connect(":memory:")
        for schema in ("gaiadr3", "gaiadr1", "external"):
            con.execute(f"CREATE SCHEMA {schema}")
        con.register("_gaia", gaia)
        con.register("_tmass", tmass)
        g_cols = ", ".join(n for n in GAIA_SOURCE.names if n in gaia.column_names and n not in _SPURIOUS_COLS)
        con.execute(f"CREATE TABLE gaiadr3.gaia_source AS SELECT {g_cols} FROM _gaia ORDER BY source_id")
        spur = [c for c in _SPURIOUS_COLS if c in gaia.column_names]
        if spur:
            cond = " OR ".join(f"{c} IS NOT NULL" for c in spur)
            con.execute(
                f"CREATE TABLE external.gaiaedr3_spurious AS SELECT source_id, {', '.join(spur)} FROM _gaia WHERE {cond}"
            )
        else:
            con.execute("CREATE TABLE external.gaiaedr3_spurious (source_id BIGINT, fidelity_v2 FLOAT, norm_dg FLOAT)")
        con.execute("CREATE TABLE gaiadr3.astrophysical_parameters AS SELECT source_id FROM _gaia")
        con.execute(
            "CREATE TABLE _tm AS SELECT *, row_number() OVER (ORDER BY source_id) AS oid FROM _tmass"
        )
        con.execute(
            "CREATE TABLE gaiadr3.tmass_psc_xsc_best_neighbour AS SELECT source_id, oid AS clean_tmass_psc_xsc_oid, "
            "designation AS original_ext_source_id, gaia_tmass_angular_distance AS angular_distance, "
            "1 AS number_of_neighbours, 0 AS number_of_mates FROM _tm"
        )
        con.execute(
            "CREATE TABLE gaiadr3.tmass_psc_xsc_join AS SELECT oid AS clean_tmass_psc_xsc_oid, "
            "designation AS original_psc_source_id, CAST(NULL AS VARCHAR) AS original_xsc_source_id FROM _tm"
        )
        con.execute(
            "CREATE TABLE gaiadr1.tmass_original_valid AS SELECT designation, tm_ra AS ra, tm_dec AS dec, "
            "j_m, j_msigcom, h_m, h_msigcom, ks_m, ks_msigcom, ph_qual, ext_key FROM _tm "
            "QUALIFY row_number() OVER (PARTITION BY designation ORDER BY source_id) = 1"
        )
        con.execute("DROP TABLE _tm")
        con.unregister("_gaia")
        con.unregister("_tmass")
        con.execute("CREATE MACRO gaia_healpix_index(lvl, sid) AS (sid >> (35 + 2 * (12 - lvl)))")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        self._con = con
        logger.info("local archive over %s: %d gaia_source rows, %d 2MASS rows, XP %s",
                    root, gaia.num_rows, tmass.num_rows, "present" if self._xp else "absent")

    def query(self, adql: str) -> pa.Table:
        """Run one ADQL query.

        Raises
        ------
        AdqlError
            With DuckDB's message when the query is not valid.
        """
        import duckdb

        sql = adql_to_duckdb(adql)
        try:
            with self._lock:
                return self._con.sql(sql).to_arrow_table()
        except duckdb.Error as err:
            raise AdqlError(f"query failed: {str(err).splitlines()[0]}") from err

    def xp_rows(self, source_ids: np.ndarray) -> pa.Table:
        """XP continuous rows for the requested ids (unknown ids left out).

        Parameters
        ----------
        source_ids : (n,) int64

        Returns
        -------
        pyarrow.Table in the XP_CONTINUOUS schema, in the order of ``source_ids``.
        """
        if self._xp is None or len(source_ids) == 0:
            return XP_CONTINUOUS.empty_table()
        ids = pa.array(np.asarray(source_ids, dtype=np.int64))
        rows = self._xp.to_table(filter=pc.field("source_id").isin(ids))
        position = pc.index_in(rows.column("source_id"), value_set=ids).to_numpy(zero_copy_only=False)
        return rows.take(pa.array(np.argsort(position, kind="stable")))

    def xp_sampled(self, rows: pa.Table) -> SampledRows:
        """XP continuous rows sampled on :data:`SAMPLED_GRID_NM`, with their gaia_source positions.

        Parameters
        ----------
        rows : pyarrow.Table in the XP_CONTINUOUS schema (e.g. :meth:`xp_rows`)

        Returns
        -------
        SampledRows
            Flux and flux_error as ``gaiaxpy.calibrate`` gives them on that grid
            (:func:`xpcat.sample_xp`), NaN where a band is missing.
        """
        from xpcat.production.condition.xp_sampling import sample_xp

        grid = np.asarray(SAMPLED_GRID_NM, dtype=np.float64)
        sid = rows.column("source_id").to_numpy(zero_copy_only=False).astype(np.int64)
        if not sid.size:
            empty = np.zeros((0, grid.size))
            return SampledRows(sid, sid.copy(), np.zeros(0), np.zeros(0), grid, empty, empty.copy())
        smp = sample_xp(rows, wavelengths_nm=grid, with_covariance=False, threads=1)  # thread-safe (condition.bases)
        known = self._pos["source_id"]
        at = np.clip(np.searchsorted(known, sid), 0, max(known.size - 1, 0))
        hit = known[at] == sid
        ra = np.where(hit, self._pos["ra"][at], np.nan)
        dec = np.where(hit, self._pos["dec"][at], np.nan)
        sol = pc.fill_null(rows.column("solution_id"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return SampledRows(sid, sol, ra, dec, grid, smp.flux, smp.flux_error)

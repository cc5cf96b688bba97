"""Raw rows of one source_id range -> one conditioned table (gaia_source + XP + 2MASS + unWISE, joined on source_id).

Every gaia_source row gives one output row; the XP rows (whole or streamed in
batches) are conditioned block by block
(:func:`xpcat.production.condition.block_factor.condition_xp_table`), the
partner photometry by :func:`xpcat.production.condition.photometry.nir_photometry`.
No file I/O here: the stage reads the rows and writes the table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.conditioned import CONDITIONED, N_FACTOR, N_FLUX, N_XP
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.config import RunConfig
from xpcat.errors import InputError
from xpcat.production.condition.bases import DEFAULT_WAVELENGTHS_NM
from xpcat.production.condition.block_factor import condition_xp_table
from xpcat.production.condition.covariance import ConditionedArrays, condition_arrays
from xpcat.production.condition.parallel import single_threaded_blas
from xpcat.production.condition.photometry import nir_photometry
from xpcat.production.condition.sampled import sampled_xp
from xpcat.production.condition.xp_sampling import XpSample

__all__ = [
    "MAX_BLOCK",
    "GAIA_COLUMNS",
    "TMASS_COLUMNS",
    "UNWISE_COLUMNS",
    "source_ids",
    "check_unique",
    "condition_tables",
]

logger = logging.getLogger(__name__)

#: Largest block of stars whose 66 x 66 matrices are held at once (~35 kB each, about 8 arrays):
#: ``[conditioning] batch_size`` is capped by it so that memory stays bounded.
MAX_BLOCK = 1024

#: Columns read from the raw tables (the optional partner tables' and gaia_source's).
TMASS_COLUMNS = ["source_id", "j_m", "j_msigcom", "h_m", "h_msigcom", "ks_m", "ks_msigcom", "ph_qual", "ext_key"]
UNWISE_COLUMNS = ["source_id", "w1_mag", "w1_mag_error", "w2_mag", "w2_mag_error"]
GAIA_COLUMNS = [
    "source_id", "ra", "dec", "parallax", "parallax_error", "phot_g_mean_mag", "phot_g_mean_flux",
    "phot_g_mean_flux_error", "phot_bp_mean_flux", "phot_bp_mean_flux_error", "phot_rp_mean_flux",
    "phot_rp_mean_flux_error", "phot_bp_rp_excess_factor", "ruwe", "fidelity_v2", "norm_dg",
]  # fmt: skip


def _f64(table: pa.Table, name: str) -> np.ndarray:
    """(n,) float64 of a column, NaN for nulls; all NaN when the column is absent."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray(table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def source_ids(table: pa.Table) -> np.ndarray:
    """(n,) int64: the table's source_id column."""
    return np.asarray(table.column("source_id").to_numpy(zero_copy_only=False), dtype=np.int64)


def check_unique(ids: np.ndarray, what: str, origin: np.ndarray | None = None, files: Sequence[str] = ()) -> None:
    """Refuse duplicated source_ids.

    Parameters
    ----------
    ids : (n,) int64
    what : str
        Names the table in the message.
    origin : (n,) int, optional
        Index into ``files`` of the file each id came from, to name the files holding duplicates.
    files : sequence of str

    Raises
    ------
    InputError
        Naming up to 10 duplicated ids (and their files).
    """
    if ids.size < 2:
        return
    s = np.sort(ids)
    dup = np.unique(s[1:][s[1:] == s[:-1]])
    if dup.size:
        where = ""
        if origin is not None and len(files):
            in_files = sorted({files[k] for k in np.unique(origin[np.isin(ids, dup[:5])])})
            where = f" (in {', '.join(in_files)})"
        shown = ", ".join(str(x) for x in dup[:10])
        raise InputError(f"{what}: {dup.size} duplicated source_id(s): {shown}{where}")


def _align(ids: np.ndarray, table: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """Row index into ``table`` for each id and a matched mask (table need not be sorted)."""
    if table is None or table.num_rows == 0:
        return np.zeros(ids.size, dtype=np.int64), np.zeros(ids.size, dtype=bool)
    t_ids = source_ids(table)
    order = np.argsort(t_ids, kind="stable")
    pos = np.searchsorted(t_ids[order], ids)
    pos = np.clip(pos, 0, t_ids.size - 1)
    idx = order[pos]
    return idx, t_ids[idx] == ids


def _empty_sample(ids: np.ndarray) -> XpSample:
    """An XpSample of stars without XP data (NaN flux, zero weight)."""
    k = ids.size
    return XpSample(
        source_id=ids, wavelengths=DEFAULT_WAVELENGTHS_NM, flux=np.full((k, N_XP), np.nan),
        flux_error=np.full((k, N_XP), np.nan), covariance=np.full((k, N_XP, N_XP), np.nan),
        flux_bp=np.zeros((k, N_XP)), flux_rp=np.zeros((k, N_XP)), has_bp=np.zeros(k, dtype=bool),
        has_rp=np.zeros(k, dtype=bool), bad_bp=np.zeros(k, dtype=bool), bad_rp=np.zeros(k, dtype=bool),
    )  # fmt: skip


def _table_batches(table: pa.Table, size: int) -> Iterator[tuple[pa.Table, str]]:
    for lo in range(0, table.num_rows, size):
        yield table.slice(lo, size), "xp_continuous_mean_spectrum"


def condition_tables(
    gaia: pa.Table,
    xp: pa.Table | Iterable[tuple[pa.Table, str]],
    tmass: pa.Table | None,
    unwise: pa.Table | None,
    config: RunConfig,
    *,
    what: str = "partition",
    sampled: pa.Table | None = None,
) -> pa.Table:
    """Join raw rows on source_id and condition them into a :data:`CONDITIONED` table.

    Every gaia_source row gives exactly one output row, sorted by source_id: a
    star with no XP row is flagged NO_XP (zero-weight XP samples), a missing or
    unusable band is flagged and zero-weighted, missing photometry has zero
    weight. XP rows are processed in blocks of at most :data:`MAX_BLOCK`, so
    memory holds the outputs plus one block.

    Parameters
    ----------
    gaia : pyarrow.Table
        gaia_source rows (archive column names).
    xp : pyarrow.Table, or iterable of (pyarrow.Table, origin name)
        xp_continuous_mean_spectrum rows, whole or as a stream of batches
        (each tagged with the file it came from, for messages).
    tmass, unwise : pyarrow.Table or None
        Optional partner tables.
    config : RunConfig
    what : str
        Name used in error messages.
    sampled : pyarrow.Table, optional
        xp_sampled_spectrum rows (SPEC §1.3): a star without coefficients is
        conditioned from its samples (flagged XP_SAMPLED); a star with both
        uses its coefficients (flagged XP_SAMPLED_UNUSED).

    Raises
    ------
    InputError
        Duplicated source_ids in any table, or XP rows with no gaia_source row (named).
    """
    cc = config.conditioning
    gaia = gaia.sort_by("source_id")
    ids = source_ids(gaia)
    n = ids.size
    for name, t in (("gaia_source", gaia), ("tmass", tmass), ("unwise", unwise)):
        if t is not None:
            check_unique(source_ids(t), f"{what}: raw {name}")
    step = max(1, min(int(cc.batch_size), MAX_BLOCK))

    def partner(table: pa.Table | None, cols: list[str]) -> dict | None:
        if table is None:
            return None
        idx, matched = _align(ids, table)
        out: dict[str, np.ndarray] = {"matched": matched}
        taken = table.take(pa.array(idx)) if table.num_rows else None
        for c in cols[1:]:
            if taken is None or c not in taken.column_names:
                out[c] = np.full(n, np.nan) if c != "ph_qual" else np.full(n, None, dtype=object)
            elif c == "ph_qual":
                out[c] = np.array(taken.column(c).to_pylist(), dtype=object)
            else:
                out[c] = np.where(matched, _f64(taken, c), np.nan)
        return out

    norm_dg = _f64(gaia, "norm_dg")
    nir = nir_photometry(
        n,
        norm_dg,
        partner(tmass, TMASS_COLUMNS),
        partner(unwise, UNWISE_COLUMNS),
        tmass_norm_dg_max=cc.tmass_norm_dg_max,
        unwise_norm_dg_max=cc.unwise_norm_dg_max,
    )

    flags = nir.flags.copy()
    plx = _f64(gaia, "parallax")
    flags[~np.isfinite(plx)] |= np.uint16(ConditionFlag.NO_PARALLAX)
    out_flux = np.empty((n, N_FLUX), np.float32)
    out_err = np.empty((n, N_FLUX), np.float32)
    out_fac = np.empty((n, N_FACTOR), np.float32)
    out_nv = np.empty(n, np.int16)
    chi2 = {b: np.full(n, np.nan) for b in ("bp", "rp")}
    dof = {b: np.full(n, np.nan) for b in ("bp", "rp")}
    origin = np.full(n, "", dtype=object)  # which XP file each star came from
    has_xp = np.zeros(n, dtype=bool)

    def condition_block(pos: np.ndarray, smp: XpSample, ca: ConditionedArrays | None = None) -> None:
        if ca is None:
            ca = condition_arrays(smp, nir.flux[pos], nir.variance[pos], floor=cc.eigenvalue_floor)
        out_flux[pos], out_err[pos], out_fac[pos], out_nv[pos] = ca.flux, ca.flux_error, ca.factor, ca.n_valid
        f = ca.flags
        f[~smp.has_bp] |= np.uint16(ConditionFlag.NO_BP)
        f[~smp.has_rp] |= np.uint16(ConditionFlag.NO_RP)
        f[smp.bad_bp | smp.bad_rp] |= np.uint16(ConditionFlag.BAD_XP_INPUT)
        flags[pos] |= f

    def _condition_batches(batches: Iterable[tuple[pa.Table, str]]) -> None:
        for batch, source in batches:
            for lo in range(0, batch.num_rows, step):
                block = batch.slice(lo, step)
                bid = source_ids(block)
                pos = np.clip(np.searchsorted(ids, bid), 0, max(n - 1, 0))
                if n == 0 or np.any(ids[pos] != bid):
                    orphans = bid if n == 0 else bid[ids[pos] != bid]
                    shown = ", ".join(str(x) for x in orphans[:10])
                    raise InputError(f"{what}: {orphans.size} XP row(s) in {source} have no gaia_source row: source_id {shown}")
                seen = has_xp[pos]
                check_unique(bid, f"{what}: raw xp_continuous_mean_spectrum ({source})")
                if seen.any():
                    dup = bid[seen]
                    files = sorted({str(origin[p]) for p in pos[seen]} | {source})
                    shown = ", ".join(str(x) for x in dup[:10])
                    raise InputError(
                        f"{what}: raw xp_continuous_mean_spectrum: {dup.size} duplicated source_id(s): {shown} (in {', '.join(files)})"
                    )
                has_xp[pos] = True
                origin[pos] = source
                try:
                    ca, smp = condition_xp_table(
                        block, nir.flux[pos], nir.variance[pos], floor=cc.eigenvalue_floor, covariance=cc.covariance, buf=buf
                    )
                except KeyError as err:
                    raise InputError(f"{what}: {err.args[0]}") from err
                condition_block(pos, smp, ca)
                for band in ("bp", "rp"):
                    chi2[band][pos] = _f64(block, f"{band}_chi_squared")
                    dof[band][pos] = _f64(block, f"{band}_degrees_of_freedom")
                del smp, block

    batches = _table_batches(xp, step) if isinstance(xp, pa.Table) else xp
    buf = np.empty((step, N_XP, N_XP))  # the XP covariance work buffer, reused by every block
    with single_threaded_blas():
        _condition_batches(batches)
        if sampled is not None and sampled.num_rows:
            check_unique(source_ids(sampled), f"{what}: raw xp_sampled_spectrum")
            sid_s = source_ids(sampled)
            pos_s = np.clip(np.searchsorted(ids, sid_s), 0, max(n - 1, 0))
            if n == 0 or np.any(ids[pos_s] != sid_s):
                orphans = sid_s if n == 0 else sid_s[ids[pos_s] != sid_s]
                shown = ", ".join(str(x) for x in orphans[:10])
                raise InputError(f"{what}: {orphans.size} xp_sampled_spectrum row(s) have no gaia_source row: source_id {shown}")
            both = has_xp[pos_s]
            flags[pos_s[both]] |= np.uint16(ConditionFlag.XP_SAMPLED_UNUSED)
            if both.any():
                logger.info("%s: %d star(s) have coefficients and sampled spectra; the coefficients are used", what, int(both.sum()))
            use = np.flatnonzero(~both)
            for lo in range(0, use.size, step):
                rows = use[lo : lo + step]
                pos = pos_s[rows]
                condition_block(pos, sampled_xp(sampled.take(pa.array(rows)), what=f"{what}: xp_sampled_spectrum"))
                flags[pos] |= np.uint16(ConditionFlag.XP_SAMPLED)
                has_xp[pos] = True
    missing = np.flatnonzero(~has_xp)
    flags[missing] |= np.uint16(ConditionFlag.NO_XP)
    for lo in range(0, missing.size, step):
        pos = missing[lo : lo + step]
        condition_block(pos, _empty_sample(ids[pos]))

    def fsl(arr: np.ndarray, size: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), size)

    def f32(x: np.ndarray) -> pa.Array:
        return pa.array(x.astype(np.float32), mask=~np.isfinite(x))

    def ratio(a: str, b: str) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return _f64(gaia, a) / _f64(gaia, b)

    xp_cols = {}
    for band in ("bp", "rp"):
        xp_cols[f"{band}_chi_squared"] = f32(chi2[band])
        d = dof[band]
        xp_cols[f"{band}_degrees_of_freedom"] = pa.array(np.nan_to_num(d).astype(np.int16), mask=~np.isfinite(d))

    columns = {
        "source_id": pa.array(ids, pa.int64()),
        "ra": pa.array(_f64(gaia, "ra")),
        "dec": pa.array(_f64(gaia, "dec")),
        "parallax": f32(plx),
        "parallax_error": f32(_f64(gaia, "parallax_error")),
        "flux": fsl(out_flux, N_FLUX),
        "flux_error": fsl(out_err, N_FLUX),
        "flux_factor_triu": fsl(out_fac, N_FACTOR),
        "n_valid_flux": pa.array(out_nv, pa.int16()),
        "condition_flags": pa.array(flags, pa.uint16()),
        "phot_g_mean_mag": f32(_f64(gaia, "phot_g_mean_mag")),
        "phot_g_mean_flux_over_error": f32(ratio("phot_g_mean_flux", "phot_g_mean_flux_error")),
        "phot_bp_mean_flux_over_error": f32(ratio("phot_bp_mean_flux", "phot_bp_mean_flux_error")),
        "phot_rp_mean_flux_over_error": f32(ratio("phot_rp_mean_flux", "phot_rp_mean_flux_error")),
        "phot_bp_rp_excess_factor": f32(_f64(gaia, "phot_bp_rp_excess_factor")),
        "ruwe": f32(_f64(gaia, "ruwe")),
        "fidelity_v2": f32(_f64(gaia, "fidelity_v2")),
        "norm_dg": f32(norm_dg),
        **xp_cols,
    }
    return pa.Table.from_arrays([columns[f.name] for f in CONDITIONED], schema=CONDITIONED)

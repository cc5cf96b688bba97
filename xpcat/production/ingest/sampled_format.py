"""The archive's DataLink ``XP_SAMPLED`` CSV: long form, one row per source and wavelength.

Columns ``source_id, solution_id, ra, dec, wavelength, flux, flux_error``
(:data:`XP_SAMPLED_CSV_COLUMNS`); ``wavelength`` in nm, ``flux`` and
``flux_error`` in W m^-2 nm^-1 written as float32, ``ra``/``dec`` in deg as
float64, every number as the archive (Java) writes it. :func:`long_form_records`
reads such a table into one record per source (``xpcat ingest`` and
``xpcat fetch`` with ``[fetch] xp = "sampled"``);
:func:`xp_sampled_to_archive_csv` writes it (the local archive serves it).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpcat.production.ingest.formats import java_float_strings

__all__ = ["XP_SAMPLED_CSV_COLUMNS", "long_form_records", "xp_sampled_to_archive_csv"]

logger = logging.getLogger(__name__)

#: Column names of the archive's XP_SAMPLED CSV, in order.
XP_SAMPLED_CSV_COLUMNS = ("source_id", "solution_id", "ra", "dec", "wavelength", "flux", "flux_error")


def long_form_records(cols: dict[str, np.ndarray]) -> list[dict]:
    """Per-source records of a long-form XP_SAMPLED table (one row per source and wavelength, as DataLink CSV).

    Parameters
    ----------
    cols : dict of str -> (n_rows,) array
        ``source_id``, ``wavelength`` [nm], ``flux``, ``flux_error`` [W m^-2 nm^-1];
        optionally ``solution_id``, ``ra``, ``dec`` [deg].

    Returns
    -------
    list of dict
        ``{source_id, solution_id, ra, dec, wavelength, flux, flux_error}`` per
        source, in order of first appearance; each source's rows in their order.

    Raises
    ------
    KeyError
        A column of the four required ones is missing.
    """
    sid = np.asarray(cols["source_id"])
    if sid.size == 0:
        return []
    order = np.argsort(sid, kind="stable")
    s_sorted = sid[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    bounds = np.r_[starts, s_sorted.size]
    first_row = order[starts]  # the first row of each source in the input
    arrays = {c: np.asarray(cols[c])[order] for c in ("wavelength", "flux", "flux_error")}
    out = []
    for k in np.argsort(first_row, kind="stable"):
        lo, hi, r0 = bounds[k], bounds[k + 1], first_row[k]
        out.append({"source_id": s_sorted[lo].item(),
                    "solution_id": int(cols["solution_id"][r0]) if "solution_id" in cols else None,
                    **{c: float(cols[c][r0]) if c in cols else np.nan for c in ("ra", "dec")},
                    **{c: arrays[c][lo:hi].astype(np.float64) for c in arrays}})
    return out


def xp_sampled_to_archive_csv(source_id: np.ndarray, solution_id: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                              wavelength: np.ndarray, flux: np.ndarray, flux_error: np.ndarray) -> bytes:
    """Sampled spectra as the archive's DataLink ``XP_SAMPLED`` CSV.

    Parameters
    ----------
    source_id, solution_id : (n,) int64
    ra, dec : (n,) float64, deg
    wavelength : (m,) float64, nm
        The sampling (the archive's: 336, 338, ..., 1020 nm, m = 343).
    flux, flux_error : (n, m) float, W m^-2 nm^-1
        Written as float32 (NaN as ``NaN``).

    Returns
    -------
    bytes
        The header line, then n * m lines ``source_id,solution_id,ra,dec,wavelength,flux,flux_error``,
        source by source: byte for byte what the archive serves (test on the real product).
    """
    flux, flux_error = np.atleast_2d(flux), np.atleast_2d(flux_error)
    n, m = flux.shape
    wavelength = np.asarray(wavelength, np.float64)
    if wavelength.shape != (m,) or flux_error.shape != (n, m) or len(source_id) != n:
        raise ValueError(f"XP_SAMPLED CSV: flux {flux.shape}, flux_error {flux_error.shape}, {len(source_id)} "
                         f"source_ids and {wavelength.shape} wavelengths do not agree")
    header = ",".join(XP_SAMPLED_CSV_COLUMNS) + "\n"
    if n == 0:
        return header.encode()
    rep = lambda a: pa.array(np.repeat(np.asarray(a), m))
    cols = [pc.cast(rep(np.asarray(source_id, np.int64)), pa.string()),
            pc.cast(rep(np.asarray(solution_id, np.int64)), pa.string()),
            java_float_strings(rep(np.asarray(ra, np.float64))), java_float_strings(rep(np.asarray(dec, np.float64))),
            java_float_strings(pa.array(np.tile(wavelength, n))),
            java_float_strings(pa.array(flux.astype(np.float32).reshape(-1))),
            java_float_strings(pa.array(flux_error.astype(np.float32).reshape(-1)))]
    lines = pc.binary_join_element_wise(*cols, ",")
    return (header + "\n".join(lines.to_pylist()) + "\n").encode()

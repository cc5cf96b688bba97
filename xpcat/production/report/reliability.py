"""How far the catalog's numbers can be trusted: validation.json's ``error_calibration`` and ``catastrophic_failures``.

- :func:`error_calibration`: are the reported error bars calibrated? The pull
  robust sigma per parameter against the 0.85-1.2 band
  (:func:`xpcat.model.model_error.pull_calibration`) for the basic-cut stars,
  overall and in bins of G, E and Teff (both the reference's where it has them:
  binning by the estimate selects stars by their error: on the 6000-star demo
  the 440 stars estimated at E 0.05-0.1 held only 47 truly there, and their
  E pulls were 1.66 against 0.80-1.07 in every bin of the true E), each
  bin's pull sigma with its bootstrap standard error and the verdict on the
  bins of >= 20 stars (outside the band, and outside by more than two
  standard errors: a bin of 84 stars scatters by ~0.13, half the band), and
  which errors the catalog reports (its ``uncertainty`` metadata);
- :func:`catastrophic_failures`: per cut, the fraction of stars whose Teff,
  logg or [Fe/H] misses the reference by more than :data:`CATASTROPHIC_THRESHOLDS`.

Both return the sentences the page states beside their numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from xpcat.catalog_schema import PARAM_NAMES
from xpcat.catalog_schema.flags import CONFIDENCE_THRESHOLD
from xpcat.model.model_error import PARAMS, PULL_SIGMA_BAND, pull_calibration
from xpcat.production.report.data import ReportData

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_BINS",
    "CATASTROPHIC_THRESHOLDS",
    "catastrophic_failures",
    "catastrophic_rows",
    "error_calibration",
    "uncertainty_statement",
]

#: Bin edges of the error calibration: G (phot_g_mean_mag, mag), E (mag), Teff (the reference, K).
CALIBRATION_BINS = {
    "G": [3.0, 10.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 21.0],
    "E": [0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 2.0, 10.0],
    "Teff": [2500.0, 4000.0, 4500.0, 5000.0, 5500.0, 6000.0, 6500.0, 7500.0, 50000.0],
}
#: What each binning variable is.
BIN_VALUES = {"G": "phot_g_mean_mag from raw/gaia_source (mag)", "E": "reference E (mag)",
              "E_estimate": "estimated E (mag; the reference has no E)", "Teff": "reference Teff (K)"}
#: A failure is catastrophic when |estimate - reference| exceeds this: Teff in K, logg and [Fe/H] in dex.
CATASTROPHIC_THRESHOLDS = {"teff": 500.0, "logg": 0.5, "feh": 0.5}
#: The words of each parameter in the page's sentences.
WORDS = {"teff": "Teff", "logg": "logg", "feh": "[Fe/H]"}
#: Fewest stars a pull robust sigma is quoted from.
MIN_STARS = 3


def uncertainty_statement(uncertainty: dict[str, Any] | None) -> str:
    """One sentence: which errors the catalog reports (its ``uncertainty`` metadata: requested, used, reason)."""
    if not uncertainty:
        return ("The catalog's metadata does not say which errors it reports (a catalog written before xpcat "
                "recorded it).")
    used, requested = uncertainty.get("used"), uncertainty.get("requested")
    kind = {"calibrated": "the calibrated errors (Fisher covariance plus the learned model error)",
            "paper": "the paper's errors (Fisher covariance only)"}.get(str(used), f"{used!r} errors")
    if requested is not None and requested != used:
        why = uncertainty.get("reason") or "no reason recorded"
        return f"The catalog reports {kind}: [inference] uncertainty asked for {requested!r}, but {why}."
    return f"The catalog reports {kind}, as [inference] uncertainty = {requested!r} asks."


def error_calibration(data: ReportData, g_mag: np.ndarray, uncertainty: dict[str, Any] | None) -> dict[str, Any]:
    """Are the reported error bars calibrated against the run's reference?

    Parameters
    ----------
    data : ReportData
        Estimates, errors and reference. Against a truth the 5 parameters
        (reference error 0); against labels Teff, [Fe/H], logg with the label
        errors added in quadrature. Stars: basic cut, converged, finite
        residuals and positive finite errors.
    g_mag : (n,) float64
        G of each catalog row (mag; NaN where unknown): the G bins are left out when no used star has one.
    uncertainty : dict or None
        The catalog's ``uncertainty`` metadata (requested / used / reason / summary).

    Returns
    -------
    dict
        :func:`~xpcat.model.model_error.pull_calibration`'s result (per parameter
        under its names ``teff, feh, logg, e, plx``; ``bins`` per G, E, Teff)
        plus ``reference``, ``parameters`` (those names), ``stars``, ``selection``, ``bin_values``,
        ``uncertainty`` (the metadata) and ``uncertainty_statement``. With fewer
        than :data:`MIN_STARS` stars ``calibrated`` is None and the statement says so.
    """
    k = 5 if data.ref_kind == "truth" else 3
    names = PARAM_NAMES[:k]
    resid = np.column_stack([data.est[:, j] - data.ref[p] for j, p in enumerate(names)])
    err = data.err[:, :k]
    ref_err = None if k == 5 else np.column_stack([data.ref[f"{p}_error"] for p in names])
    rows = (data.basic & (data.fit_status == 0) & np.all(np.isfinite(resid), axis=1)
            & np.all(np.isfinite(err) & (err > 0), axis=1))
    if ref_err is not None:
        rows &= np.all(np.isfinite(ref_err) & (ref_err >= 0), axis=1)
        ref_err = ref_err[rows]
    g = np.asarray(g_mag, dtype=np.float64)[rows]
    e_ref = data.ref_kind == "truth"  # a prior (labels' run) is no better a bin value than the estimate
    e_bin = np.asarray(data.ref["extinction"])[rows] if e_ref else data.est[rows, 3]
    bins = {"E": (e_bin, CALIBRATION_BINS["E"]), "Teff": (data.ref["teff"][rows], CALIBRATION_BINS["Teff"])}
    if np.isfinite(g).any():
        bins = {"G": (g, CALIBRATION_BINS["G"]), **bins}
    out = pull_calibration(resid[rows], err[rows], ref_err, bins=bins, band=PULL_SIGMA_BAND)
    n = int(rows.sum())
    if n < MIN_STARS:
        out["calibrated"] = None
        out["statement"] = (f"The error bars cannot be judged: only {n} basic-cut stars with a converged fit "
                            f"have a reference value.")
    out.update({
        "reference": data.ref_kind,
        "parameters": list(PARAMS[:k]),
        "stars": n,
        "selection": ("basic cut (quality_flags < 8), converged, finite residual and error; pull = residual / "
                      "sqrt(err_est^2 + err_ref^2), err_ref = 0 for a truth"),
        "bin_values": {b: BIN_VALUES["E_estimate" if b == "E" and not e_ref else b] for b in bins},
        "uncertainty": uncertainty,
        "uncertainty_statement": uncertainty_statement(uncertainty),
    })
    logger.info("report: %s", out["statement"])
    return out


def _fraction(bad: np.ndarray, ok: np.ndarray) -> dict[str, Any]:
    """``{"n", "failures", "fraction"}`` of the ``ok`` stars (fraction None without stars)."""
    n, k = int(ok.sum()), int((bad & ok).sum())
    return {"n": n, "failures": k, "fraction": k / n if n else None}


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f} %"


def catastrophic_rows(est: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
                      cuts: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per cut, the stars off the reference by more than :data:`CATASTROPHIC_THRESHOLDS`.

    Parameters
    ----------
    est, ref : ``{"teff": (n,) [K], "logg": (n,) [dex], "feh": (n,) [dex]}``: estimates and reference values
        (NaN where unknown).
    cuts : ``{name: (n,) bool}``.

    Returns
    -------
    ``{name: {"stars", "teff", "logg", "feh", "any": {"n", "failures", "fraction"}}}``, ``n`` counting the cut's
    stars with a finite estimate and reference (all three for ``any``).
    """
    off, finite = {}, {}
    for p, limit in CATASTROPHIC_THRESHOLDS.items():
        res = np.asarray(est[p], dtype=np.float64) - np.asarray(ref[p], dtype=np.float64)
        finite[p] = np.isfinite(res)
        off[p] = finite[p] & (np.abs(np.where(finite[p], res, 0.0)) > limit)
    all_finite = np.all([finite[p] for p in off], axis=0)
    any_off = np.any([off[p] for p in off], axis=0)
    return {cut: {"stars": int(m.sum()), **{p: _fraction(off[p], m & finite[p]) for p in off},
                  "any": _fraction(any_off, m & all_finite)} for cut, m in cuts.items()}


def catastrophic_failures(data: ReportData, g_mag: np.ndarray | None = None) -> dict[str, Any]:
    """Per cut, the fraction of converged stars with a catastrophic Teff, logg or [Fe/H].

    Parameters
    ----------
    data : ReportData
        Estimates (Teff in K) and the reference (truth or labels).
    g_mag : (n,) float64, optional
        phot_g_mean_mag of the same stars (NaN where unknown): the strict cut's
        failures are then also given per G bin (``CALIBRATION_BINS["G"]``), where
        most of them lie at the faint end.

    Returns
    -------
    dict
        ``thresholds`` (:data:`CATASTROPHIC_THRESHOLDS` with ``units``), ``cuts``:
        per cut (all converged; basic; strict; basic + confident in Teff, [Fe/H],
        logg) ``{"stars", "teff", "logg", "feh", "any": {"n", "failures",
        "fraction"}}`` where ``n`` counts the cut's stars with a finite estimate
        and reference (all three for ``any``), ``strict_by_G`` (with ``g_mag``:
        a list of ``{"lo", "hi", "stars", "teff", "logg", "feh", "any"}`` rows
        over the G bins holding strict-cut stars, else None), and
        ``statements``: one sentence per cut, then one for the G bins.
    """
    conv = data.fit_status == 0
    conf = data.confidence > CONFIDENCE_THRESHOLD
    b = data.basic & conv
    cuts = {
        "all converged": conv,
        "basic cut": b,
        "strict cut (quality_flags == 0)": conv & (data.quality_flags == 0),
        "basic cut + confident in Teff": b & conf[:, 0],
        "basic cut + confident in [Fe/H]": b & conf[:, 1],
        "basic cut + confident in logg": b & conf[:, 2],
    }
    est = {p: data.est[:, PARAM_NAMES.index(p)] for p in CATASTROPHIC_THRESHOLDS}
    rows = catastrophic_rows(est, data.ref, cuts)
    statements = []
    for cut, row in rows.items():
        parts = ", ".join(f"{_percent(row[p]['fraction'])} in {WORDS[p]}" for p in CATASTROPHIC_THRESHOLDS)
        if row["any"]["n"] == 0:
            statements.append(f"{cut}: no star with a reference value ({row['stars']} stars in the cut).")
        else:
            statements.append(f"{cut}: {_percent(row['any']['fraction'])} of {row['any']['n']} stars are "
                              f"catastrophic failures ({parts}).")
    by_g = None
    if g_mag is not None:
        g = np.asarray(g_mag, dtype=np.float64)
        strict = cuts["strict cut (quality_flags == 0)"]
        edges = CALIBRATION_BINS["G"]
        bins = {(lo, hi): strict & (g >= lo) & (g < hi) for lo, hi in zip(edges[:-1], edges[1:])}
        by_g = [{"lo": lo, "hi": hi, **row}
                for (lo, hi), row in catastrophic_rows(est, data.ref, {k: m for k, m in bins.items() if m.any()}).items()]
        parts = [f"G {r['lo']:g}-{r['hi']:g}: {_percent(r['any']['fraction'])} of {r['any']['n']}" for r in by_g
                 if r["any"]["n"]]
        if parts:
            statements.append("strict cut by G (catastrophic in any of the three): " + ", ".join(parts) + ".")
    units = {"teff": "K", "logg": "dex", "feh": "dex"}
    definition = " or ".join(f"|{WORDS[p]} - reference| > {v:g} {units[p]}" for p, v in CATASTROPHIC_THRESHOLDS.items())
    return {"thresholds": dict(CATASTROPHIC_THRESHOLDS, units=units), "reference": data.ref_kind,
            "selection": "converged stars of each cut", "definition": definition, "cuts": rows,
            "strict_by_G": by_g, "statements": statements}

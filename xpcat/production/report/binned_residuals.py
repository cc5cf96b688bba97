"""Residuals against the reference in bins of the reference value (the numbers of the paper's Figs. 7 and 16).

Residual = estimate - reference, in report units (Teff K, [Fe/H] dex, logg
dex, E mag, parallax mas); the reference is the labels (LAMOST / APOGEE-like
Teff, [Fe/H], logg; the reddening table's E; Gaia's parallax) or, for a
synthetic run, the truth. Per bin of the reference value: the number of stars,
the median, the robust sigma (1.4826 MAD) and the 15th / 84th percentiles.

Selections (each also needs a finite residual):

- ``validation`` (Fig. 7, Sec. 4.4): converged fit, chi2_opt / 61 <= 5, and
  parallax / s_parallax >= 5 for a star with a usable reference parallax
  (finite, s > 0; a star without one, SPEC 1.4, is kept);
- ``converged``: every converged fit;
- ``basic``: basic cut (quality_flags < 8), converged;
- ``basic_confident``: basic cut and confidence > 0.5 in the parameter (Fig. 16's selection);
- ``strict``: quality_flags == 0, converged.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xpcat.catalog_schema import PARAM_NAMES
from xpcat.catalog_schema.flags import CONFIDENCE_THRESHOLD
from xpcat.production.report.data import ReportData
from xpcat.production.report.statistics import finite_median, robust_sigma

logger = logging.getLogger(__name__)

__all__ = [
    "BIN_EDGES",
    "FIG7_PARAMS",
    "FIG16_PARAMS",
    "FIG16_SELECTIONS",
    "MIN_BIN_STARS",
    "SELECTIONS",
    "VALIDATION_CHI2_PER_DOF",
    "VALIDATION_PARALLAX_SNR",
    "binned_residual_numbers",
    "binned_statistics",
    "selection",
]

#: Bin edges of the reference value per parameter, report units (fixed, so runs compare bin by bin).
BIN_EDGES = {
    "teff": np.linspace(3000.0, 10000.0, 15),
    "feh": np.linspace(-2.5, 0.75, 14),
    "logg": np.linspace(0.0, 5.5, 12),
    "extinction": np.linspace(0.0, 1.6, 17),
    "parallax": np.linspace(0.0, 5.0, 11),
}
#: Fewest stars in a bin for its median, sigma and percentiles (NaN below).
MIN_BIN_STARS = 5
#: Fig. 7's fit-quality cut: chi2_opt / DOF <= 5, DOF = the 61 XP samples (as quality_flags bit 3).
VALIDATION_CHI2_PER_DOF = 5.0
#: Fig. 7's parallax cut: parallax / s_parallax >= 5 (stars with a usable reference parallax).
VALIDATION_PARALLAX_SNR = 5.0
#: Parameters of Fig. 7 and of Fig. 16.
FIG7_PARAMS = tuple(PARAM_NAMES)
FIG16_PARAMS = ("teff", "feh", "logg")
#: Selection name -> what it is, in words (the page and validation.json quote it).
SELECTIONS = {
    "validation": "converged, chi2_opt/61 <= 5, parallax/s_parallax >= 5 where a parallax is known (Fig. 7)",
    "converged": "every converged fit",
    "basic": "basic cut (quality_flags < 8)",
    "basic_confident": "basic cut and confidence > 0.5 in the parameter (Fig. 16)",
    "strict": "strict cut (quality_flags == 0)",
}
#: The selections Fig. 16's rows show.
FIG16_SELECTIONS = ("converged", "basic", "basic_confident", "strict")
#: Degrees of freedom of chi2_opt in the fit-quality cut.
N_DOF = 61


def selection(data: ReportData, name: str, j: int) -> np.ndarray:
    """(n,) bool: the rows of selection ``name`` (:data:`SELECTIONS`) for parameter ``j`` with a finite residual."""
    p = PARAM_NAMES[j]
    res = data.est[:, j] - data.ref[p]
    converged = (data.fit_status == 0) & np.isfinite(res)
    if name == "validation":
        plx, s = data.ref["parallax"], data.ref["parallax_error"]
        with np.errstate(invalid="ignore", divide="ignore"):
            usable = np.isfinite(plx) & np.isfinite(s) & (s > 0)
            good_plx = ~usable | (plx / np.where(usable, s, 1.0) >= VALIDATION_PARALLAX_SNR)
            good_fit = data.chi2 / N_DOF <= VALIDATION_CHI2_PER_DOF
        return converged & good_plx & good_fit
    if name == "converged":
        return converged
    if name == "basic":
        return converged & data.basic
    if name == "basic_confident":
        if j >= data.confidence.shape[1]:
            raise ValueError(f"no confidence for parameter {p}")
        return converged & data.basic & (data.confidence[:, j] > CONFIDENCE_THRESHOLD)
    if name == "strict":
        return converged & (data.quality_flags == 0)
    raise ValueError(f"unknown selection {name!r}; known: {sorted(SELECTIONS)}")


def binned_statistics(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """Statistics of ``y`` in bins of ``x``.

    Parameters
    ----------
    x, y : (m,) float arrays
        Reference value and residual (non-finite pairs are ignored).
    edges : (k + 1,) increasing array
        Bin edges; bins are [lo, hi), the last [lo, hi].

    Returns
    -------
    dict
        ``bin_edges`` (k + 1), ``bin_centers``, ``n`` (k ints), ``median``,
        ``robust_sigma``, ``p15``, ``p84`` (k floats, NaN in a bin with fewer
        than :data:`MIN_BIN_STARS` stars), and over all finite pairs (in or out
        of the bins) ``n_total``, ``median_total``, ``robust_sigma_total``.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    edges = np.asarray(edges, np.float64)
    k = edges.size - 1
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, k - 1)
    inside = (x >= edges[0]) & (x <= edges[-1])
    out: dict[str, Any] = {"bin_edges": edges.tolist(), "bin_centers": (0.5 * (edges[:-1] + edges[1:])).tolist(),
                           "n": [], "median": [], "robust_sigma": [], "p15": [], "p84": []}
    for b in range(k):
        yb = y[inside & (idx == b)]
        out["n"].append(int(yb.size))
        if yb.size >= MIN_BIN_STARS:
            p15, p84 = np.percentile(yb, [15, 84])
            out["median"].append(float(np.median(yb)))
            out["robust_sigma"].append(robust_sigma(yb))
        else:
            p15 = p84 = float("nan")
            out["median"].append(float("nan"))
            out["robust_sigma"].append(float("nan"))
        out["p15"].append(float(p15))
        out["p84"].append(float(p84))
    out.update(n_total=int(y.size), median_total=finite_median(y), robust_sigma_total=robust_sigma(y))
    return out


def binned_residual_numbers(data: ReportData) -> dict[str, Any]:
    """validation.json's ``binned_residuals``: Fig. 7's and Fig. 16's numbers.

    Returns
    -------
    dict
        ``reference`` (``"truth"`` | ``"labels"``), ``units``, ``selections``
        (name -> words), ``min_bin_stars``, ``fig7`` (``{param:
        binned_statistics}`` for the 5 parameters, ``validation`` selection)
        and ``fig16`` (``{selection: {param: binned_statistics}}`` for Teff,
        [Fe/H], logg and the selections of :data:`FIG16_SELECTIONS`).
    """
    def stats(name: str, p: str) -> dict[str, Any]:
        j = PARAM_NAMES.index(p)
        m = selection(data, name, j)
        return binned_statistics(data.ref[p][m], data.est[m, j] - data.ref[p][m], BIN_EDGES[p])

    out: dict[str, Any] = {
        "reference": data.ref_kind,
        "units": {"teff": "K", "feh": "dex", "logg": "dex", "extinction": "mag", "parallax": "mas"},
        "selections": dict(SELECTIONS),
        "min_bin_stars": MIN_BIN_STARS,
        "fig7": {p: stats("validation", p) for p in FIG7_PARAMS},
        "fig16": {s: {p: stats(s, p) for p in FIG16_PARAMS} for s in FIG16_SELECTIONS},
    }
    n7 = out["fig7"]["teff"]["n_total"]
    logger.debug("binned residuals: %d stars in Fig. 7's selection (teff)", n7)
    return out

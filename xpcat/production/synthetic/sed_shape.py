"""The shape distance between two XP spectra: rms after fitting out a scale and a reddening slope.

Issue 16's figure of merit for the truth SED. For two spectra sampled at the
same wavelengths (xpcat's 61 XP samples, 392..992 nm), the residual
``d(lambda) = ln f_1 - ln f_2`` is fitted by least squares with
``a + b k(lambda)``, where ``k(lambda) = A(lambda)/E`` is the universe's
extinction law (G23 at R_V = 3.1, :func:`~xpcat.production.synthetic.truth_sed.extinction_coefficients`):
``a`` absorbs distance and radius, ``b`` a difference in E. The shape rms is
the rms of what is left (a fraction: ``0.03`` = 3 %).

:func:`real_pair_floor` gives the real-vs-real floor: each real star against
its nearest real neighbour in (Teff, logg, [Fe/H]) when that neighbour is
within the labels' own precision, i.e. how different two real spectra at the
same labels are.
"""

from __future__ import annotations

import logging

import numpy as np

from xpcat.production.synthetic import truth_sed as truth_model

__all__ = ["PAIR_SCALES", "TEFF_RANGES_K", "extinction_slope", "real_pair_floor", "shape_rms", "teff_range_medians"]

logger = logging.getLogger(__name__)

#: Teff ranges [K) over which the figure of merit is reported (the library's coverage at low extinction).
TEFF_RANGES_K = ((3000.0, 4000.0), (4000.0, 5000.0), (5000.0, 6000.0), (6000.0, 7000.0))
#: Label distance scales of a "same labels" pair: Teff [K], logg [dex], [Fe/H] [dex] (about APOGEE's precision).
PAIR_SCALES = (50.0, 0.1, 0.05)


def extinction_slope(wavelengths_nm: np.ndarray) -> np.ndarray:
    """k(lambda) = A(lambda)/E of the universe's law at R_V = 3.1, (m,) mag per unit E."""
    a, b = truth_model.extinction_coefficients(np.asarray(wavelengths_nm, float))
    return truth_model.a_over_e(a, b, truth_model.R_V_REFERENCE)


def shape_rms(flux_1: np.ndarray, flux_2: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """rms of ``ln f_1 - ln f_2`` after a least-squares fit of ``a + b slope``.

    Parameters
    ----------
    flux_1, flux_2 : (n, m) positive fluxes at the same m wavelengths (any units, each row its own scale)
    slope : (m,) the reddening slope, :func:`extinction_slope`

    Returns
    -------
    (n,) float64, the shape rms as a fraction; NaN for a row with a non-positive or non-finite flux.
    """
    f1 = np.atleast_2d(np.asarray(flux_1, float))
    f2 = np.atleast_2d(np.asarray(flux_2, float))
    if f1.shape != f2.shape or f1.shape[1] != np.size(slope):
        raise ValueError(f"shape_rms needs two (n, m) arrays and an (m,) slope; got {f1.shape}, {f2.shape}, {np.shape(slope)}")
    good = np.all(np.isfinite(f1) & np.isfinite(f2) & (f1 > 0) & (f2 > 0), axis=1)
    d = np.log(np.where(good[:, None], f1, 1.0)) - np.log(np.where(good[:, None], f2, 1.0))
    design = np.stack([np.ones(np.size(slope)), np.asarray(slope, float)], axis=1)
    coef, *_ = np.linalg.lstsq(design, d.T, rcond=None)
    resid = d - (design @ coef).T
    return np.where(good, np.sqrt(np.mean(resid**2, axis=1)), np.nan)


def real_pair_floor(flux: np.ndarray, labels: np.ndarray, slope: np.ndarray, max_distance: float = 1.0) -> np.ndarray:
    """Shape rms of each real star against its nearest real neighbour at the same labels.

    Parameters
    ----------
    flux : (n, m) real spectra
    labels : (n, 3) Teff [K], logg [dex], [Fe/H] [dex]
    slope : (m,) :func:`extinction_slope`
    max_distance : float
        Largest label distance of a pair, in units of :data:`PAIR_SCALES` (quadrature sum).

    Returns
    -------
    (n,) float64: the pair's shape rms; NaN where no neighbour is that close.
    """
    from scipy.spatial import cKDTree

    x = np.asarray(labels, float) / np.asarray(PAIR_SCALES)
    if x.shape[0] < 2:
        return np.full(x.shape[0], np.nan)
    dist, idx = cKDTree(x).query(x, k=2)
    near = dist[:, 1] <= max_distance
    out = np.full(x.shape[0], np.nan)
    if near.any():
        out[near] = shape_rms(flux[near], flux[idx[near, 1]], slope)
    return out


def teff_range_medians(rms: np.ndarray, teff: np.ndarray) -> dict[str, dict[str, float]]:
    """Median of ``rms`` per :data:`TEFF_RANGES_K` range: ``{"4000-5000": {"n": .., "median": ..}}`` (NaNs skipped)."""
    out: dict[str, dict[str, float]] = {}
    for lo, hi in TEFF_RANGES_K:
        sel = (teff >= lo) & (teff < hi) & np.isfinite(rms)
        out[f"{lo:.0f}-{hi:.0f}"] = {"n": int(sel.sum()), "median": float(np.median(rms[sel])) if sel.any() else float("nan")}
    return out

"""Inputs of the confidence classifiers (Sec. 4.4, Appendix B): the feature matrix and the training labels.

Labels come from

    chi^2_eps = dx^2 / (s_opt^2 + s_ref^2 + eps^2)

(good when < 4, bad when > 9, unused in between; eps = 100 K for Teff,
0.1 dex otherwise).

Features (Appendix B), in the order of :data:`FEATURE_NAMES`: ln_rchi2_opt,
ln_dplx2, ln_prior, the three estimates and their errors, asinh SNRs of the
Gaia parallax and G, BP, RP fluxes, ln phot_bp_rp_excess_factor,
phot_g_mean_mag, ln ruwe, fidelity_v2, norm_dg, ln bp/rp chi_squared, and
asinh((f_pred - f_obs) / s_f) at each of the 66 flux samples.
ln_X = ln(max(X, 1e-7)).

Missing values: a star whose fit-derived features (:data:`CORE_FEATURES`) are
not all finite gets NaN confidences (:mod:`xpcat.model.confidence`). Other
missing Gaia columns (e.g. no fidelity_v2) are replaced by the training-set
median of that feature; a missing flux sample (NaN flux or infinite error)
contributes a residual of 0.

Pure array code: numpy only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from xpcat.catalog_schema.conditioned import N_FLUX, N_XP

logger = logging.getLogger(__name__)

__all__ = [
    "PARAMETERS",
    "EPSILON",
    "GOOD_CHI2",
    "BAD_CHI2",
    "LN_FLOOR",
    "N_FLUX",
    "SCALAR_FEATURES",
    "FEATURE_NAMES",
    "N_FEATURES",
    "CORE_FEATURES",
    "chi2_eps",
    "chi2_eps_labels",
    "confidence_features",
]

#: The three classified parameters, in catalog order.
PARAMETERS = ("teff", "feh", "logg")
#: Uncertainty floor eps of chi^2_eps, in the units of the residuals (Teff in K).
EPSILON = {"teff": 100.0, "feh": 0.1, "logg": 0.1}
#: chi^2_eps below which an estimate is labelled good.
GOOD_CHI2 = 4.0
#: chi^2_eps above which an estimate is labelled bad.
BAD_CHI2 = 9.0
#: Floor of the ln_X features: ln(max(X, LN_FLOOR)).
LN_FLOOR = 1e-7
#: Number of flux samples (61 XP + J H Ks W1 W2).

#: Scalar features of Appendix B, in order.
SCALAR_FEATURES = (
    "ln_rchi2_opt",
    "ln_dplx2",
    "ln_prior",
    "teff_est",
    "logg_est",
    "feh_est",
    "teff_est_err",
    "logg_est_err",
    "feh_est_err",
    "asinh_plx_snr",
    "asinh_g_snr",
    "asinh_bp_snr",
    "asinh_rp_snr",
    "ln_phot_bp_rp_excess_factor",
    "phot_g_mean_mag",
    "ln_ruwe",
    "fidelity_v2",
    "norm_dg",
    "ln_bp_chi_squared",
    "ln_rp_chi_squared",
)
#: All feature names: the scalars then asinh residuals ``asinh_dflux_00`` .. ``asinh_dflux_65``.
FEATURE_NAMES = SCALAR_FEATURES + tuple(f"asinh_dflux_{i:02d}" for i in range(N_FLUX))
#: Length of a feature vector.
N_FEATURES = len(FEATURE_NAMES)
#: Features that come from the fit: when one is not finite the confidence is NaN.
CORE_FEATURES = ("ln_rchi2_opt", "ln_prior", "teff_est", "logg_est", "feh_est", "teff_est_err", "logg_est_err", "feh_est_err")


# --------------------------------------------------------------------------- labels


def chi2_eps(est: np.ndarray, est_err: np.ndarray, ref: np.ndarray, ref_err: np.ndarray, eps: float) -> np.ndarray:
    """chi^2_eps = (est - ref)^2 / (est_err^2 + ref_err^2 + eps^2) (Sec. 4.4).

    Parameters
    ----------
    est, est_err : (n,) arrays
        Estimate and its uncertainty (same unit as ``ref``; Teff in K).
    ref, ref_err : (n,) arrays
        Reference value (LAMOST or truth) and its uncertainty (0 for truth).
    eps : float
        Uncertainty floor, same unit.

    Returns
    -------
    (n,) float64 array (NaN where any input is not finite).
    """
    est, est_err, ref, ref_err = (np.asarray(a, dtype=np.float64) for a in (est, est_err, ref, ref_err))
    return (est - ref) ** 2 / (est_err**2 + ref_err**2 + eps**2)


def chi2_eps_labels(chi2: np.ndarray, good: float = GOOD_CHI2, bad: float = BAD_CHI2) -> np.ndarray:
    """Training labels from chi^2_eps: 1.0 good (< ``good``), 0.0 bad (> ``bad``), NaN otherwise.

    Parameters
    ----------
    chi2 : (n,) array of chi^2_eps.

    Returns
    -------
    (n,) float64 array with values 1, 0 or NaN (between the thresholds, or chi^2 not finite).
    """
    chi2 = np.asarray(chi2, dtype=np.float64)
    y = np.full(chi2.shape, np.nan)
    y[chi2 < good] = 1.0
    y[chi2 > bad] = 0.0
    return y


# --------------------------------------------------------------------------- features


def _ln(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.log(np.maximum(np.asarray(x, dtype=np.float64), LN_FLOOR))


def _col(conditioned: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    if name not in conditioned:
        raise KeyError(f"confidence_features: conditioned data lack the column {name!r} (have {sorted(conditioned)})")
    a = np.asarray(conditioned[name], dtype=np.float64)
    if a.shape[0] != n:
        raise ValueError(f"confidence_features: column {name!r} has {a.shape[0]} rows, the fit has {n}")
    return a


def confidence_features(fit: Mapping[str, Any], conditioned: Mapping[str, Any]) -> np.ndarray:
    """The Appendix B feature matrix of a batch of fitted stars.

    Parameters
    ----------
    fit : mapping
        Output of inference for ``n`` stars: ``params5`` (n, 5) in catalog
        order and units (Teff kK, [Fe/H] dex, logg dex, E mag, parallax mas),
        ``cov5`` (n, 5, 5) or ``err5`` (n, 5) (same units), ``chi2`` (n,),
        ``ln_prior`` (n,), ``f_pred`` (n, 66) in the internal flux unit.
    conditioned : mapping
        The same stars' conditioned columns (schema ``CONDITIONED``):
        ``flux``, ``flux_error`` (n, 66) internal unit (NaN / inf where missing),
        ``parallax``, ``parallax_error`` [mas], ``phot_g_mean_mag`` [mag],
        ``phot_{g,bp,rp}_mean_flux_over_error``, ``phot_bp_rp_excess_factor``,
        ``ruwe``, ``fidelity_v2``, ``norm_dg``, ``bp_chi_squared``,
        ``rp_chi_squared`` and optionally ``n_valid_flux`` (n,).

    Returns
    -------
    (n, N_FEATURES) float64 array, columns as :data:`FEATURE_NAMES`; NaN where
    an input is missing.

    Notes
    -----
    ln_rchi2_opt = ln(chi2 / max(n_valid_flux - 5, 1)) when ``n_valid_flux``
    is given, else ln(chi2 / 61) (the quality-flag convention). ln_dplx2 =
    ln(((plx_gaia - plx_est) / s_plx_gaia)^2).
    """
    params5 = np.asarray(fit["params5"], dtype=np.float64)
    if params5.ndim != 2 or params5.shape[1] != 5:
        raise ValueError(f"confidence_features: params5 must be (n, 5), got shape {params5.shape}")
    n = params5.shape[0]
    if "err5" in fit:
        err5 = np.asarray(fit["err5"], dtype=np.float64)
    elif "cov5" in fit:
        cov5 = np.asarray(fit["cov5"], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            err5 = np.sqrt(np.einsum("nii->ni", cov5))
    else:
        raise KeyError("confidence_features: the fit needs 'cov5' (n, 5, 5) or 'err5' (n, 5)")
    chi2 = np.asarray(fit["chi2"], dtype=np.float64)
    ln_prior = np.asarray(fit["ln_prior"], dtype=np.float64)
    f_pred = np.asarray(fit["f_pred"], dtype=np.float64)
    if f_pred.shape != (n, N_FLUX):
        raise ValueError(f"confidence_features: f_pred must be ({n}, {N_FLUX}), got {f_pred.shape}")

    flux = _col(conditioned, "flux", n)
    flux_error = _col(conditioned, "flux_error", n)
    plx = _col(conditioned, "parallax", n)
    plx_err = _col(conditioned, "parallax_error", n)
    if "n_valid_flux" in conditioned:
        dof = np.maximum(_col(conditioned, "n_valid_flux", n) - 5.0, 1.0)
    else:
        dof = np.full(n, float(N_XP))

    with np.errstate(invalid="ignore", divide="ignore"):
        scal = {
            "ln_rchi2_opt": _ln(chi2 / dof),
            "ln_dplx2": _ln(((plx - params5[:, 4]) / plx_err) ** 2),
            "ln_prior": ln_prior,
            "teff_est": params5[:, 0],
            "logg_est": params5[:, 2],
            "feh_est": params5[:, 1],
            "teff_est_err": err5[:, 0],
            "logg_est_err": err5[:, 2],
            "feh_est_err": err5[:, 1],
            "asinh_plx_snr": np.arcsinh(plx / plx_err),
            "asinh_g_snr": np.arcsinh(_col(conditioned, "phot_g_mean_flux_over_error", n)),
            "asinh_bp_snr": np.arcsinh(_col(conditioned, "phot_bp_mean_flux_over_error", n)),
            "asinh_rp_snr": np.arcsinh(_col(conditioned, "phot_rp_mean_flux_over_error", n)),
            "ln_phot_bp_rp_excess_factor": _ln(_col(conditioned, "phot_bp_rp_excess_factor", n)),
            "phot_g_mean_mag": _col(conditioned, "phot_g_mean_mag", n),
            "ln_ruwe": _ln(_col(conditioned, "ruwe", n)),
            "fidelity_v2": _col(conditioned, "fidelity_v2", n),
            "norm_dg": _col(conditioned, "norm_dg", n),
            "ln_bp_chi_squared": _ln(_col(conditioned, "bp_chi_squared", n)),
            "ln_rp_chi_squared": _ln(_col(conditioned, "rp_chi_squared", n)),
        }
        # a missing input in a ln_X feature must stay missing (max(NaN, floor) is NaN already)
        usable = np.isfinite(flux) & np.isfinite(flux_error) & (flux_error > 0)
        dflux = np.where(usable, np.arcsinh((f_pred - flux) / np.where(usable, flux_error, 1.0)), 0.0)
    # a star with no fit at all has NaN residuals, not zeros
    dflux = np.where(np.all(np.isfinite(f_pred), axis=1, keepdims=True), dflux, np.nan)
    out = np.empty((n, N_FEATURES), dtype=np.float64)
    for i, name in enumerate(SCALAR_FEATURES):
        out[:, i] = scal[name]
    out[:, len(SCALAR_FEATURES) :] = dflux
    out[~np.isfinite(out)] = np.nan
    return out

"""Uncertainties (Sec. 4.3, SPEC §5) and the quality flags (SPEC §6) of fitted stars.

The Fisher information is computed in the *reported* parameters
p = (Teff [kK], [Fe/H] [dex], logg [dex], E [mag], plx [mas]) (catalog order)::

    I = J^T C^-1 J + diag(0, 0, 0, 0, 1 / s_plx^2),   J = d f_pred / d p

with C^-1 = R^T R the star's conditioned precision. The GMM prior is not
included (SPEC §5). The covariance is I^-1 computed from the eigen-decomposition
of I with eigenvalues clamped at ``1e-12 * max(eigenvalue)`` (and a tiny absolute
floor), so it is symmetric positive semi-definite even for nearly degenerate fits.
The whitened Jacobian ``R J`` comes from JAX (forward mode, the fit's dtype); the
5 x 5 products and the inversion are done in float64.
"""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.catalog_schema import flags as qf
from xpcat.catalog_schema.conditioned import N_XP
from xpcat.model.objective import Objective, StarData

__all__ = [
    "PARAM_ORDER_FROM_X",
    "whitened_jacobian",
    "fisher_covariance",
    "psd_inverse",
    "params5_from_x",
    "quality_flag_bits",
    "placeholder_confidence_bits",
    "PLACEHOLDER_CONFIDENCE_RULE",
]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: Column of the internal variables feeding each reported parameter (E and plx swap places).
PARAM_ORDER_FROM_X = (0, 1, 2, 4, 3)
_REL_EIG_FLOOR = 1e-12
_ABS_EIG_FLOOR = 1e-30

#: The documented rule for quality_flags bits 0-2 while the model has no confidence classifiers.
PLACEHOLDER_CONFIDENCE_RULE = (
    "no confidence classifiers in the model artifact: teff/feh/logg_confidence are null and "
    "quality_flags bits 0-2 are all set exactly when fit_status != 0 (not converged or no usable data)"
)


@partial(jax.jit, static_argnums=(0,))
def _rj_jit(obj: Objective, x: JAXArray, stars: StarData) -> JAXArray:
    def one(xi, star):
        jac = jax.jacfwd(lambda z: star.factor @ obj.predict(z))(xi)  # (66, 5) in internal variables
        # chain rule to reported parameters: d/dplx = d/dln plx / plx, d/dE = d/dln E / E
        conv = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0], xi.dtype).at[3].set(jnp.exp(-xi[3])).at[4].set(jnp.exp(-xi[4]))
        jac = jac * conv[None, :]
        return jac[:, jnp.asarray(PARAM_ORDER_FROM_X)]

    return jax.vmap(one)(x, stars)


def whitened_jacobian(obj: Objective, x: JAXArray, stars: StarData) -> np.ndarray:
    """R dF/dp at the internal variables x for m stars.

    Returns
    -------
    (m, 66, 5) float64 array, reported-parameter order (Teff kK, [Fe/H], logg, E, plx).
    """
    return np.asarray(_rj_jit(obj, x, stars), dtype=np.float64)


def fisher_covariance(rj: np.ndarray, inv_plx_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fisher matrix and its PSD-safe inverse.

    Parameters
    ----------
    rj : (m, 66, 5) whitened Jacobian in reported parameters.
    inv_plx_err : (m,) 1 / s_plx [1/mas], 0 where the parallax is not used.

    Returns
    -------
    icov : (m, 5, 5) float64 Fisher information (symmetric).
    cov : (m, 5, 5) float64 covariance, symmetric positive semi-definite; NaN for
        stars whose Fisher matrix is not finite.
    """
    rj = np.asarray(rj, dtype=np.float64)
    icov = np.einsum("mki,mkj->mij", rj, rj)
    icov[:, 4, 4] += np.asarray(inv_plx_err, dtype=np.float64) ** 2
    icov = 0.5 * (icov + np.swapaxes(icov, 1, 2))
    return icov, psd_inverse(icov)


def psd_inverse(mat: np.ndarray) -> np.ndarray:
    """Inverse of symmetric positive semi-definite matrices, stable for nearly singular ones.

    Parameters
    ----------
    mat : (m, k, k) symmetric matrices.

    Returns
    -------
    (m, k, k) float64: the inverse from the eigen-decomposition with eigenvalues
    clamped at ``1e-12 * max |eigenvalue|`` (and a tiny absolute floor), so it is
    symmetric positive semi-definite; NaN where ``mat`` is not finite.
    """
    mat = np.asarray(mat, dtype=np.float64)
    finite = np.all(np.isfinite(mat), axis=(1, 2))
    out = np.full_like(mat, np.nan)
    if finite.any():
        ev, vec = np.linalg.eigh(mat[finite])
        floor = np.maximum(_REL_EIG_FLOOR * np.max(np.abs(ev), axis=1, keepdims=True), _ABS_EIG_FLOOR)
        inv = 1.0 / np.maximum(ev, floor)
        c = np.einsum("mik,mk,mjk->mij", vec, inv, vec)
        out[finite] = 0.5 * (c + np.swapaxes(c, 1, 2))
    return out


def params5_from_x(x: np.ndarray) -> np.ndarray:
    """(m, 5) internal variables -> (m, 5) reported (Teff kK, [Fe/H], logg, E mag, plx mas)."""
    x = np.asarray(x, dtype=np.float64)
    return np.column_stack([x[:, 0], x[:, 1], x[:, 2], np.exp(x[:, 4]), np.exp(x[:, 3])])


def quality_flag_bits(chi2: np.ndarray, ln_prior: np.ndarray, plx_est: np.ndarray, plx_obs: np.ndarray,
                      plx_err: np.ndarray, ln_prior_cut: float) -> np.ndarray:
    """quality_flags bits 3-5 (SPEC §6).

    Parameters
    ----------
    chi2 : (m,) chi^2 of the fluxes at the optimum (NaN when undefined).
    ln_prior : (m,) ln p_gmm at the optimum.
    plx_est : (m,) fitted parallax [mas].
    plx_obs, plx_err : (m,) Gaia parallax and error [mas]; NaN / non-positive error = missing.
    ln_prior_cut : float
        The level of ln p_gmm enclosing 99.9 % of the fitted mixture
        (:attr:`xpcat.model.prior.GMMParams.ln_prior_cut`; -7.43 for the paper's).

    Returns
    -------
    (m,) uint8. Bit 3: chi2 / 61 > 2; bit 4: ln_prior < ln_prior_cut; bit 5:
    |plx_obs - plx_est| / plx_err > 10. An undefined chi^2 or prior sets its
    bit (the check cannot be passed). A star without a usable Gaia parallax
    was fitted without the parallax term (SPEC §1.4): there is nothing for
    its estimate to disagree with, so bit 5 stays clear (the catalog's
    parallax estimate is then the fit's alone).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        high_chi2 = ~(np.asarray(chi2) / N_XP <= qf.HIGH_CHI2_PER_SAMPLE)
        low_prior = ~(np.asarray(ln_prior) >= float(ln_prior_cut))
        obs = np.asarray(plx_obs, np.float64)
        err = np.asarray(plx_err, np.float64)
        usable = np.isfinite(obs) & (err > 0)
        dplx = np.abs(obs - plx_est) / err
        mismatch = usable & ~(dplx <= qf.PARALLAX_MISMATCH_SIGMA)
    bits = high_chi2 * qf.HIGH_CHI2 + low_prior * qf.LOW_PRIOR + mismatch * qf.PARALLAX_MISMATCH
    return bits.astype(np.uint8)


def placeholder_confidence_bits(fit_status: np.ndarray) -> np.ndarray:
    """quality_flags bits 0-2 without classifiers (:data:`PLACEHOLDER_CONFIDENCE_RULE`).

    Returns
    -------
    (m,) uint8: 0b111 where ``fit_status != 0``, else 0.
    """
    low = np.asarray(fit_status) != 0
    all3 = qf.TEFF_LOW_CONFIDENCE | qf.FEH_LOW_CONFIDENCE | qf.LOGG_LOW_CONFIDENCE
    return (low * all3).astype(np.uint8)

"""Eqs. 2-4 (SPEC §1): the inflated covariance and the factor of the conditioned precision, as arrays.

Per star the 61 XP samples and the 5 NIR fluxes form a 66-vector in the
internal flux unit :data:`xpcat.catalog_schema.conditioned.FLUX_UNIT_W_M2_NM`
(1e-18 W m^-2 nm^-1, where typical fluxes are 1-1000). Its covariance is the
propagated XP covariance inflated by Eq. 2 plus the diagonal NIR variances.
Eqs. 3-4 (C = U D U^T, D clamped at ``floor`` in the internal unit squared,
L = D^-1/2 U^T) define the conditioned precision P = L^T L = U D^-1 U^T; a
partition stores its upper-triangular Cholesky factor R (P = R^T R, so
chi^2 = |R df|^2 = |L df|^2) packed row-major in float32, with zero rows and
columns for missing samples.

Computation of R. Where no eigenvalue of C is below the floor the clamp does
nothing and P = C^-1 exactly; then R = K^-1 with C = K K^T, K upper triangular
(a Cholesky factorisation in reversed order), which is fast and numerically
stable. ``trace(P) = |R|_F^2 <= 1 / floor`` proves that lambda_min(C) >= floor,
so the shortcut is taken only where it is exact. Every other star (clamp
active, or C not positive definite) goes through the eigen-decomposition of
Eqs. 3-4 and a QR factorisation of L, and is flagged COVARIANCE_REPAIRED when
an eigenvalue was clamped.

These are the reference functions; the stage runs the same maths block by
block in :mod:`xpcat.production.condition.block_factor`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from xpcat import catalog_schema as cs
from xpcat.catalog_schema.conditioned import FLUX_UNIT_W_M2_NM
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.production.condition.xp_sampling import XpSample

__all__ = [
    "SIGMA_FRAC_DIAG",
    "SIGMA_FRAC_TOTAL",
    "SIGMA_FRAC_BAND",
    "inflate_covariance",
    "precision_factor",
    "ConditionedArrays",
    "condition_arrays",
]

logger = logging.getLogger(__name__)

#: Eq. 2: relative per-sample error added in quadrature, diag(0.005 f)^2.
SIGMA_FRAC_DIAG = 0.005
#: Eq. 2: fully correlated relative error of the whole spectrum, 0.005^2 f f^T.
SIGMA_FRAC_TOTAL = 0.005
#: Eq. 2: fully correlated relative error of each band, 0.001^2 f_band f_band^T.
SIGMA_FRAC_BAND = 0.001



def inflate_covariance(cov: np.ndarray, flux: np.ndarray, flux_bp: np.ndarray, flux_rp: np.ndarray) -> np.ndarray:
    """Eq. 2: C_obs = C_gaia + diag(0.005 f)^2 + 0.005^2 f f^T + 0.001^2 (f_BP f_BP^T + f_RP f_RP^T).

    Parameters
    ----------
    cov : (n, m, m) array
        C_gaia (any consistent flux unit squared); NaN rows/columns for missing samples.
    flux, flux_bp, flux_rp : (n, m) arrays
        The sampled flux and its weighted BP / RP parts, same unit; NaN (missing) counts as 0.

    Returns
    -------
    (n, m, m) array
        A new array; missing rows/columns stay NaN.
    """
    return _inflate_into(cov + 0.0, flux, flux_bp, flux_rp)


def _inflate_into(out: np.ndarray, flux: np.ndarray, flux_bp: np.ndarray, flux_rp: np.ndarray) -> np.ndarray:
    """Add Eq. 2's terms to ``out`` in place: one rank-3 batched product plus the diagonal."""
    f = np.nan_to_num(flux)
    F = np.stack([SIGMA_FRAC_TOTAL * f, SIGMA_FRAC_BAND * np.nan_to_num(flux_bp), SIGMA_FRAC_BAND * np.nan_to_num(flux_rp)], axis=2)
    out += F @ np.swapaxes(F, 1, 2)
    d = np.arange(f.shape[1])
    out[:, d, d] += (SIGMA_FRAC_DIAG * f) ** 2
    return out


def _inverse_cholesky_lower(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``M^-1`` for the lower Cholesky factor M of each matrix (``C = M M^T``), with LAPACK.

    ``dpotrf`` then ``dtrtri`` per matrix, on transposed views (a C-ordered lower
    triangle is a Fortran-ordered upper one), so nothing is copied. Returns
    ``(Minv, ok)``; ``ok`` is False (and Minv the identity) where C is not
    positive definite.
    """
    from scipy.linalg import lapack

    n, N, _ = C.shape
    out = np.empty_like(C)
    ok = np.ones(n, dtype=bool)
    eye = np.eye(N)
    for i in range(n):
        u, info = lapack.dpotrf(C[i].T, lower=0, clean=1)
        if info == 0:
            u, info = lapack.dtrtri(u, lower=0)
        if info != 0:
            ok[i] = False
            out[i] = eye
            continue
        out[i] = u.T
    return out, ok


def precision_factor(cov: np.ndarray, valid: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Eqs. 3-4: the upper-triangular factor R of the conditioned precision.

    Parameters
    ----------
    cov : (n, N, N) float64
        Covariances; entries in rows/columns of invalid samples are ignored.
    valid : (n, N) bool
        Samples with finite weight.
    floor : float
        Eigenvalue clamp of D (same unit as ``cov``).

    Returns
    -------
    R : (n, N, N) float64
        Upper triangular, ``R^T R = U max(D, floor)^-1 U^T`` over the valid
        samples, zero rows and columns for invalid samples.
    repaired : (n,) bool
        An eigenvalue was below the floor and was clamped.

    Notes
    -----
    With J the exchange matrix, ``J C J = M M^T`` (M lower) gives
    ``C = K K^T`` with ``K = J M J`` upper, and ``R = K^-1 = J M^-1 J``.
    """
    n, N, _ = cov.shape
    valid = np.asarray(valid, dtype=bool)
    inv = ~valid
    repaired = np.zeros(n, dtype=bool)
    if n == 0:
        return np.zeros_like(cov), repaired
    inv_r = inv[:, ::-1]
    # reversed order, invalid rows/columns replaced by the identity (one pass, contiguous)
    Cr = np.where(inv_r[:, :, None] | inv_r[:, None, :], 0.0, cov[:, ::-1, ::-1])
    d = np.arange(N)
    Cr[:, d, d] += inv_r
    Minv, ok = _inverse_cholesky_lower(Cr)
    with np.errstate(all="ignore"):
        trace_p = np.einsum("nij,nij->n", Minv, Minv) - inv.sum(axis=1)
    fast = ok & np.isfinite(trace_p) & ((trace_p <= 1.0 / floor) if floor > 0 else True)
    mask = valid[:, :, None] & valid[:, None, :]
    if fast.all():
        return np.multiply(Minv[:, ::-1, ::-1], mask), repaired
    R = np.ascontiguousarray(Minv[:, ::-1, ::-1])
    slow = np.flatnonzero(~fast)
    C = Cr[slow][:, ::-1, ::-1]
    D, U = np.linalg.eigh(C)
    repaired[slow] = D.min(axis=1) < floor
    Dc = np.maximum(D, floor) if floor > 0 else np.where(D > 0, D, np.inf)
    L = np.swapaxes(U, 1, 2) / np.sqrt(Dc)[:, :, None]  # D^-1/2 U^T
    Rq = np.linalg.qr(L, mode="r")
    sign = np.where(np.einsum("nii->ni", Rq) < 0, -1.0, 1.0)
    R[slow] = Rq * sign[:, :, None]
    logger.debug("%d of %d covariances took the eigen-decomposition path", slow.size, n)
    R *= mask
    return R, repaired


@dataclass
class ConditionedArrays:
    """The per-star arrays of a conditioned partition (internal flux unit).

    Attributes
    ----------
    flux : (n, 66) float32, NaN where missing
    flux_error : (n, 66) float32, inf where missing
    factor : (n, 2211) float32, packed upper-triangular R
    n_valid : (n,) int16
    flags : (n,) uint16
    """

    flux: np.ndarray
    flux_error: np.ndarray
    factor: np.ndarray
    n_valid: np.ndarray
    flags: np.ndarray


def condition_arrays(
    xp: XpSample,
    nir_flux: np.ndarray,
    nir_variance: np.ndarray,
    *,
    floor: float = 1e-9,
    unit: float = FLUX_UNIT_W_M2_NM,
) -> ConditionedArrays:
    """Eq. 2 inflation and Eqs. 3-4 conditioning of sampled XP + NIR data.

    Parameters
    ----------
    xp : XpSample
        With ``covariance`` (n, 61, 61) in W m^-2 nm^-1 squared.
    nir_flux, nir_variance : (n, 5) arrays, W m^-2 nm^-1 and its square
        NaN / inf where unused.
    floor : float
        Eigenvalue clamp in the internal unit squared.
    unit : float
        The internal flux unit in W m^-2 nm^-1.

    Returns
    -------
    ConditionedArrays
        Flags set here: COVARIANCE_REPAIRED, NONPOSITIVE_FLUX.
    """
    if xp.covariance is None:
        raise ValueError("condition_arrays needs an XpSample with its covariance")
    n, m = xp.flux.shape
    f_xp = xp.flux / unit
    flux = np.concatenate([f_xp, np.asarray(nir_flux, dtype=np.float64) / unit], axis=1)
    var_nir = np.asarray(nir_variance, dtype=np.float64) / unit**2
    N = flux.shape[1]
    cov = np.zeros((n, N, N))
    cov_xp = cov[:, :m, :m]  # view: filled in place (unit change, then Eq. 2)
    np.multiply(xp.covariance, 1.0 / unit**2, out=cov_xp)
    _inflate_into(cov_xp, f_xp, xp.flux_bp / unit, xp.flux_rp / unit)
    d = np.arange(N)
    var = np.concatenate([np.einsum("nii->ni", cov_xp), var_nir], axis=1)
    cov[:, d[m:], d[m:]] = var_nir
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(flux) & np.isfinite(var) & (var > 0)
    R, repaired = precision_factor(cov, valid, floor)
    flags = np.zeros(n, dtype=np.uint16)
    flags[repaired] |= np.uint16(ConditionFlag.COVARIANCE_REPAIRED)
    with np.errstate(invalid="ignore"):
        nonpos = np.any(valid[:, :m] & (f_xp <= 0), axis=1)
    flags[nonpos] |= np.uint16(ConditionFlag.NONPOSITIVE_FLUX)
    flux_out = np.where(valid, flux, np.nan).astype(np.float32)
    with np.errstate(invalid="ignore"):
        err_out = np.where(valid, np.sqrt(np.where(valid, var, 1.0)), np.inf).astype(np.float32)
    packed = cs.pack_triu(R).astype(np.float32)
    return ConditionedArrays(flux_out, err_out, packed, valid.sum(axis=1).astype(np.int16), flags)


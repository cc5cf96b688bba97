"""Blocks of XP rows + NIR photometry -> conditioned arrays: the stage's fast path to Eqs. 2-4.

:func:`condition_xp_table` gives the same R as
:func:`xpcat.production.condition.covariance.condition_arrays`: the XP block
and the NIR variances are independent, so R is block-diagonal; the 61 x 61 XP
covariance is built in place in reversed sample order (so LAPACK's lower
Cholesky factor and its inverse, computed in place, are K^-1 reversed), and
only the stars the shortcut does not cover go through
:func:`xpcat.production.condition.covariance.precision_factor`. Work runs in
blocks of stars on threads (numpy, BLAS, LAPACK and the numba kernels release
the GIL) with BLAS itself single-threaded.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from xpcat import catalog_schema as cs
from xpcat.catalog_schema.conditioned import FLUX_UNIT_W_M2_NM, N_FACTOR, N_FLUX, N_XP
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.production.condition.bases import DEFAULT_WAVELENGTHS_NM
from xpcat.production.condition.covariance import (
    SIGMA_FRAC_BAND,
    SIGMA_FRAC_DIAG,
    SIGMA_FRAC_TOTAL,
    ConditionedArrays,
    precision_factor,
)
from xpcat.production.condition.parallel import default_threads, jit_kernel, run_chunks
from xpcat.production.condition.xp_sampling import XpSample, sample_xp_into

__all__ = ["condition_xp_table"]

logger = logging.getLogger(__name__)

#: Offsets of the rows of the packed (row-major) upper triangle of the 66 x 66 factor.
_ROW_OFFSETS = np.array([a * N_FLUX - a * (a - 1) // 2 for a in range(N_FLUX)], dtype=np.int64)


def _inflate_reversed_py(buf: np.ndarray, F: np.ndarray, D: np.ndarray) -> None:
    """Eq. 2 in place, reversed order: ``buf[i] += F'[i] F'[i]^T + diag(D'[i])`` (compiled by numba).

    ``F`` (n, m, 3) holds 0.005 f, 0.001 f_BP, 0.001 f_RP and ``D`` (n, m) holds
    (0.005 f)^2, in sample order; ``'`` is the reversed order of ``buf``.
    """
    n, m, q = F.shape
    for i in range(n):
        for r in range(m):
            x = m - 1 - r
            a0, a1, a2 = F[i, x, 0], F[i, x, 1], F[i, x, 2]
            for c in range(m):
                y = m - 1 - c
                buf[i, r, c] += a0 * F[i, y, 0] + a1 * F[i, y, 1] + a2 * F[i, y, 2]
            buf[i, r, r] += D[i, x]


def _pack_trace_py(buf: np.ndarray, off: np.ndarray, packed: np.ndarray, trace: np.ndarray) -> None:
    """Pack R = J M^-1 J (row-major upper triangle) from the lower inverse factors in ``buf`` (compiled by numba).

    ``R[r, r + j] = buf[i, m-1-r, m-1-r-j]``; ``trace[i]`` = sum of squares of
    those entries (float64) = trace of the precision.
    """
    n, m, _ = buf.shape
    for i in range(n):
        s = 0.0
        for r in range(m):
            src = m - 1 - r
            o = off[r]
            for j in range(m - r):
                v = buf[i, src, src - j]
                packed[i, o + j] = v
                s += v * v
        trace[i] = s


def _factor_chunk(buf: np.ndarray, off: np.ndarray, packed: np.ndarray, trace: np.ndarray, ok: np.ndarray) -> None:
    """In-place LAPACK factor (dpotrf + dtrtri) of each reversed XP block, then packing and trace.

    ``buf[i].T`` is Fortran-ordered, so LAPACK's upper triangle is our lower
    one: afterwards the lower triangle of ``buf[i]`` holds M^-1 (C = M M^T).
    ``ok[i]`` is False where C is not positive definite.
    """
    from scipy.linalg import lapack

    for i in range(buf.shape[0]):
        u, info = lapack.dpotrf(buf[i].T, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            u, info = lapack.dtrtri(u, lower=0, overwrite_c=1)
        ok[i] = info == 0
    jit_kernel(_pack_trace_py)(buf, off, packed, trace)


def _xp_covariance_reversed(
    block,
    buf: np.ndarray,
    unit: float,
    covariance: str,
    threads: int | None,
) -> XpSample:
    """Sample XP rows and build C_obs (Eq. 2) of the 61 XP samples in ``buf``, in reversed sample order.

    ``buf[i, a, b]`` is C_obs[60 - a, 60 - b] in the internal unit squared;
    missing samples have zero rows and columns. Reversed order turns LAPACK's
    lower Cholesky factor into the upper-triangular factor of Eqs. 3-4 without
    copies (see :func:`precision_factor`).
    """
    n = buf.shape[0]
    buf.fill(0.0)
    view = buf[:, ::-1, ::-1]
    smp = sample_xp_into(block, wavelengths_nm=DEFAULT_WAVELENGTHS_NM, covariance=covariance, cov_out=view, cov_scale=1.0 / unit, threads=threads)
    f = np.nan_to_num(smp.flux) / unit
    F = np.empty((n, N_XP, 3))
    np.multiply(f, SIGMA_FRAC_TOTAL, out=F[:, :, 0])
    np.multiply(smp.flux_bp, SIGMA_FRAC_BAND / unit, out=F[:, :, 1])
    np.multiply(smp.flux_rp, SIGMA_FRAC_BAND / unit, out=F[:, :, 2])
    jit_kernel(_inflate_reversed_py)(buf, F, (SIGMA_FRAC_DIAG * f) ** 2)
    return smp


def condition_xp_table(
    block,
    nir_flux: np.ndarray,
    nir_variance: np.ndarray,
    *,
    floor: float = 1e-9,
    unit: float = FLUX_UNIT_W_M2_NM,
    covariance: str = "correct",
    threads: int | None = None,
    buf: np.ndarray | None = None,
) -> tuple[ConditionedArrays, XpSample]:
    """XP continuous rows + NIR photometry -> conditioned arrays, the fast way (same result as :func:`~xpcat.production.condition.covariance.condition_arrays`).

    The XP covariance is built in place, in reversed sample order, in the
    internal unit (:func:`_xp_covariance_reversed`); Eq. 2 is added there. The
    XP block and the NIR variances are independent, so the factor is
    block-diagonal: LAPACK ``dpotrf`` + ``dtrtri`` in place on each 61 x 61 XP
    block (the reversed lower inverse factor is the upper R), ``1/sigma`` for
    NIR. Stars where that is not exact (an eigenvalue may be below the floor,
    or C_obs is not positive definite) are redone by :func:`precision_factor`
    (eigen-decomposition, Eqs. 3-4).

    Parameters
    ----------
    block : pyarrow.Table or pandas.DataFrame
        XP continuous rows (archive columns), as for :func:`xpcat.sample_xp`.
    nir_flux, nir_variance : (n, 5) arrays, W m^-2 nm^-1 and its square
        NaN / inf where unused.
    floor : float
        Eigenvalue clamp in the internal unit squared.
    unit : float
        The internal flux unit in W m^-2 nm^-1.
    covariance : {"correct", "paper"}
        Coefficient covariance (see :func:`xpcat.sample_xp`).
    threads : int, optional
        Threads for the XP covariance products.
    buf : (>= n, 61, 61) float64 array, optional
        Work buffer reused between calls.

    Returns
    -------
    ConditionedArrays, XpSample
        The sample has no covariance (it was consumed); fluxes are in W m^-2 nm^-1.
    """
    n = len(block)
    if buf is None or buf.shape[0] < n:
        buf = np.empty((n, N_XP, N_XP))
    buf = buf[:n]
    smp = _xp_covariance_reversed(block, buf, unit, covariance, threads)
    m = N_XP
    d = np.arange(m)
    f_xp = smp.flux / unit
    var_xp = buf[:, d, d][:, ::-1].copy()
    with np.errstate(invalid="ignore"):
        valid_xp = np.isfinite(f_xp) & np.isfinite(var_xp) & (var_xp > 0)
    # invalid samples: zero rows and columns, unit diagonal (exactly decoupled, zeroed in R below)
    part = np.flatnonzero(~valid_xp.all(axis=1))
    if part.size:
        inv_r = ~valid_xp[part][:, ::-1]
        sub = np.where(inv_r[:, :, None] | inv_r[:, None, :], 0.0, buf[part])
        sub[:, d, d] += inv_r
        buf[part] = sub
    # factor + pack, in chunks on threads (LAPACK and the compiled packing release the GIL)
    packed = np.zeros((n, N_FACTOR), dtype=np.float32)
    trace_p = np.empty(n)
    ok = np.ones(n, dtype=bool)
    nt = default_threads() if threads is None else max(1, int(threads))
    step = max(64, -(-n // nt))
    chunks = [(c0, min(n, c0 + step)) for c0 in range(0, n, step)]

    def work(c: tuple[int, int]) -> None:
        c0, c1 = c
        _factor_chunk(buf[c0:c1], _ROW_OFFSETS, packed[c0:c1], trace_p[c0:c1], ok[c0:c1])

    run_chunks(work, chunks, nt)
    with np.errstate(all="ignore"):
        trace_p -= (~valid_xp).sum(axis=1)
    fast = ok & np.isfinite(trace_p)
    if floor > 0:
        fast &= trace_p <= 1.0 / floor
    # NIR block: diagonal
    f_nir = np.asarray(nir_flux, dtype=np.float64) / unit
    v_nir = np.asarray(nir_variance, dtype=np.float64) / unit**2
    with np.errstate(invalid="ignore"):
        valid_nir = np.isfinite(f_nir) & np.isfinite(v_nir) & (v_nir > 0)
    v_cl = np.where(valid_nir, np.maximum(v_nir, floor) if floor > 0 else v_nir, np.inf)
    repaired = np.any(valid_nir & (v_nir < floor), axis=1) if floor > 0 else np.zeros(n, dtype=bool)
    off = _ROW_OFFSETS
    packed[:, off[m:]] = 1.0 / np.sqrt(v_cl)
    if part.size:
        rr, cc = np.nonzero(~valid_xp[part])
        packed[part[rr], off[cc]] = 0.0
    slow = np.flatnonzero(~fast)
    if slow.size:
        # redo these stars from scratch in the original order (buf was overwritten by LAPACK)
        sub_buf = np.empty((slow.size, m, m))
        _xp_covariance_reversed(_take_rows(block, slow), sub_buf, unit, covariance, 1)
        cov = np.zeros((slow.size, N_FLUX, N_FLUX))
        cov[:, :m, :m] = sub_buf[:, ::-1, ::-1]
        dn = np.arange(m, N_FLUX)
        cov[:, dn, dn] = np.where(valid_nir[slow], v_nir[slow], 0.0)
        valid = np.concatenate([valid_xp[slow], valid_nir[slow]], axis=1)
        R, rep = precision_factor(cov, valid, floor)
        packed[slow] = cs.pack_triu(R)
        repaired[slow] |= rep
        logger.debug("%d of %d stars took the eigen-decomposition path", slow.size, n)
    flags = np.zeros(n, dtype=np.uint16)
    flags[repaired] |= np.uint16(ConditionFlag.COVARIANCE_REPAIRED)
    with np.errstate(invalid="ignore"):
        nonpos = np.any(valid_xp & (f_xp <= 0), axis=1)
    flags[nonpos] |= np.uint16(ConditionFlag.NONPOSITIVE_FLUX)
    valid = np.concatenate([valid_xp, valid_nir], axis=1)
    flux = np.concatenate([f_xp, f_nir], axis=1)
    var = np.concatenate([var_xp, v_nir], axis=1)
    flux_out = np.where(valid, flux, np.nan).astype(np.float32)
    with np.errstate(invalid="ignore"):
        err_out = np.where(valid, np.sqrt(np.where(valid, var, 1.0)), np.inf).astype(np.float32)
    return ConditionedArrays(flux_out, err_out, packed, valid.sum(axis=1).astype(np.int16), flags), smp


def _take_rows(block, rows: np.ndarray):
    """Rows of a pyarrow Table or pandas DataFrame."""
    if isinstance(block, pa.Table):
        return block.take(pa.array(rows))
    return block.iloc[rows].reset_index(drop=True)

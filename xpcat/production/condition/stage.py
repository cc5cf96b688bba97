"""Raw tables -> conditioned flux partitions (SPEC §1, Eqs. 2-5).

Per star: the 61 XP samples (GaiaXPy's own bases, :func:`xpcat.sample_xp`) and
the 5 NIR fluxes (:mod:`.photometry`) form a 66-vector in the internal flux
unit :data:`FLUX_UNIT_W_M2_NM` (1e-18 W m^-2 nm^-1, where typical fluxes are
1-1000). Its covariance is the propagated XP covariance inflated by Eq. 2
plus the diagonal NIR variances. Eqs. 3-4 (C = U D U^T, D clamped at
``eigenvalue_floor`` in the internal unit squared, L = D^-1/2 U^T) define the
conditioned precision P = L^T L = U D^-1 U^T; a partition stores its
upper-triangular Cholesky factor R (P = R^T R, so chi^2 = |R df|^2 = |L df|^2)
packed row-major in float32, with zero rows and columns for missing samples.

Computation of R. Where no eigenvalue of C is below the floor the clamp does
nothing and P = C^-1 exactly; then R = K^-1 with C = K K^T, K upper triangular
(a Cholesky factorisation in reversed order), which is fast and numerically
stable. ``trace(P) = |R|_F^2 <= 1 / floor`` proves that lambda_min(C) >= floor,
so the shortcut is taken only where it is exact. Every other star (clamp
active, or C not positive definite) goes through the eigen-decomposition of
Eqs. 3-4 and a QR factorisation of L, and is flagged COVARIANCE_REPAIRED when
an eigenvalue was clamped.

The stage's fast path (:func:`condition_xp_table`, used by
:func:`condition_tables`) gives the same R: the XP block and the NIR
variances are independent, so R is block-diagonal; the 61 x 61 XP
covariance is built in place in reversed sample order (so LAPACK's lower
Cholesky factor and its inverse, computed in place, are K^-1 reversed), and
only the stars the shortcut does not cover go through
:func:`precision_factor`. Work runs in blocks of stars on threads (numpy,
BLAS, LAPACK and the numba kernels release the GIL) with BLAS itself
single-threaded.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from xpcat import catalog_schema as cs
from xpcat.catalog_schema.conditioned import CONDITIONED, FLUX_UNIT_W_M2_NM, N_FACTOR, N_FLUX, N_XP, NIR_BANDS, NIR_WAVELENGTHS_UM
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.catalog_schema.raw import REQUIRED_RAW_TABLES
from xpcat.config import RunConfig
from xpcat.errors import InputError, StageError
from xpcat.production import partitions as parts
from xpcat.production.condition.photometry import AB_MINUS_VEGA, nir_photometry
from xpcat.production.condition.xp_sampling import DEFAULT_WAVELENGTHS_NM, INSTRUMENT_MODELS, XpSample, _jit, _run_chunks, default_threads, sample_xp, single_threaded_blas

__all__ = [
    "SIGMA_FRAC_DIAG",
    "SIGMA_FRAC_TOTAL",
    "SIGMA_FRAC_BAND",
    "inflate_covariance",
    "precision_factor",
    "condition_arrays",
    "condition_xp_table",
    "condition_tables",
    "PartitionTask",
    "plan_partitions",
    "condition_partition",
    "condition_run",
    "conditioning_metadata",
]

logger = logging.getLogger(__name__)

#: Eq. 2: relative per-sample error added in quadrature, diag(0.005 f)^2.
SIGMA_FRAC_DIAG = 0.005
#: Eq. 2: fully correlated relative error of the whole spectrum, 0.005^2 f f^T.
SIGMA_FRAC_TOTAL = 0.005
#: Eq. 2: fully correlated relative error of each band, 0.001^2 f_band f_band^T.
SIGMA_FRAC_BAND = 0.001

#: Largest block of stars whose 66 x 66 matrices are held at once (~35 kB each, about 8 arrays):
#: ``[conditioning] batch_size`` is capped by it so that memory stays bounded.
MAX_BLOCK = 1024

#: Parquet options of conditioned partitions. Measured on a real-data-based partition (CPU per
#: star to write / to read back, and bytes per star; 2-core EPYC): no compression 31 us / 23 us /
#: 9.4 kB; lz4 with byte-stream-split floats 54 / 24 / 6.4 kB; zstd-1 with byte-stream-split
#: 62 / 35 / 5.8 kB; pyarrow's defaults (zstd-3, dictionaries, statistics) 94 / 60 / 7.3 kB.
#: The float lists (94 % of the bytes) are the packed factor, flux and errors, which compress
#: poorly; no compression keeps the step within its throughput target at <= 10 kB per star.
#: lz4 with ``use_byte_stream_split`` on the float lists is the smaller choice where disk
#: matters more than CPU.
#: Dictionaries never pay off for floats (and cost a failed attempt per page); min/max
#: statistics are kept for the scalar columns only.
_LIST_COLUMNS = ("flux", "flux_error", "flux_factor_triu")
_COMPRESSION = "none"
_WRITE_OPTIONS = {
    "use_dictionary": ["source_id", "condition_flags", "n_valid_flux"],
    "write_statistics": [f.name for f in CONDITIONED if f.name not in _LIST_COLUMNS],
}

#: Raw tables read by this stage.
_STAGE_TABLES = ("gaia_source", "xp_continuous_mean_spectrum", "tmass", "unwise")
#: Columns read from the optional tables.
_TMASS_COLS = ["source_id", "j_m", "j_msigcom", "h_m", "h_msigcom", "ks_m", "ks_msigcom", "ph_qual", "ext_key"]
_UNWISE_COLS = ["source_id", "w1_mag", "w1_mag_error", "w2_mag", "w2_mag_error"]
_GAIA_COLS = [
    "source_id", "ra", "dec", "parallax", "parallax_error", "phot_g_mean_mag", "phot_g_mean_flux",
    "phot_g_mean_flux_error", "phot_bp_mean_flux", "phot_bp_mean_flux_error", "phot_rp_mean_flux",
    "phot_rp_mean_flux_error", "phot_bp_rp_excess_factor", "ruwe", "fidelity_v2", "norm_dg",
]  # fmt: skip


# ---------------------------------------------------------------------------
# Array maths
# ---------------------------------------------------------------------------


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
    _jit(_pack_trace_py)(buf, off, packed, trace)


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
    from xpcat.production.condition.xp_sampling import _sample_xp

    n = buf.shape[0]
    buf.fill(0.0)
    view = buf[:, ::-1, ::-1]
    smp = _sample_xp(block, wavelengths_nm=DEFAULT_WAVELENGTHS_NM, covariance=covariance, cov_out=view, cov_scale=1.0 / unit, threads=threads)
    f = np.nan_to_num(smp.flux) / unit
    F = np.empty((n, N_XP, 3))
    np.multiply(f, SIGMA_FRAC_TOTAL, out=F[:, :, 0])
    np.multiply(smp.flux_bp, SIGMA_FRAC_BAND / unit, out=F[:, :, 1])
    np.multiply(smp.flux_rp, SIGMA_FRAC_BAND / unit, out=F[:, :, 2])
    _jit(_inflate_reversed_py)(buf, F, (SIGMA_FRAC_DIAG * f) ** 2)
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
    """XP continuous rows + NIR photometry -> conditioned arrays, the fast way (same result as :func:`condition_arrays`).

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

    _run_chunks(work, chunks, nt)
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


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _f64(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray(table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _ids(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("source_id").to_numpy(zero_copy_only=False), dtype=np.int64)


def _check_unique(ids: np.ndarray, what: str, origin: np.ndarray | None = None, files: Sequence[str] = ()) -> None:
    if ids.size < 2:
        return
    s = np.sort(ids)
    dup = np.unique(s[1:][s[1:] == s[:-1]])
    if dup.size:
        where = ""
        if origin is not None and len(files):
            in_files = sorted({files[k] for k in np.unique(origin[np.isin(ids, dup[:5])])})
            where = f" (in {', '.join(in_files)})"
        shown = ", ".join(str(x) for x in dup[:10])
        raise InputError(f"{what}: {dup.size} duplicated source_id(s): {shown}{where}")


def _align(ids: np.ndarray, table: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """Row index into ``table`` for each id and a matched mask (table need not be sorted)."""
    if table is None or table.num_rows == 0:
        return np.zeros(ids.size, dtype=np.int64), np.zeros(ids.size, dtype=bool)
    t_ids = _ids(table)
    order = np.argsort(t_ids, kind="stable")
    pos = np.searchsorted(t_ids[order], ids)
    pos = np.clip(pos, 0, t_ids.size - 1)
    idx = order[pos]
    return idx, t_ids[idx] == ids


def _empty_sample(ids: np.ndarray) -> XpSample:
    """An XpSample of stars without XP data (NaN flux, zero weight)."""
    k = ids.size
    return XpSample(
        source_id=ids, wavelengths=DEFAULT_WAVELENGTHS_NM, flux=np.full((k, N_XP), np.nan),
        flux_error=np.full((k, N_XP), np.nan), covariance=np.full((k, N_XP, N_XP), np.nan),
        flux_bp=np.zeros((k, N_XP)), flux_rp=np.zeros((k, N_XP)), has_bp=np.zeros(k, dtype=bool),
        has_rp=np.zeros(k, dtype=bool), bad_bp=np.zeros(k, dtype=bool), bad_rp=np.zeros(k, dtype=bool),
    )  # fmt: skip


def _table_batches(table: pa.Table, size: int) -> Iterator[tuple[pa.Table, str]]:
    for lo in range(0, table.num_rows, size):
        yield table.slice(lo, size), "xp_continuous_mean_spectrum"


def condition_tables(
    gaia: pa.Table,
    xp: pa.Table | Iterable[tuple[pa.Table, str]],
    tmass: pa.Table | None,
    unwise: pa.Table | None,
    config: RunConfig,
    *,
    what: str = "partition",
) -> pa.Table:
    """Join raw rows on source_id and condition them into a :data:`CONDITIONED` table.

    Every gaia_source row gives exactly one output row, sorted by source_id: a
    star with no XP row is flagged NO_XP (zero-weight XP samples), a missing or
    unusable band is flagged and zero-weighted, missing photometry has zero
    weight. XP rows are processed in blocks of at most :data:`MAX_BLOCK`, so
    memory holds the outputs plus one block.

    Parameters
    ----------
    gaia : pyarrow.Table
        gaia_source rows (archive column names).
    xp : pyarrow.Table, or iterable of (pyarrow.Table, origin name)
        xp_continuous_mean_spectrum rows, whole or as a stream of batches
        (each tagged with the file it came from, for messages).
    tmass, unwise : pyarrow.Table or None
        Optional partner tables.
    config : RunConfig
    what : str
        Name used in error messages.

    Raises
    ------
    InputError
        Duplicated source_ids in any table, or XP rows with no gaia_source row (named).
    """
    cc = config.conditioning
    gaia = gaia.sort_by("source_id")
    ids = _ids(gaia)
    n = ids.size
    for name, t in (("gaia_source", gaia), ("tmass", tmass), ("unwise", unwise)):
        if t is not None:
            _check_unique(_ids(t), f"{what}: raw {name}")
    wl = DEFAULT_WAVELENGTHS_NM
    step = max(1, min(int(cc.batch_size), MAX_BLOCK))

    def partner(table: pa.Table | None, cols: list[str]) -> dict | None:
        if table is None:
            return None
        idx, matched = _align(ids, table)
        out: dict[str, np.ndarray] = {"matched": matched}
        taken = table.take(pa.array(idx)) if table.num_rows else None
        for c in cols[1:]:
            if taken is None or c not in taken.column_names:
                out[c] = np.full(n, np.nan) if c != "ph_qual" else np.full(n, None, dtype=object)
            elif c == "ph_qual":
                out[c] = np.array(taken.column(c).to_pylist(), dtype=object)
            else:
                out[c] = np.where(matched, _f64(taken, c), np.nan)
        return out

    norm_dg = _f64(gaia, "norm_dg")
    nir = nir_photometry(
        n,
        norm_dg,
        partner(tmass, _TMASS_COLS),
        partner(unwise, _UNWISE_COLS),
        tmass_norm_dg_max=cc.tmass_norm_dg_max,
        unwise_norm_dg_max=cc.unwise_norm_dg_max,
    )

    flags = nir.flags.copy()
    plx = _f64(gaia, "parallax")
    flags[~np.isfinite(plx)] |= np.uint16(ConditionFlag.NO_PARALLAX)
    out_flux = np.empty((n, N_FLUX), np.float32)
    out_err = np.empty((n, N_FLUX), np.float32)
    out_fac = np.empty((n, N_FACTOR), np.float32)
    out_nv = np.empty(n, np.int16)
    chi2 = {b: np.full(n, np.nan) for b in ("bp", "rp")}
    dof = {b: np.full(n, np.nan) for b in ("bp", "rp")}
    origin = np.full(n, "", dtype=object)  # which XP file each star came from
    has_xp = np.zeros(n, dtype=bool)

    def condition_block(pos: np.ndarray, smp: XpSample, ca: ConditionedArrays | None = None) -> None:
        if ca is None:
            ca = condition_arrays(smp, nir.flux[pos], nir.variance[pos], floor=cc.eigenvalue_floor)
        out_flux[pos], out_err[pos], out_fac[pos], out_nv[pos] = ca.flux, ca.flux_error, ca.factor, ca.n_valid
        f = ca.flags
        f[~smp.has_bp] |= np.uint16(ConditionFlag.NO_BP)
        f[~smp.has_rp] |= np.uint16(ConditionFlag.NO_RP)
        f[smp.bad_bp | smp.bad_rp] |= np.uint16(ConditionFlag.BAD_XP_INPUT)
        flags[pos] |= f

    def _condition_batches(batches: Iterable[tuple[pa.Table, str]]) -> None:
        for batch, source in batches:
            for lo in range(0, batch.num_rows, step):
                block = batch.slice(lo, step)
                bid = _ids(block)
                pos = np.clip(np.searchsorted(ids, bid), 0, max(n - 1, 0))
                if n == 0 or np.any(ids[pos] != bid):
                    orphans = bid if n == 0 else bid[ids[pos] != bid]
                    shown = ", ".join(str(x) for x in orphans[:10])
                    raise InputError(f"{what}: {orphans.size} XP row(s) in {source} have no gaia_source row: source_id {shown}")
                seen = has_xp[pos]
                _check_unique(bid, f"{what}: raw xp_continuous_mean_spectrum ({source})")
                if seen.any():
                    dup = bid[seen]
                    files = sorted({str(origin[p]) for p in pos[seen]} | {source})
                    shown = ", ".join(str(x) for x in dup[:10])
                    raise InputError(
                        f"{what}: raw xp_continuous_mean_spectrum: {dup.size} duplicated source_id(s): {shown} (in {', '.join(files)})"
                    )
                has_xp[pos] = True
                origin[pos] = source
                try:
                    ca, smp = condition_xp_table(
                        block, nir.flux[pos], nir.variance[pos], floor=cc.eigenvalue_floor, covariance=cc.covariance, buf=buf
                    )
                except KeyError as err:
                    raise InputError(f"{what}: {err.args[0]}") from err
                condition_block(pos, smp, ca)
                for band in ("bp", "rp"):
                    chi2[band][pos] = _f64(block, f"{band}_chi_squared")
                    dof[band][pos] = _f64(block, f"{band}_degrees_of_freedom")
                del smp, block

    batches = _table_batches(xp, step) if isinstance(xp, pa.Table) else xp
    buf = np.empty((step, N_XP, N_XP))  # the XP covariance work buffer, reused by every block
    with single_threaded_blas():
        _condition_batches(batches)
    missing = np.flatnonzero(~has_xp)
    flags[missing] |= np.uint16(ConditionFlag.NO_XP)
    for lo in range(0, missing.size, step):
        pos = missing[lo : lo + step]
        condition_block(pos, _empty_sample(ids[pos]))

    def fsl(arr: np.ndarray, size: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), size)

    def f32(x: np.ndarray) -> pa.Array:
        return pa.array(x.astype(np.float32), mask=~np.isfinite(x))

    def ratio(a: str, b: str) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return _f64(gaia, a) / _f64(gaia, b)

    xp_cols = {}
    for band in ("bp", "rp"):
        xp_cols[f"{band}_chi_squared"] = f32(chi2[band])
        d = dof[band]
        xp_cols[f"{band}_degrees_of_freedom"] = pa.array(np.nan_to_num(d).astype(np.int16), mask=~np.isfinite(d))

    columns = {
        "source_id": pa.array(ids, pa.int64()),
        "ra": pa.array(_f64(gaia, "ra")),
        "dec": pa.array(_f64(gaia, "dec")),
        "parallax": f32(plx),
        "parallax_error": f32(_f64(gaia, "parallax_error")),
        "flux": fsl(out_flux, N_FLUX),
        "flux_error": fsl(out_err, N_FLUX),
        "flux_factor_triu": fsl(out_fac, N_FACTOR),
        "n_valid_flux": pa.array(out_nv, pa.int16()),
        "condition_flags": pa.array(flags, pa.uint16()),
        "phot_g_mean_mag": f32(_f64(gaia, "phot_g_mean_mag")),
        "phot_g_mean_flux_over_error": f32(ratio("phot_g_mean_flux", "phot_g_mean_flux_error")),
        "phot_bp_mean_flux_over_error": f32(ratio("phot_bp_mean_flux", "phot_bp_mean_flux_error")),
        "phot_rp_mean_flux_over_error": f32(ratio("phot_rp_mean_flux", "phot_rp_mean_flux_error")),
        "phot_bp_rp_excess_factor": f32(_f64(gaia, "phot_bp_rp_excess_factor")),
        "ruwe": f32(_f64(gaia, "ruwe")),
        "fidelity_v2": f32(_f64(gaia, "fidelity_v2")),
        "norm_dg": f32(norm_dg),
        **xp_cols,
    }
    return pa.Table.from_arrays([columns[f.name] for f in CONDITIONED], schema=CONDITIONED)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def conditioning_metadata(config: RunConfig) -> dict:
    """The metadata document every conditioned partition carries (units, options, versions)."""
    cc = config.conditioning
    return {
        "stage": "conditioned",
        "flux_unit": "1e-18 W m-2 nm-1",
        "flux_unit_w_m2_nm": FLUX_UNIT_W_M2_NM,
        "wavelengths_nm": [float(w) for w in DEFAULT_WAVELENGTHS_NM],
        "nir_bands": list(NIR_BANDS),
        "nir_wavelengths_um": list(NIR_WAVELENGTHS_UM),
        "nir_ab_minus_vega": dict(AB_MINUS_VEGA),
        "factor": "upper-triangular R, R^T R = U max(D, floor)^-1 U^T, row-major packed; zero rows/cols for missing",
        "options": {
            "covariance": cc.covariance,
            "eigenvalue_floor": cc.eigenvalue_floor,
            "eigenvalue_floor_unit": "(1e-18 W m-2 nm-1)^2",
            "tmass_norm_dg_max": cc.tmass_norm_dg_max,
            "unwise_norm_dg_max": cc.unwise_norm_dg_max,
            "inflation": {"diag": SIGMA_FRAC_DIAG, "total": SIGMA_FRAC_TOTAL, "band": SIGMA_FRAC_BAND},
        },
        "instrument_models": {b: {str(k): v for k, v in m.items()} for b, m in INSTRUMENT_MODELS.items()},
        "gaiaxpy_version": _version("gaiaxpy"),
        "xpcat_version": _version("xpcat"),
    }


def _options_key(config: RunConfig) -> str:
    import hashlib
    import json

    doc = conditioning_metadata(config)
    key = {k: doc[k] for k in ("options", "flux_unit", "instrument_models", "gaiaxpy_version")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionTask:
    """One conditioned partition to produce.

    Attributes
    ----------
    name : str
        ``partition_name(pix, level)``.
    pix, level : int
    out_path : Path
    raw_files : dict of str -> list of Path
        Raw Parquet files per table (optional tables may be absent).
    n_stars : int
        gaia_source rows in the partition's source_id range.
    """

    name: str
    pix: int
    level: int
    out_path: Path
    raw_files: dict[str, list[Path]] = field(default_factory=dict)
    n_stars: int = 0


def _raw_dir(run_dir: Path, config: RunConfig) -> Path:
    p = Path(config.data.raw_dir)
    return p if p.is_absolute() else Path(run_dir) / p


def _raw_files(run_dir: Path, config: RunConfig) -> dict[str, list[Path]]:
    raw = _raw_dir(run_dir, config)
    files: dict[str, list[Path]] = {}
    for table in _STAGE_TABLES:
        found = sorted((raw / table).glob("*.parquet"))
        if found:
            files[table] = found
        elif table in REQUIRED_RAW_TABLES:
            raise StageError(f"raw table {table!r} not found: no Parquet files in {raw / table} (run `xpcat fetch` or `xpcat simulate` first)")
    return files


def _read_ids(files: Sequence[Path], what: str) -> tuple[np.ndarray, np.ndarray]:
    ids, origin = [], []
    for k, f in enumerate(files):
        t = parts.read_table(f, what=what, columns=["source_id"])
        ids.append(_ids(t))
        origin.append(np.full(t.num_rows, k, dtype=np.int32))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(ids), np.concatenate(origin)


def plan_partitions(run_dir: str | Path, config: RunConfig) -> list[PartitionTask]:
    """The partitions of a run: one per HEALPix pixel (``config.data.partition_level``) holding stars.

    Reads only the source_id column of the raw gaia_source and XP files, and
    refuses duplicated source_ids within or across files.

    Raises
    ------
    StageError
        A required raw table is missing.
    InputError
        A raw file is unreadable, or source_ids are duplicated (named, with their files).
    """
    run_dir = Path(run_dir)
    level = config.data.partition_level
    files = _raw_files(run_dir, config)
    for table in ("gaia_source", "xp_continuous_mean_spectrum"):
        ids, origin = _read_ids(files[table], f"raw {table}")
        _check_unique(ids, f"raw {table}", origin, [str(p) for p in files[table]])
        if table == "gaia_source":
            gaia_ids = ids
    pix = parts.partition_of(gaia_ids, level)
    uniq, counts = np.unique(pix, return_counts=True)
    out_dir = run_dir / "conditioned"
    return [
        PartitionTask(
            name=parts.partition_name(int(p), level),
            pix=int(p),
            level=level,
            out_path=out_dir / f"{parts.partition_name(int(p), level)}.parquet",
            raw_files=files,
            n_stars=int(c),
        )
        for p, c in zip(uniq, counts)
    ]


def _read_range(files: Sequence[Path], table: str, lo: int | None, hi: int | None, columns: list[str] | None) -> pa.Table:
    """Rows with lo <= source_id < hi from all files (all rows when lo is None); duplicates refused."""
    pieces, origin = [], []
    for k, f in enumerate(files):
        cols = columns
        if cols is not None:
            import pyarrow.parquet as pq

            try:
                names = set(pq.read_schema(f).names)
            except (pa.ArrowInvalid, OSError) as err:
                raise InputError(f"cannot read raw {table} Parquet file {f} (corrupt or truncated): {err}") from err
            if "source_id" not in names:
                raise InputError(f"raw {table} file {f} has no source_id column")
            cols = [c for c in cols if c in names]
        filters = None if lo is None else [("source_id", ">=", lo), ("source_id", "<", hi)]
        t = parts.read_table(f, what=f"raw {table}", columns=cols, filters=filters)
        pieces.append(t)
        origin.append(np.full(t.num_rows, k, dtype=np.int32))
    if not pieces:
        return pa.table({"source_id": pa.array([], pa.int64())})
    out = pa.concat_tables(pieces, promote_options="permissive")
    _check_unique(_ids(out), f"raw {table}", np.concatenate(origin), [str(f) for f in files])
    return out


def _prefetched(items: Iterable, depth: int = 1) -> Iterator:
    """Iterate ``items`` with the next ones produced on a background thread (Parquet decoding releases the GIL).

    Exceptions from the producer are re-raised here; a consumer that stops
    early stops the producer (no thread or open file is left behind).
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)

    worker = threading.Thread(target=produce, name="xpcat-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def _xp_batches(files: Sequence[Path], lo: int, hi: int, size: int) -> Iterator[tuple[pa.Table, str]]:
    """Stream the XP rows with lo <= source_id < hi from Parquet files, ``size`` rows at a time.

    Row groups whose source_id statistics lie outside the range are skipped,
    so memory holds one batch, not the partition's raw XP rows (~25 kB/star).

    Raises
    ------
    InputError
        A file is unreadable (corrupt, truncated) or has no source_id column; names the file.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for f in files:
        try:
            pf = pq.ParquetFile(f)
            if "source_id" not in pf.schema_arrow.names:
                raise InputError(f"raw xp_continuous_mean_spectrum file {f} has no source_id column")
            col = pf.schema_arrow.get_field_index("source_id")
            groups = []
            for g in range(pf.num_row_groups):
                st = pf.metadata.row_group(g).column(col).statistics
                if st is not None and st.has_min_max and (st.max < lo or st.min >= hi):
                    continue
                groups.append(g)
            if not groups:
                continue
            for rb in pf.iter_batches(batch_size=size, row_groups=groups):
                t = pa.Table.from_batches([rb])
                if not t.num_rows:
                    continue
                sid = rb.column("source_id")
                mm = pc.min_max(sid)
                if mm["min"].as_py() < lo or mm["max"].as_py() >= hi:  # rows outside the range: filter (a copy)
                    t = t.filter(pc.and_(pc.greater_equal(sid, lo), pc.less(sid, hi)))
                if t.num_rows:
                    yield t, str(f)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
            raise InputError(f"cannot read raw xp_continuous_mean_spectrum Parquet file {f} (corrupt or truncated): {err}") from err


def _write_partition(
    tables: Mapping[str, pa.Table | None], pix: int, level: int, out_path: Path, config: RunConfig, n_expected: int
) -> dict:
    t0 = time.perf_counter()
    name = parts.partition_name(pix, level)
    lo, hi = parts.source_id_range(pix, level)
    gaia = tables["gaia_source"]
    ids = _ids(gaia)
    if ids.size and (ids.min() < lo or ids.max() >= hi):
        raise InputError(f"partition {name}: gaia_source rows outside its source_id range [{lo}, {hi})")
    table = condition_tables(gaia, tables["xp_continuous_mean_spectrum"], tables.get("tmass"), tables.get("unwise"), config, what=f"partition {name}")
    del gaia
    if isinstance(tables, dict):
        tables.clear()  # the raw rows are no longer needed: free them before writing
    meta = conditioning_metadata(config)
    meta["partition"] = {"name": name, "level": level, "pix": pix, "source_id_lo": lo, "source_id_hi": hi}
    table = cs.with_metadata(table, meta)
    flags = table.column("condition_flags").to_numpy()
    counts = {f.name: int(np.count_nonzero(flags & int(f))) for f in ConditionFlag}
    parts.atomic_write_parquet(
        table,
        out_path,
        schema=CONDITIONED,
        expected_rows=n_expected,
        info={"options_key": _options_key(config), "flags": counts},
        compression=_COMPRESSION,
        write_options=_WRITE_OPTIONS,
        verify="footer",
    )
    return {
        "partition": name,
        "stars": int(table.num_rows),
        "flags": counts,
        "bytes": int(out_path.stat().st_size),
        "seconds": time.perf_counter() - t0,
    }


def _is_current(out_path: Path, n_expected: int, config: RunConfig) -> bool:
    if not parts.is_done(out_path, expected_rows=n_expected):
        return False
    marker = parts.read_marker(out_path) or {}
    return (marker.get("info") or {}).get("options_key") == _options_key(config)


def condition_partition(
    raw_files: Mapping[str, Sequence[Path]],
    pix: int,
    out_path: str | Path,
    config: RunConfig,
    *,
    level: int | None = None,
    n_expected: int | None = None,
    force: bool = False,
) -> dict:
    """Condition one partition, reading its source_id range from the raw files.

    For Dask tasks: inputs are read from disk (row groups filtered on the
    source_id range), the output is written atomically with its done marker,
    and only a small summary dict is returned.

    Parameters
    ----------
    raw_files : mapping of table name -> list of Parquet paths
        At least gaia_source and xp_continuous_mean_spectrum.
    pix : int
        Pixel index at ``level``.
    out_path : path-like
        The partition file (``conditioned/<name>.parquet``).
    config : RunConfig
    level : int, optional
        Default ``config.data.partition_level``.
    n_expected : int, optional
        Expected star count (from :func:`plan_partitions`); checked on write.
    force : bool
        Redo even a valid, current partition.

    Returns
    -------
    dict
        ``partition``, ``status`` ("written", "redone" or "skipped"), ``stars``,
        ``flags`` (counts per ConditionFlag name), ``bytes``, ``seconds``.
    """
    out_path = Path(out_path)
    level = config.data.partition_level if level is None else int(level)
    name = parts.partition_name(pix, level)
    if not force and n_expected is not None and _is_current(out_path, n_expected, config):
        return {"partition": name, "status": "skipped", "stars": int(n_expected), "flags": {}, "bytes": out_path.stat().st_size, "seconds": 0.0}
    existed = out_path.exists() or parts.marker_path(out_path).exists()
    lo, hi = parts.source_id_range(pix, level)
    for t in REQUIRED_RAW_TABLES:
        if not raw_files.get(t):
            raise StageError(f"partition {name}: no raw {t} files given")
    tables: dict[str, pa.Table | None] = {
        "gaia_source": _read_range(raw_files["gaia_source"], "gaia_source", lo, hi, _GAIA_COLS),
        "xp_continuous_mean_spectrum": _prefetched(_xp_batches(raw_files["xp_continuous_mean_spectrum"], lo, hi, MAX_BLOCK)),
        "tmass": _read_range(raw_files["tmass"], "tmass", lo, hi, _TMASS_COLS) if raw_files.get("tmass") else None,
        "unwise": _read_range(raw_files["unwise"], "unwise", lo, hi, _UNWISE_COLS) if raw_files.get("unwise") else None,
    }
    n = tables["gaia_source"].num_rows if n_expected is None else n_expected
    summary = _write_partition(tables, pix, level, out_path, config, n)
    summary["status"] = "redone" if existed else "written"
    return summary


#: Raw inputs up to this size are read once and sliced in memory by condition_run.
_IN_MEMORY_BYTES = 1 << 30


def _load_sorted(raw_files: Mapping[str, Sequence[Path]]) -> dict[str, tuple[pa.Table, np.ndarray] | None]:
    """Every raw table read whole, sorted by source_id, with its sorted ids (duplicates refused)."""
    cols = {"gaia_source": _GAIA_COLS, "xp_continuous_mean_spectrum": None, "tmass": _TMASS_COLS, "unwise": _UNWISE_COLS}
    out: dict[str, tuple[pa.Table, np.ndarray] | None] = {}
    for table, columns in cols.items():
        if not raw_files.get(table):
            out[table] = None
            continue
        t = _read_range(raw_files[table], table, None, None, columns).sort_by("source_id")
        out[table] = (t, _ids(t))
    return out


def _slice_tables(loaded: Mapping[str, tuple[pa.Table, np.ndarray] | None], lo: int, hi: int) -> dict[str, pa.Table | None]:
    out: dict[str, pa.Table | None] = {}
    for table, item in loaded.items():
        if item is None:
            out[table] = None
            continue
        t, ids = item
        a, b = np.searchsorted(ids, [lo, hi])
        out[table] = t.slice(int(a), int(b - a))
    return out


def condition_run(run_dir: str | Path, config: RunConfig) -> dict:
    """The ``xpcat condition`` stage: every partition of ``RUN_DIR/raw`` -> ``RUN_DIR/conditioned``.

    Valid partitions written with the same options are skipped; corrupt,
    partial or outdated ones are redone.

    Returns
    -------
    dict
        ``partitions_written``, ``partitions_skipped``, ``partitions_redone``,
        ``stars``, ``flags`` (ConditionFlag name -> count over the written
        partitions), ``bytes_per_star``, ``seconds``, ``output_dir``.
    """
    from xpcat.progress import progress

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    tasks = plan_partitions(run_dir, config)
    totals = {"written": 0, "skipped": 0, "redone": 0}
    flag_counts = {f.name: 0 for f in ConditionFlag}
    stars = 0
    n_bytes = 0
    in_memory = None
    if tasks:
        raw_bytes = sum(f.stat().st_size for fs in tasks[0].raw_files.values() for f in fs)
        if raw_bytes <= _IN_MEMORY_BYTES and len(tasks) > 1:
            in_memory = _load_sorted(tasks[0].raw_files)
    for task in progress(tasks, "condition", total=len(tasks)):
        if in_memory is None:
            res = condition_partition(task.raw_files, task.pix, task.out_path, config, level=task.level, n_expected=task.n_stars)
        elif _is_current(task.out_path, task.n_stars, config):
            res = {"status": "skipped", "stars": task.n_stars, "flags": {}, "bytes": task.out_path.stat().st_size}
        else:
            existed = task.out_path.exists() or parts.marker_path(task.out_path).exists()
            lo, hi = parts.source_id_range(task.pix, task.level)
            res = _write_partition(_slice_tables(in_memory, lo, hi), task.pix, task.level, task.out_path, config, task.n_stars)
            res["status"] = "redone" if existed else "written"
        totals[res["status"]] += 1
        stars += res["stars"]
        n_bytes += res["bytes"]
        for k, v in res["flags"].items():
            flag_counts[k] += v
    summary = {
        "partitions_written": totals["written"] + totals["redone"],
        "partitions_skipped": totals["skipped"],
        "partitions_redone": totals["redone"],
        "stars": stars,
        "flags": flag_counts,
        "bytes_per_star": n_bytes / stars if stars else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
        "output_dir": str(run_dir / "conditioned"),
    }
    logger.info("conditioned %d stars in %d partitions (%d skipped)", stars, len(tasks), totals["skipped"])
    return summary

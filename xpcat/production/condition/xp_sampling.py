"""Batched conversion of XP continuous rows to sampled spectra (the public ``xpcat.sample_xp``).

The design matrices are GaiaXPy's own (:mod:`xpcat.production.condition.bases`);
the array columns are parsed by :mod:`xpcat.production.condition.xp_columns`.
Flux and flux_error equal ``gaiaxpy.calibrate``; the covariance is the linear
propagation of the coefficient covariance, computed in chunks of stars on
threads (:mod:`xpcat.production.condition.parallel`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from xpcat.production.condition.bases import (
    DEFAULT_WAVELENGTHS_NM,
    INSTRUMENT_MODELS,
    band_design,
)
from xpcat.production.condition.parallel import (
    default_threads,
    jit_kernel,
    run_chunks,
    single_threaded_blas,
)
from xpcat.production.condition.xp_columns import (
    array_column,
    scalar_column,
    table_columns,
)

__all__ = [
    "BANDS",
    "XpSample",
    "sample_xp",
    "sample_xp_into",
]

logger = logging.getLogger(__name__)

#: Stars per chunk of the covariance products (work arrays of a few MB stay in cache).
_CHUNK = 512

#: The two XP bands, in flux-vector order.
BANDS = ("bp", "rp")


@dataclass(frozen=True)
class XpSample:
    """XP spectra sampled on a wavelength grid, as GaiaXPy's ``calibrate`` gives them.

    Attributes
    ----------
    source_id : (n,) int64
    wavelengths : (m,) float64, nm
    flux : (n, m) float64, W m^-2 nm^-1
        NaN where no band covers a sample (a missing band's samples).
    flux_error : (n, m) float64, W m^-2 nm^-1
        ``sqrt(diag(covariance))``; equals GaiaXPy's ``flux_error``.
    covariance : (n, m, m) float64 or None, (W m^-2 nm^-1)^2
        Linear propagation ``W A^T Sigma A W`` per band, summed (NaN rows and
        columns where ``flux`` is NaN). None when not requested.
    flux_bp, flux_rp : (n, m) float64, W m^-2 nm^-1
        The weighted BP and RP parts (0 where a band does not contribute), so
        that ``flux = flux_bp + flux_rp`` where finite.
    has_bp, has_rp : (n,) bool
        The band was present and usable.
    bad_bp, bad_rp : (n,) bool
        The band was present but unusable (NaN values, arrays of the wrong
        length, a non-positive error); its samples are missing.
    """

    source_id: np.ndarray
    wavelengths: np.ndarray
    flux: np.ndarray
    flux_error: np.ndarray
    covariance: np.ndarray | None
    flux_bp: np.ndarray
    flux_rp: np.ndarray
    has_bp: np.ndarray
    has_rp: np.ndarray
    bad_bp: np.ndarray
    bad_rp: np.ndarray

    def __len__(self) -> int:
        return int(self.source_id.shape[0])



def _sym_add_py(out: np.ndarray, Q: np.ndarray, var: np.ndarray) -> None:
    """``out[i] += Q[i] + Q[i]^T`` and ``var[i] += 2 diag(Q[i])`` in one pass (compiled by numba)."""
    m, k, _ = Q.shape
    for i in range(m):
        for a in range(k):
            for b in range(k):
                out[i, a, b] += Q[i, a, b] + Q[i, b, a]
            var[i, a] += 2.0 * Q[i, a, a]



_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A per-thread work array of ``shape`` (float64, uninitialised), reused across chunks.

    Each chunk's work arrays are several MB: allocated afresh, every chunk pays
    page faults on memory the allocator has just returned to the kernel (on
    this project's VMs that costs about a fifth of the covariance time). One
    buffer per thread and name, grown when a larger shape is asked for, avoids
    that; callers must not keep a view of it beyond the chunk.
    """
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    size = int(np.prod(shape))
    buf = bufs.get(name)
    if buf is None or buf.size < size:
        buf = bufs[name] = np.empty(size)
    return buf[:size].reshape(shape)


def _band_covariance_chunk(
    rho: np.ndarray,
    e: np.ndarray,
    A: np.ndarray,
    ramp: np.ndarray,
    w_ramp: np.ndarray,
    cov: np.ndarray | None,
    var: np.ndarray,
) -> None:
    """Add one band's ``W A^T Sigma A W`` for a chunk of stars (Sigma = diag(e) R diag(e)).

    Sigma = Hs + Hs^T with Hs = strict-lower(Sigma) + diag(Sigma) / 2, so
    ``A^T Sigma A = Q + Q^T`` with ``Q = A^T Y`` and ``Y = Hs A``. Row r of Y is
    ``e_r (sum_{j<r} rho_rj e_j A_j + e_r A_r / 2)``: for every r one matrix
    product of all the chunk's stars (their packed correlations, as the archive
    stores them, need no unpacking) with the shared ``A[:r+1]``, which skips the
    zero upper triangle. Then ``Q^T = Y^T A`` is one large product.

    Parameters
    ----------
    rho : (m, nb(nb-1)/2) float64
        Packed correlations (strict lower triangle, row-major, as the archive
        packs them; ``gaiaxpy.core.generic_functions.array_to_symmetric_matrix``
        is the inverse). Rows of stars without the band are zero.
    e : (m, nb) float64
        Coefficient errors (zero for stars without the band).
    A : (nb, k) float64
        The band's design matrix on its support (times any unit scale).
    ramp : (r,) int
        Columns of the support with a merge weight other than 1.
    w_ramp : (m, r) float64
        Each star's merge weight on those columns.
    cov : (m, k, k) view or None
        Receives ``+= W A^T Sigma A W`` (any strides); None for the variances only.
    var : (m, k) view
        Receives ``+=`` the diagonal.
    """
    m, nb = e.shape
    k = A.shape[1]
    Y = _scratch("Y", (nb, m, k))
    t = _scratch("t", (m, nb))
    np.multiply(0.5 * e[:, :1] ** 2, A[0], out=Y[0])
    s = 0
    for r in range(1, nb):
        tt = t[:, : r + 1]
        np.multiply(rho[:, s : s + r], e[:, :r], out=tt[:, :r])
        tt[:, r] = 0.5 * e[:, r]
        if r < k:  # scale the narrower operand by e_r
            tt *= e[:, r : r + 1]
            np.matmul(tt, A[: r + 1], out=Y[r])
        else:
            np.matmul(tt, A[: r + 1], out=Y[r])
            Y[r] *= e[:, r : r + 1]
        s += r
    if cov is None:
        v = 2.0 * np.einsum("rna,ra->na", Y, A)
        v[:, ramp] *= w_ramp**2
        var += v
        return
    # Q[star] = Y[:, star]^T A (= (A^T Hs A)^T; only Q + Q^T matters): one product, output in star order
    Q = _scratch("Q", (m, k, k))
    np.matmul(Y.reshape(nb, m * k).T, A, out=Q.reshape(m * k, k))
    for jj, j in enumerate(ramp):
        Q[:, j, :] *= w_ramp[:, jj, None]
        Q[:, :, j] *= w_ramp[:, jj, None]
    jit_kernel(_sym_add_py)(cov, Q, var)


def _rows_outside(mat: np.ndarray, length: np.ndarray, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> np.ndarray:
    """(n,) bool: rows of a padded matrix with an element outside [lo, hi] (or NaN) within the row's length.

    ``lo_open`` / ``hi_open`` exclude the bound itself. With equal row lengths
    this is two reductions (NaN propagates through min and max) and no
    temporary arrays. Rows of length 0 (a missing band) may come out either
    way; callers have already excluded them.
    """
    w = mat.shape[1]
    if w == 0:
        return np.zeros(mat.shape[0], dtype=bool)
    if np.all((length == w) | (length == 0)):
        mn, mx = mat.min(axis=1), mat.max(axis=1)
    else:
        inside = np.arange(w)[None, :] < length[:, None]
        mn = np.where(inside, mat, np.inf).min(axis=1)
        mx = np.where(inside, mat, -np.inf).max(axis=1)
    with np.errstate(invalid="ignore"):
        ok_lo = mn > lo if lo_open else mn >= lo
        ok_hi = mx < hi if hi_open else mx <= hi
    return ~(ok_lo & ok_hi)


def _fixed_width(mat: np.ndarray, width: int, rows: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """``mat[:, :width]`` (zero-padded if narrower) with the rows not in ``rows`` set to 0.

    With ``inplace`` (the caller will not use ``mat`` again) a writeable
    ``mat`` is zeroed in place rather than copied.
    """
    out = mat[:, :width]
    if out.shape[1] < width:
        out = np.concatenate([out, np.zeros((mat.shape[0], width - out.shape[1]))], axis=1)
    if not rows.all():
        if inplace and out.flags.writeable:
            out[~rows] = 0.0
        else:
            out = np.where(rows[:, None], out, 0.0)
    return out


def sample_xp(
    table,
    *,
    wavelengths_nm: np.ndarray | None = None,
    covariance: str = "correct",
    with_covariance: bool = True,
    threads: int | None = None,
) -> XpSample:
    """Convert XP continuous rows to sampled fluxes, errors and covariances, as GaiaXPy does.

    The design matrices are GaiaXPy's own (:func:`band_design`), built once per
    basis-function id and grid; all rows are then converted with batched matrix
    products. Flux and flux_error equal ``gaiaxpy.calibrate(..., sampling=grid)``;
    the covariance is the proper linear propagation ``sum_band W A^T Sigma A W``
    with ``Sigma = diag(e) R diag(e)`` from the coefficient errors and
    correlations. A source with one band only gets that band unweighted over its
    range and NaN elsewhere, as GaiaXPy does.

    Parameters
    ----------
    table : pandas.DataFrame or pyarrow.Table
        Rows with the archive's column names (``source_id``,
        ``{bp,rp}_coefficients``, ``_coefficient_errors``,
        ``_coefficient_correlations``, ``_n_parameters``,
        ``_standard_deviation``, ``_basis_function_id``). Array columns may be
        lists, arrays or the archive's CSV strings ``"(c0, c1, ...)"``; a missing
        band is null / NaN / empty.
    wavelengths_nm : (m,) array, optional
        Sampling grid in nm; default 392..992 nm in steps of 10.
    covariance : {"correct", "paper"}
        ``"correct"``: Sigma = diag(e) R diag(e) (GaiaXPy's flux_error);
        ``"paper"``: the paper's unscaled Sigma / s_band^2.
    with_covariance : bool
        Compute the (n, m, m) covariance (flux_error is always computed).
    threads : int, optional
        Threads for the covariance products (chunks of stars); default
        :func:`default_threads`. BLAS runs single-threaded inside.

    Returns
    -------
    XpSample
        ``flux`` (n, m), ``flux_error`` (n, m), ``covariance`` (n, m, m) in
        W m^-2 nm^-1, NaN where a band is missing; see :class:`XpSample`.

    Raises
    ------
    TypeError
        For a table that is neither a DataFrame nor an Arrow table.
    KeyError
        For a required column that is absent, or a basis function id GaiaXPy
        has no instrument model for.
    ValueError
        For an unknown ``covariance`` option.
    """
    with single_threaded_blas():
        return sample_xp_into(
            table, wavelengths_nm=wavelengths_nm, covariance=covariance, with_covariance=with_covariance, threads=threads
        )


def sample_xp_into(
    table,
    *,
    wavelengths_nm: np.ndarray | None = None,
    covariance: str = "correct",
    with_covariance: bool = True,
    cov_out: np.ndarray | None = None,
    cov_scale: float = 1.0,
    threads: int | None = None,
) -> XpSample:
    """:func:`sample_xp` without the BLAS thread limit, optionally adding the covariance into a caller's buffer.

    For callers that run many blocks inside one :func:`single_threaded_blas`
    (the condition stage builds the covariance in place, in its own buffer and
    unit). ``table``, ``wavelengths_nm``, ``covariance``, ``with_covariance``
    and ``threads`` are as for :func:`sample_xp`.

    Parameters
    ----------
    cov_out : (n, m, m) float64 array or view, optional
        Zero-filled (or holding terms to add to); the covariance is added into
        it (any strides, e.g. a reversed view) and it is returned as
        ``covariance``. Rows and columns of missing samples are left as they
        are (not set to NaN).
    cov_scale : float
        ``covariance`` and ``flux_error`` are for the flux times ``cov_scale``
        (e.g. ``1 / unit`` for an internal flux unit); ``flux`` is not scaled.

    Returns
    -------
    XpSample
        As :func:`sample_xp`; ``covariance`` is ``cov_out`` when given.

    Raises
    ------
    TypeError, KeyError, ValueError
        As :func:`sample_xp`.
    """
    if covariance not in ("correct", "paper"):
        raise ValueError(f"covariance must be 'correct' or 'paper'; got {covariance!r}")
    threads = default_threads() if threads is None else max(1, int(threads))
    wl = DEFAULT_WAVELENGTHS_NM if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=float)
    n, get = table_columns(table)
    m = wl.size
    sid_col = get("source_id")
    if sid_col is None:
        raise KeyError("XP table has no 'source_id' column")
    if hasattr(sid_col, "to_numpy") and not isinstance(sid_col, np.ndarray):
        source_id = np.asarray(sid_col.to_numpy(zero_copy_only=False), dtype=np.int64)
    else:
        source_id = np.asarray(sid_col).astype(np.int64)  # object ints: exact (no float round trip)

    parsed: dict[str, dict] = {}
    for band in BANDS:
        cols = {}
        for key in ("coefficients", "coefficient_errors", "coefficient_correlations"):
            c = get(f"{band}_{key}")
            if c is None:
                raise KeyError(f"XP table has no {band}_{key!r} column")
            cols[key] = array_column(c, n)
        n_par_col = get(f"{band}_n_parameters")
        coef_mat, coef_len = cols["coefficients"]
        n_par = scalar_column(n_par_col, n) if n_par_col is not None else coef_len.astype(float)
        s_col = get(f"{band}_standard_deviation")
        s = scalar_column(s_col, n) if s_col is not None else np.full(n, np.nan)
        bid_col = get(f"{band}_basis_function_id")
        default_id = next(iter(INSTRUMENT_MODELS[band]))
        bid = scalar_column(bid_col, n) if bid_col is not None else np.full(n, float(default_id))
        present = coef_len > 0
        bid = np.where(present & ~np.isfinite(bid), default_id, bid)
        parsed[band] = dict(cols=cols, n_par=n_par, s=s, bid=bid, present=present)

    # Validate each band row by row: a present band that fails a check is "bad" (its samples missing).
    ok: dict[str, np.ndarray] = {}
    bad: dict[str, np.ndarray] = {}
    designs: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for band in BANDS:
        p = parsed[band]
        coef, coef_len = p["cols"]["coefficients"]
        err, err_len = p["cols"]["coefficient_errors"]
        corr, corr_len = p["cols"]["coefficient_correlations"]
        good = p["present"].copy()
        designs[band] = {}
        for b in np.unique(p["bid"][good]).astype(int):
            designs[band][b] = band_design(band, b, wl)  # raises KeyError for unknown ids
        n_bases = np.zeros(n, dtype=np.int64)
        for b, (A, _) in designs[band].items():
            n_bases[good & (p["bid"] == b)] = A.shape[0]
        good &= (coef_len == n_bases) & (err_len == n_bases) & (p["n_par"] == n_bases)
        good &= corr_len == n_bases * (n_bases - 1) // 2
        # element checks (NaN fails every comparison): finite coefficients, 0 < error < inf, |rho| <= 1
        good &= ~_rows_outside(coef, coef_len, -np.inf, np.inf, lo_open=True, hi_open=True)
        good &= ~_rows_outside(err, err_len, 0.0, np.inf, lo_open=True, hi_open=True)
        good &= ~_rows_outside(corr, corr_len, -1.0, 1.0)
        if covariance == "paper":
            good &= np.isfinite(p["s"]) & (p["s"] > 0)
        ok[band] = good
        bad[band] = p["present"] & ~good
        if bad[band].any():
            ids = ", ".join(str(x) for x in source_id[bad[band]][:5])
            logger.warning("%d source(s) have unusable %s coefficients (e.g. %s); their %s samples are missing",
                           int(bad[band].sum()), band.upper(), ids, band.upper())

    flux = np.zeros((n, m))
    flux_parts = {band: np.zeros((n, m)) for band in BANDS}
    cov = None
    if with_covariance:
        cov = np.zeros((n, m, m)) if cov_out is None else cov_out
    var = np.zeros((n, m))
    covered = np.zeros((n, m), dtype=bool)
    for band in BANDS:
        other = "rp" if band == "bp" else "bp"
        p = parsed[band]
        coef, _ = p["cols"]["coefficients"]
        err, _ = p["cols"]["coefficient_errors"]
        corr, _ = p["cols"]["coefficient_correlations"]
        for b, (A, w) in designs[band].items():
            support = np.flatnonzero(w > 0)
            lo, hi = int(support[0]), int(support[-1]) + 1
            if hi - lo != support.size:
                raise ValueError(f"{band.upper()} merge weights are not contiguous on this grid")
            sl = slice(lo, hi)
            nb = A.shape[0]
            mine = ok[band] & (p["bid"] == b)
            if not mine.any():
                continue
            # Every row is computed with slices (no fancy-index copies of the big arrays); rows
            # without this band get zero inputs and so contribute exactly zero.
            last = len(designs[band]) == 1  # the matrices are not needed for another basis id
            c = _fixed_width(coef, nb, mine, inplace=last)
            e = _fixed_width(err, nb, mine, inplace=last)
            if covariance == "paper":
                e = e / np.where(mine, p["s"], 1.0)[:, None]
            rho = _fixed_width(corr, nb * (nb - 1) // 2, mine, inplace=last)
            A_s = A[:, sl]  # (nb, k)
            f_band = c @ A_s  # (n, k)
            # Merge weights: GaiaXPy uses a band unweighted when the other band is missing.
            # Only the ramp columns (w != 1) need them.
            w_eff = np.where(ok[other][:, None], w[None, sl], 1.0) * mine[:, None]
            ramp = np.flatnonzero(w[sl] != 1.0)
            f_band[:, ramp] *= w_eff[:, ramp]
            f_band[~mine] = 0.0
            flux[:, sl] += f_band
            flux_parts[band][:, sl] += f_band
            covered[:, sl] |= mine[:, None]
            A_c = A_s * cov_scale
            w_ramp = w_eff[:, ramp]
            chunks = [(c0, min(n, c0 + _CHUNK)) for c0 in range(0, n, _CHUNK)]

            def work(c: tuple[int, int], sl=sl, rho=rho, e=e, A_c=A_c, ramp=ramp, w_ramp=w_ramp) -> None:
                c0, c1 = c
                block = cov[c0:c1, sl, sl] if with_covariance else None
                _band_covariance_chunk(rho[c0:c1], e[c0:c1], A_c, ramp, w_ramp[c0:c1], block, var[c0:c1, sl])

            run_chunks(work, chunks, threads)
    flux[~covered] = np.nan
    for band in BANDS:
        flux_parts[band][~covered] = 0.0
    with np.errstate(invalid="ignore"):
        flux_error = np.sqrt(var)
    flux_error[~covered] = np.nan
    if with_covariance and cov_out is None:
        miss = ~covered
        rows = np.flatnonzero(miss.any(axis=1))
        if rows.size:
            sub = cov[rows]
            sub[miss[rows][:, :, None] | miss[rows][:, None, :]] = np.nan
            cov[rows] = sub
    return XpSample(
        source_id=source_id,
        wavelengths=wl,
        flux=flux,
        flux_error=flux_error,
        covariance=cov,
        flux_bp=flux_parts["bp"],
        flux_rp=flux_parts["rp"],
        has_bp=ok["bp"],
        has_rp=ok["rp"],
        bad_bp=bad["bp"],
        bad_rp=bad["rp"],
    )

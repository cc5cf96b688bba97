"""GaiaXPy's own sampled XP bases, built once and cached.

``flux_band = coefficients @ A_band`` and ``flux = w_bp * flux_bp + w_rp * flux_rp``
reproduce ``gaiaxpy.calibrate`` exactly for an explicit sampling (see
``shared/data/gaiaxpy_reference/PROVENANCE.md``). The matrices are built with
GaiaXPy's ``ExternalInstrumentModel`` and ``SampledBasisFunctions`` from the
instrument-model files shipped in GaiaXPy, and keyed by the Gaia basis
function id, so another data release is a new entry in :data:`INSTRUMENT_MODELS`,
not new code.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from os.path import join

import numpy as np

__all__ = [
    "INSTRUMENT_MODELS",
    "XpBases",
    "XpSample",
    "xp_bases",
    "band_design",
    "merge_weights",
    "sample_xp",
    "DEFAULT_WAVELENGTHS_NM",
]

logger = logging.getLogger(__name__)

#: Gaia ``{bp,rp}_basis_function_id`` -> GaiaXPy instrument model name (DR3: 56 -> BP v375wi, 57 -> RP v142r).
INSTRUMENT_MODELS: dict[str, dict[int, str]] = {"bp": {56: "v375wi"}, "rp": {57: "v142r"}}

#: The xpcat grid, 392..992 nm in 10 nm steps.
DEFAULT_WAVELENGTHS_NM = np.arange(392.0, 993.0, 10.0)


@dataclass(frozen=True)
class XpBases:
    """Sampled design matrices of both bands and their merge weights.

    Attributes
    ----------
    wavelengths : (m,) float64, nm
    design_bp, design_rp : (n_bases, m) float64
        ``coefficients @ design`` is the band's flux in W m^-2 nm^-1.
    weight_bp, weight_rp : (m,) float64
        GaiaXPy's merge weights (a ramp over 635-643 nm).
    """

    wavelengths: np.ndarray
    design_bp: np.ndarray
    design_rp: np.ndarray
    weight_bp: np.ndarray
    weight_rp: np.ndarray


def merge_weights(wavelengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GaiaXPy's BP/RP merge weights on a wavelength grid (nm).

    BP alone below ``RP_WL.low`` (635 nm), RP alone above ``BP_WL.high``
    (643 nm), a linear ramp between, as GaiaXPy's calibrator builds them.
    """
    from gaiaxpy.core.satellite import BP_WL, RP_WL

    lo, hi = float(RP_WL.low), float(BP_WL.high)
    x = np.asarray(wavelengths, dtype=float)
    w_rp = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    w_bp = 1.0 - w_rp
    return w_bp, w_rp


@functools.lru_cache(maxsize=16)
def _design(band: str, model: str, wavelengths: tuple[float, ...], weights: tuple[float, ...]) -> np.ndarray:
    from gaiaxpy.calibrator.external_instrument_model import ExternalInstrumentModel
    from gaiaxpy.config.paths import config_path
    from gaiaxpy.spectrum.sampled_basis_functions import SampledBasisFunctions

    def path(kind: str) -> str:
        return join(config_path, f"{band}C03_{model}_{kind}.csv")

    with contextlib.redirect_stdout(io.StringIO()):  # GaiaXPy prints "Reading input file..."
        eim = ExternalInstrumentModel.from_config_csv(path("dispersion"), path("response"), path("bases"))
        sbf = SampledBasisFunctions.from_external_instrument_model(np.asarray(wavelengths), np.asarray(weights), eim)
    return np.array(sbf.get_design_matrix(), dtype=np.float64)


def xp_bases(
    wavelengths_nm: np.ndarray | None = None, bp_basis_function_id: int = 56, rp_basis_function_id: int = 57
) -> XpBases:
    """The sampled bases for a wavelength grid (cached per grid and basis ids).

    Parameters
    ----------
    wavelengths_nm : (m,) array, nm, optional
        Default: 392..992 nm in steps of 10.
    bp_basis_function_id, rp_basis_function_id : int
        Gaia basis function ids of the rows to convert.

    Raises
    ------
    KeyError
        For a basis function id GaiaXPy has no instrument model for in :data:`INSTRUMENT_MODELS`.
    """
    wl = DEFAULT_WAVELENGTHS_NM if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=float)
    w_bp, w_rp = merge_weights(wl)
    models = {}
    for band, bid in (("bp", bp_basis_function_id), ("rp", rp_basis_function_id)):
        try:
            models[band] = INSTRUMENT_MODELS[band][int(bid)]
        except KeyError:
            raise KeyError(
                f"no GaiaXPy instrument model known for {band}_basis_function_id={bid}; "
                f"known: {INSTRUMENT_MODELS[band]}"
            ) from None
    key = tuple(float(v) for v in wl)
    A_bp = _design("bp", models["bp"], key, tuple(float(v) for v in w_bp))
    A_rp = _design("rp", models["rp"], key, tuple(float(v) for v in w_rp))
    return XpBases(wl, A_bp, A_rp, w_bp, w_rp)


# ---------------------------------------------------------------------------
# Batched conversion of XP continuous rows (the public ``xpcat.sample_xp``).
# ---------------------------------------------------------------------------

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


def band_design(band: str, basis_function_id: int, wavelengths_nm: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One band's sampled design matrix and merge weights.

    Parameters
    ----------
    band : {"bp", "rp"}
    basis_function_id : int
        Gaia ``{bp,rp}_basis_function_id``.
    wavelengths_nm : (m,) array, optional

    Returns
    -------
    design : (n_bases, m) float64
    weight : (m,) float64

    Raises
    ------
    KeyError
        For an unknown basis function id.
    """
    wl = DEFAULT_WAVELENGTHS_NM if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=float)
    try:
        model = INSTRUMENT_MODELS[band][int(basis_function_id)]
    except KeyError:
        raise KeyError(
            f"no GaiaXPy instrument model known for {band}_basis_function_id={basis_function_id}; "
            f"known: {INSTRUMENT_MODELS[band]}"
        ) from None
    w_bp, w_rp = merge_weights(wl)
    w = w_bp if band == "bp" else w_rp
    key = tuple(float(v) for v in wl)
    return _design(band, model, key, tuple(float(v) for v in w)), w


def _parse_array_cell(value) -> np.ndarray | None:
    """One array cell: list, ndarray, archive CSV string '(1, 2, ...)', or missing."""
    if value is None:
        return None
    if isinstance(value, str):
        body = value.strip().strip("()[]").strip()
        if not body:
            return None
        parts = body.split(",")
        try:
            return np.array(parts, dtype=np.float64)
        except ValueError:  # malformed number: keep the length, mark the values bad
            return np.full(len(parts), np.nan)
    if isinstance(value, float) and np.isnan(value):
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.ndim == 0:
        return None if np.isnan(arr) else arr.reshape(1)
    return arr.ravel()


def _is_missing(value) -> bool:
    """A missing array cell: None, a float NaN, an empty string or an empty array."""
    if value is None:
        return True
    if isinstance(value, float):
        return bool(np.isnan(value))
    if isinstance(value, (str, np.ndarray, list, tuple)):
        return len(value) == 0 or (isinstance(value, str) and not value.strip("()[] "))
    return False


def _array_cells(col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(values, lengths, rows) of a 1-d object array whose cells are 1-d numeric arrays or lists, or missing.

    Vectorised: ``pandas.isna`` finds the missing cells, ``map(len)`` and one
    ``np.concatenate`` do the rest. None when some cell is anything else
    (strings, nested arrays), for the cell-by-cell parser.
    """
    import pandas as pd

    miss = np.asarray(pd.isna(col), dtype=bool)
    rows = np.flatnonzero(~miss)
    present = col[rows]
    try:
        lengths = np.fromiter(map(len, present), dtype=np.int64, count=rows.size)
        values = np.concatenate(present) if rows.size else np.zeros(0)
    except (TypeError, ValueError):
        return None
    if values.ndim != 1 or values.dtype.kind not in "fiu" or values.size != lengths.sum():
        return None
    return values.astype(np.float64, copy=False), lengths, rows


def _ragged_to_matrix(values: np.ndarray, lengths: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scatter concatenated row arrays into an (n, max_len) zero-padded matrix (zero rows for missing cells).

    Only the first ``length`` entries of a row are data; the padding value is never read as data.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max()) if lengths.size else 0
    if width and rows.size == n and np.all(lengths == width) and np.array_equal(rows, np.arange(n)):
        return np.asarray(values, dtype=np.float64).reshape(n, width), lengths
    out = np.zeros((n, width))
    out_len = np.zeros(n, dtype=np.int64)
    out_len[rows] = lengths
    if width and lengths.size and np.all(lengths == width):
        out[rows] = np.asarray(values, dtype=np.float64).reshape(-1, width)
    elif values.size:
        r = np.repeat(rows, lengths)
        starts = np.cumsum(lengths) - lengths
        c = np.arange(values.size) - np.repeat(starts, lengths)
        out[r, c] = values
    return out, out_len


def _array_column(col, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An array column (Arrow list / pandas objects / CSV strings) as a zero-padded (n, m) matrix and lengths."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, pa.Array) and (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.flatnonzero(valid)
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)[rows] if rows.size else np.zeros(0)
        values = pc.list_flatten(col).cast(pa.float64()).to_numpy(zero_copy_only=False)
        return _ragged_to_matrix(values, lengths, rows, n)
    if isinstance(col, pa.Array):
        col = col.to_pylist()
    if isinstance(col, np.ndarray) and col.dtype == object and col.ndim == 1 and col.size and not isinstance(col[0], str):
        # DataFrame cells already holding arrays (what GaiaXPy's readers make): one concatenate
        fast = _array_cells(col)
        if fast is not None:
            values, lengths, rows = fast
            if not values.size:
                return np.zeros((n, 0)), np.zeros(n, dtype=np.int64)
            return _ragged_to_matrix(values, lengths, rows, n)
    col = list(col)
    if col and all(isinstance(v, str) or v is None or (isinstance(v, float) and np.isnan(v)) for v in col):
        # Archive CSV strings: parse a whole column in one call.
        bodies = [(i, v.strip().strip("()[]").strip()) for i, v in enumerate(col) if isinstance(v, str)]
        bodies = [(i, b) for i, b in bodies if b]
        if not bodies:
            return np.zeros((n, 0)), np.zeros(n, dtype=np.int64)
        rows = np.array([i for i, _ in bodies], dtype=np.int64)
        lengths = np.array([b.count(",") + 1 for _, b in bodies], dtype=np.int64)
        values = np.fromstring(",".join(b for _, b in bodies), sep=",")
        if values.size == lengths.sum():
            return _ragged_to_matrix(values, lengths, rows, n)
    cells = [_parse_array_cell(v) for v in col]
    rows = np.array([i for i, c in enumerate(cells) if c is not None and c.size], dtype=np.int64)
    if rows.size == 0:
        return np.zeros((n, 0)), np.zeros(n, dtype=np.int64)
    lengths = np.array([cells[i].size for i in rows], dtype=np.int64)
    return _ragged_to_matrix(np.concatenate([cells[i] for i in rows]), lengths, rows, n)


def _scalar_column(col, n: int) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls."""
    import pyarrow as pa

    if isinstance(col, (pa.ChunkedArray, pa.Array)):
        return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    import pandas as pd

    return pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _columns(table) -> tuple[int, object]:
    """(n_rows, getter) for a pyarrow Table or pandas DataFrame."""
    import pyarrow as pa

    if isinstance(table, pa.Table):
        names = set(table.column_names)
        return table.num_rows, (lambda name: table.column(name) if name in names else None)
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        names = set(table.columns)
        return len(table), (lambda name: table[name].to_numpy(dtype=object) if name in names else None)
    raise TypeError(f"expected a pandas DataFrame or a pyarrow Table of XP continuous rows, got {type(table).__name__}")


def default_threads() -> int:
    """Threads :func:`sample_xp` uses by default: the CPUs this process may run on, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # threadpoolctl comes with scikit-learn; without it BLAS keeps its threads
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas():
    """Limit BLAS to one thread inside the block (xpcat parallelises over stars instead).

    The products here are many small ones: BLAS's own threads spin more than
    they compute, which on a shared machine costs CPU time and gains nothing.
    """
    ctl = _blas_controller()
    if ctl is None:
        yield
        return
    with ctl.limit(limits=1, user_api="blas"):
        yield


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _forget_executor() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool when needed."""
    global _EXECUTOR, _EXECUTOR_LOCK
    _EXECUTOR = None
    _EXECUTOR_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


def _run_chunks(work, chunks: list[tuple[int, int]], threads: int) -> None:
    """Call ``work(chunk)`` for every chunk, on up to ``threads`` threads (numpy releases the GIL)."""
    global _EXECUTOR
    if threads <= 1 or len(chunks) <= 1:
        for c in chunks:
            work(c)
        return
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR._max_workers < threads:
            _EXECUTOR = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="xpcat-sample")
        ex = _EXECUTOR
    # consume the iterator so that exceptions propagate
    list(ex.map(work, chunks))


def _sym_add_py(out: np.ndarray, Q: np.ndarray, var: np.ndarray) -> None:
    """``out[i] += Q[i] + Q[i]^T`` and ``var[i] += 2 diag(Q[i])`` in one pass (compiled by numba)."""
    m, k, _ = Q.shape
    for i in range(m):
        for a in range(k):
            for b in range(k):
                out[i, a, b] += Q[i, a, b] + Q[i, b, a]
            var[i, a] += 2.0 * Q[i, a, a]


@functools.lru_cache(maxsize=None)
def _jit(func):
    """``numba.njit(cache=True, nogil=True)(func)``, built on first use (numba's import costs ~1 s).

    numba comes with hats (a dependency); the compiled code is cached on disk.
    """
    import numba

    return numba.njit(cache=True, nogil=True)(func)


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
    _jit(_sym_add_py)(cov, Q, var)


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
        return _sample_xp(
            table, wavelengths_nm=wavelengths_nm, covariance=covariance, with_covariance=with_covariance, threads=threads
        )


def _sample_xp(
    table,
    *,
    wavelengths_nm: np.ndarray | None = None,
    covariance: str = "correct",
    with_covariance: bool = True,
    cov_out: np.ndarray | None = None,
    cov_scale: float = 1.0,
    threads: int | None = None,
) -> XpSample:
    """:func:`sample_xp`, optionally adding the covariance into a caller's buffer.

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
    """
    if covariance not in ("correct", "paper"):
        raise ValueError(f"covariance must be 'correct' or 'paper'; got {covariance!r}")
    threads = default_threads() if threads is None else max(1, int(threads))
    wl = DEFAULT_WAVELENGTHS_NM if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=float)
    n, get = _columns(table)
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
            cols[key] = _array_column(c, n)
        n_par_col = get(f"{band}_n_parameters")
        coef_mat, coef_len = cols["coefficients"]
        n_par = _scalar_column(n_par_col, n) if n_par_col is not None else coef_len.astype(float)
        s_col = get(f"{band}_standard_deviation")
        s = _scalar_column(s_col, n) if s_col is not None else np.full(n, np.nan)
        bid_col = get(f"{band}_basis_function_id")
        default_id = next(iter(INSTRUMENT_MODELS[band]))
        bid = _scalar_column(bid_col, n) if bid_col is not None else np.full(n, float(default_id))
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

            _run_chunks(work, chunks, threads)
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

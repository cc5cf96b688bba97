"""Upper-triangle packing of symmetric / triangular matrices (row-major).

The catalog stores 5x5 covariances as their 15-entry upper triangle in
row-major order: (0,0) (0,1) ... (0,4) (1,1) ... (4,4). Conditioned partitions
store the 66x66 upper-triangular factor the same way (2211 entries).
"""

from __future__ import annotations

import numpy as np

__all__ = ["n_triu", "triu_indices", "pack_triu", "unpack_triu", "unpack_triu_symmetric"]


def n_triu(n: int) -> int:
    """Number of entries in the upper triangle (diagonal included) of an n x n matrix."""
    return n * (n + 1) // 2


def triu_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major upper-triangle indices, the packing order used everywhere in xpcat."""
    return np.triu_indices(n)


def _n_from_packed(m: int) -> int:
    n = int((np.sqrt(8 * m + 1) - 1) // 2)
    if n_triu(n) != m:
        raise ValueError(f"a packed upper triangle has n(n+1)/2 entries; got {m}, which is not of that form")
    return n


def pack_triu(matrix: np.ndarray) -> np.ndarray:
    """Pack the upper triangle.

    Parameters
    ----------
    matrix : (..., n, n) array

    Returns
    -------
    (..., n(n+1)/2) array, row-major upper triangle.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"expected (..., n, n) matrices, got shape {matrix.shape}")
    i, j = triu_indices(matrix.shape[-1])
    return matrix[..., i, j]


def unpack_triu(packed: np.ndarray, dtype=None) -> np.ndarray:
    """Unpack into an upper-triangular matrix (zeros below the diagonal).

    Row by row: n contiguous slice copies, several times faster than one
    fancy-index scatter for the 66 x 66 factors of a batch of stars.

    Parameters
    ----------
    packed : (..., n(n+1)/2) array
    dtype : dtype of the result (default: that of ``packed``); values are converted once.

    Returns
    -------
    (..., n, n) array, newly allocated.
    """
    packed = np.asarray(packed)
    n = _n_from_packed(packed.shape[-1])
    out = np.zeros(packed.shape[:-1] + (n, n), dtype=packed.dtype if dtype is None else dtype)
    off = 0
    for i in range(n):
        out[..., i, i:] = packed[..., off : off + n - i]
        off += n - i
    return out


def unpack_triu_symmetric(packed: np.ndarray) -> np.ndarray:
    """Unpack a packed upper triangle into the full symmetric matrix.

    Parameters
    ----------
    packed : (..., n(n+1)/2) array

    Returns
    -------
    (..., n, n) symmetric array.
    """
    upper = unpack_triu(packed)
    n = upper.shape[-1]
    diag = np.einsum("...ii->...i", upper)
    full = upper + np.swapaxes(upper, -1, -2)
    full[..., np.arange(n), np.arange(n)] = diag
    return full

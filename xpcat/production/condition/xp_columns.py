"""XP continuous array columns (Arrow lists, DataFrame cells, archive CSV strings) as padded matrices.

The archive's ``{bp,rp}_coefficients``, ``_coefficient_errors`` and
``_coefficient_correlations`` come as Arrow list columns (raw Parquet),
DataFrame cells holding arrays (GaiaXPy's readers) or the archive's CSV
strings ``"(c0, c1, ...)"``; each form becomes one zero-padded float64 matrix
and the row lengths, vectorised where the form allows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

__all__ = ["array_column", "scalar_column", "table_columns"]

logger = logging.getLogger(__name__)


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


def array_column(col, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An array column (Arrow list / pandas objects / CSV strings) as a zero-padded matrix and row lengths.

    Parameters
    ----------
    col : pyarrow.Array, pyarrow.ChunkedArray, (n,) object ndarray or sequence
        One cell per row: a numeric array or list, an archive CSV string, or
        missing (null, NaN, empty).
    n : int
        Rows.

    Returns
    -------
    matrix : (n, width) float64
        Row i holds its ``lengths[i]`` values, then zeros (never read as data).
    lengths : (n,) int64
        0 for a missing cell.
    """
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


def scalar_column(col, n: int) -> np.ndarray:
    """A numeric column (Arrow or any sequence) as (n,) float64, NaN for nulls and non-numbers."""
    import pyarrow as pa

    if isinstance(col, (pa.ChunkedArray, pa.Array)):
        return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    import pandas as pd

    return pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def table_columns(table) -> tuple[int, Callable[[str], object]]:
    """``(n_rows, get)`` for a pyarrow Table or pandas DataFrame; ``get(name)`` is the column or None when absent.

    Raises
    ------
    TypeError
        For anything else.
    """
    import pyarrow as pa

    if isinstance(table, pa.Table):
        names = set(table.column_names)
        return table.num_rows, (lambda name: table.column(name) if name in names else None)
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        names = set(table.columns)
        return len(table), (lambda name: table[name].to_numpy(dtype=object) if name in names else None)
    raise TypeError(f"expected a pandas DataFrame or a pyarrow Table of XP continuous rows, got {type(table).__name__}")

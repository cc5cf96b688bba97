"""The Gaia archive's text formats for XP continuous spectra, both ways.

The archive (DataLink ``XP_CONTINUOUS`` CSV, the DR3 bulk ECSV files, GaiaXPy's
test files) writes every array column as one quoted string of comma-separated
numbers: ``"(3325.74, -392.20, ...)"`` in DataLink CSV, ``"[3325.74, ...]"``
in the bulk ECSV files. A missing band is an empty field (or ``null``).

This module turns such text into the raw ``xp_continuous_mean_spectrum``
schema (:data:`xpcat.catalog_schema.raw.XP_CONTINUOUS`, arrays as
``list<double>``) and back, vectorised with pyarrow compute, and reports rows
it cannot read instead of failing the whole batch:

- :func:`parse_array_strings` / :func:`format_array_strings`: one column.
- :func:`conform_rows`: cast a table of text or loosely typed columns to a raw
  schema, dropping (and reporting, with the reason) only the rows whose values
  cannot be cast; for XP rows also checks array lengths against
  ``*_n_parameters``.
- :func:`astropy_to_arrow`: an astropy Table (what astroquery returns) as a
  pyarrow Table, masks as nulls.
- :func:`xp_to_archive_csv`: raw XP rows as the archive's DataLink CSV bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xpcat.catalog_schema.raw import XP_BAND_COLUMNS, XP_CONTINUOUS

if TYPE_CHECKING:  # pragma: no cover
    from astropy.table import Table

__all__ = [
    "XP_ARRAY_COLUMNS",
    "BadRow",
    "parse_array_strings",
    "format_array_strings",
    "java_float_strings",
    "conform_rows",
    "check_xp_lengths",
    "astropy_to_arrow",
    "xp_to_archive_csv",
]

logger = logging.getLogger(__name__)

#: The array-valued columns of ``xp_continuous_mean_spectrum``.
XP_ARRAY_COLUMNS: tuple[str, ...] = tuple(
    f"{band}_{col}" for band in ("bp", "rp") for col in ("coefficients", "coefficient_errors", "coefficient_correlations")
)
assert all(c.split("_", 1)[1] in XP_BAND_COLUMNS for c in XP_ARRAY_COLUMNS)

_F64_LIST = pa.list_(pa.float64())


@dataclass(frozen=True)
class BadRow:
    """A row that could not be read.

    Attributes
    ----------
    index : int
        Row index within the batch it came from (0-based).
    column : str
        The first column whose value could not be read.
    reason : str
        What was wrong, with the offending value where short.
    source_id : str
        The row's source_id as text ("" when it could not be read either).
    """

    index: int
    column: str
    reason: str
    source_id: str = ""

    def as_dict(self) -> dict:
        return {"index": self.index, "column": self.column, "reason": self.reason, "source_id": self.source_id}


def _combine(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def parse_array_strings(values: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """Parse archive array strings into ``list<double>``.

    Parameters
    ----------
    values : (n,) pyarrow string array
        ``"(a, b, ...)"`` or ``"[a, b, ...]"``; null, ``""`` and ``"null"``
        mean a missing array; ``"()"`` is an empty array. A list array is
        passed through (cast to ``list<double>``).

    Returns
    -------
    (n,) pyarrow ``list<double>`` array
        Values parsed with correct rounding (Arrow's float parser), so the
        shortest-repr text the archive writes round-trips exactly.

    Raises
    ------
    pyarrow.ArrowInvalid
        When an element is not a number (use :func:`conform_rows` to locate
        and drop such rows).
    """
    values = _combine(values)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        return values.cast(_F64_LIST)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if values.null_count == len(values):
            return pa.nulls(len(values), _F64_LIST)
        raise pa.ArrowInvalid(f"array column must be text or a list, got {values.type}")
    values = values.cast(pa.string())
    trimmed = pc.utf8_trim(pc.utf8_trim_whitespace(values), "()[] ")
    is_missing = pc.or_kleene(
        pc.is_null(values),
        pc.or_(pc.equal(pc.utf8_trim_whitespace(values), ""), pc.equal(pc.utf8_lower(trimmed), "null")),
    )
    is_missing = pc.fill_null(is_missing, True)
    is_empty = pc.fill_null(pc.and_(pc.invert(is_missing), pc.equal(trimmed, "")), False)
    split = pc.split_pattern(pc.if_else(is_missing, "", trimmed), ",")
    lengths = pc.list_value_length(split).to_numpy(zero_copy_only=False).astype(np.int64)
    drop_row = (is_missing.to_numpy(zero_copy_only=False) | is_empty.to_numpy(zero_copy_only=False))
    flat = pc.list_flatten(split)
    keep = ~np.repeat(drop_row, lengths)
    flat = pc.utf8_trim_whitespace(flat.filter(pa.array(keep)))
    numbers = pc.cast(flat, pa.float64())
    new_lengths = np.where(drop_row, 0, lengths)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(new_lengths, out=offsets[1:])
    mask = pa.array(is_missing.to_numpy(zero_copy_only=False))
    return pa.ListArray.from_arrays(pa.array(offsets), numbers, mask=mask)


def java_float_strings(values: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    """Floats as the archive (Java ``Double.toString`` / ``Float.toString``) writes them.

    Shortest round-trip digits; fixed notation with at least one decimal
    (``1.0``, ``-0.0``) for 1e-3 <= |x| < 1e7, else ``4.4715125E-4`` style;
    ``NaN``, ``Infinity``. float32 values get float32's shortest digits.

    Parameters
    ----------
    values : (n,) pyarrow float32 or float64 array

    Returns
    -------
    (n,) pyarrow string array (nulls kept)
    """
    values = _combine(values)
    base = pc.cast(values, pa.string())
    arr = values.to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        mag = np.abs(arr)
        special = ~np.isfinite(arr) | (((mag < 1e-3) & (mag > 0)) | (mag >= 1e7))
        integral = (arr == np.trunc(arr)) & ~special  # Arrow writes these without a point: 1 -> 1.0
    special &= ~values.is_null().to_numpy(zero_copy_only=False)
    text = base
    if integral.any():
        text = pc.if_else(pa.array(integral), pc.binary_join_element_wise(base, ".0", ""), base)
    if not special.any():
        return text
    idx = np.flatnonzero(special)
    sub = base.take(pa.array(idx))
    # 1e-6 <= |x| < 1e-3: Arrow writes 0.000ddd .. 0.00000ddd
    for zeros in (3, 4, 5):
        sub = pc.replace_substring_regex(sub, pattern=rf"^(-?)0\.0{{{zeros}}}([1-9])(\d*)$",
                                         replacement=rf"\1\2.\3E-{zeros + 1}")
    # Arrow's own exponent form (|x| < 1e-6 or >= 1e21): 4.47e-7, 1e-7, 1e+22
    sub = pc.replace_substring_regex(sub, pattern=r"^(-?\d)e", replacement=r"\1.0e")
    sub = pc.replace_substring_regex(sub, pattern=r"e\+?0*(\d+)$", replacement=r"E\1")
    sub = pc.replace_substring_regex(sub, pattern=r"e-0*(\d+)$", replacement=r"E-\1")
    sub = pc.replace_substring_regex(sub, pattern=r"\.E", replacement=".0E")
    out = sub.to_numpy(zero_copy_only=False).astype(object)
    # what is left (1e7 <= |x| < 1e21 in fixed form, NaN, infinities) is rare: one by one
    rest = np.flatnonzero(~pc.match_substring(sub, "E").to_numpy(zero_copy_only=False))
    for j in rest:
        x = arr[idx[j]]
        if np.isnan(x):
            out[j] = "NaN"
        elif np.isinf(x):
            out[j] = "Infinity" if x > 0 else "-Infinity"
        else:
            mant, exp = np.format_float_scientific(x, unique=True).split("e")
            out[j] = f"{mant}0E{int(exp)}" if mant.endswith(".") else f"{mant}E{int(exp)}"
    return pc.replace_with_mask(text, pa.array(special), pa.array(out.tolist(), pa.string()))


def format_array_strings(values: pa.Array | pa.ChunkedArray, brackets: str = "()") -> pa.StringArray:
    """Format ``list<double>`` values as the archive writes them.

    Parameters
    ----------
    values : (n,) pyarrow list array
    brackets : str
        ``"()"`` (DataLink CSV) or ``"[]"`` (bulk ECSV).

    Returns
    -------
    (n,) pyarrow string array
        ``"(a, b, ...)"`` with each number as :func:`java_float_strings`
        writes it (the shortest round-trip digits); null stays null.
    """
    values = _combine(values).cast(_F64_LIST)
    texts = java_float_strings(values.values)
    lists = pa.ListArray.from_arrays(values.offsets, texts, mask=values.is_null())
    joined = pc.binary_join(lists, ", ")
    return pc.binary_join_element_wise(brackets[0], joined, brackets[1], "")


def _cast_column(arr: pa.Array, type_: pa.DataType) -> pa.Array:
    if pa.types.is_list(type_):
        return parse_array_strings(arr).cast(type_)
    if arr.type.equals(type_):
        return arr
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
        stripped = pc.utf8_trim_whitespace(arr)
        empty = pc.fill_null(pc.or_(pc.equal(stripped, ""), pc.equal(pc.utf8_lower(stripped), "null")), True)
        if pa.types.is_string(type_):
            return arr
        arr = pc.if_else(empty, pa.scalar(None, pa.string()), stripped)
    return pc.cast(arr, type_)


def _locate_bad(arr: pa.Array, convert: Callable[[pa.Array], pa.Array], offset: int = 0) -> list[tuple[int, str]]:
    """Indices (and messages) of the elements ``convert`` rejects, by bisection."""
    try:
        convert(arr)
        return []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        if len(arr) == 1:
            return [(offset, str(err).splitlines()[0][:200])]
    mid = len(arr) // 2
    return _locate_bad(arr.slice(0, mid), convert, offset) + _locate_bad(arr.slice(mid), convert, offset + mid)


def check_xp_lengths(table: pa.Table) -> list[BadRow]:
    """XP rows whose array lengths disagree with ``*_n_parameters``.

    For each band present: ``len(coefficients) == len(coefficient_errors) ==
    n_parameters`` and ``len(coefficient_correlations) == n (n - 1) / 2``; a
    band is either wholly present or wholly null.

    Parameters
    ----------
    table : pyarrow.Table in the XP_CONTINUOUS schema

    Returns
    -------
    list of BadRow
    """
    bad: dict[int, BadRow] = {}
    sid = table.column("source_id").to_numpy(zero_copy_only=False) if table.num_rows else np.array([])
    for band in ("bp", "rp"):
        n = table.column(f"{band}_n_parameters").to_numpy(zero_copy_only=False)
        n = np.where(np.isnan(n.astype(float)), -1, n.astype(float)).astype(np.int64)
        present_n = n >= 0
        for col, expect in (
            ("coefficients", n),
            ("coefficient_errors", n),
            ("coefficient_correlations", n * (n - 1) // 2),
        ):
            arr = _combine(table.column(f"{band}_{col}"))
            length = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
            is_null = length < 0
            wrong = np.where(present_n, length != expect, ~is_null)
            for i in np.flatnonzero(wrong):
                if int(i) not in bad:
                    got = "missing" if is_null[i] else f"{length[i]} values"
                    want = f"{expect[i]} values (n_parameters={n[i]})" if present_n[i] else "no values (n_parameters missing)"
                    bad[int(i)] = BadRow(int(i), f"{band}_{col}", f"{got}, expected {want}", str(sid[i]))
    return [bad[i] for i in sorted(bad)]


def _null_missing_bands(table: pa.Table) -> pa.Table:
    """A band without coefficients is missing: all its columns null (ECSV writes ``nan`` there)."""
    for band in ("bp", "rp"):
        absent = pc.is_null(table.column(f"{band}_coefficients"))
        if not pc.any(absent).as_py():
            continue
        for f in table.schema:
            if f.name.startswith(f"{band}_"):
                col = table.column(f.name)
                i = table.schema.get_field_index(f.name)
                table = table.set_column(i, f, pc.if_else(absent, pa.scalar(None, f.type), col))
    return table


def conform_rows(table: pa.Table, schema: pa.Schema, *, what: str = "table") -> tuple[pa.Table, list[BadRow]]:
    """Cast ``table`` to ``schema``, dropping and reporting rows that cannot be read.

    Columns are matched by name (extra columns ignored; a missing nullable
    column becomes null). Text is parsed: numbers, booleans (``True``/``False``),
    archive array strings. A value that cannot be cast (garbage, out of the
    integer range, a malformed array), a null in a non-nullable column, or
    (for XP rows) arrays whose lengths disagree with ``*_n_parameters`` makes
    its row a :class:`BadRow`; every other row is kept.

    Parameters
    ----------
    table : pyarrow.Table
    schema : pyarrow.Schema
        One of the raw schemas.
    what : str
        Name used in messages.

    Returns
    -------
    (good, bad) : (pyarrow.Table in ``schema``, list of BadRow)

    Raises
    ------
    xpcat.catalog_schema.SchemaError
        When a non-nullable column is missing altogether.
    """
    from xpcat.catalog_schema import SchemaError

    n = table.num_rows
    sid_text = (
        _combine(table.column("source_id")).cast(pa.string()).to_pylist() if "source_id" in table.column_names else [""] * n
    )
    bad: dict[int, BadRow] = {}
    for f in schema:
        if f.name not in table.column_names and not f.nullable:
            raise SchemaError(f"{what}: missing required column {f.name!r}")
    converted: dict[str, pa.Array] = {}
    for f in schema:
        if f.name not in table.column_names:
            continue
        arr = _combine(table.column(f.name))
        try:
            col = _cast_column(arr, f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            for i, msg in _locate_bad(arr, lambda a, t=f.type: _cast_column(a, t)):
                bad.setdefault(i, BadRow(i, f.name, msg, sid_text[i] or ""))
            continue
        converted[f.name] = col
        if not f.nullable and col.null_count:
            for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
                bad.setdefault(int(i), BadRow(int(i), f.name, "null value where none is allowed", sid_text[i] or ""))
    keep_mask = None
    if bad:
        keep = np.ones(n, dtype=bool)
        keep[list(bad)] = False
        keep_mask = pa.array(keep)
    arrays = []
    for f in schema:
        if f.name not in table.column_names:
            arrays.append(pa.nulls(n - len(bad), f.type))
        elif f.name in converted:
            col = converted[f.name]
            arrays.append(col.filter(keep_mask) if keep_mask is not None else col)
        else:  # the column had unreadable values: convert what is left of it
            arrays.append(_cast_column(_combine(table.column(f.name)).filter(keep_mask), f.type))
    good = pa.Table.from_arrays(arrays, schema=schema)
    if schema.equals(XP_CONTINUOUS, check_metadata=False) and good.num_rows:
        kept_index = np.setdiff1d(np.arange(n), np.fromiter(bad, dtype=np.int64, count=len(bad)))
        length_bad = check_xp_lengths(good)
        if length_bad:
            for b in length_bad:
                orig = int(kept_index[b.index])
                bad[orig] = BadRow(orig, b.column, b.reason, b.source_id)
            keep = np.ones(good.num_rows, dtype=bool)
            keep[[b.index for b in length_bad]] = False
            good = good.filter(pa.array(keep))
    if schema.equals(XP_CONTINUOUS, check_metadata=False) and good.num_rows:
        good = _null_missing_bands(good)
    bad_list = [bad[i] for i in sorted(bad)]
    for b in bad_list[:5]:
        logger.warning("%s: unreadable row %d (source_id %s): column %s: %s", what, b.index, b.source_id, b.column, b.reason)
    if len(bad_list) > 5:
        logger.warning("%s: %d unreadable rows in all", what, len(bad_list))
    return good, bad_list


def astropy_to_arrow(table: "Table") -> pa.Table:
    """An astropy Table as a pyarrow Table (masked values become nulls).

    Parameters
    ----------
    table : astropy.table.Table
        E.g. what astroquery's ``launch_job_async(...).get_results()`` or
        ``load_data(...)`` return. Column names are kept; bytes become str.

    Returns
    -------
    pyarrow.Table
    """
    arrays = []
    names = []
    for name in table.colnames:
        col = table[name]
        data = np.asarray(col)
        mask = np.ma.getmaskarray(col) if hasattr(col, "mask") else np.zeros(len(col), dtype=bool)
        if data.ndim != 1:
            raise ValueError(f"column {name!r} has shape {data.shape}; only scalar columns are supported")
        if data.dtype.kind == "S":
            data = np.char.decode(data, "utf-8")
        if data.dtype.byteorder not in ("=", "|"):  # FITS is big-endian
            data = data.astype(data.dtype.newbyteorder("="))
        if data.dtype.kind == "O":
            values = [None if m else (v.decode() if isinstance(v, bytes) else v) for v, m in zip(data, mask)]
            arrays.append(pa.array(values))
        else:
            arrays.append(pa.array(data, mask=mask if mask.any() else None))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def xp_to_archive_csv(table: pa.Table) -> bytes:
    """Raw XP rows as the archive's DataLink ``XP_CONTINUOUS`` CSV.

    Parameters
    ----------
    table : pyarrow.Table in the XP_CONTINUOUS schema

    Returns
    -------
    bytes
        Header line of the 26 column names, then one line per row: integers,
        floats as :func:`java_float_strings` (float32 columns as float32),
        arrays as quoted ``"(a, b, ...)"``, missing values empty: byte for
        byte what the archive serves for the real rows (test).
    """
    if table.num_rows == 0:
        return (",".join(XP_CONTINUOUS.names) + "\n").encode()
    cols = []
    for f in XP_CONTINUOUS:
        arr = _combine(table.column(f.name))
        if pa.types.is_list(f.type):
            text = pc.binary_join_element_wise('"', format_array_strings(arr, "()"), '"', "")
        elif pa.types.is_floating(f.type):
            text = java_float_strings(arr)
        else:
            text = pc.cast(arr, pa.string())
        cols.append(pc.fill_null(text, ""))
    lines = pc.binary_join_element_wise(*cols, ",")
    body = pc.binary_join(pa.array([lines.to_pylist()], pa.list_(pa.string())), "\n")[0].as_py()
    return (",".join(XP_CONTINUOUS.names) + "\n" + body + "\n").encode()

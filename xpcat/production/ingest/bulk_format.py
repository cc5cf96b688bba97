"""The Gaia DR3 bulk files' text format (gzipped ECSV): the header, and writing such files.

A bulk file is a ``#`` YAML header (``%ECSV 1.0``, the column names and
datatypes), then CSV with arrays as ``"[a,b,...]"`` and ``null`` for missing
values. :func:`read_ecsv_header` reads the header; :func:`bulk_lines` and
:func:`write_bulk_file` write a table in the same format (tests and
benchmarks make bulk files with them).
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from xpcat.errors import InputError
from xpcat.fileio import write_bytes_atomic
from xpcat.production.ingest.formats import java_float_strings

__all__ = ["bulk_lines", "write_bulk_file", "is_gzip", "open_text", "read_ecsv_header"]

logger = logging.getLogger(__name__)


_ECSV_TYPES = {pa.int64(): "int64", pa.int32(): "int32", pa.int16(): "int16", pa.float32(): "float32",
               pa.float64(): "float64", pa.bool_(): "bool", pa.string(): "string"}


def bulk_lines(table: pa.Table) -> tuple[list[str], list[str]]:
    """A raw table as the lines of a Gaia DR3 bulk file.

    Parameters
    ----------
    table : pyarrow.Table
        Scalar columns of the raw schemas' types and ``list<double>`` arrays.

    Returns
    -------
    (header, data) : (list of str, list of str)
        The ECSV ``#`` header plus the column-name row, and one line per row:
        floats as the archive writes them, booleans ``True``/``False``,
        arrays ``"[a,b,...]"``, missing values ``null``.
    """
    header = ["# %ECSV 1.0", "# ---", "# delimiter: ','", "# datatype:"]
    cols = []
    for f in table.schema:
        arr = table.column(f.name).combine_chunks()
        if pa.types.is_list(f.type):
            header.append(f"# - {{name: {f.name}, datatype: string, subtype: 'float64[null]'}}")
            txt = pa.ListArray.from_arrays(arr.offsets, java_float_strings(arr.values), mask=arr.is_null())
            col = pc.binary_join_element_wise('"[', pc.binary_join(txt, ","), ']"', "")
        else:
            header.append(f"# - {{name: {f.name}, datatype: {_ECSV_TYPES.get(f.type, 'string')}}}")
            if pa.types.is_floating(f.type):
                col = java_float_strings(arr)
            elif pa.types.is_boolean(f.type):
                col = pc.if_else(arr, "True", "False")
            else:
                col = pc.cast(arr, pa.string())
        cols.append(pc.fill_null(col, "null"))
    header.append(",".join(table.column_names))
    return header, (pc.binary_join_element_wise(*cols, ",").to_pylist() if table.num_rows else [])


def write_bulk_file(table: pa.Table, path: str | os.PathLike, *, compresslevel: int = 6) -> Path:
    """Write a raw table as a Gaia DR3 bulk file (gzipped ECSV when ``path`` ends in ``.gz``).

    The inverse of :func:`iter_bulk_file`, for exports and tests.

    Returns
    -------
    Path
    """

    path = Path(path)
    header, data = bulk_lines(table)
    text = ("\n".join(header + data) + "\n").encode()
    write_bytes_atomic(path, gzip.compress(text, compresslevel=compresslevel) if path.name.endswith(".gz") else text)
    return path


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_text(path: Path):

    return gzip.open(path, "rt", encoding="utf-8", newline="") if is_gzip(path) else open(path, encoding="utf-8", newline="")


def read_ecsv_header(path: str | os.PathLike) -> tuple[int, list[str], dict[str, dict]]:
    """The ``#`` header of an (E)CSV file and its column names.

    Parameters
    ----------
    path : path-like
        ``.csv``, ``.ecsv``, optionally gzipped.

    Returns
    -------
    (n_comment_lines, names, datatypes) : (int, list of str, dict)
        Lines before the CSV header row, the header row's names, and the ECSV
        ``datatype`` entries by name (empty for plain CSV).

    Raises
    ------
    InputError
        When the file has no header row or its YAML header is unreadable.
    """
    import csv

    import yaml

    path = Path(path)
    comments: list[str] = []
    try:
        with open_text(path) as fh:
            for line in fh:
                if line.startswith("#"):
                    comments.append(line[1:].removeprefix(" ").rstrip("\r\n"))
                    continue
                names = next(csv.reader([line]))
                break
            else:
                raise InputError(f"{path}: no CSV header row (empty or truncated file?)")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the header ({type(err).__name__}: {err})") from err
    datatypes: dict[str, dict] = {}
    yaml_lines = [c for c in comments if not c.startswith("%ECSV")]
    if yaml_lines and any(c.strip() == "---" for c in yaml_lines):
        try:
            doc = yaml.safe_load("\n".join(yaml_lines)) or {}
        except yaml.YAMLError as err:
            raise InputError(f"{path}: unreadable ECSV header: {err}") from err
        for entry in doc.get("datatype", []) or []:
            if isinstance(entry, dict) and "name" in entry:
                datatypes[entry["name"]] = entry
    return len(comments), [n.strip() for n in names], datatypes

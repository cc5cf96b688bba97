"""HEALPix-aligned source_id partitions and atomic, verifiable Parquet writes.

Gaia DR3 ``source_id`` encodes the level-12 nested HEALPix index in its top
bits: ``pix12 = source_id >> 35``. A partition at level ``L`` is therefore the
contiguous source_id range ``[p << s, (p + 1) << s)`` with
``s = 35 + 2 (12 - L)`` (:func:`partition_shift`).

Every partition file is written by :func:`atomic_write_parquet`: a temporary
file in the same folder is written, re-read and validated, hashed, renamed into
place, and only then is the done marker ``<path>.done`` (JSON) written.
:func:`is_done` checks the marker against the file, so a truncated file, a
deleted marker or a file changed after the fact means "not done" and the
partition is redone.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpcat.catalog_schema import SCHEMA_VERSION, validate
from xpcat.errors import InputError
from xpcat.fileio import atomic_path, file_sha256, write_json_atomic

__all__ = [
    "MAX_LEVEL",
    "partition_shift",
    "partition_of",
    "source_id_range",
    "partition_name",
    "parse_partition_name",
    "read_table",
    "atomic_write_parquet",
    "is_done",
    "marker_path",
    "read_marker",
    "stamp_marker",
]

logger = logging.getLogger(__name__)

#: Deepest HEALPix level encoded in a Gaia source_id.
MAX_LEVEL = 12
#: Bits of a source_id below the level-12 HEALPix index.
_SHIFT_12 = 35
_NAME_RE = re.compile(r"^L(\d{2})-(\d+)$")
#: Suffix of the done marker beside a partition file.
DONE_SUFFIX = ".done"


def _check_level(level: int) -> int:
    lvl = int(level)
    if lvl != level or not 0 <= lvl <= MAX_LEVEL:
        raise ValueError(f"HEALPix partition level must be an integer in 0..{MAX_LEVEL}; got {level!r}")
    return lvl


def partition_shift(level: int) -> int:
    """Bit shift from a source_id to its level-``level`` nested HEALPix index.

    Parameters
    ----------
    level : int
        HEALPix level, 0..12.

    Returns
    -------
    int
        ``35 + 2 * (12 - level)``.
    """
    return _SHIFT_12 + 2 * (MAX_LEVEL - _check_level(level))


def partition_of(source_id: int | np.ndarray, level: int) -> int | np.ndarray:
    """HEALPix pixel (nested, at ``level``) of source_ids.

    Parameters
    ----------
    source_id : int or (n,) int64 array
        Gaia source_ids (non-negative).
    level : int
        HEALPix level, 0..12.

    Returns
    -------
    int or (n,) int64 array
        Pixel indices, ``source_id >> partition_shift(level)``.

    Raises
    ------
    ValueError
        For a negative source_id.
    """
    shift = partition_shift(level)
    if np.ndim(source_id) == 0:
        sid = int(source_id)
        if sid < 0:
            raise ValueError(f"source_id must be non-negative; got {sid}")
        return sid >> shift
    arr = np.asarray(source_id, dtype=np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"source_id must be non-negative; got {int(arr.min())}")
    return np.right_shift(arr, shift)


def source_id_range(pix: int, level: int) -> tuple[int, int]:
    """The source_id range ``[lo, hi)`` of a partition.

    Parameters
    ----------
    pix : int
        Nested HEALPix index at ``level`` (0 .. 12 * 4**level - 1).
    level : int

    Returns
    -------
    (lo, hi_exclusive) : tuple of int
    """
    shift = partition_shift(level)
    pix = int(pix)
    n_pix = 12 * 4 ** _check_level(level)
    if not 0 <= pix < n_pix:
        raise ValueError(f"pixel {pix} out of range 0..{n_pix - 1} at level {level}")
    return pix << shift, (pix + 1) << shift


def partition_name(pix: int, level: int) -> str:
    """File stem of a partition, e.g. ``"L05-001234"``."""
    lvl = _check_level(level)
    return f"L{lvl:02d}-{int(pix):06d}"


def parse_partition_name(name: str) -> tuple[int, int]:
    """Inverse of :func:`partition_name`; accepts a stem or a file name/path.

    Returns
    -------
    (level, pix) : tuple of int

    Raises
    ------
    ValueError
        When the name is not of the form ``Lll-pppppp``.
    """
    stem = Path(str(name)).name
    for suffix in (DONE_SUFFIX, ".parquet"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    m = _NAME_RE.match(stem)
    if not m:
        raise ValueError(f"not a partition name (expected like 'L05-001234'): {name!r}")
    level, pix = int(m.group(1)), int(m.group(2))
    source_id_range(pix, level)  # range check
    return level, pix


def read_table(
    path: str | os.PathLike,
    *,
    what: str | None = None,
    columns: list[str] | None = None,
    filters: list | None = None,
) -> pa.Table:
    """Read a Parquet file (or folder of Parquet files).

    Parameters
    ----------
    path : path-like
    what : str, optional
        What the table is (e.g. ``"raw gaia_source"``), used in messages.
    columns : list of str, optional
        Read only these columns.
    filters : list, optional
        pyarrow row filters, e.g. ``[("source_id", ">=", lo), ("source_id", "<", hi)]``
        (row groups are skipped by their statistics).

    Raises
    ------
    InputError
        When the file is missing, truncated or corrupt, or a requested column
        is absent; the message names the path.
    """
    p = Path(path)
    label = f"{what} " if what else ""
    if not p.exists():
        raise InputError(f"{label}file not found: {p}")
    try:
        return pq.read_table(p, columns=columns, filters=filters)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, KeyError, ValueError) as err:
        raise InputError(f"cannot read {label}Parquet file {p} (corrupt, truncated or wrong columns): {err}") from err


def marker_path(path: str | os.PathLike) -> Path:
    """The done marker of a partition file: ``<path>.done``."""
    p = Path(path)
    return p.with_name(p.name + DONE_SUFFIX)


def read_marker(path: str | os.PathLike) -> dict | None:
    """The done-marker document of a partition file, or None if absent/unreadable."""
    mp = marker_path(path)
    try:
        return json.loads(mp.read_text())
    except (OSError, ValueError):
        return None


def _verify_written(tmp: Path, path: Path, schema: pa.Schema | None, batch_rows: int = 16384) -> int:
    """Re-read a freshly written file batch by batch (bounded memory) and validate it; returns its row count."""
    try:
        pf = pq.ParquetFile(tmp)
        n_rows = 0
        if schema is not None:
            validate(pf.schema_arrow.empty_table(), schema, what=str(path), unique_ids=False)
        for rb in pf.iter_batches(batch_size=batch_rows):
            n_rows += rb.num_rows
            if schema is not None:
                validate(pa.Table.from_batches([rb]), schema, what=str(path), unique_ids=False)
        id_cols = [c for c in ("source_id", "gdr3_source_id") if schema is not None and c in schema.names]
        if id_cols:  # uniqueness needs the whole id column (8 bytes per row)
            validate(pf.read(columns=id_cols[:1]), pa.schema([schema.field(id_cols[0])]), what=str(path))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        raise InputError(f"cannot re-read freshly written Parquet file for {path}: {err}") from err
    if n_rows != pf.metadata.num_rows:
        raise InputError(f"{path}: re-read {n_rows} rows, the footer says {pf.metadata.num_rows}")
    return n_rows


def _verify_footer(tmp: Path, path: Path, table: pa.Table, schema: pa.Schema | None) -> int:
    """Check a freshly written file without decoding its data pages; returns its row count.

    The in-memory table has been validated against ``schema`` before writing;
    here the file's footer must give back the same Arrow schema (types) and
    row count, and the id column is read back for uniqueness.
    """
    try:
        pf = pq.ParquetFile(tmp)
        written = pf.schema_arrow
        if schema is not None:
            validate(written.empty_table(), schema, what=str(path), unique_ids=False)
        if [(f.name, f.type) for f in written] != [(f.name, f.type) for f in table.schema]:
            raise InputError(f"{path}: the written file's schema differs from the table's")
        id_cols = [c for c in ("source_id", "gdr3_source_id") if schema is not None and c in schema.names]
        if id_cols:
            validate(pf.read(columns=id_cols[:1]), pa.schema([schema.field(id_cols[0])]), what=str(path))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        raise InputError(f"cannot re-read freshly written Parquet file for {path}: {err}") from err
    return int(pf.metadata.num_rows)


def atomic_write_parquet(
    table: pa.Table,
    path: str | os.PathLike,
    *,
    schema: pa.Schema | None = None,
    expected_rows: int | None = None,
    info: dict[str, Any] | None = None,
    compression: str = "zstd",
    row_group_size: int = 16384,
    write_options: dict[str, Any] | None = None,
    verify: str = "full",
) -> dict:
    """Write a Parquet file atomically, verify it, then write its done marker.

    Steps: write a temporary file in the target folder; re-read it; validate
    it against ``schema`` (:func:`xpcat.catalog_schema.validate`) and the row
    count against ``expected_rows``; hash it; ``os.replace`` it into place;
    write ``<path>.done`` (JSON: rows, sha256, bytes, schema_version, info).
    Any existing marker is removed first, so a crash mid-way leaves the
    partition "not done".

    Parameters
    ----------
    table : pyarrow.Table
    path : path-like
        Final file path.
    schema : pyarrow.Schema, optional
        Schema the written file must match.
    expected_rows : int, optional
        Row count the written file must have.
    info : dict, optional
        JSON-serialisable extras stored in the marker.
    compression : str
        Parquet compression codec.
    row_group_size : int
        Rows per Parquet row group (bounds writer and reader memory).
    write_options : dict, optional
        Further keyword arguments of :func:`pyarrow.parquet.write_table`
        (e.g. ``compression_level``, ``use_dictionary``, ``use_byte_stream_split``).
    verify : {"full", "footer"}
        ``"full"``: re-read every row (batch by batch) and validate it.
        ``"footer"``: validate the table in memory before writing, then check
        the written file's footer (schema, row count) and its id column; no
        data page is decoded (for large partitions where the full re-read
        costs as much as the write).

    Returns
    -------
    dict
        The marker document.

    Raises
    ------
    xpcat.catalog_schema.SchemaError
        When the written table does not match ``schema``.
    InputError
        When the row count differs from ``expected_rows``.
    """
    if verify not in ("full", "footer"):
        raise ValueError(f"verify must be 'full' or 'footer'; got {verify!r}")
    if verify == "footer" and schema is not None:
        validate(table, schema, what=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mp = marker_path(path)
    mp.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression, row_group_size=row_group_size, **(write_options or {}))
        if verify == "footer":
            n_rows = _verify_footer(tmp, path, table, schema)
        else:
            n_rows = _verify_written(tmp, path, schema)
        if expected_rows is not None and n_rows != int(expected_rows):
            raise InputError(f"{path}: wrote {n_rows} rows, expected {int(expected_rows)}")
        digest = file_sha256(tmp)
        size = tmp.stat().st_size
    marker = {
        "rows": int(n_rows),
        "sha256": digest,
        "bytes": int(size),
        "schema_version": SCHEMA_VERSION,
        "info": info or {},
    }
    write_json_atomic(mp, marker, indent=None)
    logger.debug("wrote %s (%d rows, %d bytes)", path, marker["rows"], size)
    return marker


def stamp_marker(path: str | os.PathLike, **info: Any) -> dict:
    """Add ``info`` to the ``info`` of a partition's done marker (atomically); returns the marker.

    Raises
    ------
    InputError
        When the partition has no readable marker.
    """
    marker = read_marker(path)
    if marker is None:
        raise InputError(f"{path}: no done marker to stamp")
    marker["info"] = {**(marker.get("info") or {}), **info}
    write_json_atomic(marker_path(path), marker, indent=None)
    return marker


def is_done(path: str | os.PathLike, *, expected_rows: int | None = None) -> bool:
    """Whether a partition file is complete and unchanged since it was written.

    True only if the file and its marker exist, the file's size and sha256
    match the marker, and the row count (marker and, if given,
    ``expected_rows``) agrees.
    """
    p = Path(path)
    marker = read_marker(p)
    if marker is None or not p.is_file():
        return False
    try:
        if p.stat().st_size != int(marker["bytes"]):
            return False
        if expected_rows is not None and int(marker["rows"]) != int(expected_rows):
            return False
        if file_sha256(p) != marker["sha256"]:
            return False
        return pq.ParquetFile(p).metadata.num_rows == int(marker["rows"])
    except (KeyError, TypeError, ValueError, OSError, pa.ArrowInvalid):
        return False

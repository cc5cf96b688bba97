"""Partner tables from user files: unWISE crossmatch, training labels, reddening priors.

Each table is a user file keyed by Gaia DR3 ``source_id`` (Parquet, CSV,
optionally gzipped, or FITS), named in ``[data]`` (``unwise``, ``labels``,
``reddening``). It is read, its columns matched by name (case-insensitive, so
FITS upper-case names work) and cast to the raw schema
(:data:`xpcat.catalog_schema.raw.UNWISE`, ``LABELS``, ``REDDENING``), then
split into the run's HEALPix-aligned partitions and written as
``RUN_DIR/raw/<table>/<partition>.parquet`` (atomic, with done markers) next
to the archive tables, where conditioning and training join them.

Rows whose values cannot be read (text in a number column, a missing
source_id) are reported with their row number and left out; a file with
duplicated source_ids is refused (which row is right cannot be told).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from xpcat.catalog_schema import validate
from xpcat.catalog_schema.raw import LABELS, REDDENING, TMASS, UNWISE
from xpcat.config import RunConfig
from xpcat.errors import InputError
from xpcat.fileio import file_sha256, write_text_atomic
from xpcat.production.ingest.formats import BadRow, astropy_to_arrow, conform_rows
from xpcat.production.run_dir import RunPaths
from xpcat.production.partitions import (
    atomic_write_parquet,
    is_done,
    partition_name,
    partition_of,
)

__all__ = ["PARTNER_SCHEMAS", "read_partner_file", "ingest_partner", "resolve_partner_paths", "ingest_partner_tables"]

logger = logging.getLogger(__name__)

#: Partner tables and their raw schemas.
PARTNER_SCHEMAS: dict[str, pa.Schema] = {"tmass": TMASS, "unwise": UNWISE, "labels": LABELS, "reddening": REDDENING}


def _kind(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".csv.gz", "csv"),
                         (".ecsv", "csv"), (".ecsv.gz", "csv"), (".fits", "fits"), (".fit", "fits"),
                         (".fits.gz", "fits")):
        if name.endswith(suffix):
            return kind
    raise InputError(f"{path}: unknown file type; partner tables must be Parquet (.parquet), CSV (.csv[.gz]) or FITS (.fits)")


def _rename_to_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    lookup = {n.lower(): n for n in schema.names}
    names = [lookup.get(n.lower(), n) for n in table.column_names]
    return table.rename_columns(names)


def read_partner_file(path: str | os.PathLike, table: str) -> tuple[pa.Table, list[BadRow]]:
    """Read a partner file into its raw schema.

    Parameters
    ----------
    path : path-like
        Parquet, CSV (``#`` comment lines allowed, e.g. an ECSV header) or FITS.
    table : str
        ``"tmass"``, ``"unwise"``, ``"labels"`` or ``"reddening"``.

    Returns
    -------
    (rows, bad) : (pyarrow.Table in the table's schema, list of BadRow)

    Raises
    ------
    InputError
        Unknown table or file type, an unreadable file, no ``source_id``
        column, or duplicated source_ids (the message names some).
    """
    if table not in PARTNER_SCHEMAS:
        raise InputError(f"unknown partner table {table!r}; expected one of {', '.join(PARTNER_SCHEMAS)}")
    schema = PARTNER_SCHEMAS[table]
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{table} file not found: {path}")
    kind = _kind(path)
    try:
        if kind == "parquet":
            raw = pq.read_table(path)
        elif kind == "csv":
            raw = _read_csv_text(path)
        else:
            from astropy.table import Table

            raw = astropy_to_arrow(Table.read(path, format="fits"))
    except (pa.ArrowInvalid, OSError, ValueError) as err:
        raise InputError(f"cannot read {table} file {path}: {err}") from err
    raw = _rename_to_schema(raw, schema)
    if "source_id" not in raw.column_names:
        raise InputError(f"{table} file {path} has no source_id column (columns: {', '.join(raw.column_names[:12])})")
    absent = [n for n in schema.names if n not in raw.column_names]
    if absent:
        logger.warning("%s file %s lacks column(s) %s; they will be null", table, path, ", ".join(absent))
    rows, bad = conform_rows(raw, schema, what=f"{table} file {path}")
    ids = rows.column("source_id").to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise InputError(f"{table} file {path}: {dup.size} duplicated source_id(s), e.g. "
                         f"{', '.join(str(d) for d in dup[:5])}; keep one row per source")
    negative = ids[ids < 0]
    if negative.size:
        raise InputError(f"{table} file {path}: negative source_id {negative[0]}")
    return rows, bad


def _read_csv_text(path: Path) -> pa.Table:
    """A CSV with every column as text (cast later, row by row if needed); '#' lines skipped."""
    import csv
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    skip = 0
    with opener(path, "rt") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            skip += 1
        else:
            raise ValueError("no header line")
    columns = next(csv.reader([line]))
    return pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(skip_rows=skip),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=True),
    )


def resolve_partner_paths(run_dir: Path, config: RunConfig) -> dict[str, Path]:
    """The partner files named in ``[data]``, as existing paths.

    A relative path is looked up in the run directory, then in the current
    directory.

    Raises
    ------
    InputError
        When a named file does not exist (both places are named).
    """
    out: dict[str, Path] = {}
    for table in PARTNER_SCHEMAS:
        value = getattr(config.data, table, "")
        if not value:
            continue
        p = Path(value).expanduser()
        candidates = [p] if p.is_absolute() else [Path(run_dir) / p, Path.cwd() / p]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InputError(f"[data] {table} = {value!r}: file not found (looked at {', '.join(map(str, candidates))})")
        out[table] = found
    return out


def ingest_partner(run_dir: Path, table: str, path: str | os.PathLike, level: int, *,
                   raw_root: Path | None = None) -> dict[str, Any]:
    """Read one partner file and write it as raw partitions.

    Parameters
    ----------
    run_dir : Path
    table : str
        ``"tmass"``, ``"unwise"``, ``"labels"`` or ``"reddening"``.
    path : path-like
    level : int
        Partition level.
    raw_root : Path, optional
        Default ``RUN_DIR/raw``.

    Returns
    -------
    dict
        file, sha256, rows, partitions, unreadable rows (count and the first
        ten), skipped (True when this exact file was already ingested).
    """
    run_dir = Path(run_dir)
    raw_root = raw_root or RunPaths.of(run_dir).raw
    out_dir = raw_root / table
    state_path = RunPaths.of(run_dir).state / "partners" / f"{table}.json"
    digest = file_sha256(path)
    try:
        previous = json.loads(state_path.read_text())
    except (OSError, ValueError):
        previous = None
    if (previous and previous.get("sha256") == digest and previous.get("level") == level
            and all(is_done(out_dir / f"{n}.parquet") for n in previous.get("partitions", []))):
        return {**previous, "skipped": True}
    rows, bad = read_partner_file(path, table)
    validate(rows, PARTNER_SCHEMAS[table], what=f"{table} file {path}")
    pix = partition_of(rows.column("source_id").to_numpy(), level)
    order = np.argsort(pix, kind="stable")
    rows, pix = rows.take(pa.array(order)), pix[order]
    bounds = np.flatnonzero(np.diff(pix)) + 1
    starts = np.concatenate([[0], bounds]) if len(pix) else np.array([], dtype=np.int64)
    ends = np.concatenate([bounds, [len(pix)]]) if len(pix) else np.array([], dtype=np.int64)
    names = []
    info = {"source_file": str(path), "sha256": digest}
    for s, e in zip(starts, ends):
        name = partition_name(int(pix[s]), level)
        part = rows.slice(int(s), int(e - s)).sort_by("source_id")
        atomic_write_parquet(part, out_dir / f"{name}.parquet", schema=PARTNER_SCHEMAS[table],
                             expected_rows=part.num_rows, info=info)
        names.append(name)
    keep = set(names)
    for stale in out_dir.glob("L*.parquet"):  # partitions of an earlier version of the file
        if stale.stem not in keep:
            stale.unlink()
            stale.with_name(stale.name + ".done").unlink(missing_ok=True)
    summary = {"table": table, "file": str(path), "sha256": digest, "level": level, "rows": rows.num_rows,
               "partitions": names, "unreadable_rows": len(bad), "unreadable": [b.as_dict() for b in bad[:10]],
               "skipped": False}
    write_text_atomic(state_path, json.dumps(summary, indent=1))
    logger.info("%s: %d rows from %s into %d partition(s)%s", table, rows.num_rows, path, len(names),
                f"; {len(bad)} unreadable row(s) left out" if bad else "")
    return summary


def ingest_partner_tables(run_dir: Path, config: RunConfig) -> dict[str, dict]:
    """Ingest every partner file named in ``[data]`` (none named: empty dict)."""
    paths = resolve_partner_paths(run_dir, config)
    raw_root = RunPaths.of(run_dir, config).raw
    return {t: ingest_partner(run_dir, t, p, config.data.partition_level, raw_root=raw_root) for t, p in paths.items()}

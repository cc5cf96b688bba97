"""The condition stage (SPEC §1): raw tables -> conditioned flux partitions, one per HEALPix pixel.

Partition I/O: :func:`plan_partitions` lists the partitions of a run,
:func:`condition_partition` (a Dask task) reads one partition's source_id
range from the raw Parquet files (the XP rows streamed in batches, decoded on
a background thread), joins and conditions them
(:func:`xpcat.production.condition.tables.condition_tables`) and writes the
partition atomically with its done marker; :func:`condition_run` is the serial
``xpcat condition`` runner, which reads small raw inputs once and slices them.
The numerics live in :mod:`~xpcat.production.condition.covariance` (Eqs. 2-4),
:mod:`~xpcat.production.condition.block_factor` (their fast path) and
:mod:`~xpcat.production.condition.xp_sampling` (GaiaXPy's sampling, batched).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from xpcat import catalog_schema as cs
from xpcat.catalog_schema.conditioned import CONDITIONED
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.catalog_schema.raw import REQUIRED_RAW_TABLES
from xpcat.config import RunConfig
from xpcat.errors import InputError, StageError
from xpcat.production import partitions as parts
from xpcat.production.condition.metadata import conditioning_metadata, options_key
from xpcat.production.condition.tables import (
    GAIA_COLUMNS,
    MAX_BLOCK,
    TMASS_COLUMNS,
    UNWISE_COLUMNS,
    check_unique,
    condition_tables,
    source_ids,
)

__all__ = [
    "PartitionTask",
    "plan_partitions",
    "condition_partition",
    "condition_run",
]

logger = logging.getLogger(__name__)

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
        ids.append(source_ids(t))
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
        check_unique(ids, f"raw {table}", origin, [str(p) for p in files[table]])
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
    check_unique(source_ids(out), f"raw {table}", np.concatenate(origin), [str(f) for f in files])
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
    ids = source_ids(gaia)
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
        info={"options_key": options_key(config), "flags": counts},
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
    return (marker.get("info") or {}).get("options_key") == options_key(config)


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
        "gaia_source": _read_range(raw_files["gaia_source"], "gaia_source", lo, hi, GAIA_COLUMNS),
        "xp_continuous_mean_spectrum": _prefetched(_xp_batches(raw_files["xp_continuous_mean_spectrum"], lo, hi, MAX_BLOCK)),
        "tmass": _read_range(raw_files["tmass"], "tmass", lo, hi, TMASS_COLUMNS) if raw_files.get("tmass") else None,
        "unwise": _read_range(raw_files["unwise"], "unwise", lo, hi, UNWISE_COLUMNS) if raw_files.get("unwise") else None,
    }
    n = tables["gaia_source"].num_rows if n_expected is None else n_expected
    summary = _write_partition(tables, pix, level, out_path, config, n)
    summary["status"] = "redone" if existed else "written"
    return summary


#: Raw inputs up to this size are read once and sliced in memory by condition_run.
_IN_MEMORY_BYTES = 1 << 30


def _load_sorted(raw_files: Mapping[str, Sequence[Path]]) -> dict[str, tuple[pa.Table, np.ndarray] | None]:
    """Every raw table read whole, sorted by source_id, with its sorted ids (duplicates refused)."""
    cols = {"gaia_source": GAIA_COLUMNS, "xp_continuous_mean_spectrum": None, "tmass": TMASS_COLUMNS, "unwise": UNWISE_COLUMNS}
    out: dict[str, tuple[pa.Table, np.ndarray] | None] = {}
    for table, columns in cols.items():
        if not raw_files.get(table):
            out[table] = None
            continue
        t = _read_range(raw_files[table], table, None, None, columns).sort_by("source_id")
        out[table] = (t, source_ids(t))
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

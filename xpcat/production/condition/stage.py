"""The condition stage (SPEC §1): raw tables -> conditioned flux partitions, one per HEALPix pixel.

Partition I/O: :func:`condition_partition` (the engine's task, see
:mod:`xpcat.production.run`) reads one partition's source_id range from the
raw Parquet files (the XP rows streamed in batches, decoded on a background
thread), joins and conditions them
(:func:`xpcat.production.condition.tables.condition_tables`) and writes the
partition atomically with its done marker.
The numerics live in :mod:`~xpcat.production.condition.covariance` (Eqs. 2-4),
:mod:`~xpcat.production.condition.block_factor` (their fast path) and
:mod:`~xpcat.production.condition.xp_sampling` (GaiaXPy's sampling, batched).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from xpcat import catalog_schema as cs
from xpcat.catalog_schema.conditioned import CONDITIONED
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.catalog_schema.raw import REQUIRED_RAW_TABLES, XP_SAMPLED_TABLE, XP_TABLES
from xpcat.config import RunConfig
from xpcat.errors import InputError, StageError
from xpcat.production import partitions as parts
from xpcat.production.condition.metadata import (
    conditioning_metadata,
    input_forms,
    options_key,
)
from xpcat.production.condition.sampled import SAMPLED_COLUMNS
from xpcat.production.condition.tables import (
    GAIA_COLUMNS,
    MAX_BLOCK,
    TMASS_COLUMNS,
    UNWISE_COLUMNS,
    check_unique,
    condition_tables,
    source_ids,
)

__all__ = ["condition_partition"]

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
_STAGE_TABLES = ("gaia_source", "xp_continuous_mean_spectrum", XP_SAMPLED_TABLE, "tmass", "unwise")


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
    sampled = tables.get(XP_SAMPLED_TABLE)
    xp = tables["xp_continuous_mean_spectrum"]
    table = condition_tables(gaia, xp if xp is not None else [], tables.get("tmass"), tables.get("unwise"), config,
                             what=f"partition {name}", sampled=sampled)
    del gaia
    if isinstance(tables, dict):
        tables.clear()  # the raw rows are no longer needed: free them before writing
    meta = conditioning_metadata(config)
    meta["partition"] = {"name": name, "level": level, "pix": pix, "source_id_lo": lo, "source_id_hi": hi}
    if sampled is not None and sampled.num_rows:  # coefficient-only partitions keep the earlier metadata, byte for byte
        meta["xp_input_forms"] = input_forms(table, sampled)
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


def condition_partition(
    raw_files: Mapping[str, Sequence[Path]],
    pix: int,
    out_path: str | Path,
    config: RunConfig,
    *,
    level: int | None = None,
    n_expected: int | None = None,
) -> dict:
    """Condition one partition, reading its source_id range from the raw files.

    For Dask tasks: inputs are read from disk (row groups filtered on the
    source_id range), the output is written atomically with its done marker,
    and only a small summary dict is returned.

    Parameters
    ----------
    raw_files : mapping of table name -> list of Parquet paths
        gaia_source and at least one of xp_continuous_mean_spectrum and
        xp_sampled_spectrum (:data:`xpcat.catalog_schema.raw.XP_TABLES`).
    pix : int
        Pixel index at ``level``.
    out_path : path-like
        The partition file (``conditioned/<name>.parquet``).
    config : RunConfig
    level : int, optional
        Default ``config.data.partition_level``.
    n_expected : int, optional
        Expected star count (the engine's plan); checked on write.

    Returns
    -------
    dict
        ``partition``, ``status`` ("written" or "redone"), ``stars``,
        ``flags`` (counts per ConditionFlag name), ``bytes``, ``seconds``.
        Whether the partition is owed at all is the engine's done test
        (:func:`xpcat.production.run.partition_done`).
    """
    out_path = Path(out_path)
    level = config.data.partition_level if level is None else int(level)
    name = parts.partition_name(pix, level)
    existed = out_path.exists() or parts.marker_path(out_path).exists()
    lo, hi = parts.source_id_range(pix, level)
    for t in REQUIRED_RAW_TABLES:
        if not raw_files.get(t):
            raise StageError(f"partition {name}: no raw {t} files given")
    if not any(raw_files.get(t) for t in XP_TABLES):
        raise StageError(f"partition {name}: no raw {' files nor '.join(XP_TABLES)} files given")
    coef_files = raw_files.get("xp_continuous_mean_spectrum")
    sampled_files = raw_files.get(XP_SAMPLED_TABLE)
    tables: dict[str, pa.Table | None] = {
        "gaia_source": _read_range(raw_files["gaia_source"], "gaia_source", lo, hi, GAIA_COLUMNS),
        "xp_continuous_mean_spectrum": _prefetched(_xp_batches(coef_files, lo, hi, MAX_BLOCK)) if coef_files else None,
        XP_SAMPLED_TABLE: _read_range(sampled_files, XP_SAMPLED_TABLE, lo, hi, SAMPLED_COLUMNS) if sampled_files else None,
        "tmass": _read_range(raw_files["tmass"], "tmass", lo, hi, TMASS_COLUMNS) if raw_files.get("tmass") else None,
        "unwise": _read_range(raw_files["unwise"], "unwise", lo, hi, UNWISE_COLUMNS) if raw_files.get("unwise") else None,
    }
    n = tables["gaia_source"].num_rows if n_expected is None else n_expected
    summary = _write_partition(tables, pix, level, out_path, config, n)
    summary["status"] = "redone" if existed else "written"
    return summary

"""The final catalog: a HATS catalog from the fitted partitions, its validation and queries.

Fitted partitions (``RUN_DIR/fitted/*.parquet``) are source_id ranges; the
catalog is partitioned by position, as hats-import does it
(``recipes/hats-catalog.md``):

1. **histogram** (one task per fitted partition): the ``_healpix_29`` spatial
   index of every row (``hats.pixel_math.spatial_index.compute_spatial_index``)
   and its counts at ``[catalog] highest_order``, saved under
   ``state/catalog/hist/`` and keyed by the fitted file's sha256.
2. **alignment** (client): ``hats.pixel_math.partition_stats.generate_alignment``
   with ``[catalog] max_rows_per_partition`` gives the HATS pixels.
3. **pixels** (one task per HATS pixel): the rows of the contributing fitted
   partitions that fall in the pixel, sorted by ``_healpix_29``, written to
   ``dataset/Norder=K/Dir=D/Npix=N.parquet`` through a hidden temporary file,
   re-read, validated (schema, row count = histogram count) and renamed into
   place; the done marker lives in ``state/catalog/pixels/`` so that readers of
   ``dataset/`` see only Parquet files.
4. **metadata** (client, ``hats``'s own writers): ``partition_info.csv``,
   ``dataset/_metadata`` and ``_common_metadata``, ``skymap.fits``,
   ``hats.properties``.

Catalog columns: Table 2 (:data:`xpcat.catalog_schema.CATALOG`) plus the
documented extras ``fit_status`` and ``_healpix_29`` (int64, the HATS spatial
index at order 29, used for row-group pruning by LSDB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xpcat.catalog_schema import CATALOG, SCHEMA_VERSION, validate, with_metadata
from xpcat.config import RunConfig, config_to_dict, read_run_config
from xpcat.errors import StageError, XpcatError
from xpcat.fileio import atomic_path, file_sha256, package_version, write_json_atomic
from xpcat.jobs.futures import run_tasks
from xpcat.production import partitions as P
from xpcat.production import run_state as S
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = [
    "CATALOG_HATS",
    "HEALPIX_COLUMN",
    "CatalogValidationError",
    "build_catalog",
    "catalog_dir",
    "validate_catalog",
    "query_catalog",
]

#: Name of the HATS spatial-index column.
HEALPIX_COLUMN = "_healpix_29"
#: Schema of the HATS catalog: Table 2, ``fit_status``, then ``_healpix_29``.
CATALOG_HATS = CATALOG.append(
    pa.field(HEALPIX_COLUMN, pa.int64(), nullable=False,
             metadata={b"description": b"HATS spatial index: nested HEALPix pixel of (ra, dec) at order 29"})
)
_STATE = "catalog"


class CatalogValidationError(XpcatError):
    """The catalog does not hold every input source_id exactly once (offenders named)."""


def catalog_dir(run_dir: Path) -> Path:
    """``RUN_DIR/catalog``."""
    return RunPaths.of(run_dir).catalog


# ---------------------------------------------------------------- histogram step
def _hist_path(run_dir: Path, name: str) -> Path:
    return RunPaths.of(run_dir).state / _STATE / "hist" / f"{name}.npz"


def _read_hist(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"pix": z["pix"], "count": z["count"], "sha256": str(z["sha256"]), "order": int(z["order"])}
    except (OSError, KeyError, ValueError):
        return None


def histogram_task(run_dir: str, in_dir: str, name: str, order: int) -> dict:
    """Counts of one fitted partition per HEALPix pixel at ``order`` (sparse), saved to disk.

    Returns
    -------
    dict
        ``{"partition", "rows", "pixels"}`` (small).
    """
    src = RunPaths.of(run_dir).output(in_dir, name)
    marker = P.read_marker(src)
    if marker is None:
        raise StageError(f"catalog: fitted partition {src} has no done marker")
    out = _hist_path(Path(run_dir), name)
    old = _read_hist(out)
    if old is not None and old["sha256"] == marker["sha256"] and old["order"] == order:
        return {"partition": name, "rows": int(old["count"].sum()), "pixels": int(old["pix"].size), "skipped": True}
    from hats.pixel_math.spatial_index import compute_spatial_index

    t = P.read_table(src, what="fitted", columns=["ra", "dec"])
    hp29 = compute_spatial_index(t.column("ra").to_numpy(), t.column("dec").to_numpy())
    pix, count = np.unique(np.right_shift(hp29, 2 * (29 - order)), return_counts=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, pix=pix.astype(np.int64), count=count.astype(np.int64), sha256=np.array(marker["sha256"]),
                 order=np.array(order))
    return {"partition": name, "rows": int(count.sum()), "pixels": int(pix.size), "skipped": False}


# ---------------------------------------------------------------- pixel step
def _pixel_marker(run_dir: Path, order: int, pix: int) -> Path:
    return RunPaths.of(run_dir).state / _STATE / "pixels" / f"{order}_{pix}.json"


def _pixel_file(cat: Path, order: int, pix: int) -> Path:
    from hats.io import paths
    from hats.pixel_math import HealpixPixel

    return Path(str(paths.pixel_catalog_file(cat, HealpixPixel(order, pix))))


def _pixel_done(run_dir: Path, cat: Path, order: int, pix: int, rows: int, fingerprint: str) -> bool:
    f = _pixel_file(cat, order, pix)
    try:
        m = json.loads(_pixel_marker(run_dir, order, pix).read_text())
        return (m["fingerprint"] == fingerprint and m["rows"] == rows and f.is_file()
                and f.stat().st_size == m["bytes"] and file_sha256(f) == m["sha256"])
    except (OSError, ValueError, KeyError):
        return False


def pixel_task(run_dir: str, in_dir: str, sources: list[str], order: int, pix: int, rows: int,
               fingerprint: str, meta: dict) -> dict:
    """Write one HATS pixel file from the fitted partitions that have rows in it.

    Raises
    ------
    StageError
        When the rows found differ from the histogram's count.
    """
    from hats.pixel_math.spatial_index import compute_spatial_index

    run_path = Path(run_dir)
    cat = building_dir(run_path)
    if _pixel_done(run_path, cat, order, pix, rows, fingerprint):
        return {"order": order, "pix": pix, "rows": rows, "skipped": True}
    parts = []
    for name in sources:
        t = P.read_table(RunPaths.of(run_path).output(in_dir, name), what="fitted")
        hp29 = compute_spatial_index(t.column("ra").to_numpy(), t.column("dec").to_numpy())
        keep = np.right_shift(hp29, 2 * (29 - order)) == pix
        t = t.filter(pa.array(keep)).append_column(HEALPIX_COLUMN, pa.array(hp29[keep], pa.int64()))
        parts.append(t.select(CATALOG_HATS.names).cast(CATALOG_HATS))
    table = pa.concat_tables(parts) if parts else CATALOG_HATS.empty_table()
    table = table.take(pc.sort_indices(table, sort_keys=[(HEALPIX_COLUMN, "ascending")]))
    table = with_metadata(table, meta)
    out = _pixel_file(cat, order, pix)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=100_000)
        back = P.read_table(tmp, what="catalog pixel")
        validate(back, CATALOG_HATS, what=str(out))
        if back.num_rows != rows:
            raise StageError(f"catalog pixel {out}: {back.num_rows} rows, expected {rows} from the histograms")
        digest, size = file_sha256(tmp), tmp.stat().st_size
    write_json_atomic(_pixel_marker(run_path, order, pix),
                        {"rows": rows, "bytes": size, "sha256": digest, "fingerprint": fingerprint})
    return {"order": order, "pix": pix, "rows": rows, "skipped": False}


# ---------------------------------------------------------------- driver
#: What the fitted partitions' metadata says about how the catalog's numbers were made, carried to the catalog.
CARRIED_METADATA = ("uncertainty", "confidence_source", "confidence_per_parameter", "confidence_fallback",
                    "confidence_rule", "ln_prior_cut", "ln_prior_cut_mass", "params_units", "fit_status", "inference")


def _fitted_metadata(path: Path) -> dict[str, Any]:
    """The keys of :data:`CARRIED_METADATA` in one fitted partition's metadata (they are the same in every one)."""
    from xpcat.catalog_schema import read_metadata

    try:
        doc = read_metadata(pq.read_schema(path))
    except (OSError, pa.ArrowInvalid, ValueError):
        return {}
    return {k: doc[k] for k in CARRIED_METADATA if k in doc}


def _map(client, fn, calls: list[tuple], label: str, retries: int) -> None:
    """Run ``fn(*args)`` for each call on the cluster; any task still failing after its retries fails the step."""
    errors = [o.error for o in run_tasks(client, fn, list(enumerate(calls)), label, retries=retries) if not o.ok]
    if errors:
        raise StageError(f"{label}: {len(errors)} task(s) failed, first: {errors[0]}")


def building_dir(run_dir: Path) -> Path:
    """``RUN_DIR/catalog.partial``: where the catalog is built before it is swapped into ``RUN_DIR/catalog``."""
    return RunPaths.of(run_dir).catalog_partial


def _swap_in(building: Path, cat: Path) -> None:
    """Replace ``cat`` by the finished ``building`` folder (two renames; readers never see a partial catalog)."""
    old = cat.with_name(f".{cat.name}.old-{time.time_ns()}")
    if cat.exists():
        os.replace(cat, old)
    os.replace(building, cat)
    shutil.rmtree(old, ignore_errors=True)


def build_catalog(run_dir: Path, config: RunConfig, in_dir: str = "fitted", *, client,
                  names: list[str] | None = None) -> dict:
    """Build (or bring up to date) the HATS catalog ``RUN_DIR/catalog`` from fitted partitions.

    Parameters
    ----------
    run_dir : Path
    config : RunConfig
        Uses ``[catalog]`` and ``[run] name``.
    in_dir : str
        Folder of the fitted partitions.
    client : distributed.Client
        Runs the histogram and pixel tasks (the engine's cluster).
    names : list of str, optional
        Partitions to include (default: the run's plan, else every done file in ``in_dir``).

    Returns
    -------
    dict
        ``rows``, ``pixels``, ``path``, ``skipped``.

    Raises
    ------
    StageError
        A fitted partition is not done, or a written pixel disagrees with the counts.
    """
    from hats.catalog import PartitionInfo, TableProperties
    from hats.io import paths, skymap
    from hats.io.parquet_metadata import write_parquet_metadata
    from hats.pixel_math import HealpixPixel
    from hats.pixel_math.partition_stats import generate_alignment

    run_dir = Path(run_dir)
    cat = catalog_dir(run_dir)
    building = building_dir(run_dir)
    src_dir = run_dir / in_dir
    if names is None:
        plan = S.read_plan(run_dir)
        names = [p.name for p in plan] if plan else sorted(
            f.name[: -len(".parquet")] for f in src_dir.glob("*.parquet") if P.read_marker(f))
    if not names:
        raise StageError(f"catalog: no fitted partitions in {src_dir}")
    shas = []
    for name in names:
        m = P.read_marker(RunPaths.of(run_dir).output(in_dir, name))
        if m is None:
            raise StageError(f"catalog: fitted partition {src_dir / name}.parquet is not done")
        shas.append((name, m["sha256"], m["rows"]))
    order = config.catalog.highest_order
    fingerprint = hashlib.sha256(json.dumps(
        {"parts": shas, "catalog": config_to_dict(config)["catalog"], "schema": SCHEMA_VERSION}, sort_keys=True
    ).encode()).hexdigest()
    n_rows = sum(r for _, _, r in shas)
    done = S.stage_done(run_dir, _STATE)
    if done and done.get("fingerprint") == fingerprint and (cat / "hats.properties").is_file():
        logger.info("catalog up to date at %s", cat)
        return {**done, "skipped": True}
    RunPaths.of(run_dir).stage_marker(_STATE).unlink(missing_ok=True)
    retries = config.cluster.retries

    _map(client, histogram_task, [(str(run_dir), in_dir, n, order) for n in names], "histogram", retries)
    total = np.zeros(12 * 4**order, dtype=np.int64)
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, sha, rows in shas:
        h = _read_hist(_hist_path(run_dir, name))
        if h is None or h["sha256"] != sha or int(h["count"].sum()) != rows:
            raise StageError(f"catalog: histogram of {name} is missing or stale after the histogram step")
        sparse[name] = (h["pix"], h["count"])
        np.add.at(total, h["pix"], h["count"])
    threshold = config.catalog.max_rows_per_partition
    if total.max(initial=0) > threshold:
        # a pixel at the deepest order cannot be split further: keep it whole rather than fail
        logger.warning("catalog: a pixel at order %d holds %d rows, more than [catalog] max_rows_per_partition = %d; "
                       "it stays one partition (raise [catalog] highest_order to split it)", order, total.max(), threshold)
        threshold = int(total.max())
    alignment = generate_alignment(total, highest_order=order, lowest_order=0,
                                   threshold=threshold, drop_empty_siblings=True)
    dest: dict[tuple[int, int], dict[str, Any]] = {}
    for name, (pix, count) in sparse.items():
        for p in pix:
            o, dp, n = alignment[int(p)]
            d = dest.setdefault((int(o), int(dp)), {"rows": int(n), "sources": set()})
            d["sources"].add(name)
    # a different alignment makes the old pixel files wrong: start the catalog folder afresh
    align_doc = {"fingerprint": fingerprint, "pixels": sorted(f"{o}_{p}" for o, p in dest)}
    align_path = RunPaths.of(run_dir).state / _STATE / "alignment.json"
    old = json.loads(align_path.read_text()) if align_path.exists() else None
    if old != align_doc:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(RunPaths.of(run_dir).state / _STATE / "pixels", ignore_errors=True)
        write_json_atomic(align_path, align_doc)
    meta = {"model_hash": (S.stage_done(run_dir, "infer") or {}).get("model_hash"),
            "xpcat_version": package_version("xpcat"), "run": config.run.name, "config": config_to_dict(config),
            **_fitted_metadata(RunPaths.of(run_dir).output(in_dir, names[0]))}
    run_json = RunPaths.of(run_dir).run_record
    if meta["model_hash"] is None and run_json.exists():
        meta["model_hash"] = json.loads(run_json.read_text()).get("model_hash")
    calls = [(str(run_dir), in_dir, sorted(d["sources"]), o, p, d["rows"], fingerprint, meta)
             for (o, p), d in sorted(dest.items())]
    _map(client, pixel_task, calls, "catalog", retries)

    pixels = [HealpixPixel(o, p) for o, p in sorted(dest)]
    PartitionInfo.from_healpix(pixels).write_to_file(paths.get_partition_info_pointer(building))
    written = write_parquet_metadata(building)
    if int(written) != n_rows:
        raise StageError(f"catalog: _metadata counts {written} rows, the fitted partitions hold {n_rows}")
    skymap.write_skymap(total, building)
    props = TableProperties(
        catalog_name=config.run.name, catalog_type="object", total_rows=n_rows, ra_column="ra", dec_column="dec",
        healpix_column=HEALPIX_COLUMN, healpix_order=29, hats_max_rows=config.catalog.max_rows_per_partition,
        moc_sky_fraction=f"{PartitionInfo.from_healpix(pixels).calculate_fractional_coverage():0.5f}",
        **TableProperties.new_provenance_dict(building, builder=f"xpcat v{package_version('xpcat')}"),
    )
    props.to_properties_file(building)
    _swap_in(building, cat)
    summary = {"rows": n_rows, "pixels": len(pixels), "path": str(cat), "fingerprint": fingerprint,
               "max_order": max(p.order for p in pixels)}
    S.mark_stage_done(run_dir, _STATE, summary)
    logger.info("catalog: %d rows in %d HATS pixels at %s", n_rows, len(pixels), cat)
    return {**summary, "skipped": False}


# ---------------------------------------------------------------- validation and query
def _dataset_glob(cat: Path) -> str:
    return str(cat / "dataset" / "**" / "*.parquet").replace("'", "''")


def _input_files(run_dir: Path) -> list[Path]:
    cfg = read_run_config(run_dir)
    raw = Path(cfg.data.raw_dir)
    raw = raw if raw.is_absolute() else run_dir / raw
    return sorted((raw / "gaia_source").glob("*.parquet"))


def validate_catalog(run_dir: Path) -> str:
    """Check that every input source_id appears exactly once in the catalog (``xpcat validate``).

    Inputs are the source_ids of ``raw/gaia_source``. Also checks the HATS
    structure (``hats.io.validation.is_valid_catalog``, strict).

    Returns
    -------
    str
        One line: how many source_ids were checked.

    Raises
    ------
    CatalogValidationError
        Naming the first missing, duplicated or unexpected source_ids.
    """
    import duckdb
    from hats.io.validation import is_valid_catalog

    run_dir = Path(run_dir)
    cat = catalog_dir(run_dir)
    if not (cat / "hats.properties").is_file():
        raise CatalogValidationError(f"no catalog at {cat} (hats.properties missing); run `xpcat run` first")
    files = _input_files(run_dir)
    if not files:
        raise CatalogValidationError(f"no input source_ids: no raw gaia_source Parquet files under {run_dir}")
    con = duckdb.connect()
    try:
        con.execute(f"CREATE VIEW inp AS SELECT source_id AS sid FROM read_parquet({[str(f) for f in files]!r})")
        con.execute(f"CREATE VIEW cat AS SELECT gdr3_source_id AS sid FROM "
                    f"read_parquet('{_dataset_glob(cat)}', hive_partitioning=false)")
        n_in = con.execute("SELECT count(*) FROM inp").fetchone()[0]
        n_cat = con.execute("SELECT count(*) FROM cat").fetchone()[0]
        problems = []
        for what, sql in (
            ("missing from the catalog", "SELECT sid FROM inp ANTI JOIN cat USING (sid)"),
            ("duplicated in the catalog", "SELECT sid FROM cat GROUP BY sid HAVING count(*) > 1"),
            ("in the catalog but not in the inputs", "SELECT sid FROM cat ANTI JOIN inp USING (sid)"),
        ):
            n = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]
            if n:
                first = [r[0] for r in con.execute(f"{sql} ORDER BY sid LIMIT 5").fetchall()]
                problems.append(f"{n} source_id(s) {what}, first: {', '.join(map(str, first))}")
    except duckdb.Error as err:
        raise CatalogValidationError(f"cannot read the catalog {cat} or the inputs: {err}") from err
    finally:
        con.close()
    if problems:
        raise CatalogValidationError(f"catalog {cat}: " + "; ".join(problems))
    if not is_valid_catalog(str(cat), strict=True):
        raise CatalogValidationError(f"catalog {cat}: not a valid HATS catalog (hats.io.validation, strict)")
    return f"catalog {cat} OK: {n_cat} rows, every one of the {n_in} input source_ids exactly once"


#: Statement types ``xpcat query`` runs: reading only (``COPY ... TO``, ``CREATE``, ``ATTACH`` ... are refused).
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _check_read_only(con: Any, sql: str) -> None:
    """Refuse empty SQL, several statements, or any statement that is not a query.

    Raises
    ------
    XpcatError
        Naming the statement type refused.
    """
    statements = con.extract_statements(sql)
    if not statements:
        raise XpcatError("empty query: give one SQL SELECT statement over the view `catalog`")
    if len(statements) > 1:
        raise XpcatError(f"{len(statements)} statements given; `xpcat query` runs one SELECT at a time")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise XpcatError(f"`xpcat query` is read-only: {kind} statements are refused (use SELECT over the view `catalog`)")


def query_catalog(run_dir: Path, sql: str, fmt: str = "table") -> str:
    """Run DuckDB SQL over the catalog; the view is called ``catalog`` (``xpcat query``).

    Parameters
    ----------
    run_dir : Path
    sql : str
        E.g. ``SELECT count(*) FROM catalog WHERE quality_flags < 8``.
    fmt : {"table", "csv", "json"}

    Returns
    -------
    str
        The result as an aligned text table, CSV, or JSON records.

    Raises
    ------
    XpcatError
        No catalog, an unknown format, or SQL DuckDB rejects (its message).
    """
    import duckdb

    cat = catalog_dir(Path(run_dir))
    if not (cat / "dataset").is_dir():
        raise XpcatError(f"no catalog at {cat}; run `xpcat run` first")
    if fmt not in ("table", "csv", "json"):
        raise XpcatError(f"unknown format {fmt!r}; use table, csv or json")
    con = duckdb.connect()
    try:
        _check_read_only(con, sql)
        con.execute(f"CREATE VIEW catalog AS SELECT * FROM read_parquet('{_dataset_glob(cat)}', hive_partitioning=false)")
        rel = con.sql(sql)
        df = rel.df()
        for name, kind in zip(rel.columns, rel.types):  # sum() of integers is HUGEINT, which pandas makes float
            if str(kind) in ("HUGEINT", "UHUGEINT") and df[name].notna().all():
                df[name] = df[name].astype("int64")
    except duckdb.Error as err:
        raise XpcatError(f"query failed: {_first_line(err)}") from err
    finally:
        con.close()
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return df.to_json(orient="records")
    return df.to_string(index=False)

"""The HATS catalog: hats' writers, LSDB cone search, pandas and DuckDB reads, validate, query."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _fake_stages import fake_condition, fake_context, fake_infer, write_raw

from xpcat.catalog_schema import CATALOG
from xpcat.config import RunConfig, write_config
from xpcat.errors import XpcatError
from xpcat.production import run_state as S
from xpcat.production.catalog import (
    CATALOG_HATS,
    CatalogValidationError,
    build_catalog,
    query_catalog,
    validate_catalog,
)

N = 1500


def _cfg() -> RunConfig:
    return RunConfig().replace(data={"partition_level": 1}, catalog={"highest_order": 4, "max_rows_per_partition": 120})


def _fitted_run(rd: Path, cfg: RunConfig) -> np.ndarray:
    sid = write_raw(rd, N, 1, [0, 5, 20, 33, 47], seed=3)
    write_config(cfg, rd)
    plan, _ = S.plan_partitions(rd, cfg)
    ctx = fake_context(rd, cfg)
    for part in plan:
        fake_condition(ctx, part)
        fake_infer(ctx, part)
    return sid


@pytest.fixture(scope="module")
def built(tmp_path_factory, dask_client):
    rd = tmp_path_factory.mktemp("catalog_run")
    cfg = _cfg()
    sid = _fitted_run(rd, cfg)
    summary = build_catalog(rd, cfg, "fitted", client=dask_client)
    return rd, sid, summary


def _radec(rd: Path) -> pd.DataFrame:
    return pd.read_parquet(rd / "raw" / "gaia_source")


def test_hats_structure_written_by_hats(built):
    import hats
    from hats.io.validation import is_valid_catalog

    rd, sid, summary = built
    cat = rd / "catalog"
    assert summary["rows"] == sid.size and summary["pixels"] > 1 and summary["max_order"] >= 1
    for f in ("hats.properties", "partition_info.csv", "skymap.fits", "dataset/_metadata", "dataset/_common_metadata"):
        assert (cat / f).is_file(), f
    assert is_valid_catalog(str(cat), strict=True)
    c = hats.read_hats(cat)
    assert c.catalog_info.total_rows == sid.size
    assert c.catalog_info.ra_column == "ra" and c.catalog_info.healpix_column == "_healpix_29"
    assert len(c.get_healpix_pixels()) == summary["pixels"]
    # every pixel within the row threshold, rows sorted by the spatial index
    for f in (cat / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"):
        t = pq.read_table(f)
        assert t.num_rows <= 120
        h = t.column("_healpix_29").to_numpy()
        assert np.all(np.diff(h) >= 0)
        order = int(f.parent.parent.name.split("=")[1])
        pix = int(f.stem.split("=")[1])
        assert np.all(h >> (2 * (29 - order)) == pix)
    assert not list((cat / "dataset").rglob("*.done")) and not list((cat / "dataset").rglob(".*"))


def test_pandas_and_duckdb_read_table2_columns(built):
    import duckdb

    rd, sid, _ = built
    df = pd.read_parquet(rd / "catalog" / "dataset", partitioning=None)
    assert list(df.columns) == CATALOG_HATS.names
    # by default pyarrow adds the hive folder names of the HATS layout as columns
    hive = pd.read_parquet(rd / "catalog" / "dataset")
    assert set(hive.columns) - set(df.columns) == {"Norder", "Dir"} and len(hive) == sid.size
    assert list(df.columns[: len(CATALOG.names)]) == CATALOG.names
    assert sorted(df["gdr3_source_id"]) == sorted(sid.tolist())
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{rd}/catalog/dataset/**/*.parquet', hive_partitioning=false)").fetchall()[0][0]
    assert n == sid.size
    meta = json.loads(pq.read_schema(rd / "catalog" / "dataset" / "_common_metadata").metadata[b"xpcat"])
    assert meta["schema_version"] and meta["run"] == "xpcat"


def test_lsdb_cone_search_matches_brute_force(built):
    import lsdb

    rd, sid, _ = built
    cat = lsdb.open_catalog(rd / "catalog")
    assert len(cat.compute()) == sid.size
    raw = _radec(rd)
    ra0, dec0 = float(raw.ra.iloc[7]), float(raw.dec.iloc[7])
    radius_arcsec = 20 * 3600.0
    got = cat.cone_search(ra=ra0, dec=dec0, radius_arcsec=radius_arcsec).compute()
    r1, d1, r2, d2 = map(np.radians, (raw.ra.to_numpy(), raw.dec.to_numpy(), ra0, dec0))
    cossep = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2)
    inside = raw.source_id[np.degrees(np.arccos(np.clip(cossep, -1, 1))) * 3600 <= radius_arcsec]
    assert len(inside) > 5
    assert sorted(got["gdr3_source_id"]) == sorted(inside)


def test_query_formats_and_errors(built):
    rd, sid, _ = built
    n_basic = int(np.sum((sid % 16) < 8))
    assert query_catalog(rd, "SELECT count(*) AS n FROM catalog WHERE quality_flags < 8", fmt="csv") == f"n\n{n_basic}"
    rows = json.loads(query_catalog(rd, "SELECT gdr3_source_id FROM catalog ORDER BY gdr3_source_id LIMIT 3", fmt="json"))
    assert [r["gdr3_source_id"] for r in rows] == sorted(sid.tolist())[:3]
    table = query_catalog(rd, "SELECT count(*) AS n FROM catalog")
    assert table.split() == ["n", str(sid.size)]
    # sums of integers print as integers (DuckDB's HUGEINT came out as float)
    assert query_catalog(rd, "SELECT sum(CAST(quality_flags < 8 AS INTEGER)) AS b FROM catalog").split() == ["b", str(n_basic)]
    with pytest.raises(XpcatError, match="query failed.*nosuchcol"):
        query_catalog(rd, "SELECT nosuchcol FROM catalog")
    with pytest.raises(XpcatError, match="no catalog"):
        query_catalog(rd / "nowhere", "SELECT 1")


def test_validate_names_missing_and_duplicated_ids(tmp_path, dask_client):
    cfg = _cfg()
    sid = _fitted_run(tmp_path, cfg)
    build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    assert f"every one of the {sid.size} input source_ids exactly once" in validate_catalog(tmp_path)
    files = sorted((tmp_path / "catalog" / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))
    a, b = pq.read_table(files[0]), pq.read_table(files[1])
    dropped = a.column("gdr3_source_id")[0].as_py()
    pq.write_table(a.slice(1), files[0])
    with pytest.raises(CatalogValidationError, match=f"1 source_id\\(s\\) missing from the catalog, first: {dropped}"):
        validate_catalog(tmp_path)
    pq.write_table(pa.concat_tables([a, a.slice(0, 1)]), files[0])
    with pytest.raises(CatalogValidationError, match=f"duplicated in the catalog, first: {dropped}"):
        validate_catalog(tmp_path)
    pq.write_table(a, files[0])
    assert "exactly once" in validate_catalog(tmp_path)
    assert b.num_rows > 0


def test_rebuild_only_when_fitted_partitions_change(tmp_path, dask_client):
    cfg = _cfg()
    _fitted_run(tmp_path, cfg)
    first = build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    again = build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    assert again["skipped"] is True and again["fingerprint"] == first["fingerprint"]
    # change one fitted partition's content: the catalog is rebuilt and shows the new values
    from xpcat.production import partitions as P

    part = S.read_plan(tmp_path)[0]
    path = tmp_path / "fitted" / f"{part.name}.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("chi2_opt"), "chi2_opt", pa.array(np.full(t.num_rows, 42.0, np.float32)))
    P.atomic_write_parquet(t, path, schema=CATALOG, expected_rows=part.rows)
    third = build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    assert third["skipped"] is False and third["fingerprint"] != first["fingerprint"]
    n42 = query_catalog(tmp_path, "SELECT count(*) AS n FROM catalog WHERE chi2_opt = 42", fmt="csv")
    assert n42 == f"n\n{part.rows}"


def test_unfinished_fitted_partition_refused(tmp_path, dask_client):
    cfg = _cfg()
    _fitted_run(tmp_path, cfg)
    from xpcat.errors import StageError
    from xpcat.production import partitions as P

    name = S.read_plan(tmp_path)[1].name
    P.marker_path(tmp_path / "fitted" / f"{name}.parquet").unlink()
    with pytest.raises(StageError, match=f"{name}.parquet is not done"):
        build_catalog(tmp_path, cfg, "fitted", client=dask_client)


def test_cli_validate_query_and_plan(built, tmp_path):
    from click.testing import CliRunner

    from xpcat.cli import cli

    rd, sid, _ = built
    runner = CliRunner()
    res = runner.invoke(cli, ["validate", str(rd)])
    assert res.exit_code == 0 and f"every one of the {sid.size} input source_ids exactly once" in res.output
    res = runner.invoke(cli, ["query", str(rd), "SELECT count(*) AS n FROM catalog", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.output) == [{"n": sid.size}]
    res = runner.invoke(cli, ["query", str(rd), "SELECT * FROM nowhere"])
    assert res.exit_code == 1 and "query failed" in res.output
    res = runner.invoke(cli, ["validate", str(tmp_path)])
    assert res.exit_code == 1 and "no catalog" in res.output
    res = runner.invoke(cli, ["plan", "--stars", "1000", "--profile", "slurm", "--benchmark", str(tmp_path / "none.json")])
    assert res.exit_code != 0


def test_pixel_over_threshold_at_deepest_order_stays_whole(tmp_path, dask_client):
    """More rows in a deepest-order pixel than max_rows_per_partition: kept whole, not a failure."""
    cfg = RunConfig().replace(data={"partition_level": 1}, catalog={"highest_order": 0, "max_rows_per_partition": 5})
    sid = _fitted_run(tmp_path, cfg)
    build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    assert f"every one of the {sid.size} input source_ids exactly once" in validate_catalog(tmp_path)


def test_query_is_read_only_and_errors_are_one_line(built, tmp_path):
    rd, sid, _ = built
    before = sorted(p.relative_to(rd) for p in (rd / "catalog").rglob("*"))
    target = rd / "catalog" / "dataset" / "extra.parquet"
    for sql in (f"COPY (SELECT * FROM catalog) TO '{target}' (FORMAT parquet)", "CREATE TABLE t AS SELECT 1",
                f"ATTACH '{tmp_path / 'x.db'}'"):
        with pytest.raises(XpcatError, match="read-only"):
            query_catalog(rd, sql)
    assert not target.exists() and sorted(p.relative_to(rd) for p in (rd / "catalog").rglob("*")) == before
    for sql in ("", "   ", "-- nothing"):
        with pytest.raises(XpcatError, match="empty query"):
            query_catalog(rd, sql)
    with pytest.raises(XpcatError, match="2 statements"):
        query_catalog(rd, "SELECT 1; SELECT 2")
    with pytest.raises(XpcatError) as err:
        query_catalog(rd, "SELEC count(*) FROM catalog")
    assert "\n" not in str(err.value)
    assert "validate" not in query_catalog(rd, "SELECT count(*) AS n FROM catalog")  # still answers
    assert f"every one of the {sid.size} input source_ids exactly once" in validate_catalog(rd)


def test_interrupted_rebuild_leaves_the_old_catalog_whole(tmp_path, dask_client, monkeypatch):
    """The catalog is built in catalog.partial and swapped in: a build that dies leaves no partial catalog."""
    from xpcat.production import catalog as C

    cfg = _cfg()
    sid = _fitted_run(tmp_path, cfg)
    C.build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    # new fitted content, then a build that dies after its pixel files, before the swap
    part = S.read_plan(tmp_path)[0]
    path = tmp_path / "fitted" / f"{part.name}.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("chi2_opt"), "chi2_opt", pa.array(np.full(t.num_rows, 42.0, np.float32)))
    from xpcat.production import partitions as P

    P.atomic_write_parquet(t, path, schema=CATALOG, expected_rows=part.rows)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed during the catalog build")

    monkeypatch.setattr(C, "write_parquet_metadata", die, raising=False)
    monkeypatch.setattr("hats.io.parquet_metadata.write_parquet_metadata", die)
    with pytest.raises(KeyboardInterrupt):
        C.build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    assert (tmp_path / "catalog.partial").is_dir()
    df = pd.read_parquet(tmp_path / "catalog" / "dataset")
    assert len(df) == sid.size and not (df["chi2_opt"] == 42).any()  # the old catalog, whole
    monkeypatch.undo()
    C.build_catalog(tmp_path, cfg, "fitted", client=dask_client)
    df = pd.read_parquet(tmp_path / "catalog" / "dataset")
    assert len(df) == sid.size and int((df["chi2_opt"] == 42).sum()) == part.rows
    assert not (tmp_path / "catalog.partial").exists()

"""Bulk-file ingest: streaming, malformed rows, truncated gzip, partitions, GaiaSource files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from _archive_universe import make_universe, read_fetched

from xpcat.catalog_schema.raw import GAIA_SOURCE, XP_CONTINUOUS
from xpcat.config import RunConfig, config_from_dict, config_to_dict, write_config
from xpcat.errors import InputError
from xpcat.production.ingest.bulk import ingest_files, iter_bulk_file
from xpcat.production.ingest.bulk_format import (
    bulk_lines,
    read_ecsv_header,
    write_bulk_file,
)
from xpcat.production.partitions import is_done, partition_of

LEVEL = 2
def write_bulk(path, table: pa.Table, lines: list[str] | None = None, truncate: bool = False):
    if lines is None and not truncate:
        write_bulk_file(table, path)
        return
    header, data = bulk_lines(table)
    text = "\n".join(header + (data if lines is None else lines)) + "\n"
    raw = gzip.compress(text.encode(), compresslevel=1) if str(path).endswith(".gz") else text.encode()
    path.write_bytes(raw[: len(raw) // 2] if truncate else raw)
    return len(header)


@pytest.fixture(scope="module")
def universe(tmp_path_factory):
    return make_universe(tmp_path_factory.mktemp("u"), n_stars=120, seed=7)


@pytest.fixture
def run_dir(tmp_path):
    d = config_to_dict(RunConfig())
    d["data"]["partition_level"] = LEVEL
    run = tmp_path / "run"
    write_config(config_from_dict(d), run)
    return run


def test_xp_bulk_file_into_partitions(universe, run_dir, tmp_path):
    xp = universe["xp_continuous_mean_spectrum"]
    f = tmp_path / "XpContinuousMeanSpectrum_000000-003111.csv.gz"
    write_bulk(f, xp)
    s = ingest_files(run_dir, [f])
    assert s["failed"] == [] and s["malformed"] == 0 and s["rows_read"] == xp.num_rows
    got = read_fetched(run_dir / "raw", "xp_continuous_mean_spectrum")
    assert got.equals(xp.sort_by("source_id"))  # value for value, arrays and missing bands included
    files = sorted((run_dir / "raw" / "xp_continuous_mean_spectrum").glob("*.parquet"))
    assert len(files) == len(np.unique(partition_of(xp.column("source_id").to_numpy(), LEVEL)))
    for p in files:
        assert is_done(p)
        sid = pa.parquet.read_table(p).column("source_id").to_numpy()
        assert set(partition_of(sid, LEVEL).tolist()) == {int(p.stem.split("-")[1])}
    # the same file again is skipped
    s2 = ingest_files(run_dir, [f])
    assert s2["files"][0]["status"] == "skipped"


def test_streaming_in_small_blocks_gives_the_same_rows(universe, tmp_path):
    xp = universe["xp_continuous_mean_spectrum"]
    f = tmp_path / "XpContinuousMeanSpectrum_1.csv.gz"
    write_bulk(f, xp)
    batches = list(iter_bulk_file(f, block_size=1 << 16))
    assert len(batches) > 5  # streamed, not read whole
    assert max(b[1].num_rows for b in batches) < xp.num_rows / 4
    rows = pa.concat_tables([b[1] for b in batches])
    assert rows.equals(xp)


def test_malformed_rows_are_reported_and_the_rest_kept(universe, run_dir, tmp_path):
    xp = universe["xp_continuous_mean_spectrum"]
    header, lines = bulk_lines(xp)
    n_head = len(header)
    with_bp = [i for i, v in enumerate(xp.column("bp_basis_function_id").to_pylist()) if v is not None]
    i_int = next(i for i in with_bp if i >= 3)
    fields = lines[i_int].split(",", 3)
    fields[2] = "5x6"  # bp_basis_function_id
    bad = {
        i_int: ",".join(fields),
        10: ",".join(lines[10].split(",")[:7]),  # too few fields
        20: lines[20].replace('"[', '"[oops,', 1),  # array element not a number
    }
    # an array shorter than n_parameters
    rec = xp.slice(30, 1).to_pylist()[0]
    if rec["rp_coefficients"] is not None:
        rec["rp_coefficients"] = rec["rp_coefficients"][:-1]
        bad[30] = bulk_lines(pa.Table.from_pylist([rec], schema=XP_CONTINUOUS))[1][0]
    for i, text in bad.items():
        lines[i] = text
    f = tmp_path / "XpContinuousMeanSpectrum_614517-614573.csv.gz"
    write_bulk(f, xp, lines=lines)
    s = ingest_files(run_dir, [f])
    rep = s["files"][0]
    assert rep["status"] == "done" and rep["malformed"] == len(bad)
    reported_lines = sorted(r["line"] for r in rep["malformed_rows"])
    assert reported_lines == sorted(n_head + 1 + i for i in bad)  # 1-based line numbers in the file
    by_line = {r["line"]: r for r in rep["malformed_rows"]}
    assert by_line[n_head + 1 + i_int]["column"] == "bp_basis_function_id"
    assert "5x6" in by_line[n_head + 1 + i_int]["reason"]
    assert "expected" in by_line[n_head + 1 + 10]["reason"]
    assert by_line[n_head + 1 + 20]["column"].endswith("_coefficients")
    if 30 in bad:
        assert "n_parameters" in by_line[n_head + 1 + 30]["reason"]
    got = read_fetched(run_dir / "raw", "xp_continuous_mean_spectrum")
    keep = np.ones(xp.num_rows, dtype=bool)
    keep[list(bad)] = False
    assert got.equals(xp.filter(pa.array(keep)).sort_by("source_id"))


def test_truncated_gzip_is_recorded_and_other_files_land(universe, run_dir, tmp_path):
    xp = universe["xp_continuous_mean_spectrum"]
    half = xp.num_rows // 2
    good = tmp_path / "XpContinuousMeanSpectrum_a.csv.gz"
    cut = tmp_path / "XpContinuousMeanSpectrum_b.csv.gz"
    write_bulk(good, xp.slice(0, half))
    write_bulk(cut, xp.slice(half), truncate=True)
    s = ingest_files(run_dir, [good, cut])
    assert [f["file"] for f in s["failed"]] == [str(cut)]
    assert "truncated" in s["failed"][0]["reason"] and "none of its rows" in s["failed"][0]["reason"]
    got = read_fetched(run_dir / "raw", "xp_continuous_mean_spectrum")
    assert got.equals(xp.slice(0, half).sort_by("source_id"))
    state = json.loads((run_dir / "state" / "ingest" / "summary.json").read_text())
    assert state["failed"][0]["file"] == str(cut)


def test_files_sharing_a_partition_are_merged_and_duplicates_reported(universe, run_dir, tmp_path):
    xp = universe["xp_continuous_mean_spectrum"].sort_by("source_id")
    a, b = tmp_path / "XpContinuousMeanSpectrum_a.csv", tmp_path / "XpContinuousMeanSpectrum_b.csv"
    write_bulk(a, xp.slice(0, 60))
    write_bulk(b, xp.slice(55))  # 5 rows in both files
    s = ingest_files(run_dir, [a, b])
    assert s["failed"] == []
    assert sum(d["count"] for d in s["duplicates"]) == 5 and s["conflicting_duplicates"] == 0
    got = read_fetched(run_dir / "raw", "xp_continuous_mean_spectrum")
    assert got.equals(xp)


def test_duplicates_with_different_content_are_named(universe, run_dir, tmp_path, caplog):
    """Issue 19 item 12: a source_id met twice with different rows is reported with its id, not silently kept."""
    xp = universe["xp_continuous_mean_spectrum"].sort_by("source_id")
    a, b = tmp_path / "XpContinuousMeanSpectrum_a.csv", tmp_path / "XpContinuousMeanSpectrum_b.csv"
    write_bulk(a, xp.slice(0, 60))
    other = xp.slice(58, 4)  # 58, 59 also in file a; 59 changed
    col = other.schema.get_field_index("bp_n_relevant_bases")
    vals = other.column(col).to_pylist()
    vals[1] = (vals[1] or 0) + 1
    other = other.set_column(col, other.schema.field(col), pa.array(vals, other.schema.field(col).type))
    write_bulk(b, other)
    changed = xp.column("source_id")[59].as_py()
    with caplog.at_level("WARNING"):
        s = ingest_files(run_dir, [a, b])
    assert s["conflicting_duplicates"] == 1
    assert [i for d in s["duplicates"] for i in d["conflicting_ids"]] == [changed]
    assert "DIFFERENT content" in caplog.text and str(changed) in caplog.text
    got = read_fetched(run_dir / "raw", "xp_continuous_mean_spectrum")
    assert got.num_rows == 62 and got.slice(59, 1).equals(xp.slice(59, 1))  # the first file's row, as documented


def test_partner_tables_through_ingest(universe, run_dir, tmp_path):
    """Issue 19 item 12: `xpcat ingest --tmass/--unwise` brings 2MASS and unWISE rows in (no more NO_TMASS for all)."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from xpcat.cli import cli
    from xpcat.config import read_run_config

    tm = universe["tmass"]
    tm_file = tmp_path / "my_2mass.parquet"
    pq.write_table(tm.select(["source_id", "j_m", "j_msigcom", "h_m", "h_msigcom", "ks_m", "ks_msigcom", "ph_qual"]),
                   tm_file)
    xp = universe["xp_continuous_mean_spectrum"]
    f = tmp_path / "XpContinuousMeanSpectrum_000000-003111.csv.gz"
    write_bulk(f, xp)
    res = CliRunner().invoke(cli, ["ingest", str(run_dir), str(f), "--tmass", str(tm_file)])
    assert res.exit_code == 0, res.output
    assert read_run_config(run_dir).data.tmass == str(tm_file.resolve())  # outside RUN_DIR: absolute
    got = read_fetched(run_dir / "raw", "tmass")
    assert got.num_rows == tm.num_rows
    np.testing.assert_array_equal(got.sort_by("source_id").column("j_m").to_numpy(),
                                  tm.sort_by("source_id").column("j_m").to_numpy())


def test_gaia_source_bulk_file(universe, run_dir, tmp_path):
    gaia = universe["gaia_source"]
    bulk = gaia.drop_columns(["fidelity_v2", "norm_dg"])  # not in GaiaSource files
    f = tmp_path / "GaiaSource_000000-003111.csv.gz"
    write_bulk(f, bulk)
    s = ingest_files(run_dir, [f])
    assert s["failed"] == [] and s["malformed"] == 0
    got = read_fetched(run_dir / "raw", "gaia_source")
    want = gaia.filter(pc.field("has_xp_continuous")).sort_by("source_id")
    want = want.set_column(want.schema.get_field_index("fidelity_v2"), GAIA_SOURCE.field("fidelity_v2"),
                           pa.nulls(want.num_rows, pa.float32()))
    want = want.set_column(want.schema.get_field_index("norm_dg"), GAIA_SOURCE.field("norm_dg"),
                           pa.nulls(want.num_rows, pa.float32()))
    assert got.equals(want)
    assert got.num_rows < gaia.num_rows  # sources without XP left out, as the fetch query does


def test_unknown_file_and_bad_calls(run_dir, tmp_path):
    f = tmp_path / "something.csv"
    f.write_text("a,b\n1,2\n")
    s = ingest_files(run_dir, [f])
    assert s["failed"] and "neither" in s["failed"][0]["reason"]
    with pytest.raises(InputError, match="nothing to ingest"):
        ingest_files(run_dir, [])
    with pytest.raises(InputError, match="not found"):
        ingest_files(run_dir, [tmp_path / "missing.csv.gz"])
    empty = tmp_path / "XpContinuousMeanSpectrum_e.csv"
    empty.write_text("# %ECSV 1.0\n")
    with pytest.raises(InputError, match="no CSV header"):
        read_ecsv_header(empty)

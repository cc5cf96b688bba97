"""The local archive: ADQL over DuckDB, TAP async and DataLink as astroquery sees them, faults."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pyarrow as pa
import pytest
import requests
from _archive_universe import (
    REFERENCE,
    REFERENCE_CSVS,
    expected_fetch,
    fixture_xp_csv,
    make_universe,
    read_text_csv,
)

from xpcat.catalog_schema.raw import GAIA_SOURCE, TMASS, XP_CONTINUOUS
from xpcat.errors import InputError
from xpcat.production.ingest.archive import (
    GAIA_SOURCE_ADQL,
    TMASS_ADQL,
    FetchOptions,
    build_client,
    load_xp,
    run_query,
    socket_timeout,
)
from xpcat.production.ingest.formats import conform_rows, xp_to_archive_csv
from xpcat.production.synthetic.archive_server import AdqlError, ArchiveDatabase, LocalArchive, adql_to_duckdb
from xpcat.production.partitions import source_id_range

LEVEL = 2


@pytest.fixture(scope="module")
def universe(tmp_path_factory):
    d = tmp_path_factory.mktemp("universe")
    tables = make_universe(d, n_stars=40, seed=3)
    return d, tables


@pytest.fixture(scope="module")
def archive(universe):
    with LocalArchive(universe[0]) as arc:
        yield arc


def test_adql_translation():
    assert adql_to_duckdb("SELECT TOP 5 source_id FROM gaiadr3.gaia_source") == \
        "SELECT source_id FROM gaiadr3.gaia_source\nLIMIT 5"
    assert adql_to_duckdb("select distinct top 2 a from t;").endswith("LIMIT 2")
    assert "'True'" in adql_to_duckdb("SELECT a FROM t WHERE b = \u2019True\u2019")
    for bad in ("", "DROP TABLE gaiadr3.gaia_source", "SELECT 1; SELECT 2", "COPY t TO 'x'"):
        with pytest.raises(AdqlError):
            adql_to_duckdb(bad)


def test_appendix_a_queries_on_the_database(universe):
    d, tables = universe
    db = ArchiveDatabase(d)
    exp = expected_fetch(tables)
    lo, hi = 0, (1 << 63) - 1
    g, bad = conform_rows(db.query(GAIA_SOURCE_ADQL.format(lo=lo, hi=hi)), GAIA_SOURCE)
    assert not bad and g.equals(exp["gaia_source"])
    t, bad = conform_rows(db.query(TMASS_ADQL.format(lo=lo, hi=hi)), TMASS)
    assert not bad and t.equals(exp["tmass"])
    assert 0 < t.num_rows < tables["tmass"].num_rows  # the ph_qual / ext_key cuts removed some


def test_database_cannot_read_files(universe):
    db = ArchiveDatabase(universe[0])
    with pytest.raises(AdqlError, match="query failed"):
        db.query("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(AdqlError, match="no_such_column"):
        db.query("SELECT no_such_column FROM gaiadr3.gaia_source")


def test_not_a_universe(tmp_path):
    with pytest.raises(InputError, match="gaia_source"):
        ArchiveDatabase(tmp_path)


def test_datalink_csv_is_byte_identical_to_the_archive():
    """Formatting the real rows again gives exactly the archive's (and GaiaXPy's test) files."""
    for raw in [fixture_xp_csv()] + [(REFERENCE / n).read_bytes() for n in REFERENCE_CSVS]:
        rows, bad = conform_rows(read_text_csv(raw), XP_CONTINUOUS)
        assert not bad
        assert xp_to_archive_csv(rows) == raw


def test_async_query_through_astroquery(universe, archive):
    d, tables = universe
    client = build_client(archive.url)
    exp = expected_fetch(tables)["gaia_source"]
    pix = int(exp.column("source_id")[0].as_py()) >> 55
    lo, hi = source_id_range(pix, LEVEL)
    with socket_timeout(10):
        got = run_query(client, GAIA_SOURCE_ADQL.format(lo=lo, hi=hi - 1), FetchOptions())
    got, bad = conform_rows(got, GAIA_SOURCE)
    sid = exp.column("source_id").to_numpy()
    assert not bad and got.equals(exp.filter(pa.array((sid >= lo) & (sid < hi))))
    assert archive.stats["jobs"] >= 1


def test_adql_error_reaches_the_client(archive):
    client = build_client(archive.url)
    with socket_timeout(10), pytest.raises(SystemError, match="nonexistent_col"):
        run_query(client, "SELECT nonexistent_col FROM gaiadr3.gaia_source", FetchOptions())


@pytest.mark.parametrize("structure", ["RAW", "INDIVIDUAL"])
def test_datalink_returns_the_served_rows(universe, archive, tmp_path, structure):
    d, tables = universe
    xp = tables["xp_continuous_mean_spectrum"]
    ids = np.concatenate([xp.column("source_id").to_numpy()[:7], [12345]])  # 12345 is not in the universe
    client = build_client(archive.url)
    with socket_timeout(10):
        rows, bad = load_xp(client, ids, FetchOptions(data_structure=structure), tmp_path)
    assert not bad
    assert rows.sort_by("source_id").equals(xp.slice(0, 7).sort_by("source_id"))
    assert list(tmp_path.iterdir()) == []  # astroquery's temporary folder is gone


def test_injected_errors_stalls_and_short_answers(universe, tmp_path):
    d, tables = universe
    ids = tables["xp_continuous_mean_spectrum"].column("source_id").to_numpy()[:20]
    with LocalArchive(d, error_rate=1.0) as arc:
        client = build_client(arc.url)
        with socket_timeout(10), pytest.raises(requests.exceptions.HTTPError):
            load_xp(client, ids, FetchOptions(), tmp_path)
        assert arc.stats["errors_injected"] == 1
    with LocalArchive(d, stall_rate=1.0, stall_seconds=5) as arc:
        client = build_client(arc.url)
        with socket_timeout(0.3), pytest.raises(TimeoutError):
            run_query(client, "SELECT TOP 1 source_id FROM gaiadr3.gaia_source", FetchOptions())
    with LocalArchive(d, short_rate=1.0, seed=1) as arc:
        client = build_client(arc.url)
        with socket_timeout(10):
            rows, _ = load_xp(client, ids, FetchOptions(), tmp_path)
        assert 0 < rows.num_rows < len(ids)
        assert set(rows.column("source_id").to_pylist()) < set(ids.tolist())
        assert arc.stats["short_answers"] == 1


def test_fault_rates_are_checked(universe):
    with pytest.raises(ValueError, match="error_rate"):
        LocalArchive(universe[0], error_rate=1.5)


def test_datalink_refuses_too_many_ids(archive):
    r = requests.post(archive.url + "data-server/data",
                      data={"ID": ",".join(str(i) for i in range(5001)), "RETRIEVAL_TYPE": "XP_CONTINUOUS",
                            "FORMAT": "csv"}, timeout=10)
    assert r.status_code == 400 and "5000" in r.text
    r = requests.post(archive.url + "data-server/data", data={"ID": "1", "RETRIEVAL_TYPE": "EPOCH_PHOTOMETRY",
                                                               "FORMAT": "csv"}, timeout=10)
    assert r.status_code == 400 and "XP_CONTINUOUS" in r.text


def test_datalink_zip_names(universe, archive):
    xp = universe[1]["xp_continuous_mean_spectrum"]
    sid = xp.column("source_id").to_pylist()[:2]
    for structure, names in (("INDIVIDUAL", {f"XP_CONTINUOUS-Gaia DR3 {s}.csv" for s in sid}),
                             ("RAW", {"XP_CONTINUOUS_RAW.csv"})):
        r = requests.post(archive.url + "data-server/data", timeout=10, data={
            "ID": ",".join(map(str, sid)), "RETRIEVAL_TYPE": "XP_CONTINUOUS", "FORMAT": "csv",
            "DATA_STRUCTURE": structure, "USE_ZIP_ALWAYS": "true"})
        assert r.status_code == 200
        assert set(zipfile.ZipFile(io.BytesIO(r.content)).namelist()) == names

"""Fetching through astroquery from the local archive; real DataLink / GaiaXPy formats."""

from __future__ import annotations

import json
import shutil
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _archive_universe import (
    REFERENCE,
    REFERENCE_CSVS,
    expected_fetch,
    fixture_zip,
    make_universe,
    read_fetched,
    read_text_csv,
)

from xpcat.catalog_schema.raw import XP_CONTINUOUS
from xpcat.config import RunConfig, config_from_dict, config_to_dict
from xpcat.errors import InputError
from xpcat.production.ingest.archive import fetch_options, fetch_run
from xpcat.production.ingest.client import (
    DEFAULT_WORKERS,
    MAX_WORKERS,
    ArchiveUnreachable,
    FetchOptions,
    RangeFailed,
    build_client,
    socket_timeout,
    with_retries,
)
from xpcat.production.ingest.formats import astropy_to_arrow, conform_rows
from xpcat.production.synthetic.archive_server import AdqlError, LocalArchive
from xpcat.production.ingest.bulk import iter_bulk_file
from xpcat.production.partitions import is_done, partition_name, read_marker

LEVEL = 2
FAST = dict(backoff_s=0.01, backoff_max_s=0.05, workers=1)


def _config(level: int = LEVEL, **data) -> RunConfig:
    d = config_to_dict(RunConfig())
    d["data"]["partition_level"] = level
    d["data"].update(data)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def universe(tmp_path_factory):
    d = tmp_path_factory.mktemp("universe")
    return d, make_universe(d, n_stars=80, seed=11)


def _no_xp_ids(tables) -> set[int]:
    """XP-flagged stars that the universe has no spectrum for."""
    exp = expected_fetch(tables)
    return set(exp["gaia_source"].column("source_id").to_pylist()) - set(
        exp["xp_continuous_mean_spectrum"].column("source_id").to_pylist())


@pytest.mark.parametrize("structure", ["RAW", "INDIVIDUAL"])
def test_fetch_reproduces_the_universe(universe, tmp_path, structure):
    d, tables = universe
    exp = expected_fetch(tables)
    run = tmp_path / "run"
    with LocalArchive(d) as arc:
        s = fetch_run(run, _config(), archive_url=arc.url, login=False,
                      options=FetchOptions(data_structure=structure, datalink_batch=7, **FAST))
        assert s["failed"] == [] and s["done"] == s["ranges"] == 3
        for t in ("gaia_source", "tmass", "xp_continuous_mean_spectrum"):
            got = read_fetched(run / "raw", t)
            assert got.equals(exp[t]), t  # value for value, XP arrays included
        # the star without a spectrum is recorded as missing, in the summary and the markers
        missing = _no_xp_ids(tables)
        assert s["missing_xp"] == len(missing) == 1
        assert not s["complete"] and s["unfetched_stars"] == 1
        assert s["incomplete"].startswith("fetch incomplete: 1 star(s) not fetched (1 star(s) without XP spectra)")
        assert f"rerun `xpcat fetch {run} --archive {arc.url}` to resume" in s["incomplete"]
        recorded = set()
        for f in (run / "raw" / "xp_continuous_mean_spectrum").glob("*.parquet"):
            assert is_done(f)
            recorded |= set(read_marker(f)["info"]["missing_xp_ids"])
        assert recorded == missing
        # a second fetch fetches no range again: it only asks DataLink for the missing star
        before = arc.stats
        s2 = fetch_run(run, _config(), archive_url=arc.url, login=False, options=FetchOptions(**FAST))
        assert s2["skipped"] == 3 and s2["done"] == 0 and s2["missing_xp"] == 1 and not s2["complete"]
        after = arc.stats
        assert after["jobs"] - before["jobs"] == 1  # the census job only
        assert after["datalink_sources"] == before["datalink_sources"]  # nothing new to send
        assert after["datalink_requests"] > before["datalink_requests"]
        for t in ("gaia_source", "tmass", "xp_continuous_mean_spectrum"):
            assert read_fetched(run / "raw", t).equals(exp[t]), t


def test_fetch_in_worker_processes(universe, tmp_path):
    d, tables = universe
    exp = expected_fetch(tables)
    run = tmp_path / "run"
    with LocalArchive(d) as arc:
        s = fetch_run(run, _config(), archive_url=arc.url, login=False, options=FetchOptions(**{**FAST, "workers": 2}))
    assert s["failed"] == [] and s["done"] == 3
    for t in ("gaia_source", "tmass", "xp_continuous_mean_spectrum"):
        assert read_fetched(run / "raw", t).equals(exp[t]), t


def test_fetch_under_faults_is_complete_and_exact(universe, tmp_path):
    """High fault rates, the default attempts: every star exactly once, no range left failed (issue 19.4)."""
    d, tables = universe
    exp = expected_fetch(tables)
    run = tmp_path / "run"
    opts = FetchOptions(timeout_s=1.0, datalink_batch=5, **FAST)
    t0 = time.perf_counter()
    with LocalArchive(d, error_rate=0.3, short_rate=0.5, stall_rate=0.03, stall_seconds=3, seed=5) as arc:
        s = fetch_run(run, _config(), archive_url=arc.url, login=False, options=opts)
        stats = arc.stats
    assert time.perf_counter() - t0 < 60
    assert stats["errors_injected"] > 10 and stats["short_answers"] > 0 and stats["stalls_injected"] > 0
    assert s["failed"] == [] and s["done"] == s["ranges"] == 3
    for t in ("gaia_source", "tmass", "xp_continuous_mean_spectrum"):
        assert read_fetched(run / "raw", t).equals(exp[t]), t  # every star once, value for value
    missing = set()
    for f in (run / "raw" / "xp_continuous_mean_spectrum").glob("*.parquet"):
        assert is_done(f)
        missing |= set(read_marker(f)["info"]["missing_xp_ids"])
    assert missing == _no_xp_ids(tables)  # only the star the archive does not have
    assert s["missing_xp"] == 1 and s["unfetched_stars"] == 1


def test_failed_request_inside_a_job_keeps_the_job(universe, tmp_path):
    """A failed poll or result download asks again for the same job; it is never submitted again."""
    d, tables = universe
    run = tmp_path / "run"
    with LocalArchive(d, error_rate=0.5, seed=3) as arc:
        s = fetch_run(run, _config(), archive_url=arc.url, login=False,
                      options=FetchOptions(max_attempts=25, **FAST))
        stats = arc.stats
    assert stats["errors_injected"] > 20
    assert s["failed"] == [] and s["done"] == 3
    assert stats["jobs"] == 1 + 2 * 3  # the census, then gaia_source and tmass per range: each submitted once
    assert read_fetched(run / "raw", "gaia_source").equals(expected_fetch(tables)["gaia_source"])


def test_failing_range_is_recorded_and_the_rest_goes_on(universe, tmp_path):
    d, tables = universe
    exp = expected_fetch(tables)
    run = tmp_path / "run"
    with LocalArchive(d) as arc:
        db = arc._state.db
        real_query = db.query
        bad_pix = int(exp["gaia_source"].column("source_id")[0].as_py()) >> 55
        bad_lo = bad_pix << 55

        def query(adql):
            if f"BETWEEN {bad_lo} AND" in adql:
                raise AdqlError("query failed: table is being rebuilt")
            return real_query(adql)

        db.query = query
        s = fetch_run(run, _config(), archive_url=arc.url, login=False, options=FetchOptions(**FAST))
    name = partition_name(bad_pix, LEVEL)
    assert [f["partition"] for f in s["failed"]] == [name]
    assert "rejected the query" in s["failed"][0]["reason"] and "being rebuilt" in s["failed"][0]["reason"]
    state = json.loads((run / "state" / "fetch" / f"{name}.json").read_text())
    assert state["status"] == "failed" and "being rebuilt" in state["reason"] and state["permanent"]
    assert not (run / "raw" / "gaia_source" / f"{name}.parquet").exists()
    assert s["done"] == 2
    # not complete: the failed range's stars (counted by the census) and the star without XP, and how to resume
    n_bad = sum(1 for i in exp["gaia_source"].column("source_id").to_pylist() if i >> 55 == bad_pix)
    missing_elsewhere = len({i for i in _no_xp_ids(tables) if i >> 55 != bad_pix})
    assert not s["complete"] and s["unfetched_stars"] == n_bad + missing_elsewhere
    assert f"{n_bad} star(s) of 1 failed range(s)" in s["incomplete"] and "rerun `xpcat fetch" in s["incomplete"]


def test_empty_pixel_list_entries_and_bad_pixels(universe, tmp_path):
    d, tables = universe
    run = tmp_path / "run"
    with LocalArchive(d) as arc:
        s = fetch_run(run, _config(pixels=[0, 1]), archive_url=arc.url, login=False, options=FetchOptions(**FAST))
        assert s["empty"] == 2 and s["failed"] == []
        for t in ("gaia_source", "tmass", "xp_continuous_mean_spectrum"):
            f = run / "raw" / t / f"{partition_name(0, LEVEL)}.parquet"
            assert is_done(f) and pq.read_table(f).num_rows == 0
        with pytest.raises(InputError, match="out of range"):
            fetch_run(run, _config(pixels=[10**6]), archive_url=arc.url, login=False)


@pytest.mark.parametrize("url", ["refused", "http://gaia-archive.invalid/"])
def test_unreachable_archive_fails_fast(tmp_path, url):
    """No archive there (connection refused, name not resolved): one error naming the URL, in seconds (issue 19.3)."""
    if url == "refused":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    t0 = time.perf_counter()
    with pytest.raises(ArchiveUnreachable, match=f"cannot reach the Gaia archive at {url}"):
        # no census: the old code went on through every pixel of the level, each retried
        fetch_run(tmp_path / "run", _config(), archive_url=url, login=False,
                  options=FetchOptions(census=False, backoff_s=0.2, backoff_max_s=0.2, workers=1))
    assert time.perf_counter() - t0 < 10
    assert not list((tmp_path / "run" / "state" / "fetch").glob("L*.json"))  # no range was tried


def test_cli_unreachable_archive_is_one_line(tmp_path):
    from click.testing import CliRunner

    from xpcat.cli import cli
    from xpcat.config import write_config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    write_config(_config(pixels=[3]), tmp_path / "run")
    res = CliRunner().invoke(cli, ["fetch", str(tmp_path / "run"), "--archive", url])
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"xpcat fetch: error: cannot reach the Gaia archive at {url}")
    assert "refused" in lines[0]


def test_retries_back_off_and_cap():
    delays: list[float] = []
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        raise ConnectionResetError("reset by peer")

    opts = FetchOptions(max_attempts=5, backoff_s=1.0, backoff_max_s=3.0)
    with pytest.raises(RangeFailed, match="gave up after 5 attempts.*reset by peer"):
        with_retries("test", flaky, opts, sleep=delays.append)
    assert calls["n"] == 5 and delays == [1.0, 2.0, 3.0, 3.0]


def test_socket_timeout_is_restored():
    old = socket.getdefaulttimeout()
    with socket_timeout(1.5):
        assert socket.getdefaulttimeout() == 1.5
    assert socket.getdefaulttimeout() == old


def test_login_needs_credentials(monkeypatch):
    monkeypatch.delenv("GAIA_USER", raising=False)
    monkeypatch.delenv("GAIA_PASSWORD", raising=False)
    with pytest.raises(InputError, match="GAIA_USER"):
        build_client("http://127.0.0.1:9/", login=True)
    monkeypatch.setenv("GAIA_USER", "someone")
    monkeypatch.setenv("GAIA_PASSWORD", "secret")
    with socket_timeout(5), pytest.raises(InputError, match="login to http://127.0.0.1:9/ failed"):
        build_client("http://127.0.0.1:9/", login=True)  # nothing listens there (HTTPS port 443 either)


def test_astroquery_import_does_not_reach_the_network(monkeypatch):
    """Our import of GaiaClass refuses connections while astroquery builds its module-level client."""
    import http.client
    import sys

    from xpcat.production.ingest import client as archive_client
    attempts = []
    monkeypatch.setattr(http.client.HTTPConnection, "connect", lambda self: attempts.append(self.host))
    for mod in [m for m in sys.modules if m.startswith("astroquery.gaia")]:
        monkeypatch.delitem(sys.modules, mod)
    cls = archive_client._gaia_class()
    assert cls.__name__ == "GaiaClass" and attempts == []
    assert http.client.HTTPConnection.connect is not None


def test_fetch_options_are_checked():
    with pytest.raises(ValueError, match="5000"):
        FetchOptions(datalink_batch=6000)
    with pytest.raises(ValueError, match="data_structure"):
        FetchOptions(data_structure="COMBINED")
    with pytest.raises(ValueError, match="workers"):
        FetchOptions(workers=0)
    with pytest.raises(ValueError, match="workers"):
        FetchOptions(workers=MAX_WORKERS + 1)


def test_fetch_concurrency_comes_from_the_run_config():
    """``[fetch] workers`` of the run config, bounded by the archive's politeness limit."""
    assert fetch_options(RunConfig()).workers == RunConfig().fetch.workers == DEFAULT_WORKERS == FetchOptions().workers
    assert fetch_options(RunConfig().replace(fetch={"workers": 3})).workers == 3
    assert 1 < DEFAULT_WORKERS <= MAX_WORKERS


# -- real formats: the rows GaiaXPy reads --------------------------------------------------

def _gaiaxpy_frame(path):
    from gaiaxpy.file_parser.parse_internal_continuous import InternalContinuousParser

    df, _ = InternalContinuousParser().parse_file(str(path))
    return df


def _assert_same_as_gaiaxpy(rows: pa.Table, df) -> None:
    """Our raw rows hold exactly what GaiaXPy reads (matrices via GaiaXPy's own unpacking)."""
    from gaiaxpy.core.generic_functions import array_to_symmetric_matrix

    assert rows.column("source_id").to_pylist() == [int(x) for x in df["source_id"]]
    for i, rec in enumerate(rows.to_pylist()):
        ref = df.iloc[i]
        for f in XP_CONTINUOUS:
            ours, theirs = rec[f.name], ref[f.name]
            if ours is None:  # missing band: GaiaXPy has NaN / NA
                import pandas as pd

                assert np.ndim(theirs) == 0 and bool(pd.isna(theirs)), f.name
            elif f.name.endswith("_coefficient_correlations"):
                n = rec[f.name.split("_")[0] + "_n_parameters"]
                assert np.array_equal(array_to_symmetric_matrix(np.asarray(ours), n), theirs), f.name
            elif isinstance(ours, list):
                assert np.array_equal(np.asarray(ours), theirs), f.name
            elif pa.types.is_float32(f.type):
                assert np.float32(ours) == np.float32(theirs), f.name
            else:
                assert ours == theirs, f.name


@pytest.mark.parametrize("name", REFERENCE_CSVS)
def test_reference_csv_parses_as_gaiaxpy_reads_it(name):
    rows, bad = conform_rows(read_text_csv(REFERENCE / name), XP_CONTINUOUS)
    assert not bad and rows.num_rows == 3
    _assert_same_as_gaiaxpy(rows, _gaiaxpy_frame(REFERENCE / name))


def test_reference_ecsv_parses_as_gaiaxpy_reads_it():
    path = REFERENCE / "XP_CONTINUOUS_RAW_with_missing_BP.ecsv"
    parts = list(iter_bulk_file(path))
    rows = pa.concat_tables([p[1] for p in parts])
    assert all(p[0] == "xp_continuous_mean_spectrum" and not p[2] for p in parts)
    _assert_same_as_gaiaxpy(rows, _gaiaxpy_frame(path))
    # and the same rows as its CSV twin
    csv_rows, _ = conform_rows(read_text_csv(REFERENCE / "XP_CONTINUOUS_RAW_with_missing_BP.csv"), XP_CONTINUOUS)
    assert rows.equals(csv_rows)


def test_astroquery_datalink_fixture_parses_as_gaiaxpy_reads_it(tmp_path):
    """astroquery's own DataLink unpacking of the real products zip, then our conversion."""
    from astroquery.gaia.core import GaiaClass

    zip_copy = tmp_path / "download"
    shutil.copy(fixture_zip(), zip_copy)
    files = GaiaClass._GaiaClass__get_data_files(output_file=str(zip_copy), path=str(tmp_path))
    key = next(k for k in files if k.startswith("XP_CONTINUOUS"))
    rows, bad = conform_rows(astropy_to_arrow(files[key][0]), XP_CONTINUOUS)
    assert not bad and rows.num_rows == 1
    assert rows.column("bp_coefficients")[0].as_py().__len__() == 55
    _assert_same_as_gaiaxpy(rows, _gaiaxpy_frame(tmp_path / key))


def test_wrong_answers_fail_the_range_with_the_reason(universe, tmp_path, monkeypatch):
    """Rows outside the range, duplicated rows, an unparsable VOTable: recorded per range."""
    from xpcat.production.synthetic import archive_server
    d, tables = universe
    exp = expected_fetch(tables)["gaia_source"]
    pixels = sorted({int(s) >> 55 for s in exp.column("source_id").to_pylist()})
    with LocalArchive(d) as arc:
        db = arc._state.db
        real_query = db.query
        from xpcat.production.ingest.archive import GAIA_SOURCE_ADQL

        other = real_query(GAIA_SOURCE_ADQL.format(lo=pixels[1] << 55, hi=(pixels[1] + 1 << 55) - 1)).slice(0, 1)

        def query(adql):
            out = real_query(adql)
            if f"BETWEEN {pixels[0] << 55} AND" in adql and "spur" in adql:
                return pa.concat_tables([out, other])  # a stray row from another range
            if f"BETWEEN {pixels[1] << 55} AND" in adql and "spur" in adql:
                return pa.concat_tables([out, out.slice(0, 1)])  # a duplicated row
            return out

        db.query = query
        s = fetch_run(tmp_path / "run", _config(), archive_url=arc.url, login=False,
                      options=FetchOptions(census=False, **FAST), pixels=pixels)
        reasons = {f["partition"]: f["reason"] for f in s["failed"]}
        assert "outside the range" in reasons[partition_name(pixels[0], LEVEL)]
        assert "duplicated source_id" in reasons[partition_name(pixels[1], LEVEL)]
        assert s["done"] == 1
        db.query = real_query
        monkeypatch.setattr(archive_server, "_encode_table", lambda table, fmt: (b"<VOTABLE>not really", "text/xml"))
        s = fetch_run(tmp_path / "run2", _config(pixels=[pixels[2]]), archive_url=arc.url, login=False,
                      options=FetchOptions(max_attempts=2, **FAST))
    assert len(s["failed"]) == 1 and "gave up after 2 attempts" in s["failed"][0]["reason"]


def test_cli_serve_and_fetch(universe, tmp_path):
    """`xpcat archive serve` in a subprocess, `xpcat fetch` against it."""
    import os
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from xpcat.cli import cli
    from xpcat.config import write_config

    d, tables = universe
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "xpcat.cli", "archive", "serve", str(d), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "XPCAT_PROGRESS": "0"})
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "local archive did not start"
            time.sleep(0.2)
        run = tmp_path / "run"
        write_config(_config(), run)
        res = CliRunner().invoke(cli, ["fetch", str(run), "--archive", f"http://127.0.0.1:{port}/"])
        # the universe's star without a spectrum is never served: the fetch is incomplete, and says so
        assert res.exit_code == 3, res.output
        summary = json.loads(res.stdout[res.stdout.index("{"):])
        assert summary["done"] == 3 and summary["failed"] == [] and summary["unfetched_stars"] == 1
        assert "1 star(s) not fetched" in summary["incomplete"] and "to resume" in summary["incomplete"]
        assert read_fetched(run / "raw", "gaia_source").equals(expected_fetch(tables)["gaia_source"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)

"""``xpcat fetch`` with ``[fetch] xp = "sampled"``: DataLink XP_SAMPLED from the local archive.

The local archive serves XP_SAMPLED in the real product's format (checked byte
for byte and value for value against the real product of astroquery's test
data); a sampled fetch conditions into the same partitions as a coefficient
fetch of the same universe, with the XP_SAMPLED flag; a wrong grid fails the
range with the reason.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from _archive_universe import fixture_xp_csv, make_universe, read_text_csv

from xpcat import catalog_schema as cs
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.catalog_schema.raw import XP_CONTINUOUS
from xpcat.config import read_run_config
from xpcat.production.ingest.archive import fetch_options, fetch_run
from xpcat.production.ingest.client import FetchOptions
from xpcat.production.ingest.formats import conform_rows
from xpcat.production.ingest.sampled import XP_TAKE
from xpcat.production.ingest.sampled_format import long_form_records, xp_sampled_to_archive_csv
from xpcat.production.run import run_condition
from xpcat.production.synthetic import archive_db
from xpcat.production.synthetic.archive_server import LocalArchive

DL_ZIP = Path(__file__).resolve().parents[2] / "data" / "astroquery_xp" / \
    "gaia_dr3_source_id_5937083312263887616_dl_products_csv.zip"
FAST = dict(backoff_s=0.01, backoff_max_s=0.05, workers=1)


def _real_sampled_csv() -> bytes:
    with zipfile.ZipFile(DL_ZIP) as zf:
        return zf.read(next(n for n in zf.namelist() if n.startswith("XP_SAMPLED")))


def _long(data: bytes) -> dict[str, np.ndarray]:
    t = pcsv.read_csv(pa.BufferReader(data))
    return {c: t.column(c).to_numpy() for c in t.column_names}


@pytest.fixture(scope="module")
def universe(tmp_path_factory):
    d = tmp_path_factory.mktemp("universe")
    return d, make_universe(d, n_stars=60, seed=5)


def _run(tmp_path: Path, name: str, xp: str) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "config.toml").write_text(
        f'[data]\npartition_level = 2\n[fetch]\nxp = "{xp}"\n[cluster]\nprofile = "threads"\nn_workers = 1\n'
        "threads_per_worker = 2\nretries = 0\n")
    return run


def _conditioned(run: Path) -> dict[str, pa.Table]:
    return {f.name: pq.read_table(f) for f in sorted((run / "conditioned").glob("*.parquet"))}


def test_sampled_csv_is_the_archive_s_format_byte_for_byte():
    data = _real_sampled_csv()
    (r,) = long_form_records(_long(data))
    assert r["wavelength"].size == 343 and r["wavelength"][0] == 336.0 and r["wavelength"][-1] == 1020.0
    out = xp_sampled_to_archive_csv(np.array([r["source_id"]]), np.array([r["solution_id"]]), np.array([r["ra"]]),
                                    np.array([r["dec"]]), r["wavelength"], r["flux"][None], r["flux_error"][None])
    assert out == data
    with pytest.raises(ValueError, match="do not agree"):
        xp_sampled_to_archive_csv(np.array([1]), np.array([1]), np.array([0.0]), np.array([0.0]), r["wavelength"][:-1],
                                  r["flux"][None], r["flux_error"][None])


def test_served_xp_sampled_equals_the_real_product(universe):
    """The local archive samples the real star's coefficients as the archive's XP_SAMPLED is (flux, flux_error)."""
    d, _ = universe
    rows = conform_rows(read_text_csv(fixture_xp_csv()), XP_CONTINUOUS)[0]
    db = archive_db.ArchiveDatabase(d)
    served = db.xp_sampled(rows)
    (real,) = long_form_records(_long(_real_sampled_csv()))
    np.testing.assert_array_equal(served.wavelength, real["wavelength"])
    np.testing.assert_allclose(served.flux[0], real["flux"], rtol=1e-4, atol=1e-3 * np.abs(real["flux"]).max())
    np.testing.assert_allclose(served.flux_error[0], real["flux_error"], rtol=5e-3)
    # the server answers DataLink requests on several threads at once (a fetch's workers): same answers
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        for again in pool.map(lambda _: archive_db.ArchiveDatabase.xp_sampled(db, rows), range(12)):
            np.testing.assert_array_equal(again.flux, served.flux)


def test_sampled_fetch_conditions_into_the_coefficient_partitions(universe, tmp_path):
    d, _ = universe
    runs = {xp: _run(tmp_path, xp, xp) for xp in ("continuous", "sampled")}
    with LocalArchive(d) as arc:
        for xp, run in runs.items():
            cfg = read_run_config(run)
            assert fetch_options(cfg).xp == xp
            s = fetch_run(run, cfg, archive_url=arc.url, options=FetchOptions(xp=xp, data_structure="RAW", **FAST))
            assert s["failed"] == [] and s["xp"] == xp
            assert run_condition(run, cfg) is not None
        one_file_each = _run(tmp_path, "individual", "sampled")  # DATA_STRUCTURE=INDIVIDUAL: a file per source
        fetch_run(one_file_each, read_run_config(one_file_each), archive_url=arc.url,
                  options=FetchOptions(xp="sampled", data_structure="INDIVIDUAL", **FAST))
    for f in sorted((runs["sampled"] / "raw" / "xp_sampled_spectrum").glob("*.parquet")):
        a, b = pq.read_table(f), pq.read_table(one_file_each / "raw" / "xp_sampled_spectrum" / f.name)
        assert a.select(["source_id", "solution_id", "input_form"]).equals(b.select(["source_id", "solution_id",
                                                                                    "input_form"]))
        for c in ("flux", "flux_error"):  # NaN where a band is missing, in both
            np.testing.assert_array_equal(np.array(a.column(c).to_pylist()), np.array(b.column(c).to_pylist()))
    assert not (runs["sampled"] / "raw" / "xp_continuous_mean_spectrum").exists()
    assert not (runs["continuous"] / "raw" / "xp_sampled_spectrum").exists()
    coef, samp = _conditioned(runs["continuous"]), _conditioned(runs["sampled"])
    assert list(samp) == list(coef) and len(samp) == 3  # the same partitions
    n_forms = 0
    for name in coef:
        c, s = coef[name], samp[name]
        ids = s.column("source_id").to_numpy()
        assert len(ids) == len(np.unique(ids)) and np.array_equal(ids, c.column("source_id").to_numpy())
        flags = s.column("condition_flags").to_numpy()
        has_xp = ~(flags & ConditionFlag.NO_XP).astype(bool)
        assert np.array_equal(has_xp, ~(c.column("condition_flags").to_numpy() & ConditionFlag.NO_XP).astype(bool))
        assert np.all(flags[has_xp] & ConditionFlag.XP_SAMPLED)
        assert not np.any(c.column("condition_flags").to_numpy() & ConditionFlag.XP_SAMPLED)
        forms = cs.read_metadata(pq.read_schema(runs["sampled"] / "conditioned" / name))["xp_input_forms"]
        assert set(forms) - {"none"} == {"datalink_xp_sampled"}  # "none": the universe's star without XP
        assert forms["datalink_xp_sampled"] == has_xp.sum() and forms.get("none", 0) == (~has_xp).sum()
        n_forms += forms.get("none", 0)
        # both routes give the same fluxes where both bands are there (the CSV's float32 digits)
        fs = np.array(s.column("flux").to_pylist())[:, :61]
        fc = np.array(c.column("flux").to_pylist())[:, :61]
        both = has_xp & np.all(np.isfinite(fs), axis=1) & np.all(np.isfinite(fc), axis=1)
        assert both.sum() >= 0.8 * has_xp.sum()
        np.testing.assert_allclose(fs[both], fc[both], rtol=1e-4, atol=1e-6 * np.abs(fc[both]).max())
    assert n_forms == 1  # the universe's one star without a spectrum, in both runs, flagged NO_XP


def test_a_wrong_grid_fails_the_range_with_the_reason(universe, tmp_path, monkeypatch):
    d, _ = universe
    monkeypatch.setattr(archive_db, "SAMPLED_GRID_NM", np.arange(336.0, 934.5, 2.0))  # 300 samples
    run = _run(tmp_path, "wrong", "sampled")
    with LocalArchive(d) as arc:
        s = fetch_run(run, read_run_config(run), archive_url=arc.url, options=FetchOptions(xp="sampled", **FAST))
        asked = arc.stats["datalink_requests"]
    assert s["done"] == 0 and len(s["failed"]) == 3 and not s["complete"]
    for f in s["failed"]:
        assert "XP_SAMPLED answer" in f["reason"] and "wrong_grid: 300 samples 336-934 nm" in f["reason"]
        assert "expected 343 samples 336-1020 nm every 2 nm" in f["reason"]
    assert asked == 3  # permanent: never asked again
    assert not list((run / "raw").glob("*/*.parquet"))


def test_fetch_options_xp_is_checked():
    with pytest.raises(ValueError, match="xp must be 'continuous' or 'sampled'"):
        FetchOptions(xp="coefficients")
    assert XP_TAKE == slice(28, 329, 5)

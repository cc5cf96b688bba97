"""APOGEE library rows -> labels and reddening tables: selection, error floor, AK_TARG conversion, accounting."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from xpcat.catalog_schema.raw import LABELS, REDDENING
from xpcat.catalog_schema.validation import validate
from xpcat.errors import InputError
from xpcat.production.ingest.apogee import (
    AK_SIGMA,
    AKS_PER_E,
    LABEL_REASONS,
    LIBRARY_COLUMNS,
    MIN_SNR,
    REDDENING_REASONS,
    TRAINING_ERROR_FLOOR,
    apogee_tables,
    read_library_rows,
    write_apogee_tables,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "apogee_labels_sample" / "apogee_library_sample.parquet"


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    t = pq.read_table(SAMPLE)
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in LIBRARY_COLUMNS}


@pytest.fixture(scope="module")
def out(rows):
    return apogee_tables(rows)


def test_tables_match_schemas_and_ids_unique(out):
    validate(out.labels, LABELS, what="labels")
    validate(out.reddening, REDDENING, what="reddening")
    assert set(out.labels.column("label_source").to_pylist()) == {"apogee"}


def test_every_row_accounted_for(rows, out):
    n = len(rows["teff"])
    s = out.summary
    assert s["rows"] == n == out.accounting.num_rows
    assert sum(s["labels"]["reasons"].values()) == n
    assert sum(s["reddening"]["reasons"].values()) == n
    assert s["labels"]["rows_out"] == s["labels"]["reasons"]["ok"] == out.labels.num_rows
    r = s["reddening"]["reasons"]
    assert s["reddening"]["rows_out"] == r["ok"] + r["ak_targ_negative_clipped"] == out.reddening.num_rows
    assert set(s["labels"]["reasons"]) == set(LABEL_REASONS)
    assert set(s["reddening"]["reasons"]) == set(REDDENING_REASONS)


def test_label_selection_reasons(rows, out):
    acc = out.accounting.to_pandas()
    feh_nan = ~np.isfinite(rows["fe_h"])
    assert feh_nan.sum() > 0
    assert (acc.label_reason[feh_nan] == "label_not_finite").all()
    low = np.isfinite(rows["fe_h"]) & (rows["snr"] < MIN_SNR)
    assert low.sum() > 0 and (acc.label_reason[low] == "snr_below_min").all()
    kept = acc.label_reason == "ok"
    assert np.all(rows["snr"][kept] >= MIN_SNR)
    assert np.all(np.isfinite(rows["fe_h"][kept]))


def test_duplicates_keep_highest_snr(rows, out):
    acc = out.accounting.to_pandas()
    sid, snr = rows["gaiaedr3_source_id"], rows["snr"]
    ids, counts = np.unique(sid, return_counts=True)
    dups = ids[counts > 1]
    assert dups.size >= 10
    checked = 0
    for i in dups:
        m = np.flatnonzero(sid == i)
        ok = m[acc.label_reason.values[m] == "ok"]
        assert ok.size <= 1
        if ok.size:
            eligible = m[np.isin(acc.label_reason.values[m], ["ok", "duplicate_lower_snr"])]
            assert snr[ok[0]] == snr[eligible].max()
            checked += 1
    assert checked > 0
    assert out.summary["labels"]["reasons"]["duplicate_lower_snr"] > 0


def test_label_errors_are_the_formal_ones(rows, out):
    """The table carries ASPCAP's formal errors (the references' noise); the training's floor is a config."""
    lab = out.labels.to_pandas().set_index("source_id")
    acc = out.accounting.to_pandas()
    i = int(np.flatnonzero(acc.label_reason == "ok")[0])
    row = lab.loc[int(rows["gaiaedr3_source_id"][i])]
    for col, raw in (("teff_error", "teff_err"), ("logg_error", "logg_err"), ("feh_error", "fe_h_err")):
        assert getattr(row, col) == pytest.approx(rows[raw][i], rel=1e-6)
    assert lab.teff_error.min() < TRAINING_ERROR_FLOOR[0]  # no floor in the table
    assert "label_error_floor" not in out.summary["constants"]


def test_reddening_conversion_and_flags(rows, out):
    acc = out.accounting.to_pandas()
    red = out.reddening.to_pandas().set_index("source_id")
    ak = rows["ak_targ"]
    nan = ~np.isfinite(ak)
    assert nan.sum() > 0 and (acc.reddening_reason[nan] == "ak_targ_not_finite").all()
    very_neg = np.isfinite(ak) & (ak < -3 * AK_SIGMA)
    assert very_neg.sum() > 0 and (acc.reddening_reason[very_neg] == "ak_targ_implausibly_negative").all()
    clipped = acc.reddening_reason == "ak_targ_negative_clipped"
    assert clipped.sum() > 0
    assert (acc.e_clipped == clipped).all()
    for i in np.flatnonzero(clipped)[:5]:
        assert red.loc[int(rows["gaiaedr3_source_id"][i])].e == 0.0
    i = int(np.flatnonzero((acc.reddening_reason == "ok") & (ak > 0.2))[0])
    r = red.loc[int(rows["gaiaedr3_source_id"][i])]
    assert r.e == pytest.approx(ak[i] / AKS_PER_E, rel=1e-6)
    assert r.e_error == pytest.approx(np.hypot(AK_SIGMA, 0.1 * ak[i]) / AKS_PER_E, rel=1e-6)
    assert (red.e >= 0).all() and (red.e_error > 0).all()


def test_bad_input_messages_with_counts(rows, caplog):
    caplog.set_level(logging.WARNING, logger="xpcat.production.ingest.apogee")
    apogee_tables(rows)
    text = caplog.text
    n_nan = int((~np.isfinite(rows["fe_h"])).sum())
    assert f"{n_nan} of {len(rows['teff'])} rows have a NaN / infinite Teff, logg or [Fe/H]" in text
    assert "NaN AK_TARG" in text and "clipped to E = 0" in text


def test_missing_or_bad_errors_counted(rows):
    bad = {k: np.array(v, copy=True) for k, v in rows.items()}
    ok = np.flatnonzero(np.isfinite(bad["fe_h"]) & (bad["snr"] >= MIN_SNR))
    bad["teff_err"][ok[:3]] = np.nan
    bad["logg_err"][ok[3:5]] = 0.0
    out = apogee_tables(bad)
    assert out.summary["labels"]["reasons"]["error_missing"] == 5


def test_missing_column_named():
    with pytest.raises(InputError, match="ak_targ"):
        apogee_tables({c: np.zeros(2) for c in LIBRARY_COLUMNS if c != "ak_targ"})


def test_write_and_read_fits(tmp_path, rows, out):
    paths = write_apogee_tables(out, tmp_path)
    assert pq.read_table(paths["labels"]).num_rows == out.labels.num_rows
    assert json.loads(paths["summary"].read_text())["rows"] == len(rows["teff"])
    from astropy.table import Table

    t = Table({c: (rows[c].astype(str) if c == "apogee_id" else rows[c]) for c in LIBRARY_COLUMNS})
    t.write(tmp_path / "lib.fits", format="fits")
    back = read_library_rows(tmp_path / "lib.fits")
    assert np.array_equal(back["gaiaedr3_source_id"], rows["gaiaedr3_source_id"])
    with pytest.raises(InputError, match="lacks column"):
        read_library_rows(tmp_path / "lib.fits", columns=("teff", "no_such"))


def test_selection_options_change_cut_floor_and_width(rows, out):
    """min_snr and ak_sigma (the real-data benchmark's levers) act as documented and are recorded."""
    looser = apogee_tables(rows, min_snr=50.0, ak_sigma=0.1)
    assert looser.labels.num_rows > out.labels.num_rows
    assert (looser.summary["labels"]["reasons"]["snr_below_min"]
            < out.summary["labels"]["reasons"]["snr_below_min"])
    assert looser.summary["constants"]["min_snr"] == 50.0
    red = looser.reddening.to_pandas()
    assert red.e_error.min() == pytest.approx(0.1 / AKS_PER_E, rel=1e-5)
    assert looser.summary["constants"]["ak_sigma"] == 0.1
    # the implausibly-negative cut stays at the measured noise, not the chosen width
    assert (looser.summary["reddening"]["reasons"]["ak_targ_implausibly_negative"]
            == out.summary["reddening"]["reasons"]["ak_targ_implausibly_negative"])


@pytest.mark.parametrize("kw, match", [({"ak_sigma": 0.0}, "ak_sigma"),
                                       ({"min_snr": float("nan")}, "min_snr")])
def test_bad_selection_options_named(rows, kw, match):
    with pytest.raises(InputError, match=match):
        apogee_tables(rows, **kw)

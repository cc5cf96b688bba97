"""The report against real labels (issue 14 item 6): Figs. 7 and 16 in bins of the label, and the learned
extinction curve against the XP curve of XP-Extinction-Toolkit and CCM89 R_V = 3.1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpcat.catalog_schema import CATALOG, XP_WAVELENGTHS_NM
from xpcat.catalog_schema.raw import GAIA_SOURCE, LABELS, REDDENING
from xpcat.production.report import page as R
from xpcat.production.report.binned_residuals import (
    BIN_EDGES,
    MIN_BIN_STARS,
    binned_statistics,
)
from xpcat.production.report.evaluation import (
    ccm89_extinction_curve,
    extinction_comparison,
    xp_toolkit_extinction_curve,
)
from xpcat.production.report.xp_extinction_data import (
    TABLE_FILE,
    TOOLKIT_R55,
    derive_table,
    read_toolkit_curve,
    table_text,
)

PARAMS = ("teff", "feh", "logg", "extinction", "parallax")
NIR_NM = np.array([1235.0, 1662.0, 2159.0, 3352.6, 4602.8])
WL = np.concatenate([np.asarray(XP_WAVELENGTHS_NM), NIR_NM])
#: Residual = offset per bin + scale x PATTERN: median offset, robust sigma 1.4826 x scale in every bin.
PATTERN = np.array([-2.0, -1.0, 0.0, 1.0, 2.0] * 2)
SCALE = {"teff": 50.0, "feh": 0.05, "logg": 0.08, "extinction": 0.02, "parallax": 0.04}
STEP = {"teff": 10.0, "feh": 0.01, "logg": 0.02, "extinction": 0.003, "parallax": 0.01}
N_GOOD = 140  # 14 groups of 10 stars


def _conform(d: dict, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: d[f.name] for f in schema if f.name in d},
                                schema=pa.schema([f for f in schema if f.name in d]))


def _labels_run(run: Path) -> dict:
    """A run whose residuals against its labels are constructed bin by bin.

    Groups: A (140) good stars at the bin centres with PATTERN residuals; E (10) copies of A's first 10
    without a Gaia parallax; B (20) chi2 too high and quality_flags 8; C (20) Gaia parallax / error 2,
    quality_flags 7 (low confidence: basic, not strict), confidence 0.2; D (10) not converged. B, C and D carry residuals of +10 sigma.
    """
    ref, res, group = {p: [] for p in PARAMS}, {p: [] for p in PARAMS}, []
    for i in range(N_GOOD):
        for p in PARAMS:
            e = BIN_EDGES[p]
            b = (i // 10) % (e.size - 1)
            ref[p].append(0.5 * (e[b] + e[b + 1]))
            res[p].append(STEP[p] * b + SCALE[p] * PATTERN[i % 10])
        group.append("A")
    for g, n in (("E", 10), ("B", 20), ("C", 20), ("D", 10)):
        for i in range(n):
            for p in PARAMS:
                ref[p].append(ref[p][i])
                res[p].append(res[p][i] if g == "E" else 10 * SCALE[p] * 10)
            group.append(g)
    group = np.array(group)
    n = group.size
    ref = {p: np.array(v) for p, v in ref.items()}
    res = {p: np.array(v) for p, v in res.items()}
    sid = (np.arange(n, dtype=np.int64) + 1) << 30
    est = np.column_stack([(ref["teff"] + res["teff"]) / 1000.0] + [ref[p] + res[p] for p in PARAMS[1:]])
    plx_err = np.where(group == "C", ref["parallax"] / 2.0, 0.01)
    gaia_plx = np.where(group == "E", np.nan, ref["parallax"])
    qf = np.select([group == "B", group == "C"], [8, 7], 0).astype(np.uint8)
    conf = np.where(group == "C", 0.2, 0.9).astype(np.float32)
    cat = {
        "gdr3_source_id": sid, "ra": np.linspace(0, 359, n), "dec": np.linspace(-60, 60, n),
        "stellar_params_est": list(est.astype(np.float32)), "stellar_params_err": list(np.full((n, 5), 0.05, np.float32)),
        "chi2_opt": np.where(group == "B", 6 * 61.0, 61.0).astype(np.float32), "ln_prior": np.full(n, -3.0, np.float32),
        "teff_confidence": conf, "feh_confidence": conf, "logg_confidence": conf, "quality_flags": qf,
        "stellar_params_icov_triu": [np.ones(15, np.float32)] * n, "stellar_params_cov_triu": [np.ones(15, np.float32)] * n,
        "fit_status": np.where(group == "D", 1, 0).astype(np.uint8),
        "condition_flags": np.zeros(len(group), np.uint16),
    }
    (run / "fitted").mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(cat, schema=CATALOG), run / "fitted" / "L05-000001.parquet")
    lab = {"source_id": sid, "teff": ref["teff"], "teff_error": np.full(n, 50.0), "feh": ref["feh"],
           "feh_error": np.full(n, 0.05), "logg": ref["logg"], "logg_error": np.full(n, 0.07),
           "label_source": ["lamost"] * n}
    for name, d, schema in (("labels", lab, LABELS),
                            ("reddening", {"source_id": sid, "e": ref["extinction"], "e_error": np.full(n, 0.03)},
                             REDDENING),
                            ("gaia_source", {"source_id": sid, "ra": cat["ra"], "dec": cat["dec"], "parallax": gaia_plx,
                                             "parallax_error": plx_err}, GAIA_SOURCE)):
        (run / "raw" / name).mkdir(parents=True)
        pq.write_table(_conform(d, schema), run / "raw" / name / "part-0.parquet")
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)
    ref32 = {"teff": f32(ref["teff"]), "feh": f32(ref["feh"]), "logg": f32(ref["logg"]),
             "extinction": f32(ref["extinction"]), "parallax": gaia_plx}
    est32 = f32(est) * np.array([1000.0, 1, 1, 1, 1])
    return {"group": group, "ref": ref32, "est": est32}


@pytest.fixture(scope="module")
def labels_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("labels_run")
    f = _labels_run(run)
    page = R.write_report(run)
    return run, f, page, json.loads((run / "report" / "validation.json").read_text())


def test_fig7_and_fig16_figures_and_keys_appear(labels_run):
    run, _, page, v = labels_run
    text = page.read_text()
    assert v["reference"] == "labels"
    for key, name in (("residuals_fig7", "residuals_fig7.png"), ("residuals_fig16", "residuals_fig16.png")):
        assert v["figures"][key] == name
        png = run / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"src='{name}'" in text
    b = v["binned_residuals"]
    assert b["reference"] == "labels" and b["min_bin_stars"] == MIN_BIN_STARS
    assert set(b["fig7"]) == set(PARAMS)
    assert set(b["fig16"]) == {"converged", "basic", "basic_confident", "strict"}
    assert all(set(b["fig16"][s]) == {"teff", "feh", "logg"} for s in b["fig16"])
    assert "Fig. 7&#39;s validation selection" in text and '<table id="binned-fig7">' in text
    assert "density is normalised by its maximum in each pixel column" in text
    # no model artifact: the extinction comparison is there, empty
    assert v["extinction_curve_max_rel_dev_xp_toolkit"] is None and v["extinction_curve_max_rel_dev_ccm89_rv31"] is None
    assert '<table id="extinction-comparison">' in text


def test_fig7_numbers_are_the_constructed_offsets_and_scatter(labels_run):
    """Fig. 7's selection keeps groups A and E only: per bin, the median is the offset, the robust sigma 1.4826 x scale."""
    _, _, page, v = labels_run
    for p in PARAMS:
        s = v["binned_residuals"]["fig7"][p]
        nb = len(BIN_EDGES[p]) - 1
        assert s["bin_edges"] == pytest.approx(BIN_EDGES[p].tolist())
        n_exp = np.zeros(nb, int)
        for i in range(N_GOOD):
            n_exp[(i // 10) % nb] += 1
        if p != "parallax":  # group E (no Gaia parallax) is kept, with the residuals of A's first bin
            n_exp[0] += 10
        assert s["n"] == n_exp.tolist(), p
        tol = 2e-3 if p == "teff" else 2e-6
        for b in range(nb):
            if n_exp[b] == 0:  # E has 16 bins, 14 filled
                assert s["median"][b] is None and s["robust_sigma"][b] is None
                continue
            assert s["median"][b] == pytest.approx(STEP[p] * b, abs=tol), (p, b)
            assert s["robust_sigma"][b] == pytest.approx(1.4826 * SCALE[p], abs=tol), (p, b)
            assert s["p15"][b] < s["median"][b] < s["p84"][b]
        assert s["n_total"] == int(n_exp.sum())
    # the page's table quotes the bins
    text = page.read_text()
    assert "<td>teff</td><td>3000 - 3500</td><td>20</td>" in text


def test_fig16_selections(labels_run):
    _, f, _, v = labels_run
    g, ref, est = f["group"], f["ref"], f["est"]
    masks = {"converged": g != "D", "basic": np.isin(g, ["A", "E", "C"]), "basic_confident": np.isin(g, ["A", "E"]),
             "strict": np.isin(g, ["A", "E"])}
    for name, m in masks.items():
        for j, p in enumerate(("teff", "feh", "logg")):
            s = v["binned_residuals"]["fig16"][name][p]
            exp = binned_statistics(ref[p][m], est[m, j] - ref[p][m], BIN_EDGES[p])
            assert s["n"] == exp["n"] and s["n_total"] == int(m.sum())
            np.testing.assert_allclose(np.array(s["median"], float), exp["median"], atol=1e-9)
            np.testing.assert_allclose(np.array(s["robust_sigma"], float), exp["robust_sigma"], atol=1e-9)
            # independent of binned_statistics: plain numpy per bin
            e = BIN_EDGES[p]
            for b in range(len(e) - 1):
                inb = m & (ref[p] >= e[b]) & ((ref[p] < e[b + 1]) | (b == len(e) - 2))
                y = est[inb, j] - ref[p][inb]
                assert s["n"][b] == int(inb.sum())
                if y.size >= MIN_BIN_STARS:
                    assert s["median"][b] == pytest.approx(np.median(y), abs=1e-9)
                    assert s["robust_sigma"][b] == pytest.approx(1.4826 * np.median(np.abs(y - np.median(y))), abs=1e-9)
                else:
                    assert s["median"][b] is None  # NaN -> null in validation.json
    # the constructed selections: strict and confident equal Fig. 7's groups, basic keeps group C's outliers
    assert v["binned_residuals"]["fig16"]["strict"]["teff"]["median"][3] == pytest.approx(30.0, abs=2e-3)
    assert v["binned_residuals"]["fig16"]["basic"]["teff"]["n_total"] == 170


def test_binned_statistics_edges_and_sparse_bins():
    x = np.array([0.0, 0.5, 1.0, 1.0, 2.0, np.nan, 5.0])
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    s = binned_statistics(x, y, np.array([0.0, 1.0, 2.0]))
    assert s["n"] == [2, 3]  # the last bin is closed; 5.0 is outside, NaN dropped
    assert s["median"][0] != s["median"][0]  # fewer than MIN_BIN_STARS: NaN
    assert s["n_total"] == 6 and s["median_total"] == pytest.approx(np.median([1, 2, 3, 4, 5, 7]))


def test_extinction_comparison_of_a_curve_equal_to_ccm():
    ccm = ccm89_extinction_curve(WL)
    assert np.isfinite(ccm[:64]).all() and np.isnan(ccm[64:]).all()  # W1, W2 beyond CCM89's 0.3 um^-1
    learned = 0.4 * np.log(10) * 1.7 * ccm  # ln-flux units, any scale
    c = extinction_comparison(learned, WL)
    assert c["ccm89_rv3.1"]["max_rel_dev"] == pytest.approx(0.0, abs=1e-12)
    xp = xp_toolkit_extinction_curve(WL)
    rl, rx = ccm[:61] / ccm[0], xp[:61] / xp[0]
    assert c["xp_extinction_toolkit"]["max_rel_dev"] == pytest.approx(np.max(np.abs(rl - rx) / rx), rel=1e-12)
    assert 0.02 < c["xp_extinction_toolkit"]["max_rel_dev"] < 0.3  # the two laws differ by some per cent
    assert c["truth"]["max_rel_dev"] is None
    c2 = extinction_comparison(0.3 * xp, WL)
    assert c2["xp_extinction_toolkit"]["max_rel_dev"] == pytest.approx(0.0, abs=1e-12)
    none = extinction_comparison(None, None)
    assert all(none[k]["max_rel_dev"] is None for k in ("xp_extinction_toolkit", "ccm89_rv3.1", "truth"))


def test_packaged_xp_curve_table():
    rows = [line.split(",") for line in TABLE_FILE.read_text().splitlines()[1:]]
    assert len(rows) == 66
    wl = np.array([float(r[1]) for r in rows])
    np.testing.assert_allclose(wl, WL)
    k, a = np.array([float(r[2]) for r in rows]), np.array([float(r[3]) for r in rows])
    np.testing.assert_allclose(a, k / TOOLKIT_R55 + 1, rtol=1e-15)
    assert np.all(np.diff(a) < 0) and 1.3 < a[0] < 1.7 and 0 < a[-1] < 0.05
    np.testing.assert_allclose(xp_toolkit_extinction_curve(WL), a, rtol=1e-15)
    prov = (TABLE_FILE.parent / "PROVENANCE.md").read_text()
    assert "MIT" in prov and "XP-Extinction-Toolkit" in prov and "xp_extinction_data" in prov


def test_table_derivation_from_a_toolkit_csv(tmp_path):
    """The rebuild script on a constructed source CSV: XP rows copied, NIR rows interpolated linearly in wavelength."""
    wave = np.concatenate([np.arange(290.0, 1021.0, 2.0), 1e4 / np.linspace(1e4 / 1030.0, 0.1, 90)])
    k = 1.0 - wave / 1000.0
    src = tmp_path / "XP_extinction_curve.csv"
    src.write_text(",wave,ext\n" + "".join(f"{i},{float(w)!r},{float(v)!r}\n" for i, (w, v) in enumerate(zip(wave, k))))
    w, kk = read_toolkit_curve(src)
    assert w.max() < 5341.4
    rows = derive_table(w, kk)
    assert [r[0] for r in rows[-5:]] == ["J", "H", "Ks", "W1", "W2"] and len(rows) == 66
    for band, wl, kv, a in rows:
        assert kv == pytest.approx(1.0 - wl / 1000.0, abs=1e-12)
        assert a == pytest.approx(kv / TOOLKIT_R55 + 1.0, rel=1e-15)
    assert table_text(rows).startswith("band,wavelength_nm,k_lambda_55,a_over_a550\nXP,392.0000,")

"""The report says what happened (issue 15 items 5, 6): error calibration, catastrophic failures, classifier fallbacks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpcat.catalog_schema import CATALOG, with_metadata
from xpcat.catalog_schema.raw import GAIA_SOURCE, TRUTH
from xpcat.production.report import page as R
from xpcat.production.report.confidence_status import confidence_status
from xpcat.production.report.data import ReportData
from xpcat.production.report.reliability import (
    CALIBRATION_BINS,
    CATASTROPHIC_THRESHOLDS,
    catastrophic_failures,
    error_calibration,
    uncertainty_statement,
)

PARAMS = ("teff", "feh", "logg", "extinction", "parallax")
#: Reported errors in report units (Teff K).
ERR = np.array([80.0, 0.1, 0.12, 0.02, 0.05])
FEH_REASON = "only 12 stars labelled bad in [Fe/H] (at least 50 needed)"
RULE = "no confidence classifiers in the model artifact: teff/feh/logg_confidence are null"


def _data(ref: dict, est: np.ndarray, err: np.ndarray, kind: str, qf=None, status=None, conf=None) -> ReportData:
    n = est.shape[0]
    return ReportData(
        source_id=np.arange(n, dtype=np.int64) + 1, ra=np.zeros(n), dec=np.zeros(n), est=est, err=err,
        chi2=np.full(n, 61.0), ln_prior=np.zeros(n),
        confidence=np.full((n, 3), 0.9) if conf is None else conf,
        quality_flags=np.zeros(n, np.uint8) if qf is None else np.asarray(qf, np.uint8),
        fit_status=np.zeros(n, np.uint8) if status is None else np.asarray(status, np.uint8),
        ref=ref, ref_kind=kind,
    )


def _truth_data(rng: np.random.Generator, n: int, factor: np.ndarray) -> ReportData:
    """Residuals drawn with sigma = factor x the reported errors (per parameter), reference errors 0."""
    ref = {"teff": rng.uniform(4000, 7000, n), "feh": rng.normal(-0.3, 0.3, n), "logg": rng.uniform(1, 5, n),
           "extinction": rng.uniform(0.15, 1.5, n), "parallax": rng.uniform(0.2, 3, n)}
    for p in PARAMS:
        ref[f"{p}_error"] = np.zeros(n)
    truth = np.column_stack([ref[p] for p in PARAMS])
    est = truth + factor * ERR * rng.standard_normal((n, 5))
    return _data(ref, est, np.tile(ERR, (n, 1)), "truth")


@pytest.mark.parametrize("factor, sigma, words", [(2.0, 2.0, "not calibrated"), (1.0, 1.0, "are calibrated")])
def test_truth_pull_sigma_and_statement(factor, sigma, words):
    rng = np.random.default_rng(1)
    data = _truth_data(rng, 6000, np.full(5, factor))
    g = rng.uniform(9, 18, 6000)
    cal = error_calibration(data, g, {"requested": "paper", "used": "paper"})
    assert cal["parameters"] == ["teff", "feh", "logg", "e", "plx"] and cal["stars"] == 6000
    for p in cal["parameters"]:
        assert cal[p]["pull_sigma"] == pytest.approx(sigma, rel=0.06), p
        assert cal[p]["calibrated"] is (factor == 1.0)
    assert cal["calibrated"] is (factor == 1.0)
    assert words in cal["statement"]
    assert ("not calibrated" in cal["statement"]) is (factor != 1.0)
    # per bin of G, E and Teff: the same sigma wherever there are enough stars
    assert set(cal["bins"]) == {"G", "E", "Teff"}
    for name, rows in cal["bins"].items():
        assert sum(r["n"] for r in rows) == 6000 or name == "G"
        for r in rows:
            if r["n"] >= 500:
                assert r["pull_sigma"]["teff"] == pytest.approx(sigma, rel=0.15), (name, r)
                assert 0 < r["pull_sigma_se"]["teff"] < 0.1 * sigma, (name, r)
    # every bin is 1.0 or 2.0 within its noise: none significantly outside for calibrated errors, all for 2x
    verdict = cal["bins_verdict"]
    assert verdict["checked"] > 0
    if factor == 1.0:
        assert verdict["significantly_outside"] == [] and cal["bins_statement"].startswith(f"Of {verdict['checked']} bin")
    else:
        assert len(verdict["significantly_outside"]) >= 0.9 * verdict["checked"]
    # E bins by the truth's E (binning by the estimate would select stars by their error)
    e_counts = np.histogram(data.ref["extinction"], bins=CALIBRATION_BINS["E"])[0]
    assert [r["n"] for r in cal["bins"]["E"]] == e_counts.tolist()
    assert cal["bin_values"]["E"] == "reference E (mag)"
    g_rows = {(r["lo"], r["hi"]): r["n"] for r in cal["bins"]["G"]}
    assert g_rows[(13.0, 14.0)] == int(((g >= 13) & (g < 14)).sum())
    assert "as [inference] uncertainty = 'paper' asks" in cal["uncertainty_statement"]


def test_labels_errors_in_quadrature_and_only_three_parameters():
    rng = np.random.default_rng(2)
    n = 5000
    lab_err = np.array([60.0, 0.08, 0.15])
    ref = {"teff": rng.uniform(4000, 7000, n), "feh": rng.normal(-0.3, 0.3, n), "logg": rng.uniform(1, 5, n),
           "extinction": np.full(n, np.nan), "parallax": np.full(n, np.nan)}
    for j, p in enumerate(PARAMS[:3]):
        ref[f"{p}_error"] = np.full(n, lab_err[j])
    est = np.column_stack([ref[p] for p in PARAMS])
    est[:, :3] += np.sqrt(ERR[:3] ** 2 + lab_err**2) * rng.standard_normal((n, 3))
    est[:, 3:] = rng.uniform(0.1, 1, (n, 2))
    qf = np.where(np.arange(n) < 500, 8, 0)  # not in the basic cut: left out
    data = _data(ref, est, np.tile(ERR, (n, 1)), "labels", qf=qf)
    cal = error_calibration(data, np.full(n, np.nan), None)
    assert cal["parameters"] == ["teff", "feh", "logg"] and cal["stars"] == n - 500
    for p in cal["parameters"]:
        assert cal[p]["pull_sigma"] == pytest.approx(1.0, rel=0.06)
    assert cal["calibrated"] is True and "are calibrated" in cal["statement"]
    assert "G" not in cal["bins"]  # no G known: no G bins
    assert cal["bin_values"]["E"].startswith("estimated E")  # labels' runs have no true E
    # without the label errors the pulls would be too wide: sigma_teff = 100 / 80 = 1.25
    assert "does not say which errors" in cal["uncertainty_statement"]


def test_too_few_stars_cannot_be_judged():
    data = _truth_data(np.random.default_rng(3), 2, np.ones(5))
    cal = error_calibration(data, np.full(2, 12.0), None)
    assert cal["calibrated"] is None and "cannot be judged" in cal["statement"]


def test_uncertainty_statement_says_why_the_request_was_not_met():
    s = uncertainty_statement({"requested": "calibrated", "used": "paper", "reason": "the model error could not "
                                                                                    "be learned"})
    assert "asked for 'calibrated'" in s and "the model error could not be learned" in s and "Fisher" in s
    assert "calibrated errors" in uncertainty_statement({"requested": "calibrated", "used": "calibrated"})


def test_catastrophic_fractions_on_constructed_residuals():
    n = 20
    ref = {"teff": np.full(n, 5000.0), "feh": np.zeros(n), "logg": np.full(n, 4.0), "extinction": np.full(n, 0.1),
           "parallax": np.ones(n)}
    for p in PARAMS:
        ref[f"{p}_error"] = np.zeros(n)
    est = np.column_stack([ref[p] for p in PARAMS]).copy()
    est[0:2, 0] += [600.0, -501.0]          # Teff catastrophic
    est[2, 0] += 499.0                      # not
    est[3:6, 2] += [0.6, -0.7, 0.51]        # logg catastrophic
    est[6, 1] += -0.8                       # [Fe/H] catastrophic
    est[7, 1] += 0.4                        # not
    est[0, 1] += 0.9                        # star 0 fails in Teff and [Fe/H]: counted once in "any"
    ref["feh"][19] = np.nan                 # no [Fe/H] reference
    qf = np.zeros(n, np.uint8)
    qf[[1, 3, 4]] = 8                       # out of the basic cut
    qf[[5, 6, 10]] = 1                      # basic, not strict
    status = np.zeros(n, np.uint8)
    status[18] = 1                          # not converged: in no cut
    est[18, :3] += 5000.0
    conf = np.full((n, 3), 0.9)
    conf[0, 0] = 0.1                        # star 0 not confident in Teff
    data = _data(ref, est, np.tile(ERR, (n, 1)), "truth", qf=qf, status=status, conf=conf)
    out = catastrophic_failures(data)
    assert out["thresholds"]["teff"] == 500.0 and out["thresholds"]["units"]["teff"] == "K"
    assert out["thresholds"] == dict(CATASTROPHIC_THRESHOLDS, units={"teff": "K", "logg": "dex", "feh": "dex"})
    c = out["cuts"]
    conv = c["all converged"]
    assert conv["stars"] == 19
    assert conv["teff"] == {"n": 19, "failures": 2, "fraction": 2 / 19}
    assert conv["logg"]["failures"] == 3 and conv["feh"] == {"n": 18, "failures": 2, "fraction": 2 / 18}
    assert conv["any"] == {"n": 18, "failures": 6, "fraction": 6 / 18}
    basic = c["basic cut"]  # stars 1, 3, 4 out
    assert basic["stars"] == 16 and basic["teff"]["failures"] == 1 and basic["logg"]["failures"] == 1
    assert basic["any"]["failures"] == 3 and basic["any"]["n"] == 15
    strict = c["strict cut (quality_flags == 0)"]  # 5, 6 out too
    assert strict["stars"] == 13 and strict["logg"]["failures"] == 0 and strict["feh"]["failures"] == 1
    conf_teff = c["basic cut + confident in Teff"]  # star 0 out
    assert conf_teff["stars"] == 15 and conf_teff["teff"]["failures"] == 0
    assert c["basic cut + confident in logg"]["stars"] == 16
    assert out["statements"][0].startswith("all converged: 33.33 % of 18 stars are catastrophic failures")
    assert "500 K" in out["definition"] and "0.5 dex" in out["definition"]
    assert out["strict_by_G"] is None
    # with G: the strict cut's failures per G bin (stars 0-9 at G 16.5, 10-19 at G 12.5)
    g_mag = np.where(np.arange(n) < 10, 16.5, 12.5)
    by_g = catastrophic_failures(data, g_mag)
    rows = {(r["lo"], r["hi"]): r for r in by_g["strict_by_G"]}
    assert set(rows) == {(12.0, 13.0), (16.0, 17.0)}
    faint, bright = rows[(16.0, 17.0)], rows[(12.0, 13.0)]
    assert faint["stars"] == 5 and faint["teff"] == {"n": 5, "failures": 1, "fraction": 0.2}
    assert faint["any"] == {"n": 5, "failures": 1, "fraction": 0.2} and faint["feh"]["failures"] == 1
    assert bright["stars"] == 8 and bright["teff"]["failures"] == 0 and bright["any"]["n"] == 7
    assert by_g["statements"][-1] == ("strict cut by G (catastrophic in any of the three): G 12-13: 0.00 % of 7, "
                                      "G 16-17: 20.00 % of 5.")
    assert by_g["cuts"] == out["cuts"] and by_g["statements"][:-1] == out["statements"]
    assert catastrophic_failures(data, np.full(n, np.nan))["strict_by_G"] == []
    empty = catastrophic_failures(_data(ref, est, np.tile(ERR, (n, 1)), "truth", conf=np.zeros((n, 3))))
    assert empty["cuts"]["basic cut + confident in logg"]["any"] == {"n": 0, "failures": 0, "fraction": None}
    assert "basic cut + confident in logg: no star with a reference value (0 stars in the cut)." in empty["statements"]


def test_confidence_status_sources():
    meta = {"confidence_source": "mixed", "confidence_per_parameter": {"teff": "classifier", "feh": "placeholder",
                                                                       "logg": "classifier"},
            "confidence_fallback": {"feh": FEH_REASON}, "confidence_rule": RULE}
    s = confidence_status(meta, {"auc_teff": 0.9, "auc_feh": None, "auc_logg": 0.8}, "state/confidence.json")
    assert s["teff"]["status"] == "trained" and s["teff"]["auc"] == 0.9
    assert s["feh"] == {"status": "fell back", "reason": FEH_REASON, "from": "catalog metadata", "auc": None}
    assert s["any_fallback"] and not s["all_fallback"] and not s["all_trained"] and s["rule"] == RULE
    assert any(FEH_REASON in t for t in s["statements"]) and any(RULE in t for t in s["statements"])
    # only the train-confidence summary (a catalog written before the metadata existed)
    s = confidence_status({}, {"fallback": {"logg": "too few stars"}}, "state/confidence.json")
    assert s["logg"]["status"] == "fell back" and s["logg"]["reason"] == "too few stars"
    assert s["teff"]["status"] == "trained" and s["logg"]["from"] == "state/confidence.json"
    # the AUC's bootstrap error and how its stars were chosen are stated
    s = confidence_status({}, {"auc_teff": 0.812, "auc_teff_se": 0.031, "auc_method": "out-of-fold (5 folds)",
                               "auc_feh": 0.77, "auc_logg": 0.93})
    assert s["teff"]["auc_se"] == 0.031 and s["teff"]["auc_method"] == "out-of-fold (5 folds)"
    assert ("Teff: the confidence classifier was trained (AUC 0.812 +- 0.031 on out-of-fold (5 folds), "
            "stars the classifier did not see).") in s["statements"]
    assert "[Fe/H]: the confidence classifier was trained (AUC 0.770 on out-of-fold (5 folds)" in s["statements"][1]
    # which classifier the catalog's confidences come from: the stored (last trained) one of each parameter
    s = confidence_status({}, {"auc_teff": 0.86, "auc_feh": 0.77, "auc_logg": 0.93,
                               "settings": {"n_hidden": 3, "hidden_width": 64},
                               "classifiers": {"teff": {"architecture": ["network", "logistic"],
                                                        "inverse_l2": [None, 0.0316]},
                                               "feh": {"architecture": ["logistic", "network"],
                                                       "inverse_l2": [0.1, None]}}})
    assert s["teff"]["classifier"] == "a logistic regression, L2 penalty C = 0.0316 chosen by cross-validation"
    assert s["feh"]["classifier"] == "a 3 x 64 network" and s["logg"]["classifier"] is None
    assert s["statements"][0] == ("Teff: the confidence classifier was trained (a logistic regression, L2 penalty "
                                  "C = 0.0316 chosen by cross-validation; AUC 0.860 on held-out stars).")
    assert s["statements"][2] == "logg: the confidence classifier was trained (AUC 0.930 on held-out stars)."
    s = confidence_status({}, None)
    assert all(s[p]["status"] == "unknown" for p in ("teff", "feh", "logg")) and not s["any_fallback"]
    assert not s["all_trained"] and any("xpcat train-confidence" in t for t in s["statements"])
    assert confidence_status({}, {"auc_teff": 0.9})["all_trained"]


# ------------------------------------------------------------------ the page and validation.json of a run
N = 3000


def _truth_run(run: Path, rng: np.random.Generator) -> dict:
    """Truth run: Teff, [Fe/H], logg drawn with the reported errors, E and parallax with twice them;
    [Fe/H]'s classifier fell back; the calibrated errors were asked for and not used."""
    sid = (np.arange(N, dtype=np.int64) + 7) << 25
    truth = {"source_id": sid, "teff": rng.uniform(4000, 7000, N), "feh": rng.normal(-0.3, 0.3, N),
             "logg": rng.uniform(1, 5, N), "e": rng.uniform(0.05, 1.5, N), "parallax": rng.uniform(0.3, 3, N),
             "r_v": np.full(N, 3.1)}
    err = ERR / np.array([1000.0, 1, 1, 1, 1])  # catalog units (kK)
    tv = np.column_stack([truth["teff"] / 1000, truth["feh"], truth["logg"], truth["e"], truth["parallax"]])
    est = tv + np.array([1, 1, 1, 2, 2]) * err * rng.standard_normal((N, 5))
    est[:50, 0] += 1.0  # 50 stars 1000 K off
    conf = np.full(N, np.nan, np.float32)
    cat = {"gdr3_source_id": sid, "ra": rng.uniform(0, 360, N), "dec": rng.uniform(-60, 60, N),
           "stellar_params_est": list(est.astype(np.float32)), "stellar_params_err": list(np.tile(err, (N, 1))
                                                                                          .astype(np.float32)),
           "chi2_opt": np.full(N, 61.0, np.float32), "ln_prior": np.full(N, -3.0, np.float32),
           "teff_confidence": np.full(N, 0.9, np.float32), "feh_confidence": conf,
           "logg_confidence": np.full(N, 0.9, np.float32), "quality_flags": np.zeros(N, np.uint8),
           "stellar_params_icov_triu": [np.ones(15, np.float32)] * N,
           "stellar_params_cov_triu": [np.ones(15, np.float32)] * N, "fit_status": np.zeros(N, np.uint8),
           "condition_flags": np.zeros(N, np.uint16)}
    meta = {"uncertainty": {"requested": "calibrated", "used": "paper",
                            "reason": "the model error could not be learned (too few stars)"},
            "confidence_source": "mixed",
            "confidence_per_parameter": {"teff": "classifier", "feh": "placeholder", "logg": "classifier"},
            "confidence_fallback": {"feh": FEH_REASON}, "confidence_rule": RULE}
    (run / "fitted").mkdir(parents=True)
    pq.write_table(with_metadata(pa.Table.from_pydict(cat, schema=CATALOG), meta), run / "fitted" / "P-000001.parquet")
    (run / "truth").mkdir()
    pq.write_table(pa.Table.from_pydict({f.name: truth[f.name] for f in TRUTH if f.name in truth},
                                        schema=pa.schema([f for f in TRUTH if f.name in truth])),
                   run / "truth" / "truth.parquet")
    g = rng.uniform(8, 18, N)
    (run / "raw" / "gaia_source").mkdir(parents=True)
    gs = {"source_id": sid, "phot_g_mean_mag": g}
    pq.write_table(pa.Table.from_pydict(gs, schema=pa.schema([GAIA_SOURCE.field(k) for k in gs])),
                   run / "raw" / "gaia_source" / "part-0.parquet")
    (run / "state").mkdir()
    (run / "state" / "confidence.json").write_text(json.dumps({"auc_teff": 0.91, "auc_feh": None, "auc_logg": 0.87,
                                                               "fallback": {"feh": FEH_REASON}}))
    return {"g": g}


@pytest.fixture(scope="module")
def truth_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("truth_run")
    f = _truth_run(run, np.random.default_rng(4))
    page = R.write_report(run)
    return run, f, page.read_text(), json.loads((run / "report" / "validation.json").read_text())


def test_validation_json_carries_calibration_failures_and_fallback(truth_run):
    _, f, _, v = truth_run
    cal = v["error_calibration"]
    assert cal["reference"] == "truth" and cal["stars"] == N and cal["band"] == [0.85, 1.2]
    for p in ("feh", "logg"):
        assert cal[p]["calibrated"] is True and cal[p]["pull_sigma"] == pytest.approx(1.0, rel=0.08)
    for p in ("e", "plx"):
        assert cal[p]["calibrated"] is False and cal[p]["pull_sigma"] == pytest.approx(2.0, rel=0.08)
    assert cal["calibrated"] is False and "not calibrated for e, plx" in cal["statement"]
    assert sum(r["n"] for r in cal["bins"]["G"]) == int(((f["g"] >= 3) & (f["g"] < 21)).sum()) == N
    assert cal["uncertainty"]["used"] == "paper" and "too few stars" in cal["uncertainty_statement"]
    cat = v["catastrophic_failures"]
    assert cat["cuts"]["basic cut"]["teff"]["failures"] == 50
    assert cat["cuts"]["basic cut"]["teff"]["fraction"] == pytest.approx(50 / N)
    assert cat["cuts"]["basic cut + confident in [Fe/H]"]["stars"] == 0  # the placeholder: nobody is confident
    cs = v["confidence_status"]
    assert cs["feh"]["status"] == "fell back" and cs["feh"]["reason"] == FEH_REASON
    assert cs["teff"]["status"] == "trained" and cs["teff"]["auc"] == 0.91


def test_page_states_it_in_words(truth_run):
    _, _, text, v = truth_run
    assert v["error_calibration"]["statement"] in text
    assert "too few stars" in text and "asked for &#39;calibrated&#39;" in text
    assert "500 K" in text and "0.5 dex" in text
    for s in v["catastrophic_failures"]["statements"]:
        assert s in text
    assert text.count(FEH_REASON) == 2  # under Table 3 and in the confidence section
    conf = re.search(r'<ul id="confidence-status">(.*?)</ul>', text, re.DOTALL).group(1)
    assert FEH_REASON in conf and "Teff: the confidence classifier was trained (AUC 0.910" in conf
    assert "no confidence training set" in text  # no state/confidence_stars.npz: the empty figure is not shown
    assert "src='confidence.png'" not in text
    assert re.search(r"<td>plx</td><td>[0-9.]+</td><td>no</td>", text)
    assert re.search(r"<td>feh</td><td>[0-9.]+</td><td>yes</td>", text)


def test_every_classifier_fell_back_shows_text_not_a_figure(truth_run):
    _, _, _, v = truth_run
    v["confidence_status"] = confidence_status(
        {"confidence_per_parameter": {p: "placeholder" for p in ("teff", "feh", "logg")},
         "confidence_fallback": {p: f"reason {p}" for p in ("teff", "feh", "logg")}, "confidence_rule": RULE}, None)
    v["confidence_scatter"] = {"teff": {}}
    out = R.render_page(v, [("all stars", N, 1.0)], [], v["figures"])
    assert "every classifier fell back" in out and "src='confidence.png'" not in out
    for p in ("teff", "feh", "logg"):
        assert f"reason {p}" in out

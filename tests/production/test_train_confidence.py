"""Tests of xpcat.production.train_confidence (train-confidence)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpcat.catalog_schema import CONDITIONED, XP_WAVELENGTHS_NM
from xpcat.catalog_schema.flags import FitStatus
from xpcat.catalog_schema.raw import LABELS
from xpcat.config import RunConfig, config_from_dict
from xpcat.errors import StageError
from xpcat.model import confidence as C
from xpcat.production import train_confidence as S
from xpcat.production.run_dir import RunPaths

WL = np.concatenate([np.asarray(XP_WAVELENGTHS_NM), [1235.0, 1662.0, 2159.0, 3352.6, 4602.8]])
N = 900


def _write_run(run: Path, rng: np.random.Generator) -> dict:
    sid = (np.arange(N, dtype=np.int64) * 7919 + 11) << 35
    teff = rng.uniform(4000, 7000, N)
    feh = rng.normal(-0.2, 0.3, N)
    logg = rng.uniform(2.0, 4.8, N)
    plx = rng.uniform(0.5, 3.0, N)
    flux = rng.uniform(20, 200, (N, 66))
    cond = {
        "source_id": sid, "ra": rng.uniform(0, 360, N), "dec": rng.uniform(-60, 60, N),
        "parallax": plx + 0.05 * rng.standard_normal(N), "parallax_error": np.full(N, 0.05),
        "flux": list(flux.astype(np.float32)), "flux_error": list((0.02 * flux).astype(np.float32)),
        "flux_factor_triu": [np.zeros(2211, np.float32)] * N, "n_valid_flux": np.full(N, 66, np.int16),
        "condition_flags": np.zeros(N, np.uint16), "phot_g_mean_mag": rng.uniform(10, 17, N),
        "phot_g_mean_flux_over_error": rng.uniform(200, 3000, N), "phot_bp_mean_flux_over_error": rng.uniform(50, 900, N),
        "phot_rp_mean_flux_over_error": rng.uniform(50, 900, N), "phot_bp_rp_excess_factor": rng.uniform(1.15, 1.3, N),
        "ruwe": rng.uniform(0.8, 1.3, N), "fidelity_v2": rng.uniform(0.6, 1, N), "norm_dg": rng.uniform(-30, -6, N),
        "bp_chi_squared": rng.uniform(50, 400, N), "rp_chi_squared": rng.uniform(50, 400, N),
        "bp_degrees_of_freedom": np.full(N, 50, np.int16), "rp_degrees_of_freedom": np.full(N, 50, np.int16),
    }
    (run / "conditioned").mkdir(parents=True)
    t = pa.Table.from_pydict(cond, schema=CONDITIONED)
    pq.write_table(t.slice(0, N // 2), run / "conditioned" / "L01-000001.parquet")
    pq.write_table(t.slice(N // 2), run / "conditioned" / "L01-000002.parquet")
    labelled = rng.random(N) < 0.9
    lab = {"source_id": sid[labelled], "teff": teff[labelled], "teff_error": np.full(labelled.sum(), 50.0),
           "feh": feh[labelled], "feh_error": np.full(labelled.sum(), 0.05), "logg": logg[labelled],
           "logg_error": np.full(labelled.sum(), 0.08), "label_source": ["lamost"] * int(labelled.sum()),
           **{k: np.full(labelled.sum(), 100.0) for k in ("snr_g", "snr_r", "snr_i")}}
    (run / "raw" / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(lab, schema=LABELS), run / "raw" / "labels" / "part-0000.parquet")

    from xpcat.model.artifact import save_artifact
    from xpcat.model.forward import init_params, make_scaler
    from xpcat.model.prior import fit_gmm

    theta = np.column_stack([teff, feh, logg])
    params = jax.tree_util.tree_map(np.asarray, init_params(jax.random.PRNGKey(0)))
    save_artifact(run / "model", params=params, scaler=make_scaler(theta), activation="tanh",
                  gmm=fit_gmm(theta, n_components=2), wavelengths=WL, flux_unit=1e-18)
    return {"sid": sid, "theta": theta, "plx": plx, "flux": flux, "labelled": labelled}


def _fake_fit_factory(truth: dict, bad_rate: float = 0.4):
    """A stand-in for the Eq. 19 fit: truth + noise, with some stars badly off and a residual signature."""

    def fake_fit(inference, cond, chunk):
        rng = np.random.default_rng(1)
        idx = np.searchsorted(truth["sid"], cond["source_id"])
        n = idx.size
        th = truth["theta"][idx]
        bad = rng.random(n) < bad_rate
        est = th + np.column_stack([30.0, 0.04, 0.05]) * rng.standard_normal((n, 3))
        est[bad] += np.column_stack([800.0, 0.6, 0.8]) * rng.choice([-1, 1], (bad.sum(), 3))
        params5 = np.column_stack([est[:, 0] / 1000, est[:, 1], est[:, 2], np.full(n, 0.1), cond["parallax"]])
        cov5 = np.zeros((n, 5, 5))
        cov5[:, np.arange(5), np.arange(5)] = np.array([0.04, 0.05, 0.06, 0.01, 0.05]) ** 2
        f_obs = cond["flux"]
        f_pred = f_obs + cond["flux_error"] * rng.standard_normal(f_obs.shape)
        f_pred[bad, 10:30] += 2.5 * cond["flux_error"][bad, 10:30]
        chi2 = np.where(bad, rng.uniform(70, 110, n), rng.uniform(40, 80, n))
        status = np.full(n, FitStatus.CONVERGED, np.uint8)
        status[:5] = FitStatus.NOT_CONVERGED  # never used for training
        return {"params5": params5, "cov5": cov5, "chi2": chi2, "ln_prior": np.full(n, -2.0), "f_pred": f_pred,
                "fit_status": status, "n_iter": np.full(n, 5), "n_valid_flux": cond["n_valid_flux"]}

    return fake_fit


def _config(label_set: str = "validation") -> RunConfig:
    return RunConfig().replace(confidence={"preset": "quick", "epochs": 120, "label_set": label_set}, run={"seed": 3})


def test_stage_stores_classifiers_in_artifact(tmp_path, rng, monkeypatch):
    truth = _write_run(tmp_path, rng)
    monkeypatch.setattr(S, "fit_stars", _fake_fit_factory(truth))
    out = S.train_confidence_run(tmp_path, _config())
    for p in ("teff", "feh", "logg"):
        assert out[f"auc_{p}"] >= 0.85
    from xpcat.production.train import split_is_validation

    val = split_is_validation(truth["sid"], _config().training.validation_fraction) & truth["labelled"]
    assert out["label_set"] == "validation"
    assert out["stars_labelled"] == int(val.sum())
    assert out["stars_basic_cut"] == out["stars_labelled"] - 5

    from xpcat.model.artifact import load_artifact

    art = load_artifact(tmp_path / "model")
    assert art.content_hash == out["content_hash"]
    assert "confidence" in art.components
    meta = art.component_meta["confidence"]
    assert meta["auc_teff"] == pytest.approx(out["auc_teff"])
    assert meta["feature_names"] == list(C.FEATURE_NAMES)
    state = json.loads((tmp_path / "state" / "confidence.json").read_text())
    assert state["auc_logg"] == pytest.approx(out["auc_logg"])
    assert state["classifiers"]["teff"]["n_holdout_bad"] > 5
    stars = np.load(RunPaths.of(tmp_path).confidence_stars)
    n = out["stars_labelled"]
    assert stars["features"].shape == (n, C.N_FEATURES) and stars["confidence"].shape == (n, 3)
    assert stars["used"].sum() == out["stars_basic_cut"]
    final = C.predict_confidence(art.components["confidence"], stars["features"])
    np.testing.assert_allclose(stars["confidence_final"], final, rtol=1e-5)
    # the default 5 folds (beyond the paper): every used star is scored by the network that did not see it
    assert state["auc_method"] == "out-of-fold (5 folds)" and len(state["classifiers"]["teff"]["epochs_run"]) == 6
    assert all(0.0 < state[f"auc_{p}_se"] < 0.1 for p in ("teff", "feh", "logg")), state
    rep = state["classifiers"]["teff"]
    assert rep["n_holdout_good"] + rep["n_holdout_bad"] == np.sum(np.isfinite(stars["labels"][stars["used"], 0]))
    np.testing.assert_array_equal(stars["fold"], S.fold_index(stars["source_id"], 5, 3))
    assert stars["holdout"].all() and not np.allclose(stars["confidence"], stars["confidence_final"])
    np.testing.assert_allclose(stars["confidence"][~stars["used"]], final[~stars["used"]], rtol=1e-5)
    # the stored classifiers apply to new features
    X = np.random.default_rng(0).normal(size=(4, C.N_FEATURES))
    conf = C.predict_confidence(art.components["confidence"], X)
    assert conf.shape == (4, 3) and np.all((conf >= 0) & (conf <= 1))

    # the holdout is a stable function of source_id
    h1 = S.holdout_mask(truth["sid"], 0.2, 3)
    assert np.array_equal(h1, S.holdout_mask(truth["sid"][::-1], 0.2, 3)[::-1])
    assert 0.12 < h1.mean() < 0.28
    f1 = S.fold_index(truth["sid"], 5, 3)
    assert np.array_equal(f1, S.fold_index(truth["sid"][::-1], 5, 3)[::-1])
    assert set(np.unique(f1)) == {0, 1, 2, 3, 4} and np.all(np.bincount(f1) > 0.12 * N)
    assert not np.array_equal(f1, S.fold_index(truth["sid"], 5, 4))


def test_too_few_bad_stars_fall_back_per_parameter_and_are_recorded(tmp_path, rng, monkeypatch):
    truth = _write_run(tmp_path, rng)
    monkeypatch.setattr(S, "fit_stars", _fake_fit_factory(truth, bad_rate=0.0))
    out = S.train_confidence_run(tmp_path, _config())  # no TooFewLabelsError, no StageError
    for p in C.PARAMETERS:
        assert re.match(r"only \d+ bad training stars", out["fallback"][p])
    state = json.loads((tmp_path / "state" / "confidence.json").read_text())
    assert state["fallback"] == out["fallback"] and state["classifiers"]["teff"]["fallback"]
    from xpcat.model.artifact import load_artifact

    art = load_artifact(tmp_path / "model")
    assert art.component_meta["confidence"]["fallback"] == out["fallback"]
    assert C.trained_parameters(art.components["confidence"]) == ()


def test_model_error_learned_from_the_validation_split(tmp_path, rng, monkeypatch):
    """The validation stars' residuals (fake fit: 30 K scatter around the truth, Fisher 40 K, labels 50 K)."""
    truth = _write_run(tmp_path, rng)
    monkeypatch.setattr(S, "fit_stars", _fake_fit_factory(truth, bad_rate=0.0))
    out = S.train_confidence_run(tmp_path, _config("all"))
    me = out["model_error"]
    assert me["status"] == "calibrated"
    from xpcat.production.train import split_is_validation

    val = split_is_validation(truth["sid"], 0.2) & truth["labelled"]
    assert me["learned_from"]["stars_validation"] == int(val.sum())
    assert me["report"]["teff"]["learned"] and not me["report"]["e"]["learned"]  # no reddening prior here
    from xpcat.model.artifact import load_artifact

    art = load_artifact(tmp_path / "model")
    assert art.component_meta["model_error"]["status"] == "calibrated"
    assert set(art.components["model_error"]) == {"beta", "z_lo", "z_hi", "rho", "fisher_scale"}


def test_model_error_falls_back_on_a_tiny_validation_split(tmp_path, rng, monkeypatch):
    truth = _write_run(tmp_path, rng)
    monkeypatch.setattr(S, "fit_stars", _fake_fit_factory(truth, bad_rate=0.0))
    cfg = _config("all").replace(training={"validation_fraction": 0.02})
    out = S.train_confidence_run(tmp_path, cfg)
    assert out["model_error"]["status"] == "fallback"
    assert "validation split too small" in out["model_error"]["reason"]
    from xpcat.model.artifact import load_artifact

    art = load_artifact(tmp_path / "model")
    assert art.component_meta["model_error"]["status"] == "fallback" and art.components["model_error"] == {}


def test_missing_inputs_name_the_stage(tmp_path, rng):
    with pytest.raises(StageError, match="xpcat train"):
        S.train_confidence_run(tmp_path, _config())
    _write_run(tmp_path, rng)
    for p in (tmp_path / "raw" / "labels").glob("*.parquet"):
        p.unlink()
    with pytest.raises(StageError, match="no label table"):
        S.train_confidence_run(tmp_path, _config())


def test_default_label_set_is_every_labelled_star(tmp_path, rng, monkeypatch):
    """Sec. 4.4: the classifiers learn from all LAMOST sources (fitted without their labels), 20 % held out."""
    truth = _write_run(tmp_path, rng)
    fitted: list[int] = []
    fake = _fake_fit_factory(truth)

    def counting_fit(inference, cond, chunk):
        fitted.append(len(cond["source_id"]))
        return fake(inference, cond, chunk)

    monkeypatch.setattr(S, "fit_stars", counting_fit)
    assert RunConfig().confidence.label_set == "all"
    out = S.train_confidence_run(tmp_path, _config(label_set="all"))
    assert out["label_set"] == "all labelled"
    assert fitted == [int(truth["labelled"].sum())] and out["stars_labelled"] == fitted[0]
    stars = np.load(RunPaths.of(tmp_path).confidence_stars)
    assert np.array_equal(np.sort(stars["source_id"]), np.sort(truth["sid"][truth["labelled"]]))


def test_small_validation_split_falls_back_to_all_labelled(tmp_path, rng, monkeypatch):
    truth = _write_run(tmp_path, rng)
    monkeypatch.setattr(S, "fit_stars", _fake_fit_factory(truth, bad_rate=0.05))
    out = S.train_confidence_run(tmp_path, _config())
    assert out["label_set"].startswith("all labelled")
    assert out["stars_labelled"] == int(truth["labelled"].sum())
    assert all(0.0 <= out[f"auc_{p}"] <= 1.0 for p in ("teff", "feh", "logg"))


# ----------------------------------------------------------------------------- slow (issue 7 item 2)

@pytest.fixture(scope="module")
def universe_run(tmp_path_factory):
    """simulate -> condition -> train (quick) -> train-confidence, with 20 % binaries and 10 % outliers.

    Bad Teff estimates are rare once the model is trained (1.2 % of the basic-cut stars, a third of them
    binaries) and the classifier's output is a probability, so few stars fall below 0.5: the universe must be
    large for the held-out 20 % to hold enough of them. 200k stars give 32 held-out stars labelled not
    confident in Teff (4 with 100k, whose held-out AUC is 0.90 all the same)."""
    from xpcat.production.run import run_condition
    from xpcat.production.synthetic.universe import simulate_universe
    from xpcat.production.train import train_run

    run = tmp_path_factory.mktemp("confidence_universe") / "run"
    cfg = config_from_dict({
        "simulate": {"n_stars": 200_000, "seed": 3, "binary_fraction": 0.2, "outlier_fraction": 0.1, "label_fraction": 1.0,
                     "universe": "legacy"},  # the universe issue 7's figures were measured on
        # the paper's network is what issue 7 tests; the logistic candidate lost all 18 choices here (2026-12-04)
        # and costs ~12 s per classifier, so the fixture trains the network alone, with the paper's batch of 4096
        # (the quick preset's 1024 is for the demo's ~2,000 stars): setup 25.0 min alone, against 35.0 min at 1024
        # while the default suite shared the cores (2026-12-04; not timed alone)
        "confidence": {"preset": "quick", "logistic_candidate": False, "batch_size": 4096}, "training": {"preset": "quick"},
        "data": {"partition_level": 1},
    })
    simulate_universe(run, cfg.simulate)
    run_condition(run, cfg)
    train_run(run, cfg)
    out = S.train_confidence_run(run, cfg)
    state = json.loads(RunPaths.of(run).confidence_state.read_text())
    return {"out": out, "state": state, "stars": dict(np.load(RunPaths.of(run).confidence_stars))}


# the universe_run fixture (200k stars simulated, conditioned, trained and scored out of fold) took 36 min on two
# shared cores (2026-12-04; 25 min alone with the batch of 4096): it sets up inside the first test it serves
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("p", ["teff", "feh", "logg"])
def test_classifier_auc_on_a_synthetic_universe(universe_run, p):
    """Issue 7 item 2: each classifier's held-out ROC AUC >= 0.85 on a universe with binaries and outliers."""
    rep = universe_run["state"]["classifiers"][p]
    assert rep["n_holdout_bad"] >= 10 and rep["n_holdout_good"] >= 10, rep
    assert universe_run["out"][f"auc_{p}"] >= 0.85, (p, universe_run["out"][f"auc_{p}"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("p", ["teff", "feh", "logg"])
def test_confident_stars_scatter_half_as_much(universe_run, p):
    """Issue 7 item 2, as the paper's Fig. 10: the residual scatter (robust sigma, estimate - label) of held-out
    stars labelled confident is at least 2x smaller than that of the held-out stars labelled not confident."""
    from xpcat.production.report.statistics import robust_sigma

    d = universe_run["stars"]
    j = ("teff", "feh", "logg").index(p)
    sel = d["used"] & d["holdout"]  # with k folds every star, scored ("confidence") by the network that did not see it
    res = d["est"][:, j] - d["ref"][:, j]
    conf = d["confidence"][:, j] > 0.5
    assert (sel & ~conf).sum() >= 10, (p, int((sel & ~conf).sum()), "held-out stars labelled not confident")
    s_good, s_bad = robust_sigma(res[sel & conf]), robust_sigma(res[sel & ~conf])
    assert s_bad >= 2 * s_good, (p, s_good, s_bad)


def test_validation_label_set_follows_the_split_train_recorded():
    """label_set = "validation" uses the hash range `xpcat train` recorded (a benchmark's carved split)."""
    from types import SimpleNamespace

    from xpcat.production.train import in_hash_range, split_is_validation

    sid = np.arange(1, 20001, dtype=np.int64) * 7919
    config = _config()
    old = SimpleNamespace(data_summary={})  # an artifact made before the range was recorded
    assert np.array_equal(S._validation_mask(sid, config, old), split_is_validation(sid, 0.2))
    carved = SimpleNamespace(data_summary={"validation_hash_range": [0.2, 0.36]})
    got = S._validation_mask(sid, config, carved)
    assert np.array_equal(got, in_hash_range(sid, (0.2, 0.36)))
    assert not (got & split_is_validation(sid, 0.2)).any() and 0.14 < got.mean() < 0.18


def test_model_error_of_e_also_learns_from_stars_without_labels(tmp_path, rng, monkeypatch):
    """Unlabelled conditioned stars (never trained on) add their reddening prior to E's model error only."""
    from xpcat.production.train_model_error import unlabelled_sample

    truth = _write_run(tmp_path, rng)
    unlabelled = truth["sid"][~truth["labelled"]]
    sample = unlabelled_sample(tmp_path, truth["sid"][truth["labelled"]], 50)
    assert sample.size == 50 and np.all(np.isin(sample, unlabelled)) and np.all(np.diff(sample) > 0)
    assert np.array_equal(sample, unlabelled_sample(tmp_path, truth["sid"][truth["labelled"]], 50))
    assert unlabelled_sample(tmp_path, truth["sid"], 50).size == 0  # every star labelled
    (tmp_path / "raw" / "reddening").mkdir(parents=True)
    prior = {"source_id": truth["sid"], "e": 0.1 + 0.02 * rng.standard_normal(N), "e_error": np.full(N, 0.02)}
    pq.write_table(pa.table(prior), tmp_path / "raw" / "reddening" / "part-0000.parquet")
    monkeypatch.setattr(S, "fit_stars", _fake_fit_factory(truth, bad_rate=0.0))
    learned = {}
    for n_unlabelled in (0, 1000):
        cfg = _config("all").replace(confidence={"model_error_unlabelled": n_unlabelled})
        learned[n_unlabelled] = S.train_confidence_run(tmp_path, cfg)["model_error"]
    assert learned[0]["learned_from"]["stars_unlabelled_basic_cut"] == 0
    n_u = learned[1000]["learned_from"]["stars_unlabelled_basic_cut"]
    assert 0.9 * unlabelled.size <= n_u <= unlabelled.size  # the basic cut: a few not converged
    assert learned[1000]["report"]["e"]["n_used"] == learned[0]["report"]["e"]["n_used"] + n_u
    for p in ("teff", "feh", "logg", "plx"):  # labels and parallaxes: the validation split only
        assert learned[1000]["report"][p]["n_used"] == learned[0]["report"][p]["n_used"]

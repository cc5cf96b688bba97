"""Tests of xpcat.model.confidence: features, labels, training, prediction."""

from __future__ import annotations

import numpy as np
import pytest

from xpcat.model import confidence as C


def _fake_batch(rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    params5 = np.column_stack(
        [rng.uniform(4.0, 7.0, n), rng.normal(-0.2, 0.4, n), rng.uniform(1.0, 5.0, n), rng.uniform(0, 1, n),
         rng.uniform(0.2, 3.0, n)]
    )
    err5 = np.abs(rng.normal(0.05, 0.01, (n, 5)))
    cov5 = np.zeros((n, 5, 5))
    cov5[:, np.arange(5), np.arange(5)] = err5**2
    flux = rng.uniform(10, 100, (n, 66))
    flux_error = 0.02 * flux
    f_pred = flux + flux_error * rng.normal(size=(n, 66))
    fit = {"params5": params5, "cov5": cov5, "chi2": rng.chisquare(61, n), "ln_prior": rng.normal(-2, 1, n),
           "f_pred": f_pred}
    cond = {
        "flux": flux,
        "flux_error": flux_error,
        "parallax": params5[:, 4] + 0.05 * rng.normal(size=n),
        "parallax_error": np.full(n, 0.05),
        "phot_g_mean_mag": rng.uniform(10, 17, n),
        "phot_g_mean_flux_over_error": rng.uniform(100, 3000, n),
        "phot_bp_mean_flux_over_error": rng.uniform(50, 1000, n),
        "phot_rp_mean_flux_over_error": rng.uniform(50, 1000, n),
        "phot_bp_rp_excess_factor": rng.uniform(1.15, 1.3, n),
        "ruwe": rng.uniform(0.8, 1.4, n),
        "fidelity_v2": rng.uniform(0.5, 1, n),
        "norm_dg": rng.uniform(-30, -5, n),
        "bp_chi_squared": rng.uniform(50, 500, n),
        "rp_chi_squared": rng.uniform(50, 500, n),
        "n_valid_flux": np.full(n, 66),
    }
    return fit, cond


def test_features_follow_appendix_b(rng):
    fit, cond = _fake_batch(rng, 50)
    cond["flux"][3, 10] = np.nan  # a missing sample
    cond["flux_error"][3, 10] = np.inf
    cond["ruwe"][4] = 0.0  # ln floor
    X = C.confidence_features(fit, cond)
    assert X.shape == (50, C.N_FEATURES) == (50, 20 + 66)
    col = {n: X[:, i] for i, n in enumerate(C.FEATURE_NAMES)}
    np.testing.assert_allclose(col["ln_rchi2_opt"], np.log(fit["chi2"] / 61.0))
    np.testing.assert_allclose(
        col["ln_dplx2"], np.log(((cond["parallax"] - fit["params5"][:, 4]) / cond["parallax_error"]) ** 2)
    )
    np.testing.assert_allclose(col["teff_est"], fit["params5"][:, 0])
    np.testing.assert_allclose(col["feh_est_err"], np.sqrt(fit["cov5"][:, 1, 1]))
    np.testing.assert_allclose(col["asinh_g_snr"], np.arcsinh(cond["phot_g_mean_flux_over_error"]))
    assert col["ln_ruwe"][4] == pytest.approx(np.log(1e-7))
    np.testing.assert_allclose(
        X[:, 20 + 5], np.arcsinh((fit["f_pred"][:, 5] - cond["flux"][:, 5]) / cond["flux_error"][:, 5])
    )
    assert X[3, 20 + 10] == 0.0  # missing sample: no information, not NaN
    assert np.all(np.isfinite(X))


def test_features_reject_bad_shapes(rng):
    fit, cond = _fake_batch(rng, 5)
    with pytest.raises(ValueError, match="params5"):
        C.confidence_features({**fit, "params5": fit["params5"][:, :4]}, cond)
    bad = dict(cond)
    del bad["ruwe"]
    with pytest.raises(KeyError, match="ruwe"):
        C.confidence_features(fit, bad)


def test_chi2_eps_labels():
    est = np.array([5000.0, 5000.0, 5000.0, np.nan])
    ref = np.array([5050.0, 5400.0, 5250.0, 5000.0])
    chi2 = C.chi2_eps(est, np.full(4, 50.0), ref, np.zeros(4), C.EPSILON["teff"])
    np.testing.assert_allclose(chi2[:3], np.array([50.0, 400.0, 250.0]) ** 2 / (50**2 + 100**2))
    y = C.chi2_eps_labels(chi2)
    assert y[0] == 1.0 and y[1] == 0.0
    assert np.isnan(y[2]) and np.isnan(y[3])  # 5 (between 4 and 9) and NaN are unused


def _separable(rng, n):
    """Fake features where the fit residual features decide good vs bad, plus noise."""
    fit, cond = _fake_batch(rng, n)
    bad = rng.random(n) < 0.35
    # bad stars: large chi2, flux residual shape, offset parallax
    fit["chi2"] = np.where(bad, fit["chi2"] * rng.uniform(1.5, 6, n), fit["chi2"])
    fit["f_pred"][bad, 20:40] += 3 * cond["flux_error"][bad, 20:40] * rng.uniform(0.5, 2, (bad.sum(), 1))
    X = C.confidence_features(fit, cond)
    labels = {p: np.where(bad, 0.0, 1.0) for p in C.PARAMETERS}
    labels["feh"][rng.random(n) < 0.1] = np.nan  # some stars between the thresholds
    return X, labels, bad


@pytest.fixture(scope="module")
def trained():
    X, labels, bad = _separable(np.random.default_rng(7), 1500)
    settings = C.ClassifierSettings(epochs=150, patience=30, batch_size=512)
    clf, report = C.train_confidence_classifiers(X, labels, settings, seed=1)
    return X, labels, bad, clf, report


def test_classifiers_separate_good_from_bad(trained):
    X, labels, bad, clf, report = trained
    for p in C.PARAMETERS:
        assert report[p]["auc"] >= 0.85, report
        assert report[p]["n_holdout_good"] > 0 and report[p]["n_holdout_bad"] > 0
    conf = C.predict_confidence(clf, X)
    assert conf.shape == (1500, 3) and conf.dtype == np.float32
    assert np.all((conf >= 0) & (conf <= 1))
    assert np.mean(conf[~bad, 0]) > np.mean(conf[bad, 0]) + 0.3

    # the artifact round trip gives the same confidences
    arrays = C.classifiers_to_arrays(clf)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    np.testing.assert_allclose(C.predict_confidence(arrays, X), conf, rtol=1e-6)

    # NaN in the fit -> NaN confidence and all three low-confidence bits; NaN Gaia column -> imputed
    X2 = X[:4].copy()
    X2[0, :] = np.nan
    X2[1, C.FEATURE_NAMES.index("teff_est")] = np.nan
    X2[2, C.FEATURE_NAMES.index("fidelity_v2")] = np.nan
    c2 = C.predict_confidence(clf, X2)
    assert np.all(np.isnan(c2[:2])) and np.all(np.isfinite(c2[2:]))
    bits = C.confidence_quality_bits(c2)
    assert bits[0] == bits[1] == 7
    expected = sum(int(c2[3, j] < 0.5) << j for j in range(3))
    assert bits[3] == expected


def test_lr_drops_and_early_stop(rng):
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    settings = C.ClassifierSettings(epochs=400, patience=5, batch_size=64, hidden_width=8)
    layers, info = C.train_classifier(x, y, x[:50], y[:50], settings, seed=0)
    assert info["final_learning_rate"] < settings.learning_rate
    assert info["epochs_run"] < 400  # stopped after 4 x patience epochs without improvement
    assert len(layers) == 4 and layers[0]["W"].shape == (4, 8)


def test_too_few_labels_falls_back_alone(rng):
    """A classifier without bad stars falls back to the placeholder rule; the other two still train."""
    X, labels, bad = _separable(rng, 200)
    labels["logg"] = np.where(bad, np.nan, 1.0)  # no bad logg stars at all: one class only
    clf, report = C.train_confidence_classifiers(X, labels, C.ClassifierSettings(epochs=2), seed=0)
    assert report["logg"]["fallback"] and "only 0 bad" in report["logg"]["reason"]
    assert not report["teff"]["fallback"] and not report["feh"]["fallback"]
    assert C.trained_parameters(clf) == ("teff", "feh")
    arrays = C.classifiers_to_arrays(clf)
    assert C.trained_parameters(arrays) == ("teff", "feh")
    conf = C.predict_confidence(arrays, X[:5])
    assert np.all(np.isnan(conf[:, 2])) and np.all(np.isfinite(conf[:, :2]))
    # the fallen-back parameter's bit follows the placeholder rule: set exactly where the fit failed
    status = np.array([0, 1, 0, 2, 0], np.uint8)
    bits = C.confidence_quality_bits(conf, fit_status=status, trained=("teff", "feh"))
    assert list((bits >> 2) & 1) == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="fit_status"):
        C.confidence_quality_bits(conf, trained=("teff", "feh"))


def test_no_class_anywhere_and_nan_features_never_crash(rng):
    X, labels, _ = _separable(rng, 120)
    X[:10, 0] = np.nan  # a core feature missing: those stars take no part
    one_class = {p: np.ones(120) for p in C.PARAMETERS}
    clf, report = C.train_confidence_classifiers(X, one_class, C.ClassifierSettings(epochs=2), seed=0)
    assert all(report[p]["fallback"] for p in C.PARAMETERS) and C.trained_parameters(clf) == ()
    conf = C.predict_confidence(C.classifiers_to_arrays(clf), X)
    assert np.all(np.isnan(conf))


def test_from_arrays_missing_classifier_is_a_fallback(trained):
    X, _, _, clf, _ = trained
    arrays = {k: v for k, v in C.classifiers_to_arrays(clf).items() if not k.startswith("feh/")}
    conf = C.predict_confidence(arrays, X)
    assert np.all(np.isnan(conf[:, 1])) and np.all(np.isfinite(conf[:, 0]))
    with pytest.raises(ValueError, match="center"):
        C.predict_confidence({k: v for k, v in arrays.items() if k != "center"}, X)


def test_classifier_on_fewer_features_still_predicts(trained):
    """An artifact trained before features were appended: its columns are picked by name."""
    X, _, _, clf, _ = trained
    n_old = C.N_FEATURES - 2
    names = C.FEATURE_NAMES[:n_old]
    arrays = C.classifiers_to_arrays(clf)
    legacy = {"center": arrays["center"][:n_old], "scale": arrays["scale"][:n_old],
              "feature_names": np.asarray(names)}
    for k, v in arrays.items():
        if k.endswith("/W0"):
            legacy[k] = v[:n_old]
        elif "/" in k:
            legacy[k] = v
    x_new = X.copy()
    x_new[:, n_old:] = 123.0  # the later columns must not reach the older classifier
    conf = C.predict_confidence(legacy, x_new)
    np.testing.assert_allclose(conf, C.predict_confidence(legacy, X[:, :n_old]), rtol=1e-6)
    assert np.all(np.isfinite(conf))
    del legacy["feature_names"]  # an artifact without names used the leading features
    np.testing.assert_allclose(C.predict_confidence(legacy, x_new), conf, rtol=1e-6)
    unknown = {**legacy, "feature_names": np.asarray(names[:-1] + ("a_feature_from_elsewhere",))}
    with pytest.raises(ValueError, match="retrain the confidence component"):
        C.predict_confidence(unknown, X)
    with pytest.raises(ValueError, match="confidence features must be"):
        C.predict_confidence(legacy, X[:, :50])


def test_k_fold_scores_every_star_unseen_and_averages_the_fold_networks(rng):
    """folds >= 2: each usable star is scored by the fold network that did not see it; the classifier learns from all."""
    X, labels, bad = _separable(rng, 600)
    labels["logg"] = np.where(bad & (np.arange(600) >= 12 * 3), np.nan, labels["logg"])  # ~12 bad logg stars only
    settings = C.ClassifierSettings(epochs=40, patience=10, batch_size=256, folds=3)
    folds = np.arange(600) % 3
    clf, report = C.train_confidence_classifiers(X, labels, settings, seed=0, folds=folds)
    oof = report["oof_confidence"]
    x, _ = clf.standardise(X)
    for j, p in enumerate(("teff", "feh")):
        r = report[p]
        usable = np.isfinite(labels[p])
        assert r["auc_method"] == "out-of-fold (3 folds)" and not r["fallback"]
        assert r["n_holdout_good"] + r["n_holdout_bad"] == usable.sum()
        assert np.all(np.isfinite(oof[usable, j])) and np.all(np.isnan(oof[~usable, j]))
        assert r["auc"] >= 0.85 and 0.0 < r["auc_se"] < 0.05, r
        assert len(r["epochs_run"]) == 4  # three fold networks and the final one
        # the final network saw every star: it does not reproduce the out-of-fold scores
        assert not np.allclose(oof[usable, j], C.classifier_probability(clf.nets[p], x[usable]), atol=1e-3)
    assert report["logg"]["fallback"] and "smallest fold's training part" in report["logg"]["reason"]
    assert np.all(np.isnan(oof[:, 2]))
    conf = C.predict_confidence(clf, X)
    arrays = C.classifiers_to_arrays(clf)
    assert C.trained_parameters(arrays) == ("teff", "feh")
    np.testing.assert_allclose(C.predict_confidence(arrays, X), conf, rtol=1e-6)
    with pytest.raises(ValueError, match="folds must lie"):
        C.train_confidence_classifiers(X, labels, settings, folds=np.full(600, 3))
    with pytest.raises(ValueError, match="folds must be"):
        C.train_confidence_classifiers(X, labels, settings, folds=np.zeros(5, int))


def test_auc_with_error():
    y = np.array([0, 0, 1, 1, 1, 1] * 20, dtype=float)
    auc, se = C.auc_with_error(y, y)
    assert auc == 1.0 and se == 0.0
    auc, se = C.auc_with_error(y, np.random.default_rng(0).random(y.size))
    assert 0.3 < auc < 0.7 and 0.02 < se < 0.15
    assert all(np.isnan(v) for v in C.auc_with_error(np.ones(5), np.ones(5)))


def test_logistic_candidate_chooses_its_penalty_by_cross_validation(rng, monkeypatch):
    """scikit-learn's LogisticRegressionCV, stored as a network without hidden layer: pure-noise features get a
    strong penalty (small weights), an informative one a weak penalty; the stored layer reproduces its
    probabilities; a class of fewer than 2 stars gives no candidate."""
    from sklearn.metrics import log_loss

    from xpcat.model.confidence_logistic import INVERSE_L2_GRID, train_logistic

    x = rng.normal(size=(600, 8)).astype(np.float32)
    informative = (x[:, 0] + 0.3 * rng.normal(size=600) > 0).astype(np.float32)
    noise = (rng.random(600) > 0.5).astype(np.float32)
    layers, info = train_logistic(x[:500], informative[:500], x[500:], informative[500:], seed=0)
    assert len(layers) == 1 and layers[0]["W"].shape == (8, 1) and layers[0]["b"].shape == (1,)
    p = C.classifier_probability(layers, x[500:])
    assert info["best_val_loss"] == pytest.approx(log_loss(informative[500:], p, labels=[0.0, 1.0]), rel=1e-4)
    assert info["best_val_loss"] < 0.4 and info["cv_folds"] == 5
    _, noisy = train_logistic(x[:500], noise[:500], x[500:], noise[500:], seed=0)
    assert noisy["inverse_l2"] < info["inverse_l2"] and noisy["inverse_l2"] in INVERSE_L2_GRID
    assert noisy["best_val_loss"] == pytest.approx(np.log(2.0), abs=0.03)
    import xpcat.model.confidence_logistic as L

    monkeypatch.setattr(L, "CV_MAX_STARS", 200)  # C and the weights from a stratified 200 of the 500 stars
    sub_layers, sub = L.train_logistic(x[:500], informative[:500], x[500:], informative[500:], seed=0)
    assert sub["cv_stars"] == 200 and info["cv_stars"] == 500 and sub["inverse_l2"] in INVERSE_L2_GRID
    assert sub["best_val_loss"] < 0.4
    one_bad = np.ones(500, np.float32)
    one_bad[0] = 0.0
    assert train_logistic(x[:500], one_bad, x[500:], one_bad[:100], seed=0) is None


def _linear_problem(rng, n):
    """Few stars, one linear direction decides good vs bad (bad class 10 %), 80-odd noise features."""
    fit, cond = _fake_batch(rng, n)
    score = np.log(fit["chi2"]) + (cond["phot_g_mean_mag"] - 14.0) + rng.normal(0, 0.3, n)
    bad = score > np.quantile(score, 0.9)
    return C.confidence_features(fit, cond), {p: np.where(bad, 0.0, 1.0) for p in C.PARAMETERS}, bad


def _xor_problem(rng, n):
    """Many stars, bad where two features' standardised values share a sign: no linear classifier can tell."""
    fit, cond = _fake_batch(rng, n)
    X = C.confidence_features(fit, cond)
    a, b = (C.FEATURE_NAMES.index(k) for k in ("asinh_g_snr", "fidelity_v2"))
    bad = (X[:, a] - X[:, a].mean()) * (X[:, b] - X[:, b].mean()) > 0
    return X, {p: np.where(bad, 0.0, 1.0) for p in C.PARAMETERS}, bad


@pytest.mark.parametrize("problem, n, expected, min_auc", [(_linear_problem, 800, "logistic", 0.7),
                                                           (_xor_problem, 3000, "network", 0.55)])
def test_the_candidate_with_the_lower_validation_loss_is_kept(problem, n, expected, min_auc):
    """logistic_candidate: per classifier the logistic one or the network, whichever the validation loss prefers;
    the choice is reported per trained classifier and the kept layers are what the artifact stores."""
    X, labels, bad = problem(np.random.default_rng(11), n)
    settings = C.ClassifierSettings(epochs=300, patience=30, batch_size=256, folds=2, logistic_candidate=True)
    clf, report = C.train_confidence_classifiers(X, labels, settings, seed=0, folds=np.arange(n) % 2)
    for p in C.PARAMETERS:
        archs = report[p]["architecture"]
        assert len(archs) == 3 and archs[-1] == expected, (p, archs, report[p]["best_val_loss"])
        assert len(clf.nets[p]) == (1 if expected == "logistic" else 4)
        assert report[p]["auc"] > min_auc, report[p]
    conf = C.predict_confidence(C.classifiers_to_arrays(clf), X)
    assert np.mean(conf[~bad, 0]) > np.mean(conf[bad, 0])
    off = C.ClassifierSettings(epochs=120, patience=20, batch_size=256, folds=2)
    assert C.train_confidence_classifiers(X, labels, off, seed=0, folds=np.arange(n) % 2)[1]["teff"]["architecture"] \
        == ["network"] * 3

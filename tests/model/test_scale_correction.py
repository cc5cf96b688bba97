"""The ML scale's bias prior pooled over parameters (empirical Bayes) and its use in learning the model error."""

import numpy as np
import pytest

from xpcat.model import model_error as ME
from xpcat.model import pull_deconvolution as PD


def _residuals(seed: int, n: int = 465, ref_sd: float = 1.0):
    """Gaussian own errors of variance ``shape`` (true ln c = 0) plus reference noise of sd ``ref_sd``."""
    rs = np.random.default_rng(seed)
    shape = rs.uniform(0.5, 1.5, n)
    r = np.sqrt(shape) * rs.standard_normal(n) + ref_sd * rs.standard_normal(n)
    return r, np.full(n, ref_sd**2), shape


def test_pooled_width_is_zero_when_the_corrections_are_noise_and_large_when_they_are_not():
    assert PD.pooled_correction_sd([0.1, -0.2, 0.05], [0.2, 0.3, 0.1]) == 0.0
    assert PD.pooled_correction_sd([0.8, -0.9, 1.0], [0.1, 0.1, 0.1]) == pytest.approx(
        np.sqrt(np.mean(np.array([0.8, 0.9, 1.0]) ** 2) - 0.01))
    assert PD.pooled_correction_sd([0.5, np.nan], [np.inf, 0.1]) == PD.CORRECTION_SD  # nothing finite on both
    assert PD.pooled_correction_sd([], []) == PD.CORRECTION_SD


def test_scale_correction_is_the_robust_minus_the_ml_scale_and_its_error_grows_with_the_reference_noise():
    r, fixed, shape = _residuals(3)
    m = PD.scale_match(r, fixed, shape)
    d, se = m.correction, m.se
    ln_ml, _ = PD.shape_fit(r, fixed, shape)
    whole, _ = PD.deconvolved_scale(r, fixed, shape, correction_sd=1e6)  # the robust match taken whole
    assert whole == pytest.approx(ln_ml + d, abs=1e-3)
    assert PD.deconvolved_scale(r, fixed, shape, correction_sd=0.0)[0] == pytest.approx(ln_ml, abs=1e-9)
    se_noisy = PD.scale_match(*_residuals(3, ref_sd=2.0)).se
    se_exact = PD.scale_match(*_residuals(3, ref_sd=0.0)).se
    assert se_exact < se < se_noisy and np.isfinite(se_noisy)


def test_learning_records_the_pooled_width_and_uses_it():
    rs = np.random.default_rng(5)
    n = 1500
    est_true = np.column_stack([rs.uniform(4.0, 7.5, n), rs.normal(-0.2, 0.3, n), rs.uniform(1.5, 4.8, n),
                                rs.uniform(0.01, 1.0, n), rs.uniform(0.3, 3.0, n)])
    fisher_sd = np.array([0.02, 0.03, 0.03, 0.01, 0.02]) * rs.uniform(0.3, 3.0, (n, 1))
    cov = np.zeros((n, 5, 5))
    cov[:, range(5), range(5)] = fisher_sd**2
    s_model = np.array([0.1, 0.08, 0.1, 0.03, 0.0])
    est = est_true + rs.standard_normal((n, 5)) * np.sqrt(fisher_sd**2 + s_model**2)
    ref_sd = np.array([0.1, 0.1, 0.15, 0.03, 0.05])
    ref = est_true + rs.standard_normal((n, 5)) * ref_sd
    ref[:, 4] = np.nan
    me, report = ME.learn_model_error(est, cov, np.zeros(n), ref, np.broadcast_to(ref_sd**2, (n, 5)))
    sc = report["scale_correction"]
    assert set(sc) == {"prior_sd", "teff", "feh", "logg", "e"}
    expected = PD.pooled_correction_sd([sc[p]["correction"] for p in ("teff", "feh", "logg", "e")],
                                       [sc[p]["se"] for p in ("teff", "feh", "logg", "e")])
    assert sc["prior_sd"] == pytest.approx(expected)
    # Gaussian errors, exact shape: the corrections are noise, the pooled width small, the truth pulls near 1
    assert sc["prior_sd"] < 0.2
    a = ME.propagation_matrix(cov, np.zeros(n))
    k = ME.fisher_scale_per_star(me.fisher_scale, a)
    var = fisher_sd**2 * k**2 + me.variance(est, cov, np.zeros(n))
    pulls = (est - est_true) / np.sqrt(var)
    for j in range(4):
        assert abs(ME.robust_sigma(pulls[:, j]) - 1.0) < 0.16, j  # ln c has se 0.09-0.15 here: pulls +- 0.08

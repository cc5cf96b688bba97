"""The model error's scale against the truth when the references are noisy themselves."""

import numpy as np
import pytest

from xpcat.model.pull_deconvolution import (
    deconvolved_scale,
    shape_fit,
    unit_t_variance_nodes,
)


def _robust_sigma(x):
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def _heavy_tailed(n, seed=0, nu=2.0, ref_sd=1.0):
    """Own errors t_nu (unit robust sigma) times a per-star scale, plus Gaussian reference noise."""
    rs = np.random.default_rng(seed)
    scale = rs.uniform(0.5, 1.5, n)
    own = scale * rs.standard_t(nu, n) / (1.4826 * np.median(np.abs(rs.standard_t(nu, 200000))))
    ref = ref_sd * rs.standard_normal(n)
    return own, own + ref, np.full(n, ref_sd**2), scale**2


def test_unit_t_nodes_have_unit_robust_sigma():
    rs = np.random.default_rng(1)
    for nu in (1.5, 3.0, 1e4):
        v = unit_t_variance_nodes(nu, 256)
        x = np.sqrt(v[rs.integers(0, v.size, 400000)]) * rs.standard_normal(400000)
        assert _robust_sigma(x) == pytest.approx(1.0, abs=0.02), nu


def test_heavy_tailed_errors_under_noisy_labels_are_calibrated_against_the_truth():
    """Matching the pulls against the labels leaves those against the truth low; deconvolving does not."""
    own, r, fixed, shape = _heavy_tailed(3000)
    ln_c, nu = deconvolved_scale(r, fixed, shape)
    assert nu <= 3.0  # the t_2 shape is found
    truth_pulls = own / np.sqrt(np.exp(ln_c) * shape)
    assert _robust_sigma(truth_pulls) == pytest.approx(1.0, abs=0.07)
    # the naive factor (robust sigma of the pulls against the labels = 1) misses by more
    grid = np.linspace(-3, 3, 601)
    naive = grid[np.argmin([abs(_robust_sigma(r / np.sqrt(fixed + np.exp(g) * shape)) - 1) for g in grid])]
    assert _robust_sigma(own / np.sqrt(np.exp(naive) * shape)) < 0.9


def test_gaussian_errors_and_exact_references_reduce_to_the_plain_robust_sigma():
    rs = np.random.default_rng(2)
    shape = rs.uniform(0.2, 2.0, 2000)
    r = 1.7 * np.sqrt(shape) * rs.standard_normal(2000)
    ln_c, _ = deconvolved_scale(r, np.zeros(2000), shape)
    assert _robust_sigma(r / np.sqrt(np.exp(ln_c) * shape)) == pytest.approx(1.0, abs=1e-3)
    _, r, fixed, shape = _heavy_tailed(3000, seed=3, nu=1e4)
    ln_c, nu = deconvolved_scale(r, fixed, shape)
    assert nu >= 8.0 and np.exp(ln_c) == pytest.approx(1.0, abs=0.1)
    assert shape_fit(r, fixed, shape)[0] == pytest.approx(0.0, abs=0.15)


def test_references_noisier_than_the_residuals_give_the_smallest_factor():
    rs = np.random.default_rng(4)
    r = 0.5 * rs.standard_normal(500)
    ln_c, _ = deconvolved_scale(r, np.ones(500), np.ones(500))
    assert ln_c == -30.0


@pytest.mark.parametrize("bad", ["nan", "short", "negative", "shape"])
def test_bad_input_is_named(bad):
    r, fixed, scaled = np.ones(10), np.ones(10), np.ones(10)
    if bad == "nan":
        r[3] = np.nan
    if bad == "short":
        r, fixed, scaled = r[:2], fixed[:2], scaled[:2]
    if bad == "negative":
        fixed[0] = -1.0
    if bad == "shape":
        scaled = np.ones(9)
    with pytest.raises(ValueError, match="deconvolved_scale"):
        deconvolved_scale(r, fixed, scaled)


def test_a_gaussian_part_of_the_truth_error_that_the_residuals_lack_is_calibrated_too():
    """The parallax: own error heavy-tailed, Gaia's share Gaussian and absent from estimate - Gaia."""
    rs = np.random.default_rng(5)
    own, r, fixed, shape = _heavy_tailed(4000, seed=6, nu=2.0, ref_sd=0.5)
    extra = np.full(own.size, 1.0)
    truth_err = own + rs.standard_normal(own.size)
    ln_c, _ = deconvolved_scale(r, fixed, shape, extra)
    assert _robust_sigma(truth_err / np.sqrt(np.exp(ln_c) * shape + extra)) == pytest.approx(1.0, abs=0.05)
    ln_c0, _ = deconvolved_scale(r, fixed, shape)  # ignoring it: the own part alone is calibrated
    assert _robust_sigma(truth_err / np.sqrt(np.exp(ln_c0) * shape + extra)) > 1.05


def test_references_noisier_than_the_errors_keep_the_scale_near_the_likelihoods(monkeypatch):
    """Labels 1.8x noisier than the estimates (logg on the demo): the robust match alone swings ln c by up to
    2.5 between draws of the label noise; shrunk by its precision it stays within about 1 of the truth (0)."""
    import xpcat.model.pull_deconvolution as PD

    def scales():
        out = []
        for seed in range(10, 22):
            rs = np.random.default_rng(seed)
            shape = rs.uniform(0.5, 1.5, 465)
            r = np.sqrt(shape) * rs.standard_normal(465) + 1.8 * rs.standard_normal(465)
            out.append(deconvolved_scale(r, np.full(465, 1.8**2), shape)[0])
        return np.array(out)

    shrunk = scales()
    assert np.sqrt(np.mean(shrunk**2)) < 0.7 and np.max(np.abs(shrunk)) < 1.3, shrunk
    monkeypatch.setattr(PD, "CORRECTION_SD", 1e6)  # the robust match taken whole
    whole = scales()
    assert np.sqrt(np.mean(whole**2)) > 0.9 and np.max(np.abs(whole)) > 2.0, whole

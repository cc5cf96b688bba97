"""Tests of the refit of unconverged LM stars (xpcat/model/refit.py, issue 15 item 4).

Stars are drawn from the small teacher network (tests/model/_training_data.py)
with very low noise and a random multiplicative distortion of their spectra the
model cannot fit, so their losses are ~1e5: there the float32 Gauss-Newton LM
stalls on some stars that are at (or a few steps from) their optimum. The fits
start at the truth, so no start grid is built.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from _training_data import draw_labels, teacher_model  # tests/model is on sys.path (pytest prepend mode)
from inference_problem import make_problem

from xpcat.catalog_schema.flags import FitStatus
from xpcat.model.inference import Inference, InferenceSettings, prepare_stars
from xpcat.model.objective import StarData
from xpcat.model.optimise import PaperSchedule
from xpcat.model.prior import fit_gmm
from xpcat.model.refit import Refit, RefitStage, cast_model

N_STARS = 48
SHORT = PaperSchedule(adam_steps=400, adam_halve_every=100, sgd_steps=64, sgd_halve_every=32, max_rounds=1)


@pytest.fixture(scope="module")
def problem():
    model = teacher_model()
    rng = np.random.default_rng(0)
    gmm = fit_gmm(draw_labels(rng, 2000), n_components=4, seed=0)
    theta = draw_labels(rng, N_STARS)
    prob = make_problem(model, theta, rng, rel_range=(0.001, 0.002))
    flux = prob.flux * np.exp(0.3 * rng.standard_normal(66))
    prep = prepare_stars(flux, prob.factor, prob.plx_obs, prob.plx_err, prob.flux_error)
    x_true = np.column_stack([theta[:, 0] / 1000, theta[:, 1], theta[:, 2], np.log(prob.plx), np.log(prob.e)])
    inf = Inference(model, gmm, InferenceSettings(batch_size=64, refit=False, paper_schedule=SHORT))
    return inf, prep, x_true.astype(np.float32)


@pytest.fixture(scope="module")
def fits(problem):
    inf, prep, x0 = problem
    off = inf.optimise(prep, x0)
    on = inf.with_settings(refit=True).optimise(prep, x0)
    return off, on


def _stars(prep, idx):
    return StarData(*(a[idx] for a in (prep.flux, prep.factor, prep.plx_obs, prep.inv_plx_err)))


def test_float32_only_failures_end_converged(fits):
    """Stars the float32 LM leaves unconverged land on the same loss in float64 and end converged."""
    off, on = fits
    stalled = ~off["converged"]
    assert 1 <= stalled.sum() <= N_STARS // 4, stalled.sum()
    assert np.all(on["converged"])
    np.testing.assert_array_equal(on["refit"][stalled], RefitStage.POLISH)
    # the same minimum: no higher loss (float32 rounding of |L| ~ 1e5 aside), the same parameters to ~0.2
    tol = 1e-6 * np.abs(off["loss"][stalled])
    assert np.all(on["loss"][stalled] <= off["loss"][stalled] + tol), on["loss"][stalled] - off["loss"][stalled]
    assert np.all(off["loss"][stalled] - on["loss"][stalled] < 1e-4 * off["loss"][stalled])
    assert np.max(np.abs(on["x"][stalled] - off["x"][stalled])) < 0.3
    assert np.all(on["n_iter"][stalled] >= off["n_iter"][stalled])  # 0 more: only the float32 test failed


def test_converged_stars_are_left_alone(fits):
    off, on = fits
    done = off["converged"]
    np.testing.assert_array_equal(on["refit"][done], RefitStage.LM)
    np.testing.assert_array_equal(on["x"][done], off["x"][done])
    np.testing.assert_array_equal(on["loss"][done], off["loss"][done])
    np.testing.assert_array_equal(on["n_iter"][done], off["n_iter"][done])
    assert on["x"].dtype == off["x"].dtype == np.float32


def test_paper_optimiser_result_taken_when_lower(problem):
    """A star the polish cannot finish, whose paper-optimiser fit from its start is lower, takes that fit."""
    inf, prep, x_true = problem
    idx = np.arange(8)
    x_bad = x_true[idx] + np.array([1.2, 0.8, -1.5, 0.5, 0.5], np.float32)  # where the LM 'stopped'
    stars = _stars(prep, idx)
    refit = Refit(inf.objective, polish_iterations=1, schedule=SHORT)
    lm_loss = np.full(idx.size, np.inf)
    out = refit(x_true[idx], x_bad, lm_loss, np.zeros(idx.size, bool), np.full(idx.size, 50), stars,
                np.ones(idx.size, bool))
    polished = refit.polish(x_bad, stars)
    paper = refit.paper(x_true[idx], stars)
    assert np.all(~polished.converged)
    took = out["refit"] == RefitStage.PAPER
    assert took.sum() >= 6
    np.testing.assert_allclose(out["loss"][took], paper.loss[took])
    np.testing.assert_allclose(out["x"][took], paper.x[took], rtol=1e-6, atol=1e-6)
    assert np.all(out["loss"][took] < polished.loss[took])
    np.testing.assert_array_equal(out["converged"][took], paper.converged[took])
    # the others keep the lower (polished LM) estimate
    np.testing.assert_allclose(out["loss"][~took], polished.loss[~took])


def test_unconverged_star_keeps_its_last_estimate(problem):
    """When the paper optimiser does no better, the star keeps the polished LM estimate and fit_status 1."""
    inf, prep, x_true = problem
    idx = np.arange(8)
    stars = _stars(prep, idx)
    x_lm = x_true[idx] + np.array([0.6, 0.4, -0.8, 0.2, 0.2], np.float32)
    x_start = x_true[idx] + np.array([2.5, 1.5, -2.5, 1.5, 1.5], np.float32)  # far worse than x_lm
    stuck = PaperSchedule(adam_steps=1, adam_lr=1e-6, sgd_steps=1, sgd_lr=1e-9, max_rounds=1)
    refit = Refit(inf.objective, polish_iterations=1, schedule=stuck)
    out = refit(x_start, x_lm, np.full(idx.size, np.inf), np.zeros(idx.size, bool), np.zeros(idx.size, int), stars,
                np.ones(idx.size, bool))
    polished = refit.polish(x_lm, stars)
    assert np.all(out["refit"] == RefitStage.POLISH) and not out["converged"].any()
    np.testing.assert_allclose(out["x"], polished.x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["loss"], polished.loss)
    # through the whole fit: fit_status 1 with that estimate, not NaN
    summary = inf.summarise(prepare_stars(prep.flux[idx], prep.factor[idx], None, None), out["x"], out["loss"],
                            out["converged"], out["n_iter"])
    assert np.all(summary["fit_status"] == FitStatus.NOT_CONVERGED)
    np.testing.assert_allclose(summary["params5"][:, :3], out["x"][:, :3], rtol=1e-6)


def test_inactive_and_nonfinite_rows_are_not_refitted(problem):
    inf, prep, x_true = problem
    idx = np.arange(4)
    x = x_true[idx].copy()
    x[1] = np.nan
    refit = Refit(inf.objective, schedule=SHORT)
    out = refit(x_true[idx], x, np.full(4, 1e5), np.zeros(4, bool), np.zeros(4, int), _stars(prep, idx),
                np.array([False, True, True, True]))
    assert out["refit"][0] == RefitStage.LM and out["refit"][1] == RefitStage.LM
    np.testing.assert_array_equal(out["x"][0], x[0])
    assert np.all(np.isnan(out["x"][1])) and not out["converged"][:2].any()
    assert np.all(out["refit"][2:] != RefitStage.LM) and out["converged"][2:].all()
    with pytest.raises(ValueError, match="polish_iterations"):
        Refit(inf.objective, polish_iterations=0)
    with pytest.raises(ValueError, match="polish_iterations"):
        InferenceSettings(polish_iterations=0)


def test_cast_model():
    model = teacher_model()
    with jax.enable_x64(True):
        m64 = cast_model(model, np.float64)
        assert all(a.dtype == np.float64 for a in jax.tree_util.tree_leaves(m64))

        @dataclasses.dataclass(frozen=True)
        class Curve:
            scale: float
            R: jax.Array

        c64 = cast_model(Curve(2.0, jax.numpy.ones(3, np.float32)), np.float64)
        assert c64.R.dtype == np.float64 and c64.scale == 2.0
    assert cast_model(object(), np.float64) is None

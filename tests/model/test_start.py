"""The start screen (xpcat.model.start): the scan over E picks what scoring every pair densely picks.

The reference scores all P = K x J (Theta, E) pairs of the binned diagonal chi^2
at once in float64 (the definition in the module docstring), keeps each Theta
sample's best E, re-scores the ``n_refine`` best samples with the full chi^2 and
takes the best; the scan must reach the same criterion, on the full-band path
(folded tables) and on the general path (stars missing part of the 592-782 nm
band, or with a non-positive band sum).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from inference_problem import draw_labels, make_gmm, make_problem  # noqa: E402

from xpcat.model.inference import Inference, InferenceSettings, prepare_stars  # noqa: E402
from xpcat.model.start import _MIN_S, full_band_stars, screen_bins, screen_start  # noqa: E402

N_REFINE = 4


@pytest.fixture(scope="module")
def grid_and_stars():
    from xpcat.production.synthetic.truth_sed import build_truth_model

    truth = build_truth_model()
    gmm, rng = make_gmm(seed=5)
    inf = Inference(truth, gmm, InferenceSettings(n_prior_samples=48, e_log10_step=0.1, seed=2))
    prob = make_problem(truth, draw_labels(rng, 48), rng)
    prep = prepare_stars(prob.flux, prob.factor, prob.plx_obs, prob.plx_err, prob.flux_error)
    return inf.grid, prep


def _reference(grid, flux, weight, factor):
    """Dense float64 screen: (m,) criterion chi^2 - 2 ln p of the chosen start."""
    g = np.asarray(grid.g, dtype=np.float64)
    lnp = np.repeat(np.asarray(grid.ln_prior, dtype=np.float64), grid.n_e)
    bins = screen_bins()
    g_bins = g @ (bins / bins.sum(axis=0))
    out = []
    for f, w, r in zip(flux.astype(np.float64), weight.astype(np.float64), factor.astype(np.float64)):
        bm = grid.band & (w > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = f[bm].sum() / g[:, bm].sum(axis=1)
        s = np.where(np.isfinite(s) & (s > _MIN_S), s, _MIN_S)
        score = s**2 * (g_bins**2 @ (w @ bins)) - 2 * s * (g_bins @ ((w * f) @ bins)) - 2 * lnp
        score = score.reshape(grid.n_theta, grid.n_e)
        best_j = np.argmin(score, axis=1)
        top = np.argsort(score.min(axis=1))[:N_REFINE]
        pairs = top * grid.n_e + best_j[top]
        chi2 = [np.sum((r @ (s[p] * g[p] - f)) ** 2) for p in pairs]
        out.append(np.min(np.array(chi2) - 2 * lnp[pairs]))
    return np.array(out)


def _screen(grid, flux, weight, factor):
    _, crit = screen_start(grid, jnp.asarray(flux), jnp.asarray(weight), jnp.asarray(factor), n_refine=N_REFINE)
    return np.asarray(crit, dtype=np.float64)


def test_full_band_path_matches_dense_scores(grid_and_stars):
    grid, prep = grid_and_stars
    full = full_band_stars(grid, prep.flux, prep.weight)
    assert full.all()
    got = _screen(grid, prep.flux, prep.weight, prep.factor)
    ref = _reference(grid, prep.flux, prep.weight, prep.factor)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=0.05)


def test_general_path_matches_dense_scores(grid_and_stars):
    grid, prep = grid_and_stars
    flux, weight, factor = prep.flux.copy(), prep.weight.copy(), prep.factor.copy()
    band = np.flatnonzero(grid.band)
    # half the stars lose part of the parallax-guess band; one star gets a negative band sum
    for i in range(0, len(flux), 2):
        gone = band[i % 7 : i % 7 + 6]
        flux[i, gone], weight[i, gone] = 0.0, 0.0
        factor[i][:, gone] = 0.0
    flux[1, band] = -np.abs(flux[1, band])
    full = full_band_stars(grid, flux, weight)
    assert not full[0] and not full[1] and full[3]
    got = _screen(grid, flux, weight, factor)
    ref = _reference(grid, flux, weight, factor)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=0.05)

"""The start screen (xpcat.model.start): the scan over E picks what scoring every pair densely picks.

The reference scores all P = K x J (Theta, E) pairs of the binned diagonal chi^2
at once in float64 (the definition in the module docstring), keeps each Theta
sample's best E, re-scores the ``n_refine`` best samples with the full chi^2 and
takes the best; the scan must reach the same criterion, on the full-band path
(folded tables) and on the general path (stars missing part of the 592-782 nm
band, or with a non-positive band sum). The Teff ambiguity (the best
alternative start more than 500 K away) must match the same reference, and the
paper start's that of all pairs.
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
from xpcat.model.start import (  # noqa: E402
    _MIN_S,
    ALT_TEFF_K,
    full_band_stars,
    paper_start,
    screen_bins,
    screen_start,
)

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
    """Dense float64 screen: (m, 3) criterion chi^2 - 2 ln p of the chosen start, alt_gap, alt_dteff [K]."""
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
        teff = np.asarray(grid.theta[:, 0], dtype=np.float64)

        def crit(ps, r=r, s=s, f=f):
            return np.array([np.sum((r @ (s[p] * g[p] - f)) ** 2) for p in ps]) - 2 * lnp[ps]

        c = crit(pairs)
        t0 = teff[pairs[np.argmin(c)] // grid.n_e]
        far_k = np.abs(teff - t0) > ALT_TEFF_K
        k_far = np.argmin(np.where(far_k, score.min(axis=1), np.inf))
        alt = np.concatenate([pairs, [k_far * grid.n_e + best_j[k_far]]])
        c_alt = np.where(np.abs(teff[alt // grid.n_e] - t0) > ALT_TEFF_K, crit(alt), np.inf)
        i = np.argmin(c_alt)
        out.append([c.min(), c_alt[i] - c.min(), teff[alt[i] // grid.n_e] - t0])
    return np.array(out)


def _screen(grid, flux, weight, factor):
    r = screen_start(grid, jnp.asarray(flux), jnp.asarray(weight), jnp.asarray(factor), n_refine=N_REFINE)
    return np.column_stack([np.asarray(a, dtype=np.float64) for a in (r.crit, r.alt_gap, r.alt_dteff)])


def _check(got, ref):
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=2e-3, atol=0.05)
    # the alternative: the same gap (float32 vs float64), the same Teff offset where the gap is not a near tie
    np.testing.assert_allclose(got[:, 1], ref[:, 1], rtol=2e-3, atol=0.1)
    assert np.all(np.abs(ref[:, 2]) > ALT_TEFF_K)
    same = np.abs(got[:, 2] - ref[:, 2]) < 1e-3
    assert np.mean(same) > 0.9


def test_full_band_path_matches_dense_scores(grid_and_stars):
    grid, prep = grid_and_stars
    full = full_band_stars(grid, prep.flux, prep.weight)
    assert full.all()
    got = _screen(grid, prep.flux, prep.weight, prep.factor)
    ref = _reference(grid, prep.flux, prep.weight, prep.factor)
    _check(got, ref)


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
    _check(got, ref)


def test_paper_start_alternative_is_the_best_pair_far_in_teff(grid_and_stars):
    grid, prep = grid_and_stars
    r = paper_start(grid, *(jnp.asarray(a) for a in (prep.flux, prep.weight, prep.factor)))
    g = np.asarray(grid.g, dtype=np.float64)
    lnp = np.repeat(np.asarray(grid.ln_prior, dtype=np.float64), grid.n_e)
    teff = np.repeat(np.asarray(grid.theta[:, 0], dtype=np.float64), grid.n_e)
    for i, (f, w, rr) in enumerate(zip(*(a.astype(np.float64) for a in (prep.flux, prep.weight, prep.factor)))):
        bm = grid.band & (w > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = f[bm].sum() / g[:, bm].sum(axis=1)
        s = np.where(np.isfinite(s) & (s > _MIN_S), s, _MIN_S)
        crit = np.sum((rr @ (s[:, None] * g - f).T) ** 2, axis=0) - 2 * lnp
        p = np.argmin(crit)
        far = np.abs(teff - teff[p]) > ALT_TEFF_K
        gap = np.min(crit[far]) - crit[p]
        assert float(r.alt_gap[i]) >= 0.0
        np.testing.assert_allclose(float(r.alt_gap[i]), gap, rtol=2e-3, atol=0.1)
        assert abs(float(r.alt_dteff[i])) > ALT_TEFF_K

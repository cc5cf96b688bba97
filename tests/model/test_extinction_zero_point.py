"""Tests of xpcat.model.extinction_zero_point (the E zero point of a trained model)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpcat.model import forward as fw
from xpcat.model import training_phases as tp
from xpcat.model.extinction_zero_point import extinction_offset, shift_extinction_zero_point

from _training_data import WL, make_training_data  # tests/model is on sys.path (pytest prepend mode)


def test_offset_is_the_inverse_variance_weighted_mean():
    e = np.array([0.10, 0.20, 0.30, 0.40, np.nan])
    e_obs = np.array([0.08, 0.20, 0.26, np.nan, 0.1])
    e_err = np.array([0.01, 0.02, 0.02, 0.01, 0.01])
    w = 1 / e_err[:3] ** 2
    assert extinction_offset(e, e_obs, e_err) == pytest.approx(np.sum(w * (e[:3] - e_obs[:3])) / w.sum())
    assert extinction_offset(e[3:], e_obs[3:], e_err[3:]) == 0.0  # no usable prior


def test_shift_keeps_every_predicted_flux_and_lowers_e():
    params = fw.init_params(jax.random.PRNGKey(3), n_hidden=2, width=8, dtype=jnp.float64,
                            ln_r=np.log(3.1 * (WL / 550.0) ** -1.3))
    scaler = {"mean": jnp.array([5500.0, -0.2, 3.8]), "scale": jnp.array([700.0, 0.3, 1.0])}
    rng = np.random.default_rng(0)
    theta = jnp.asarray(np.column_stack([rng.uniform(4500, 6500, 20), rng.normal(-0.2, 0.3, 20), rng.uniform(2, 4.6, 20)]))
    ln_plx = jnp.asarray(rng.normal(0.0, 0.5, 20))
    ln_e = jnp.log(jnp.asarray(rng.uniform(0.02, 1.0, 20)))
    before = jax.vmap(lambda t, p, e: fw.predict_flux(params, scaler, t, p, e))(theta, ln_plx, ln_e)
    new, ln_e2 = shift_extinction_zero_point(params, ln_e, 0.007, 1e-3)
    after = jax.vmap(lambda t, p, e: fw.predict_flux(new, scaler, t, p, e))(theta, ln_plx, ln_e2)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=2e-6)  # float32 (x64 off)
    np.testing.assert_allclose(np.exp(ln_e2), np.exp(ln_e) - 0.007, rtol=1e-5)
    assert params["layers"][-1]["b"] is not new["layers"][-1]["b"]  # the input pytree is left alone
    # E never goes below the floor
    _, ln_e3 = shift_extinction_zero_point(params, jnp.log(jnp.array([0.002, 0.5])), 0.007, 1e-3)
    np.testing.assert_allclose(np.exp(ln_e3), [1e-3, 0.493], rtol=1e-5)


SHORT = dict(batch_size=256, epochs=6, lr_drop_epochs=(4,), model_optimizer="adam", star_optimizer="gn",
             model_lr=(3e-3, 1e-3, 3e-4), star_lr=(3e-3, 3e-3, 1e-3), phase3_steps=10, phase6_steps=10,
             phase6_halve_every=16, init_steps=300, width=16, n_hidden=2)


def test_training_anchors_e_to_the_priors(teacher):
    """With the anchor, the trained stars' E agree with their (unbiased) priors on average; without it the E scale
    is off (on long schedules Eq. 14's -2 ln E lifts it; this short one has not relaxed, and it is low)."""
    data, truth = make_training_data(teacher.predict_flux, 1500, seed=4)
    rng = np.random.default_rng(5)  # unbiased Gaussian priors (the helper's are clipped at 0, hence biased high)
    e_err = np.full(data.n, 0.02, np.float32)
    data = dataclasses.replace(data, e_obs=(truth["e"] + e_err * rng.standard_normal(data.n)).astype(np.float32),
                               e_err=e_err)
    on = tp.train_model(data, tp.Schedule(**SHORT, anchor_extinction=True), WL)
    off = tp.train_model(data, tp.Schedule(**SHORT, anchor_extinction=False), WL)
    shift = on.history["phases"]["5"]["extinction_zero_point_shift"]
    assert "extinction_zero_point_shift" not in off.history["phases"]["5"]
    d_on = extinction_offset(on.stars["e"], data.e_obs, data.e_err)
    d_off = extinction_offset(off.stars["e"], data.e_obs, data.e_err)
    assert abs(d_off) > 0.001 and abs(shift) > 0.001, (d_off, shift)
    assert abs(d_on) < 0.25 * abs(d_off), (d_on, d_off)
    # the anchored stars are closer to the true E on average
    assert abs(np.median(on.stars["e"] - truth["e"])) < abs(np.median(off.stars["e"] - truth["e"]))

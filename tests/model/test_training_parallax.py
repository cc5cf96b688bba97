"""Training without parallaxes: the dropped term, the reference start, and the pinned level of f_abs across phases."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from _training_data import (  # tests/model is on sys.path (pytest prepend mode)
    WL,
    make_training_data,
)

from xpcat.model import forward as fw
from xpcat.model import training_phases as tp
from xpcat.model.forward import ln_flux_abs_batch
from xpcat.model.training import TrainingData, star_loss
from xpcat.model.training_checkpoints import unflatten_params
from xpcat.model.training_data import initial_stars
from xpcat.model.training_parallax import (
    pin_flux_scale,
    reference_ln_plx,
    usable_parallax,
)

SMALL = dict(batch_size=256, epochs=8, lr_drop_epochs=(100,), model_optimizer="adam", star_optimizer="adam",
             model_lr=(3e-3, 1e-3, 3e-4), star_lr=(3e-3, 3e-3, 1e-3), phase3_steps=16, phase6_steps=16,
             phase6_halve_every=8, init_steps=300, width=16, n_hidden=2, clean_sigma=50.0)
BAND = np.flatnonzero((WL >= 592) & (WL <= 782))


def _without_parallax(data: TrainingData) -> TrainingData:
    nan = np.full(data.n, np.nan, np.float32)
    return dataclasses.replace(data, plx_obs=nan, plx_err=nan.copy())


def test_usable_parallax():
    assert usable_parallax(np.array([1.0, np.nan, 1.0, 1.0, -0.5]), np.array([0.1, 0.1, 0.0, np.nan, 0.1])).tolist() == [
        True, False, False, False, True]


def test_parallax_term_dropped_and_reference_start(teacher):
    data, _ = make_training_data(teacher.predict_flux, 40, seed=5)
    nop = _without_parallax(data)
    assert not nop.has_parallax.any()
    obs = nop.device_arrays()
    assert np.all(np.asarray(obs["inv_plx_err"]) == 0)
    stars = initial_stars(nop)
    assert np.all(np.isfinite(np.asarray(stars["ln_plx"])))
    # the start follows each star's brightness: 4x the flux (half the distance) is ln 2 more in ln plx
    ref = reference_ln_plx(nop.theta_obs, nop.e_obs, nop.flux, nop.flux_error)
    ref4 = reference_ln_plx(nop.theta_obs, nop.e_obs, 4.0 * nop.flux, 4.0 * nop.flux_error)
    np.testing.assert_allclose(ref4 - ref, np.log(2.0), atol=1e-9)
    # and a giant (logg 2.5) at the same flux and Teff lies 10x further than a dwarf (logg 4.5): R^2 ~ 1/g
    th = np.array([[5000.0, 0.0, 4.5], [5000.0, 0.0, 2.5]])
    f = np.repeat(nop.flux[:1], 2, axis=0)
    e = np.repeat(nop.flux_error[:1], 2, axis=0)
    lp = reference_ln_plx(th, np.zeros(2), f, e)
    assert lp[0] - lp[1] == pytest.approx(np.log(10.0), abs=1e-9)
    # the star loss no longer depends on the (absent) parallax prior: moving ln plx changes only chi^2 and -2 ln plx
    params, scaler = teacher.params, {k: jnp.asarray(v) for k, v in teacher.scaler.items()}
    one = {k: v[0] for k, v in stars.items()}
    o1 = {k: v[0] for k, v in obs.items()}
    o2 = dict(o1, plx_obs=jnp.asarray(123.0), plx_err=jnp.asarray(1e-3))
    assert float(star_loss(params, scaler, "tanh", one, o1)) == float(star_loss(params, scaler, "tanh", one, o2))


def test_pin_is_an_exact_gauge_move(teacher):
    params = {"layers": [dict(layer) for layer in teacher.params["layers"]], "ln_R": teacher.params["ln_R"]}
    scaler = {k: jnp.asarray(v) for k, v in teacher.scaler.items()}
    theta = jnp.asarray([[5000.0, -0.2, 4.0], [4500.0, 0.1, 2.5]])
    ln_plx = jnp.asarray([0.3, -0.9])
    ln_e = jnp.log(jnp.asarray([0.1, 0.4]))
    before = np.asarray(fw.predict_flux_batch(params, scaler, theta, ln_plx, ln_e, "tanh"))
    p2, l2, c = pin_flux_scale(params, ln_plx, reference_mean=-1.0)
    assert c == pytest.approx(0.7, abs=1e-6) and float(jnp.mean(l2)) == pytest.approx(-1.0, abs=1e-6)
    after = np.asarray(fw.predict_flux_batch(p2, scaler, theta, l2, ln_e, "tanh"))
    np.testing.assert_allclose(after, before, rtol=2e-5)


@pytest.fixture(scope="module")
def trained_without_parallax(teacher, tmp_path_factory):
    data, _ = make_training_data(teacher.predict_flux, 1200, seed=3)
    data = _without_parallax(data)
    ck = tmp_path_factory.mktemp("ck_noplx")
    res = tp.train_model(data, tp.Schedule(**SMALL), WL, checkpoint_dir=ck)
    return data, res, ck


def test_flux_scale_does_not_drift_between_phases(trained_without_parallax):
    """All parallaxes NaN: the mean ln plx stays pinned and the level of f_abs stays put through phases 1-6."""
    data, res, ck = trained_without_parallax
    fs = res.history["flux_scale"]
    assert fs["mode"] == "pinned_mean_ln_plx" and fs["n_without_parallax"] == data.n
    ref = fs["reference_mean_ln_plx"]
    theta = jnp.asarray(data.theta_obs)
    level, mean_ln_plx = {}, {}
    for k in tp.PHASES:
        a = dict(np.load(ck / f"phase{k}.npz"))
        params = unflatten_params(a, jnp.float32)
        scaler = {"mean": jnp.asarray(a["scaler/mean"]), "scale": jnp.asarray(a["scaler/scale"])}
        level[k] = float(np.median(np.asarray(ln_flux_abs_batch(params, scaler, theta, "tanh"))[:, BAND].mean(axis=1)))
        mean_ln_plx[k] = float(a["stars/ln_plx"].mean())
    # the pinned quantity is exactly the reference after the model phases
    assert mean_ln_plx[2] == pytest.approx(ref, abs=1e-4) and mean_ln_plx[5] == pytest.approx(ref, abs=1e-4)
    # the level of f_abs (median ln f_abs over 592-782 nm at the labels) stays within 3 % of phase 1's
    for k in tp.PHASES[1:]:
        assert abs(level[k] - level[1]) < 0.03, (k, level)
    # what the pin removes: Eq. 14's -2 ln plx pushes every star outwards (fainter model) epoch after epoch
    shifts = np.asarray(res.history["phases"]["2"]["flux_scale_shift"])
    assert shifts.size == SMALL["epochs"] and np.all(shifts[1:] > 0) and np.all(np.abs(shifts) < 0.01)
    assert np.all(np.isfinite(res.stars["plx"])) and np.all(res.stars["plx"] > 0)


def test_mixed_set_is_not_pinned(teacher):
    data, _ = make_training_data(teacher.predict_flux, 300, seed=8)
    plx, err = data.plx_obs.copy(), data.plx_err.copy()
    plx[::3] = np.nan
    mixed = dataclasses.replace(data, plx_obs=plx, plx_err=err)
    assert mixed.has_parallax.sum() == 200
    res = tp.train_model(mixed, tp.Schedule(**dict(SMALL, batch_size=64, epochs=2, init_steps=20, phase3_steps=2,
                                                   phase6_steps=2)), WL)
    assert res.history["flux_scale"]["mode"] == "gaia_parallaxes"
    assert res.history["phases"]["2"]["flux_scale_shift"] == []

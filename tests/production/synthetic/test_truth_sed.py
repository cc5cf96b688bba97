"""The truth SED model: physics sanity, features, the forward-model interface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpcat.production.synthetic import truth_sed as truth


@pytest.fixture(scope="module")
def proj() -> truth.ProjectionArrays:
    return truth.projection_arrays()


@pytest.fixture(scope="module")
def model(proj) -> truth.TruthModel:
    return truth.build_truth_model(3.1, projection=proj)


def _g_mag_1kpc(proj, theta):
    sed = np.exp(truth.batched_ln_sed(np.atleast_2d(theta), proj.fine_wavelengths)) * truth.FLUX_UNIT_W_M2_NM
    return -2.5 * np.log10(sed @ proj.to_phot) + proj.phot_zero_points


def test_planck_constants_are_the_exact_si_values():
    """h, c and k_B come from astropy.constants and are the exact SI 2019 values the model was built with."""
    assert (truth._H, truth._C, truth._KB) == (6.62607015e-34, 2.99792458e8, 1.380649e-23)
    assert all(type(v) is float for v in (truth._H, truth._C, truth._KB))


def test_flux_unit_matches_schema():
    from xpcat.catalog_schema import FLUX_UNIT_W_M2_NM, XP_WAVELENGTHS_NM

    assert truth.FLUX_UNIT_W_M2_NM == FLUX_UNIT_W_M2_NM
    np.testing.assert_array_equal(truth.XP_WAVELENGTHS_NM, XP_WAVELENGTHS_NM)


def test_sun_at_one_kpc_is_physical(proj):
    # the solar irradiance ~1.9 W m^-2 nm^-1 at 550 nm scaled to 1 kpc: ~4.4e-17, i.e. ~44 internal units
    f = np.exp(truth.ln_sed_abs(jnp.array([5772.0, 0.0, 4.44]), jnp.array([550.0])))[0]
    assert 25.0 < f < 70.0
    g, bp, rp = _g_mag_1kpc(proj, [5772.0, 0.0, 4.44])[0]
    assert 14.3 < g < 15.2  # M_G(Sun) = 4.67 at 10 pc
    assert 0.6 < bp - rp < 1.1
    # giants are much brighter, M dwarfs fainter and redder
    g_rc = _g_mag_1kpc(proj, [4700.0, 0.0, 2.45])[0]
    g_m = _g_mag_1kpc(proj, [3300.0, 0.0, 4.8])[0]
    assert g_rc[0] < g - 3.0 and g_m[0] > g + 4.0
    assert g_m[1] - g_m[2] > 2.0 and g_rc[1] - g_rc[2] > bp - rp


def _line_depth(theta, centre, off=25.0):
    wl = jnp.array([centre - off, centre, centre + off])
    ln = np.asarray(truth.ln_sed_abs(jnp.asarray(theta, dtype=jnp.float32), wl))
    return 0.5 * (ln[0] + ln[2]) - ln[1]


def test_features_depend_on_parameters():
    # Balmer lines peak near A stars
    h_a = [_line_depth([t, 0.0, 4.0], 486.13) for t in (5000.0, 9500.0, 25000.0)]
    assert h_a[1] > h_a[0] and h_a[1] > h_a[2]
    # Ca triplet: stronger for metal-rich stars and for giants
    assert _line_depth([4800.0, 0.3, 2.5], 854.2) > _line_depth([4800.0, -1.5, 2.5], 854.2)
    assert _line_depth([4800.0, 0.0, 2.0], 854.2) > _line_depth([4800.0, 0.0, 4.6], 854.2)
    # TiO only in cool stars (band head at 705 nm: flux drops redward of it)
    def tio(t):
        ln = np.asarray(truth.ln_sed_abs(jnp.array([t, 0.0, 4.8]), jnp.array([702.0, 712.0])))
        return ln[0] - ln[1]

    assert tio(3200.0) > 0.3 and abs(tio(5000.0)) < 0.15


def test_predict_flux_matches_ln_flux_abs_and_R(model):
    theta = jnp.array([5772.0, 0.0, 4.44])
    np.testing.assert_allclose(
        np.log(np.asarray(model.predict_flux(theta, 0.0, jnp.log(1e-9)))), np.asarray(model.ln_flux_abs(theta)), atol=1e-5
    )
    # parallax scaling
    f1 = np.asarray(model.predict_flux(theta, 0.0, jnp.log(0.1)))
    f2 = np.asarray(model.predict_flux(theta, jnp.log(2.0), jnp.log(0.1)))
    np.testing.assert_allclose(f2, 4.0 * f1, rtol=1e-5)
    # R is the small-E extinction per unit E in ln flux
    lnf = lambda e: jnp.log(model.predict_flux(theta, 0.0, jnp.log(e)))  # noqa: E731
    slope = (np.asarray(lnf(1e-3)) - np.asarray(lnf(3e-3))) / 2e-3
    np.testing.assert_allclose(slope, np.asarray(model.R), rtol=0.02)
    assert np.all(np.asarray(model.R)[:61] > np.asarray(model.R)[61])  # NIR less extinguished than optical
    assert model.R.shape == (66,) and model.ln_flux_abs(theta).shape == (66,)


def test_predict_flux_is_differentiable(model):
    def f(p):
        return model.predict_flux(p[:3], p[3], p[4])

    jac = np.asarray(jax.jacfwd(f)(jnp.array([5000.0, -0.5, 3.0, np.log(0.5), np.log(0.2)])))
    assert jac.shape == (66, 5) and np.all(np.isfinite(jac))
    assert np.all(np.abs(jac).max(axis=0) > 0)


def test_projection_reproduces_smooth_sed(proj):
    # a hot star's SED (few features) is reproduced through the XP bases to ~1 %
    theta = np.array([[15000.0, 0.0, 4.2], [6500.0, -1.0, 4.2]])
    sed = np.exp(truth.batched_ln_sed(theta, proj.fine_wavelengths))
    direct = np.exp(truth.batched_ln_sed(theta, truth.XP_WAVELENGTHS_NM))
    rel = (sed @ proj.to_xp) / direct - 1.0
    assert np.sqrt(np.mean(rel**2)) < 0.01
    assert np.abs(rel).max() < 0.05


def test_extinction_law_linear_in_inverse_rv():
    import astropy.units as u
    from dust_extinction.parameter_averages import G23

    wl = np.array([450.0, 650.0, 1235.0, 4602.8])
    a, b = truth.extinction_coefficients(wl)
    for rv in (2.6, 4.0):
        k = G23(Rv=rv)(wl * u.nm)
        np.testing.assert_allclose(truth.a_over_e(a, b, rv), rv * k, rtol=1e-10)

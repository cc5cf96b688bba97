"""The model error learned on validation stars: calibrated pulls, the propagation, the fallback."""

import numpy as np
import pytest

from xpcat.model import model_error as ME
from xpcat.model.uncertainty import psd_inverse


def _universe(n: int, seed: int = 0, scale: float = 1.0, fisher_scale: float = 1.0, ref_scale: float = 1.0):
    """n stars with a known model error that grows with Teff and E, Fisher errors spread over 10x.

    ``fisher_scale``: the true errors are that factor times the Fisher ones (plus the model error).
    """
    rs = np.random.default_rng(seed)
    teff = rs.uniform(4.0, 7.5, n)
    est_true = np.column_stack([teff, rs.normal(-0.2, 0.3, n), rs.uniform(1.5, 4.8, n), rs.uniform(0.01, 1.0, n),
                                rs.uniform(0.3, 3.0, n)])
    fisher_sd = np.array([0.02, 0.03, 0.03, 0.01, 0.02]) * rs.uniform(0.3, 3.0, (n, 1))
    cov = np.zeros((n, 5, 5))
    cov[:, range(5), range(5)] = fisher_sd**2
    s_model = scale * np.column_stack([0.05 + 0.04 * (teff - 4.0), 0.08 + 0 * teff, 0.10 + 0 * teff,
                                       0.02 + 0.03 * est_true[:, 3], 0 * teff])
    ref_sd = ref_scale * np.array([0.05, 0.05, 0.05, 0.02, 0.05]) * np.ones((n, 5))
    noise = rs.standard_normal((n, 5)) * np.sqrt((fisher_scale * fisher_sd) ** 2 + s_model**2)
    est = est_true + noise
    ref = est_true + rs.standard_normal((n, 5)) * ref_sd
    # the parallax: estimate = fit's own datum, ref = Gaia parallax; no model error, inv_plx_err = 0 here
    ref[:, 4] = np.nan
    return est, cov, np.zeros(n), ref, ref_sd**2, s_model


def test_learned_model_error_calibrates_pulls_overall_and_in_bins():
    est, cov, inv, ref, ref_var, s_true = _universe(3000)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    assert me is not None
    for p in ("teff", "feh", "logg", "e"):
        assert report[p]["learned"]
        assert report[p]["pull_sigma_fisher"] > 1.5
        # against the references: the ML scale is kept when the robust match's correction is noise (robust
        # sigma of 3000 pulls: se about 0.02)
        assert abs(report[p]["pull_sigma_calibrated"] - 1.0) < 0.05
    assert not report["plx"]["learned"] and "only 0 stars" in report["plx"]["reason"]
    # held-out stars, in bins of Teff and of the Fisher error (the G proxy)
    est2, cov2, inv2, ref2, ref_var2, _ = _universe(6000, seed=1)
    cal, icov = ME.calibrated_covariance(cov2, est2, inv2, me)
    assert np.allclose(np.einsum("nij,njk->nik", cal, icov)[:, :4, :4], np.eye(4), atol=1e-6)
    pulls = (est2 - ref2) / np.sqrt(np.einsum("nii->ni", cal) + ref_var2)
    sd0 = np.sqrt(cov2[:, 0, 0])
    for mask in (est2[:, 0] < 5.0, est2[:, 0] > 6.5, sd0 < np.median(sd0), sd0 > np.median(sd0), est2[:, 3] > 0.6):
        for j in range(4):
            assert 0.85 <= ME.robust_sigma(pulls[mask, j]) <= 1.2, (j, ME.robust_sigma(pulls[mask, j]))


def test_fisher_errors_too_small_by_a_factor_are_scaled_not_absorbed_in_s():
    """Errors that are 2x the Fisher ones (e.g. a noise systematic) grow with the Fisher error: K, not S."""
    est, cov, inv, ref, ref_var, _ = _universe(4000, scale=0.3, fisher_scale=2.0)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    assert me is not None
    for j, p in enumerate(("teff", "feh", "logg", "e")):
        assert report[p]["fisher_scale"] == pytest.approx(2.0, rel=0.2), p
    assert me.fisher_scale[4] == 1.0  # the parallax's Fisher error is Gaia's
    est2, cov2, inv2, ref2, ref_var2, _ = _universe(8000, seed=3, scale=0.3, fisher_scale=2.0)
    sd = np.sqrt(np.einsum("nii->ni", cov2))
    cal, _ = ME.calibrated_covariance(cov2, est2, inv2, me)
    unscaled = ME.ModelError(me.beta, me.z_lo, me.z_hi, me.rho)  # the same S without K
    cal1, _ = ME.calibrated_covariance(cov2, est2, inv2, unscaled)
    for j in range(4):
        faint = sd[:, j] > np.quantile(sd[:, j], 0.8)  # the largest Fisher errors: the faint stars
        for c, ok in ((cal, True), (cal1, False)):
            pull = ME.robust_sigma(((est2 - ref2) / np.sqrt(np.einsum("nii->ni", c) + ref_var2))[faint, j])
            assert (0.85 <= pull <= 1.2) == ok, (j, pull, ok)
    arrays = ME.model_error_to_arrays(me)
    assert np.array_equal(ME.model_error_from_arrays(arrays).fisher_scale, me.fisher_scale)
    old = {k: v for k, v in arrays.items() if k != "fisher_scale"}  # an artifact made before K existed
    assert np.array_equal(ME.model_error_from_arrays(old).fisher_scale, np.ones(5))
    with pytest.raises(ValueError, match="fisher_scale"):
        ME.model_error_from_arrays({**arrays, "fisher_scale": np.array([1.0, -1.0, 1.0, 1.0, 1.0])})


def test_no_model_error_needed_gives_none_added():
    est, cov, inv, ref, ref_var, _ = _universe(800, scale=0.0)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    for p in ("teff", "feh", "logg", "e"):
        assert report[p]["pull_sigma_fisher"] == pytest.approx(1.0, abs=0.1)
        assert report[p]["pull_sigma_calibrated"] == pytest.approx(1.0, abs=0.06)  # ML scale; se 0.03 at n = 800
        assert report[p]["fisher_scale"] == pytest.approx(1.0, abs=0.2)
        assert report[p]["model_error_median"] < 0.2 * np.median(np.sqrt(ref_var[:, 0]))


def test_fisher_errors_too_large_are_scaled_down_within_bounds():
    """Errors half the Fisher ones (Eq. 2's inflation overstating the noise): k ~ 0.5, never below."""
    est, cov, inv, ref, ref_var, _ = _universe(3000, scale=0.0, fisher_scale=0.6, ref_scale=0.1)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    for p in ("teff", "feh", "logg", "e"):
        assert report[p]["pull_sigma_fisher"] < 0.75
        assert report[p]["fisher_scale"] == pytest.approx(0.6, abs=0.08)
        assert report[p]["pull_sigma_calibrated"] == pytest.approx(1.0, abs=0.04)  # ML scale: se 0.015-0.02
    est, cov, inv, ref, ref_var, _ = _universe(3000, scale=0.0, fisher_scale=0.2, ref_scale=0.1)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    assert all(report[p]["fisher_scale"] == pytest.approx(0.5) for p in ("teff", "feh", "logg", "e"))  # the bound
    # 0.4 x Fisher plus a model error: k stays small (not back at 1), S takes the rest, pulls calibrated
    est, cov, inv, ref, ref_var, _ = _universe(3000, scale=0.3, fisher_scale=0.4, ref_scale=0.1)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    for p in ("teff", "feh", "logg", "e"):
        assert report[p]["fisher_scale"] < 0.7, p
        assert report[p]["pull_sigma_calibrated"] == pytest.approx(1.0, abs=0.05), p


def test_too_few_stars_falls_back_with_a_reason():
    est, cov, inv, ref, ref_var, _ = _universe(30)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    assert me is None
    assert "only 30 stars" in report["teff"]["reason"]


def test_nan_inputs_are_skipped_not_fatal():
    est, cov, inv, ref, ref_var, _ = _universe(600)
    est[:20] = np.nan
    cov[20:40] = np.nan
    ref[40:60, 0] = np.nan
    ref_var[60:80, 1] = np.nan
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    assert me is not None and report["n_fitted"] == 560
    assert report["teff"]["n_used"] == 540
    cal, icov = ME.calibrated_covariance(cov, est, inv, me)
    assert np.all(np.isnan(cal[:40])) and np.all(np.isfinite(cal[40:]))


def test_propagation_keeps_a_precise_gaia_parallax():
    """A = diag(1, 1, 1, 1, 1 - C_F,44 / s_plx^2): a precise Gaia parallax keeps the flux-only parallax error out."""
    cov_flux = np.diag([0.01, 0.01, 0.01, 0.001, 0.25])[None]
    s_plx = 0.01
    info = psd_inverse(cov_flux)
    info[:, 4, 4] += 1 / s_plx**2
    cov_f = psd_inverse(info)
    me = ME.ModelError(beta=np.zeros((5, ME.N_Z)), z_lo=np.full(ME.N_Z, -9.0), z_hi=np.full(ME.N_Z, 9.0),
                       rho=np.eye(5))
    est = np.array([[5.0, 0.0, 4.0, 0.1, 1.0]])
    cal, _ = ME.calibrated_covariance(cov_f, est, np.array([1 / s_plx]), me)
    s = ME.UNITS**2 * np.array([1, 1, 1, 1, 1.0])
    assert cal[0, 0, 0] == pytest.approx(cov_f[0, 0, 0] + s[0])
    assert cal[0, 4, 4] < cov_f[0, 4, 4] + 0.01 * s[4]  # w_phot ~ s_plx^2 / 0.25
    cal0, _ = ME.calibrated_covariance(cov_f, est, np.array([0.0]), me)  # no parallax used: C_F + S
    assert cal0[0, 4, 4] == pytest.approx(cov_f[0, 4, 4] + s[4])


def test_arrays_round_trip_and_bad_shapes():
    est, cov, inv, ref, ref_var, _ = _universe(400)
    me, _ = ME.learn_model_error(est, cov, inv, ref, ref_var)
    back = ME.model_error_from_arrays(ME.model_error_to_arrays(me))
    assert np.allclose(back.variance(est, cov, inv), me.variance(est, cov, inv))
    with pytest.raises(ValueError, match="beta"):
        ME.model_error_from_arrays({"z_lo": np.zeros(ME.N_Z)})


def test_pull_calibration_statement_and_bins():
    rs = np.random.default_rng(3)
    n = 4000
    err = np.full((n, 5), 0.1)
    resid = rs.standard_normal((n, 5)) * 0.1
    resid[:, 2] *= 1.7  # logg's errors 1.7x too small
    g = rs.uniform(8, 18, n)
    out = ME.pull_calibration(resid, err, None, bins={"G": (g, [8, 12, 18])})
    assert out["teff"]["calibrated"] and not out["logg"]["calibrated"] and not out["calibrated"]
    assert out["worst"][0] == "logg" and out["worst"][1] == pytest.approx(0.5, abs=0.08)
    assert "not calibrated for logg" in out["statement"]
    assert [b["n"] for b in out["bins"]["G"]] == [int((g < 12).sum()), int((g >= 12).sum())]
    three = ME.pull_calibration(resid[:, :3], err[:, :3], np.zeros((n, 3)))
    assert set(three) >= {"teff", "feh", "logg"} and "e" not in three
    resid[:, 2] /= 1.7
    assert ME.pull_calibration(resid, err)["statement"].startswith("The error bars are calibrated")


def _parallax_universe(n: int, seed: int, k: float):
    """Flux parallaxes with noise k x the Fisher one, combined with Gaia's by the Fisher weights."""
    rs = np.random.default_rng(seed)
    plx = rs.uniform(0.3, 3.0, n)
    s_gaia = rs.uniform(0.01, 0.1, n)
    c_flux = (plx * rs.uniform(0.01, 0.15, n)) ** 2  # the fit's flux-only parallax variance
    gaia = plx + s_gaia * rs.standard_normal(n)
    flux = plx + k * np.sqrt(c_flux) * rs.standard_normal(n)
    c_f = 1.0 / (1.0 / c_flux + 1.0 / s_gaia**2)
    est5 = np.column_stack([rs.uniform(4.0, 7.0, n), np.zeros(n), np.full(n, 4.0), np.full(n, 0.1),
                            c_f * (flux / c_flux + gaia / s_gaia**2)])
    cov = np.zeros((n, 5, 5))
    cov[:, range(4), range(4)] = 0.01
    cov[:, 4, 4] = c_f
    ref = np.full((n, 5), np.nan)
    ref[:, 4] = gaia
    ref_var = np.ones((n, 5))
    ref_var[:, 4] = s_gaia**2
    return est5, cov, 1.0 / s_gaia, ref, ref_var, plx


def test_parallax_fisher_scale_acts_on_the_fluxes_share_only():
    """Flux noise 2x the assumed: k_4 ~ 2 on A_44 C_F,44, so the pulls hold where the fluxes or Gaia dominate."""
    me, report = ME.learn_model_error(*_parallax_universe(4000, 0, 2.0)[:5])
    assert report["plx"]["learned"] and report["plx"]["fisher_scale"] == pytest.approx(2.0, rel=0.15)
    est, cov, inv, _, _, plx = _parallax_universe(8000, 1, 2.0)
    a44 = ME.propagation_matrix(cov, inv)[:, 4, 4]
    for model_error, ok in ((me, True), (ME.ModelError(me.beta, me.z_lo, me.z_hi, me.rho), False)):
        cal, _ = ME.calibrated_covariance(cov, est, inv, model_error)
        pulls = (est[:, 4] - plx) / np.sqrt(cal[:, 4, 4])
        flux_led = ME.robust_sigma(pulls[a44 > 0.7])
        assert (0.85 <= flux_led <= 1.2) == ok, (flux_led, ok)
        assert 0.85 <= ME.robust_sigma(pulls[a44 < 0.2]) <= 1.2  # Gaia-led: k never touches Gaia's share
    k = ME.fisher_scale_per_star(np.array([1, 1, 1, 1, 2.0]), ME.propagation_matrix(cov[:2], np.zeros(2)))
    assert np.allclose(k[:, 4], 2.0)  # no Gaia parallax used: the whole Fisher variance is the fluxes'


def _parallax_share_universe(n: int, seed: int):
    """Stars whose logg model error shrinks as Gaia's parallax pins the luminosity: s^2 = 0.1^2 w^-0.8,
    w = C_F,44 / s_plx^2 from 0.01 (faint: the fluxes set the parallax) to 1 (bright, precise parallax)."""
    est, cov, _, ref, ref_var, _ = _universe(n, seed=seed, scale=0.0)
    rs = np.random.default_rng(seed + 100)
    w = np.exp(rs.uniform(np.log(0.01), 0.0, n))
    s_plx = 0.05
    cov[:, 4, 4] = w * s_plx**2
    s_logg = 0.1 * w**-0.4
    est[:, 2] += rs.standard_normal(n) * s_logg
    return est, cov, np.full(n, 1.0 / s_plx), ref, ref_var, w


def test_model_error_follows_the_parallax_share():
    """The ln w term of z: the logg model error grows as the fluxes, not Gaia's parallax, set the luminosity."""
    est, cov, inv, ref, ref_var, _ = _parallax_share_universe(3000, seed=5)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    assert report["logg"]["beta"][5] == pytest.approx(-0.8, abs=0.2)
    est2, cov2, inv2, ref2, ref_var2, w = _parallax_share_universe(6000, seed=6)
    cal, _ = ME.calibrated_covariance(cov2, est2, inv2, me)
    pulls = (est2 - ref2)[:, 2] / np.sqrt(cal[:, 2, 2] + ref_var2[:, 2])
    for mask in (w < 0.03, w > 0.3):
        assert 0.85 <= ME.robust_sigma(pulls[mask]) <= 1.2, ME.robust_sigma(pulls[mask])


def _quality_universe(n: int, seed: int):
    """Stars whose Teff model error grows with the fit's chi^2 per flux q: s^2 = 0.1^2 q^1.5, q from 0.5 to 4."""
    est, cov, inv, ref, ref_var, _ = _universe(n, seed=seed, scale=0.0)
    rs = np.random.default_rng(seed + 200)
    q = np.exp(rs.uniform(np.log(0.5), np.log(4.0), n))
    est[:, 0] += rs.standard_normal(n) * 0.1 * q**0.75
    return est, cov, inv, ref, ref_var, q


def test_fit_quality_and_its_feature():
    q = ME.fit_quality(np.array([66.0, 10.0, 5.0]), np.array([66, 0, 5]))
    assert q[0] == 1.0 and np.isnan(q[1]) and q[2] == 1.0
    est, cov, inv, *_ = _universe(3)
    z = ME.model_error_z(est, cov, inv, np.array([2.0, np.nan, 1e9]))
    assert z.shape == (3, ME.N_Z)
    assert np.allclose(z[:, 6], [np.log(2.0), 0.0, np.log(ME.Q_RANGE[1])])
    assert np.all(ME.model_error_z(est, cov, inv)[:, 6] == 0.0)  # no chi^2 known: ln q = 0


def test_model_error_follows_the_fit_quality():
    """The ln q term of z: a star the model fits badly gets the larger model error it has."""
    est, cov, inv, ref, ref_var, q = _quality_universe(3000, seed=7)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var, quality=q)
    assert report["teff"]["beta"][6] == pytest.approx(1.5, abs=0.3)
    est2, cov2, inv2, ref2, ref_var2, q2 = _quality_universe(6000, seed=8)
    blind, _ = ME.learn_model_error(est, cov, inv, ref, ref_var)  # the form without q
    for model, ok in ((me, True), (blind, False)):
        cal, _ = ME.calibrated_covariance(cov2, est2, inv2, model, q2)
        pulls = (est2 - ref2)[:, 0] / np.sqrt(cal[:, 0, 0] + ref_var2[:, 0])
        inside = [0.85 <= ME.robust_sigma(pulls[m]) <= 1.2 for m in (q2 < 0.8, q2 > 2.5)]
        assert all(inside) if ok else not any(inside), (ok, [ME.robust_sigma(pulls[m]) for m in (q2 < 0.8, q2 > 2.5)])


def _giant_universe(n: int, seed: int):
    """Stars whose logg model error shrinks with a giant's parallax S/N: s^2 = 0.15^2 exp(0.7 h), h as in z."""
    est, cov, inv, ref, ref_var, _ = _universe(n, seed=seed, scale=0.0)
    rs = np.random.default_rng(seed + 300)
    snr = np.exp(rs.uniform(np.log(0.5), np.log(200.0), n))
    inv = snr / est[:, 4]
    h = np.minimum(est[:, 2] - 3.5, 0.0) * np.log(np.maximum(snr, 1.0))
    est[:, 2] += rs.standard_normal(n) * 0.15 * np.exp(0.35 * h)
    return est, cov, inv, ref, ref_var, snr


def test_giant_parallax_term_of_z():
    """h = min(g, 0) ln max(plx / s_plx, 1): 0 for dwarfs, for S/N <= 1 and without a parallax."""
    est, cov, _, *_ = _universe(4)
    est[:, 2] = [2.5, 2.5, 4.5, 1.5]
    inv = np.array([20.0, 0.0, 20.0, 0.5]) / est[:, 4]  # S/N 20, none, 20 (a dwarf), 0.5
    z = ME.model_error_z(est, cov, inv)
    assert z.shape == (4, ME.N_Z)
    assert np.allclose(z[:, 7], [-np.log(20.0), 0.0, 0.0, 0.0])


def test_model_error_follows_a_giants_parallax():
    """The h term: a giant whose parallax pins its luminosity gets the smaller logg model error it has."""
    est, cov, inv, ref, ref_var, _ = _giant_universe(3000, seed=9)
    me, report = ME.learn_model_error(est, cov, inv, ref, ref_var)
    assert report["logg"]["beta"][7] == pytest.approx(0.7, abs=0.2)
    est2, cov2, inv2, ref2, ref_var2, snr2 = _giant_universe(6000, seed=10)
    cal, _ = ME.calibrated_covariance(cov2, est2, inv2, me)
    pulls = (est2 - ref2)[:, 2] / np.sqrt(cal[:, 2, 2] + ref_var2[:, 2])
    giant = est2[:, 2] < 2.5
    for m in (giant & (snr2 < 2.0), giant & (snr2 > 30.0), ~giant):
        assert 0.85 <= ME.robust_sigma(pulls[m]) <= 1.2, ME.robust_sigma(pulls[m])


@pytest.mark.parametrize("nz", [ME.N_Z_LEGACY, ME.N_Z_NO_Q, ME.N_Z_NO_H])
def test_artifact_without_the_newer_terms_still_loads(nz: int):
    """Artifacts made before ln w (beta (5, 5)), ln q (5, 6) or h (5, 7) are read and use z's first terms."""
    est, cov, inv, ref, ref_var, _ = _universe(400)
    me, _ = ME.learn_model_error(est, cov, inv, ref, ref_var)
    arrays = ME.model_error_to_arrays(me)
    legacy = {**arrays, "beta": arrays["beta"][:, :nz], "z_lo": arrays["z_lo"][:nz], "z_hi": arrays["z_hi"][:nz]}
    old = ME.model_error_from_arrays(legacy)
    z = np.clip(ME.model_error_z(est, cov, inv)[:, :nz], legacy["z_lo"], legacy["z_hi"])
    expect = ME.UNITS[0] ** 2 * np.exp(z @ legacy["beta"][0])
    assert np.allclose(old.variance(est, cov, inv, np.full(len(est), 3.0))[:, 0], expect)
    with pytest.raises(ValueError, match="z_lo"):
        ME.model_error_from_arrays({**legacy, "z_lo": arrays["z_lo"]})


def test_slope_prior_does_not_tighten_with_more_stars():
    """The slopes' prior is fixed (not grown with n): 20,000 stars with a weak feature recover its slope.

    A penalty growing as n / 1000 (before 2026-12-04) held this slope near 2.1 whatever the number of stars.
    """
    rng = np.random.default_rng(5)
    n = 20_000
    x = 0.1 * rng.standard_normal(n)
    z = np.column_stack([np.ones(n), x])
    r = np.sqrt(np.exp(3.0 * x)) * rng.standard_normal(n)
    _, beta = ME._fit_beta(r, np.zeros(n), np.zeros(n), np.ones(n), z)
    assert abs(beta[1] - 3.0) < 0.3, beta
    few = slice(0, 60)  # a few-star fit stays near a constant model error
    _, beta_few = ME._fit_beta(r[few], np.zeros(60), np.zeros(60), np.ones(60), z[few])
    assert abs(beta_few[1]) < abs(beta[1]), (beta_few, beta)

"""The observation model of the synthetic universe: one chunk of stars -> the columns of every raw table.

:func:`chunk_observables` simulates, for the stars of one chunk and with the
chunk's own seeded generator, in this order (the order of the random draws
fixes the universe of a seed):

1. :func:`chunk_light`: the observed SED of each star, plus its unresolved
   companion, plus the light that leaks in from a neighbour for crowded
   sources (more in the NIR's larger beams); ``norm_dg``.
2. The noiseless XP coefficients (GaiaXPy's BP/RP bases, a fixed linear map)
   and G/BP/RP synthetic magnitudes (GaiaXPy's Gaia_DR3_Vega system).
3. :func:`xp_spectra`: per-star coefficient errors and correlations, noise
   drawn from exactly that covariance (:mod:`~xpcat.production.synthetic.noise`),
   the archive's fit statistics, and corrupted spectra for the outliers.
4. :func:`gaia_source_columns`: G/BP/RP fluxes in e-/s with errors, parallax,
   proper motion, RUWE, fidelity and the archive's other columns.
5. The partner surveys (:mod:`~xpcat.production.synthetic.observe_partners`):
   2MASS, unWISE, labels, reddening priors.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xpcat.config import SimulationConfig
from xpcat.production.synthetic import noise as noise_mod
from xpcat.production.synthetic import noise_dr3
from xpcat.production.synthetic import truth_sed as truth_model
from xpcat.production.synthetic.observe_partners import (
    label_columns,
    nir_magnitudes,
    reddening_columns,
    tmass_columns,
    unwise_columns,
)
from xpcat.production.synthetic.observed_sed import ln_sed, observed_sed, sed_grid
from xpcat.production.synthetic.truth_sed_empirical import sed_for_universe

__all__ = ["BANDS", "BASIS_ID", "N_COEF", "chunk_light", "chunk_observables", "gaia_source_columns", "xp_spectra"]

logger = logging.getLogger(__name__)

#: Coefficients per XP band.
N_COEF = 55
#: The archive's basis_function_id of each band.
BASIS_ID = {"bp": 56, "rp": 57}
BANDS = ("bp", "rp")
#: Index of the fine-grid sample that scales a crowding neighbour's light.
_CROWDING_REFERENCE_SAMPLE = 300


def chunk_observables(
    rng: np.random.Generator,
    stars: dict[str, np.ndarray],
    proj: truth_model.ProjectionArrays,
    ext: tuple[np.ndarray, np.ndarray],
    config: SimulationConfig,
) -> dict[str, Any]:
    """Simulate the observations of one chunk of stars.

    Parameters
    ----------
    rng : numpy.random.Generator
        The chunk's generator (the draws are made in a fixed order).
    stars : dict of (n, ...) arrays
        The chunk's rows of the universe (truth, flags, sight lines; see
        :mod:`xpcat.production.synthetic.universe`).
    proj : ProjectionArrays
        The truth model's projections onto the XP bases and the Gaia passbands.
    ext : (a, b), each (n_fine + 5,)
        G23 terms on :func:`~xpcat.production.synthetic.observed_sed.sed_grid`.
    config : SimulationConfig

    Returns
    -------
    dict
        ``xp`` (columns per band), ``missing`` ((n,) bool per band), and
        ``(columns, masks)`` pairs for ``gaia``, ``tmass``, ``unwise``,
        ``labels`` and ``reddening``.
    """
    n = stars["source_id"].size
    nf = proj.fine_wavelengths.size
    obs, norm_dg = chunk_light(rng, stars, proj, ext, sed_for_universe(config.universe))
    flux_w = obs[:, :nf] * truth_model.FLUX_UNIT_W_M2_NM
    realistic = config.universe != "legacy"
    xp_light = flux_w
    if realistic:  # the per-star calibration error the published covariance does not contain
        xp_light = flux_w * noise_dr3.systematic_factor(
            rng, proj.fine_wavelengths, n, config.systematic_rms, config.systematic_tail_fraction)
    coef = {"bp": xp_light @ proj.to_bp, "rp": xp_light @ proj.to_rp}
    phot = flux_w @ proj.to_phot  # G, BP, RP synthetic fluxes (W m^-2 nm^-1-weighted)
    mags = -2.5 * np.log10(np.maximum(phot, 1e-40)) + proj.phot_zero_points
    n_obs = {b: rng.integers(14, 80, n) for b in BANDS}
    xp = xp_spectra(rng, coef, n_obs, stars, realistic=realistic)
    missing = {"bp": stars["missing_bp"], "rp": stars["missing_rp"]}
    gaia = gaia_source_columns(rng, stars, mags, norm_dg, n_obs, missing)
    nir_obs, nir_err = nir_magnitudes(rng, obs[:, nf:] * truth_model.FLUX_UNIT_W_M2_NM)
    tmass = tmass_columns(rng, stars, nir_obs[:, :3], nir_err[:, :3], gaia[0]["random_index"])
    unwise = unwise_columns(stars, nir_obs[:, 3:], nir_err[:, 3:])
    labels = label_columns(rng, stars, mags, config)
    reddening = reddening_columns(rng, stars)
    return {
        "xp": xp,
        "missing": missing,
        "gaia": gaia,
        "tmass": tmass,
        "unwise": unwise,
        "labels": labels,
        "reddening": reddening,
    }


def chunk_light(
    rng: np.random.Generator,
    stars: dict[str, np.ndarray],
    proj: truth_model.ProjectionArrays,
    ext: tuple[np.ndarray, np.ndarray],
    sed: str = "physical",
) -> tuple[np.ndarray, np.ndarray]:
    """The light each source sends: star + unresolved companion + a crowding neighbour's share.

    ``sed`` names the truth SED (:func:`~xpcat.production.synthetic.observed_sed.ln_sed`).

    Returns
    -------
    obs : (n, n_fine + 5) float64, internal unit, on :func:`~xpcat.production.synthetic.observed_sed.sed_grid`
    norm_dg : (n,) mag, Gaia's normalised brightest-neighbour difference (NaN: no neighbour);
        crowded sources have -5 < norm_dg < 0.
    """
    n = stars["source_id"].size
    nf = proj.fine_wavelengths.size
    wl = sed_grid(proj)
    theta, plx, e, r_v = stars["theta"], stars["parallax_true"], stars["e"], stars["r_v"]
    obs = observed_sed(ln_sed(theta, wl, sed), plx, e, r_v, *ext)
    binary = stars["is_binary"]
    if binary.any():
        th2 = np.stack([stars["teff2"][binary], theta[binary, 1], stars["logg2"][binary]], axis=1)
        obs[binary] += observed_sed(ln_sed(th2, wl, sed), plx[binary], e[binary], r_v[binary], *ext)
    crowded = stars["crowded"]
    norm_dg = np.where(rng.uniform(size=n) < 0.4, np.nan, -5.0 - rng.exponential(8.0, n))
    norm_dg = np.where(crowded, rng.uniform(-5.0, 0.0, n), norm_dg)
    if crowded.any():
        donor = rng.permutation(n)
        frac = np.where(crowded, 0.3 * 10.0 ** (0.2 * np.nan_to_num(norm_dg, nan=-50.0)), 0.0)
        ref = _CROWDING_REFERENCE_SAMPLE
        ratio = obs[:, ref] / np.maximum(obs[donor, ref], 1e-300)
        contam = obs[donor] * (frac * ratio)[:, None]
        contam[:, nf:] *= 2.0
        obs = obs + contam
    return obs, norm_dg


def xp_spectra(
    rng: np.random.Generator,
    coef: dict[str, np.ndarray],
    n_obs: dict[str, np.ndarray],
    stars: dict[str, np.ndarray],
    *,
    realistic: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """The archive's XP columns per band: noisy coefficients, errors, correlations, fit statistics.

    Parameters
    ----------
    coef : {"bp", "rp"} -> (n, 55) noiseless coefficients, W m^-2 nm^-1 basis units
    n_obs : {"bp", "rp"} -> (n,) int, transits per band
    stars : the chunk (``crowded``, ``is_outlier``, ``outlier_kind`` are used)
    realistic : bool
        DR3-like errors and correlations (:mod:`~xpcat.production.synthetic.noise_dr3`) instead of the legacy ones.

    Returns
    -------
    {"bp", "rp"} -> column name -> (n,) or (n, k) array, the names of
    :data:`xpcat.catalog_schema.raw.XP_BAND_COLUMNS`.
    """
    crowded, outlier = stars["crowded"], stars["is_outlier"]
    xp: dict[str, dict[str, np.ndarray]] = {}
    noisy: dict[str, np.ndarray] = {}
    for b in BANDS:
        xp[b], noisy[b] = _band_columns(rng, coef[b], n_obs[b], b, crowded | outlier, realistic)
    _corrupt_outliers(rng, noisy, coef, {b: xp[b]["coefficient_errors"] for b in BANDS}, outlier, stars["outlier_kind"])
    for b in BANDS:
        xp[b]["coefficients"] = noisy[b]
    return xp


def _band_columns(
    rng: np.random.Generator, coef: np.ndarray, n_obs: np.ndarray, band: str, poor_fit: np.ndarray, realistic: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One band's columns (all but ``coefficients``) and its noisy coefficients (n, 55)."""
    n = coef.shape[0]
    draw_model = noise_dr3.draw_dr3_noise_model if realistic else noise_mod.draw_xp_noise_model
    nm = draw_model(rng, coef[:, 0], n_obs, band, N_COEF)
    noisy = coef + noise_mod.xp_noise_draw(rng, nm)
    n_meas = (n_obs * rng.uniform(18.0, 26.0, n)).astype(np.int64)
    n_rej = rng.poisson(0.006 * n_meas)
    dof = n_meas - n_rej - N_COEF
    stdev = 1.0 + np.abs(rng.normal(0.0, 0.03, n)) + np.where(poor_fit, rng.uniform(0.1, 1.0, n), 0.0)
    cols = {
        "basis_function_id": np.full(n, BASIS_ID[band]),
        "degrees_of_freedom": dof,
        "n_parameters": np.full(n, N_COEF),
        "n_measurements": n_meas,
        "n_rejected_measurements": n_rej,
        "standard_deviation": stdev,
        "chi_squared": stdev**2 * dof,
        "coefficient_errors": nm.errors,
        "coefficient_correlations": noise_mod.correlation_packed(nm),
        "n_relevant_bases": np.clip(
            (8 + 10 * np.log10(np.maximum(coef[:, 0], 1.0)) + rng.normal(0, 5, n)).astype(int), 3, N_COEF
        ),
        "relative_shrinking": 1.0 - 10.0 ** rng.uniform(-7.0, -3.0, n),
    }
    return cols, noisy


def _corrupt_outliers(
    rng: np.random.Generator,
    noisy: dict[str, np.ndarray],
    coef: dict[str, np.ndarray],
    errors: dict[str, np.ndarray],
    outlier: np.ndarray,
    kind: np.ndarray,
) -> None:
    """Corrupt the outliers' noisy coefficients in place.

    ``kind`` 0: spikes of 30-100 sigma in 1-5 coefficients of each band;
    1: one band scaled by 0.4-0.8 or 1.3-2.5; 2: another star's spectrum, scaled to this star's RP flux.
    """
    n = outlier.size
    for i in np.flatnonzero(outlier):
        if kind[i] == 0:
            for b in BANDS:
                ks = rng.choice(np.arange(3, N_COEF), size=rng.integers(1, 6), replace=False)
                noisy[b][i, ks] += rng.choice([-1.0, 1.0], ks.size) * rng.uniform(30, 100, ks.size) * errors[b][i, ks]
        elif kind[i] == 1:
            b = "bp" if rng.uniform() < 0.5 else "rp"
            noisy[b][i] *= rng.uniform(0.4, 0.8) if rng.uniform() < 0.5 else rng.uniform(1.3, 2.5)
        else:
            j = (i + 1 + rng.integers(0, max(n - 1, 1))) % n
            s = coef["rp"][i, 0] / max(coef["rp"][j, 0], 1e-30)
            for b in BANDS:
                noisy[b][i] = noisy[b][j] * s


def _gaia_photometry(
    rng: np.random.Generator, mags: np.ndarray, crowded: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed G, BP, RP: fluxes (n, 3) e-/s, their errors (n, 3) e-/s and magnitudes (n, 3).

    Crowded sources get 5-40 % extra BP and RP flux (the blend the BP/RP windows collect).
    """
    n = mags.shape[0]
    g_mag = mags[:, 0]
    flux_e = 10.0 ** (-0.4 * (mags - noise_mod.G_ZERO_POINTS_E))
    rel = np.stack(
        [
            np.sqrt(3e-4**2 + (0.004 * 10.0 ** (0.4 * (g_mag - 20.0))) ** 2),
            np.sqrt(1e-3**2 + (0.01 * 10.0 ** (0.4 * (g_mag - 18.0))) ** 2),
            np.sqrt(1e-3**2 + (0.01 * 10.0 ** (0.4 * (g_mag - 18.0))) ** 2),
        ],
        axis=1,
    )
    flux_e_err = rel * flux_e
    flux_e_obs = flux_e + rng.standard_normal((n, 3)) * flux_e_err
    flux_e_obs[:, 1:] *= np.where(crowded, 1.0 + rng.uniform(0.05, 0.4, n), 1.0)[:, None]
    flux_e_obs = np.maximum(flux_e_obs, 1e-3)
    mag_obs = -2.5 * np.log10(flux_e_obs) + noise_mod.G_ZERO_POINTS_E
    return flux_e_obs, flux_e_err, mag_obs


def _astrometry(rng: np.random.Generator, stars: dict[str, np.ndarray], g_mag: np.ndarray) -> dict[str, np.ndarray]:
    """Parallax error and draw [mas], RUWE (binary wobble), fidelity_v2, proper motion (n, 2) [mas/yr]."""
    n = g_mag.size
    binary, crowded = stars["is_binary"], stars["crowded"]
    s_plx = noise_mod.parallax_error(g_mag) * np.exp(rng.normal(0.0, 0.1, n))
    ruwe = np.exp(rng.normal(0.0, 0.06, n)) * 1.0
    wobble = binary & (rng.uniform(size=n) < 0.3)
    ruwe = np.where(wobble, rng.uniform(1.4, 4.0, n), ruwe)
    plx_obs = stars["parallax_true"] + s_plx * rng.standard_normal(n) * np.where(wobble, ruwe, 1.0)
    fidelity = np.clip(1.0 - np.abs(rng.normal(0.0, 0.02, n)) - 0.3 * np.maximum(ruwe - 1.4, 0.0), 0.0, 1.0)
    fidelity = np.where(crowded & (rng.uniform(size=n) < 0.5), rng.uniform(0.0, 0.6, n), fidelity)
    v_t = rng.normal(0.0, 35.0, (n, 2))  # km/s
    pm = v_t / (4.74047 * (stars["distance"] / 1000.0))[:, None]
    return {"s_plx": s_plx, "ruwe": ruwe, "parallax": plx_obs, "fidelity": fidelity, "pm": pm}


def gaia_source_columns(
    rng: np.random.Generator,
    stars: dict[str, np.ndarray],
    mags: np.ndarray,
    norm_dg: np.ndarray,
    n_obs: dict[str, np.ndarray],
    missing: dict[str, np.ndarray],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The gaia_source rows of the chunk and their null masks.

    Parameters
    ----------
    mags : (n, 3) noiseless G, BP, RP (Vega mag)
    norm_dg : (n,) mag (NaN: null)
    n_obs : {"bp", "rp"} -> (n,) transits
    missing : {"bp", "rp"} -> (n,) bool, band without a spectrum (its photometry is null too)

    Returns
    -------
    (columns, masks): column name -> (n,) array; column name -> (n,) bool, True = null.
    """
    n = mags.shape[0]
    flux_e_obs, flux_e_err, mag_obs = _gaia_photometry(rng, mags, stars["crowded"])
    ast = _astrometry(rng, stars, mags[:, 0])
    s_plx, ruwe = ast["s_plx"], ast["ruwe"]
    gaia = {
        "random_index": rng.integers(0, 1_811_709_771, n),
        "source_id": stars["source_id"],
        "ref_epoch": np.full(n, 2016.0),
        "ra": stars["ra"],
        "ra_error": 0.8 * s_plx,
        "dec": stars["dec"],
        "dec_error": 0.75 * s_plx,
        "parallax": ast["parallax"],
        "parallax_error": s_plx,
        "pmra": ast["pm"][:, 0],
        "pmra_error": 1.1 * s_plx,
        "pmdec": ast["pm"][:, 1],
        "pmdec_error": 1.0 * s_plx,
        "ruwe": ruwe,
        "astrometric_excess_noise": np.where(ruwe > 1.4, 0.1 * (ruwe - 1.0), 0.0),
        "fidelity_v2": ast["fidelity"],
        "norm_dg": norm_dg,
        "phot_g_mean_mag": mag_obs[:, 0],
        "phot_g_mean_flux": flux_e_obs[:, 0],
        "phot_g_mean_flux_error": flux_e_err[:, 0],
        "phot_bp_mean_mag": mag_obs[:, 1],
        "phot_bp_mean_flux": flux_e_obs[:, 1],
        "phot_bp_mean_flux_error": flux_e_err[:, 1],
        "phot_rp_mean_mag": mag_obs[:, 2],
        "phot_rp_mean_flux": flux_e_obs[:, 2],
        "phot_rp_mean_flux_error": flux_e_err[:, 2],
        "has_xp_continuous": np.ones(n, dtype=bool),
        "phot_bp_n_obs": n_obs["bp"],
        "phot_rp_n_obs": n_obs["rp"],
        "phot_bp_rp_excess_factor": (flux_e_obs[:, 1] + flux_e_obs[:, 2]) / flux_e_obs[:, 0],
        "visibility_periods_used": rng.integers(9, 30, n),
    }
    masks = {}
    for b in BANDS:
        for c in ("mag", "flux", "flux_error"):
            masks[f"phot_{b}_mean_{c}"] = missing[b]
        masks[f"phot_{b}_n_obs"] = missing[b]
    masks["phot_bp_rp_excess_factor"] = missing["bp"] | missing["rp"]
    masks["norm_dg"] = np.isnan(norm_dg)
    return gaia, masks

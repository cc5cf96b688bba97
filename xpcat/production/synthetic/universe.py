"""The synthetic Gaia universe: raw tables as the archive and its partners serve them, plus truth.

``simulate_universe(out_dir, config)`` writes

- ``OUT/raw/<table>/part-0000.parquet`` for every table of
  :data:`xpcat.catalog_schema.raw.RAW_TABLES` (Gaia column names, units and
  array formats; XP correlations packed as the archive packs them);
- ``OUT/truth/truth.parquet`` (schema ``TRUTH``);
- ``OUT/universe.json``: seed, size, fractions, mean R_V, code version.

Pipeline (all vectorised, chunked over stars, one seeded generator per chunk):

1. :func:`~xpcat.production.synthetic.population.draw_population` draws
   parameters, sight lines, distances and E (dust integrated along the sight line).
2. The truth SED (:mod:`xpcat.production.synthetic.truth_sed`) on a fine grid, plus the
   secondary for unresolved near-equal-mass binaries, is reddened with G23
   at the star's R_V, scaled by parallax^2, contaminated for crowded
   sources, and projected onto GaiaXPy's BP/RP bases (a fixed linear map).
3. Coefficient errors and correlations are drawn per star
   (:mod:`~xpcat.production.synthetic.noise`) and the noise is drawn from
   exactly that covariance. Outliers get corrupted spectra.
4. G/BP/RP from GaiaXPy's Gaia_DR3_Vega synthetic photometry of the noiseless
   coefficients; 2MASS and unWISE magnitudes from the SED at the SPEC §1
   reference wavelengths; parallaxes, astrometric quality, labels, reddening.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpcat import catalog_schema
from xpcat.catalog_schema import raw as raw_schema
from xpcat.config import SimulationConfig
from xpcat.errors import InputError
from xpcat.production.synthetic import truth_sed as truth_model
from xpcat.production.synthetic import noise as noise_mod
from xpcat.production.synthetic.population import POPULATION_FRACTIONS, draw_population

__all__ = ["simulate_universe", "noiseless_fluxes", "source_ids", "companion_teff_logg", "CHUNK_SIZE"]

logger = logging.getLogger(__name__)

#: Stars per chunk (fixed: the universe of a seed does not depend on memory).
CHUNK_SIZE = 5000
_SED_BLOCK = 1000
_LN10 = float(np.log(10.0))
_N_COEF = 55
_SOLUTION_ID = 4545469030156206080
_BASIS_ID = {"bp": 56, "rp": 57}


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xpcat")
    except PackageNotFoundError:  # a bare checkout without package metadata
        return "unknown"


def source_ids(rng: np.random.Generator, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Gaia-like source_ids: HEALPix level-12 nested index << 35 plus a unique running number.

    Parameters
    ----------
    ra, dec : (n,) deg

    Returns
    -------
    (n,) int64, unique.
    """
    from hats.pixel_math.healpix_shim import radec2pix

    pix = np.asarray(radec2pix(12, ra, dec), dtype=np.int64)
    order = np.lexsort((rng.uniform(size=pix.size), pix))
    run = np.empty(pix.size, dtype=np.int64)
    sp = pix[order]
    first = np.r_[True, sp[1:] != sp[:-1]]
    grp_start = np.maximum.accumulate(np.where(first, np.arange(sp.size), 0))
    rank = np.arange(sp.size) - grp_start
    gaps = rng.integers(1, 2**20, sp.size)
    # increasing per pixel: cumulative gaps within the group, well below 2^35
    cum = np.cumsum(gaps)
    cum_start = cum[grp_start] - gaps[grp_start]
    run[order] = (cum - cum_start) + rank
    return (pix << 35) + run


def _sed_grid(proj: truth_model.ProjectionArrays) -> np.ndarray:
    """Fine XP grid followed by the 5 NIR reference wavelengths, nm."""
    return np.concatenate([proj.fine_wavelengths, truth_model.NIR_WAVELENGTHS_NM])


def _ln_sed(theta: np.ndarray, wl: np.ndarray) -> np.ndarray:
    """ln absolute SED (n, m), evaluated in blocks of :data:`_SED_BLOCK` rows (one JAX compilation per grid)."""
    n = theta.shape[0]
    out = np.empty((n, wl.size))
    for lo in range(0, n, _SED_BLOCK):
        blk = theta[lo : lo + _SED_BLOCK]
        short = _SED_BLOCK - blk.shape[0]
        pad = np.concatenate([blk, np.repeat(blk[-1:], short, axis=0)]) if short else blk
        out[lo : lo + blk.shape[0]] = truth_model.batched_ln_sed(pad, wl)[: blk.shape[0]]
    return out


def _extinction_terms(proj: truth_model.ProjectionArrays) -> tuple[np.ndarray, np.ndarray]:
    return truth_model.extinction_coefficients(_sed_grid(proj))


def _observed_sed(
    ln_sed: np.ndarray, parallax: np.ndarray, e: np.ndarray, r_v: np.ndarray, ext_a: np.ndarray, ext_b: np.ndarray
) -> np.ndarray:
    """(n, m) reddened flux at the star's parallax, internal unit."""
    a_e = truth_model.a_over_e(ext_a, ext_b, r_v)  # (n, m) mag per unit E
    return np.exp(ln_sed + 2.0 * np.log(parallax)[:, None] - 0.4 * _LN10 * e[:, None] * a_e)


def noiseless_fluxes(
    theta: np.ndarray,
    parallax: np.ndarray,
    e: np.ndarray,
    r_v: np.ndarray,
    projection: truth_model.ProjectionArrays | None = None,
) -> np.ndarray:
    """The 66 noiseless fluxes of single stars exactly as the universe computes them.

    Parameters
    ----------
    theta : (n, 3) Teff [K], [Fe/H], logg
    parallax : (n,) mas
    e : (n,) mag (E of the universe's law)
    r_v : (n,) R_V

    Returns
    -------
    (n, 66) float64, internal unit (1e-18 W m^-2 nm^-1).
    """
    proj = truth_model.projection_arrays() if projection is None else projection
    ext_a, ext_b = _extinction_terms(proj)
    obs = _observed_sed(_ln_sed(np.asarray(theta, float), _sed_grid(proj)), np.asarray(parallax, float), np.asarray(e, float),
                        np.asarray(r_v, float), ext_a, ext_b)
    nf = proj.fine_wavelengths.size
    return np.concatenate([obs[:, :nf] @ proj.to_xp, obs[:, nf:]], axis=1)


def _abs_g(proj: truth_model.ProjectionArrays) -> Callable[[np.ndarray], np.ndarray]:
    def g_at_1kpc(theta: np.ndarray) -> np.ndarray:
        # every 5th fine sample is enough for the magnitude limit (~0.01 mag)
        wl = proj.fine_wavelengths[::5]
        weights = 5.0 * proj.to_phot[::5, 0] * truth_model.FLUX_UNIT_W_M2_NM
        flux = np.exp(_ln_sed(theta, wl)) @ weights
        return -2.5 * np.log10(np.maximum(flux, 1e-40)) + proj.phot_zero_points[0]

    return g_at_1kpc


def companion_teff_logg(teff: np.ndarray, logg: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teff [K] and logg [dex] of a main-sequence companion of mass ratio ``q`` (<= 1) to a primary (teff, logg).

    T ~ M^0.6 (floored at 3100 K) and g ~ M / R^2 with R ~ M^0.85 on the lower main sequence:
    logg2 = logg - 0.7 log10 q. Arrays broadcast; q = 1 returns the primary.
    """
    return np.maximum(teff * q**0.6, 3100.0), logg - 0.7 * np.log10(q)


def _exact_subset(rng: np.random.Generator, eligible: np.ndarray, fraction: float, n_total: int) -> np.ndarray:
    """Boolean mask choosing round(fraction * n_total) stars among ``eligible`` (fewer if not enough)."""
    idx = np.flatnonzero(eligible)
    k = min(idx.size, int(round(fraction * n_total)))
    mask = np.zeros(eligible.size, dtype=bool)
    if k:
        mask[rng.choice(idx, size=k, replace=False)] = True
    return mask


def _universe(config: SimulationConfig, proj: truth_model.ProjectionArrays) -> dict[str, np.ndarray]:
    """Everything that is drawn once for the whole universe (small per-star arrays)."""
    seq = np.random.SeedSequence(config.seed)
    rng = np.random.default_rng(seq.spawn(1)[0])
    n = config.n_stars
    pop = draw_population(
        rng,
        n,
        abs_g=_abs_g(proj),
        n_fields=config.n_fields,
        field_radius_deg=config.field_radius_deg,
        g_limit=config.g_limit,
        r_v_mean=config.r_v_mean,
        r_v_scatter=config.r_v_scatter,
    )
    sid = source_ids(rng, pop.ra, pop.dec)
    order = np.argsort(sid, kind="stable")
    u: dict[str, np.ndarray] = {k: np.asarray(v)[order] for k, v in asdict(pop).items()}
    u["source_id"] = sid[order]
    theta = np.stack([u["teff"], u["feh"], u["logg"]], axis=1)
    # unresolved near-equal-mass binaries: main-sequence primaries
    dwarf = (u["logg"] > 3.9) & (u["teff"] < 7000.0)
    u["is_binary"] = _exact_subset(rng, dwarf, config.binary_fraction, n)
    q = np.where(u["is_binary"], rng.uniform(0.7, 1.0, n), np.nan)
    u["mass_ratio"] = q
    q1 = np.where(u["is_binary"], q, 1.0)
    u["teff2"], u["logg2"] = companion_teff_logg(u["teff"], u["logg"], q1)
    # outliers (not binaries), missing bands (disjoint), crowding
    u["is_outlier"] = _exact_subset(rng, ~u["is_binary"], config.outlier_fraction, n)
    u["outlier_kind"] = rng.integers(0, 3, n)
    u["missing_bp"] = _exact_subset(rng, np.ones(n, bool), config.missing_bp_fraction, n)
    u["missing_rp"] = _exact_subset(rng, ~u["missing_bp"], config.missing_rp_fraction, n)
    u["crowded"] = _exact_subset(rng, np.ones(n, bool), config.crowded_fraction, n)
    u["no_tmass"] = _exact_subset(rng, np.ones(n, bool), config.missing_tmass_fraction, n)
    u["no_unwise"] = _exact_subset(rng, np.ones(n, bool), config.missing_unwise_fraction, n)
    u["parallax_true"] = 1000.0 / u["distance"]
    u["theta"] = theta
    return u


def _chunk_observables(
    rng: np.random.Generator, u: dict[str, np.ndarray], sl: slice, proj: truth_model.ProjectionArrays,
    ext: tuple[np.ndarray, np.ndarray], config: SimulationConfig,
) -> dict[str, Any]:
    """Simulate the observations of the stars in ``sl``; returns column arrays per table."""
    n = sl.stop - sl.start
    nf = proj.fine_wavelengths.size
    wl = _sed_grid(proj)
    theta = u["theta"][sl]
    plx = u["parallax_true"][sl]
    e, r_v = u["e"][sl], u["r_v"][sl]
    obs = _observed_sed(_ln_sed(theta, wl), plx, e, r_v, *ext)
    binary = u["is_binary"][sl]
    if binary.any():
        th2 = np.stack([u["teff2"][sl][binary], theta[binary, 1], u["logg2"][sl][binary]], axis=1)
        obs[binary] += _observed_sed(_ln_sed(th2, wl), plx[binary], e[binary], r_v[binary], *ext)
    # crowding: light of an unrelated neighbour leaks in (more in the NIR's larger beams)
    crowded = u["crowded"][sl]
    norm_dg = np.where(rng.uniform(size=n) < 0.4, np.nan, -5.0 - rng.exponential(8.0, n))
    norm_dg = np.where(crowded, rng.uniform(-5.0, 0.0, n), norm_dg)
    if crowded.any():
        donor = rng.permutation(n)
        frac = np.where(crowded, 0.3 * 10.0 ** (0.2 * np.nan_to_num(norm_dg, nan=-50.0)), 0.0)
        ratio = obs[:, 300] / np.maximum(obs[donor, 300], 1e-300)
        contam = obs[donor] * (frac * ratio)[:, None]
        contam[:, nf:] *= 2.0
        obs = obs + contam
    flux_w = obs[:, :nf] * truth_model.FLUX_UNIT_W_M2_NM
    coef = {"bp": flux_w @ proj.to_bp, "rp": flux_w @ proj.to_rp}
    phot = flux_w @ proj.to_phot  # G, BP, RP synthetic fluxes (W m^-2 nm^-1-weighted)
    mags = -2.5 * np.log10(np.maximum(phot, 1e-40)) + proj.phot_zero_points
    g_mag = mags[:, 0]

    # --- XP coefficients, errors, correlations ---
    n_obs = {b: rng.integers(14, 80, n) for b in ("bp", "rp")}
    xp: dict[str, Any] = {}
    outlier = u["is_outlier"][sl]
    kind = u["outlier_kind"][sl]
    noisy = {}
    for b in ("bp", "rp"):
        nm = noise_mod.draw_xp_noise_model(rng, coef[b][:, 0], n_obs[b], b, _N_COEF)
        noisy[b] = coef[b] + noise_mod.xp_noise_draw(rng, nm)
        n_meas = (n_obs[b] * rng.uniform(18.0, 26.0, n)).astype(np.int64)
        n_rej = rng.poisson(0.006 * n_meas)
        dof = n_meas - n_rej - _N_COEF
        stdev = 1.0 + np.abs(rng.normal(0.0, 0.03, n)) + np.where(crowded | outlier, rng.uniform(0.1, 1.0, n), 0.0)
        xp[b] = {
            "basis_function_id": np.full(n, _BASIS_ID[b]),
            "degrees_of_freedom": dof,
            "n_parameters": np.full(n, _N_COEF),
            "n_measurements": n_meas,
            "n_rejected_measurements": n_rej,
            "standard_deviation": stdev,
            "chi_squared": stdev**2 * dof,
            "coefficient_errors": nm.errors,
            "coefficient_correlations": noise_mod.correlation_packed(nm),
            "n_relevant_bases": np.clip(
                (8 + 10 * np.log10(np.maximum(coef[b][:, 0], 1.0)) + rng.normal(0, 5, n)).astype(int), 3, _N_COEF
            ),
            "relative_shrinking": 1.0 - 10.0 ** rng.uniform(-7.0, -3.0, n),
            "errors": nm.errors,
        }
    # outliers: 0 = spikes in a few coefficients, 1 = one band mis-scaled, 2 = another star's spectrum
    for i in np.flatnonzero(outlier):
        if kind[i] == 0:
            for b in ("bp", "rp"):
                ks = rng.choice(np.arange(3, _N_COEF), size=rng.integers(1, 6), replace=False)
                noisy[b][i, ks] += rng.choice([-1.0, 1.0], ks.size) * rng.uniform(30, 100, ks.size) * xp[b]["errors"][i, ks]
        elif kind[i] == 1:
            b = "bp" if rng.uniform() < 0.5 else "rp"
            noisy[b][i] *= rng.uniform(0.4, 0.8) if rng.uniform() < 0.5 else rng.uniform(1.3, 2.5)
        else:
            j = (i + 1 + rng.integers(0, max(n - 1, 1))) % n
            s = coef["rp"][i, 0] / max(coef["rp"][j, 0], 1e-30)
            for b in ("bp", "rp"):
                noisy[b][i] = noisy[b][j] * s
    for b in ("bp", "rp"):
        xp[b]["coefficients"] = noisy[b]
        xp[b].pop("errors")

    missing = {"bp": u["missing_bp"][sl], "rp": u["missing_rp"][sl]}

    # --- Gaia photometry, e-/s ---
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

    # --- astrometry ---
    s_plx = noise_mod.parallax_error(g_mag) * np.exp(rng.normal(0.0, 0.1, n))
    ruwe = np.exp(rng.normal(0.0, 0.06, n)) * 1.0
    wobble = binary & (rng.uniform(size=n) < 0.3)
    ruwe = np.where(wobble, rng.uniform(1.4, 4.0, n), ruwe)
    plx_obs = plx + s_plx * rng.standard_normal(n) * np.where(wobble, ruwe, 1.0)
    fidelity = np.clip(1.0 - np.abs(rng.normal(0.0, 0.02, n)) - 0.3 * np.maximum(ruwe - 1.4, 0.0), 0.0, 1.0)
    fidelity = np.where(crowded & (rng.uniform(size=n) < 0.5), rng.uniform(0.0, 0.6, n), fidelity)
    v_t = rng.normal(0.0, 35.0, (n, 2))
    pm = v_t / (4.74047 * (u["distance"][sl] / 1000.0))[:, None]
    gaia = {
        "random_index": rng.integers(0, 1_811_709_771, n),
        "source_id": u["source_id"][sl],
        "ref_epoch": np.full(n, 2016.0),
        "ra": u["ra"][sl],
        "ra_error": 0.8 * s_plx,
        "dec": u["dec"][sl],
        "dec_error": 0.75 * s_plx,
        "parallax": plx_obs,
        "parallax_error": s_plx,
        "pmra": pm[:, 0],
        "pmra_error": 1.1 * s_plx,
        "pmdec": pm[:, 1],
        "pmdec_error": 1.0 * s_plx,
        "ruwe": ruwe,
        "astrometric_excess_noise": np.where(ruwe > 1.4, 0.1 * (ruwe - 1.0), 0.0),
        "fidelity_v2": fidelity,
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
    gaia_masks = {}
    for b, col in (("bp", 1), ("rp", 2)):
        for c in ("mag", "flux", "flux_error"):
            gaia_masks[f"phot_{b}_mean_{c}"] = missing[b]
        gaia_masks[f"phot_{b}_n_obs"] = missing[b]
    gaia_masks["phot_bp_rp_excess_factor"] = missing["bp"] | missing["rp"]
    gaia_masks["norm_dg"] = np.isnan(norm_dg)

    # --- 2MASS and unWISE ---
    nir_w = obs[:, nf:] * truth_model.FLUX_UNIT_W_M2_NM
    nir_mag = noise_mod.nir_flux_to_mag(nir_w)
    lim = np.array([16.5, 16.0, 15.5, 17.5, 16.0])
    nir_err = np.sqrt(np.array([0.02, 0.02, 0.02, 0.01, 0.01]) ** 2 + (0.1 * 10.0 ** (0.4 * (nir_mag - lim))) ** 2)
    nir_obs = nir_mag + nir_err * rng.standard_normal(nir_mag.shape)
    tm = _tmass_columns(rng, u, sl, nir_obs[:, :3], nir_err[:, :3], gaia["random_index"])
    uw_keep = ~u["no_unwise"][sl] & (nir_obs[:, 3] < 19.0)
    unwise = {
        "source_id": u["source_id"][sl][uw_keep],
        "w1_mag": nir_obs[uw_keep, 3],
        "w1_mag_error": nir_err[uw_keep, 3],
        "w2_mag": nir_obs[uw_keep, 4],
        "w2_mag_error": nir_err[uw_keep, 4],
    }
    unwise_masks = {"w2_mag": nir_obs[uw_keep, 4] > 17.5, "w2_mag_error": nir_obs[uw_keep, 4] > 17.5}
    labels = _label_columns(rng, u, sl, g_mag, mags, config)
    reddening = _reddening_columns(rng, u, sl)
    return {
        "xp": xp,
        "missing": missing,
        "gaia": (gaia, gaia_masks),
        "tmass": tm,
        "unwise": (unwise, unwise_masks),
        "labels": labels,
        "reddening": reddening,
    }


def _designation(ra: np.ndarray, dec: np.ndarray) -> list[str]:
    out = []
    for r, d in zip(ra, dec):
        h = r / 15.0
        hh, mm = int(h), int((h % 1) * 60)
        ss = ((h * 60) % 1) * 60
        sign = "+" if d >= 0 else "-"
        ad = abs(d)
        dd, dm = int(ad), int((ad % 1) * 60)
        ds = ((ad * 60) % 1) * 60
        out.append(f"{hh:02d}{mm:02d}{int(ss * 100):04d}{sign}{dd:02d}{dm:02d}{int(ds * 10):03d}")
    return out


def _tmass_columns(rng, u, sl, mag, err, random_index):
    """The 2MASS best-neighbour join rows (the archive returns gaia_source's random_index)."""
    n = mag.shape[0]
    lim = np.array([16.5, 16.0, 15.5])
    detected = mag < lim[None, :] + 0.6
    keep = ~u["no_tmass"][sl] & detected.any(axis=1)
    # quality per band: A (snr > 10), B, C, D; U for non-detections; a few E/X (bad)
    snr = 1.0857 / err
    q = np.where(snr > 10, "A", np.where(snr > 7, "B", np.where(snr > 5, "C", "D"))).astype("<U1")
    q = np.where(detected, q, "U")
    bad = rng.uniform(size=n) < 0.02
    q[bad, rng.integers(0, 3, n)[bad]] = "E"
    ph_qual = np.array(["".join(r) for r in q])
    ext = np.where(rng.uniform(size=n) < 0.01, rng.integers(1, 5_000_000, n), -1)
    dra = rng.normal(0.0, 0.08, n) / 3600.0
    ddec = rng.normal(0.0, 0.08, n) / 3600.0
    ra = u["ra"][sl]
    dec = u["dec"][sl]
    tm_ra = ra + dra / np.cos(np.radians(dec))
    tm_dec = dec + ddec
    cols = {
        "random_index": random_index[keep],
        "source_id": u["source_id"][sl][keep],
        "ra": ra[keep],
        "dec": dec[keep],
        "designation": _designation(tm_ra[keep], tm_dec[keep]),
        "tm_ra": tm_ra[keep],
        "tm_dec": tm_dec[keep],
        "j_m": mag[keep, 0],
        "j_msigcom": err[keep, 0],
        "h_m": mag[keep, 1],
        "h_msigcom": err[keep, 1],
        "ks_m": mag[keep, 2],
        "ks_msigcom": err[keep, 2],
        "ph_qual": ph_qual[keep],
        "ext_key": ext[keep],
        "gaia_tmass_angular_distance": (np.hypot(dra, ddec) * 3600.0)[keep],
    }
    masks = {"ext_key": ext[keep] < 0}
    for i, band in enumerate(("j", "h", "ks")):
        masks[f"{band}_msigcom"] = ~detected[keep, i]  # upper limits carry no error
    return cols, masks


def _label_columns(rng, u, sl, g_mag, mags, config: SimulationConfig):
    n = g_mag.size
    w = 1.0 / (1.0 + np.exp((g_mag - 17.0) / 0.4))
    k = int(round(config.label_fraction * n))
    k = min(k, int(np.count_nonzero(w > 0)))
    chosen = np.zeros(n, bool)
    if k:
        chosen[rng.choice(n, size=k, replace=False, p=w / w.sum())] = True
    color = mags[:, 1] - mags[:, 2]
    snr_r = np.clip(70.0 * 10.0 ** (-0.2 * (g_mag - 15.0)) * np.exp(rng.normal(0.0, 0.4, n)), 2.0, 1500.0)
    snr_g = snr_r * 10.0 ** (-0.3 * (color - 0.8))
    snr_i = snr_r * 10.0 ** (0.15 * (color - 0.8))
    teff = u["teff"][sl]
    hot = teff > config.hotpayne_teff_min
    s = snr_g
    t_err = np.where(hot, 0.03 * teff + 50.0, 25.0 + 2500.0 / s)
    f_err = np.where(hot, 0.15 + 2.0 / s, 0.02 + 2.5 / s)
    g_err = np.where(hot, 0.12 + 3.0 / s, 0.03 + 4.0 / s)
    draw = lambda true, err: true + err * rng.standard_normal(n)  # noqa: E731
    cols = {
        "source_id": u["source_id"][sl],
        "teff": draw(teff, t_err),
        "teff_error": t_err,
        "feh": draw(u["feh"][sl], f_err),
        "feh_error": f_err,
        "logg": draw(u["logg"][sl], g_err),
        "logg_error": g_err,
        "snr_g": snr_g,
        "snr_r": snr_r,
        "snr_i": snr_i,
        "label_source": np.where(hot, "hotpayne", "lamost"),
    }
    return {kk: (v[chosen] if not isinstance(v, list) else v) for kk, v in cols.items()}, {}


def _reddening_columns(rng, u, sl):
    dec = u["dec"][sl]
    e = u["e"][sl]
    n = e.size
    keep = dec > -30.0  # Bayestar footprint (PS1 sky)
    err = 0.015 + 0.06 * e
    e_obs = np.maximum(e * np.exp(rng.normal(0.0, 0.05, n)) + err * rng.standard_normal(n), 0.0)
    return {"source_id": u["source_id"][sl][keep], "e": e_obs[keep], "e_error": err[keep]}, {}


def _array(values: Any, mask: np.ndarray | None = None) -> pa.Array:
    if isinstance(values, list) or (isinstance(values, np.ndarray) and values.dtype.kind in "US"):
        return pa.array(list(values), type=pa.string(), mask=mask)
    return pa.array(values, mask=mask)


def _list_array(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    """A list<double> column from (n, k) values; rows in ``missing`` are null."""
    present = ~missing
    counts = np.where(present, values.shape[1], 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = np.ascontiguousarray(values[present]).ravel()
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float64()), mask=pa.array(missing))


def _table(cols: dict[str, Any], masks: dict[str, np.ndarray], schema: pa.Schema, what: str) -> pa.Table:
    arrays = {k: _array(v, masks.get(k)) for k, v in cols.items()}
    return catalog_schema.conform(pa.table(arrays), schema, what=what)


def _xp_table(chunk: dict[str, Any]) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    n = chunk["gaia"][0]["source_id"].size
    cols["source_id"] = pa.array(chunk["gaia"][0]["source_id"])
    cols["solution_id"] = pa.array(np.full(n, _SOLUTION_ID, dtype=np.int64))
    for b in ("bp", "rp"):
        miss = chunk["missing"][b]
        for name in raw_schema.XP_BAND_COLUMNS:
            v = chunk["xp"][b][name]
            if v.ndim == 2:
                cols[f"{b}_{name}"] = _list_array(v, miss)
            else:
                cols[f"{b}_{name}"] = pa.array(v, mask=miss)
    return catalog_schema.conform(pa.table(cols), raw_schema.XP_CONTINUOUS, what="xp_continuous_mean_spectrum")


def _truth_table(u: dict[str, np.ndarray]) -> pa.Table:
    cols = {
        "source_id": u["source_id"],
        "teff": u["teff"],
        "feh": u["feh"],
        "logg": u["logg"],
        "e": u["e"],
        "r_v": u["r_v"],
        "parallax": u["parallax_true"],
        "distance": u["distance"],
        "population": list(u["population"]),
        "is_binary": u["is_binary"],
        "mass_ratio": u["mass_ratio"],
        "is_outlier": u["is_outlier"],
    }
    return catalog_schema.conform(pa.table({k: _array(v) for k, v in cols.items()}), raw_schema.TRUTH, what="truth")


def simulate_universe(out_dir: Path, config: SimulationConfig) -> dict:
    """Write a synthetic Gaia universe under ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Created if absent. Gets ``raw/<table>/part-0000.parquet``,
        ``truth/truth.parquet`` and ``universe.json``.
    config : SimulationConfig
        Size, seed and the fractions of binaries, outliers, missing data, labels.

    Returns
    -------
    dict
        Summary: output paths, row counts per table, seed, size.

    Raises
    ------
    InputError
        When ``out_dir`` exists and is not a directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {out_dir} exists and is not a directory")
    logger.info("simulating %d stars, seed %d", config.n_stars, config.seed)
    proj = truth_model.projection_arrays()
    ext = _extinction_terms(proj)
    u = _universe(config, proj)
    n = config.n_stars
    seeds = np.random.SeedSequence([config.seed, 1]).spawn((n + CHUNK_SIZE - 1) // CHUNK_SIZE)
    paths = {name: out_dir / "raw" / name / "part-0000.parquet" for name in raw_schema.RAW_TABLES}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    rows = {name: 0 for name in paths}
    try:
        for ci, lo in enumerate(range(0, n, CHUNK_SIZE)):
            sl = slice(lo, min(n, lo + CHUNK_SIZE))
            chunk = _chunk_observables(np.random.default_rng(seeds[ci]), u, sl, proj, ext, config)
            tables = {
                "gaia_source": _table(*chunk["gaia"], raw_schema.GAIA_SOURCE, "gaia_source"),
                "xp_continuous_mean_spectrum": _xp_table(chunk),
                "tmass": _table(*chunk["tmass"], raw_schema.TMASS, "tmass"),
                "unwise": _table(*chunk["unwise"], raw_schema.UNWISE, "unwise"),
                "labels": _table(*chunk["labels"], raw_schema.LABELS, "labels"),
                "reddening": _table(*chunk["reddening"], raw_schema.REDDENING, "reddening"),
            }
            for name, t in tables.items():
                if name not in writers:
                    writers[name] = pq.ParquetWriter(paths[name], raw_schema.RAW_TABLES[name])
                writers[name].write_table(t)
                rows[name] += t.num_rows
    finally:
        for w in writers.values():
            w.close()
    truth_path = out_dir / "truth" / "truth.parquet"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_truth_table(u), truth_path)
    info = {
        "seed": config.seed,
        "n_stars": n,
        "config": asdict(config),
        "population_fractions": POPULATION_FRACTIONS,
        "population_counts": {k: int(np.count_nonzero(u["population"] == k)) for k in POPULATION_FRACTIONS},
        "binary_fraction": float(np.mean(u["is_binary"])),
        "outlier_fraction": float(np.mean(u["is_outlier"])),
        "missing_bp_fraction": float(np.mean(u["missing_bp"])),
        "missing_rp_fraction": float(np.mean(u["missing_rp"])),
        "crowded_fraction": float(np.mean(u["crowded"])),
        "r_v_mean": config.r_v_mean,
        "r_v_scatter": config.r_v_scatter,
        "e_unit": "E(B-V) of the G23 law: A(lambda) = E R_V k(lambda; R_V)",
        "flux_unit_w_m2_nm": truth_model.FLUX_UNIT_W_M2_NM,
        "code_version": _code_version(),
        "schema_version": catalog_schema.SCHEMA_VERSION,
        "rows": rows,
    }
    (out_dir / "universe.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    logger.info("universe written to %s (%s)", out_dir, rows)
    return {"out_dir": str(out_dir), "n_stars": n, "seed": config.seed, "rows": rows,
            "truth": str(truth_path), "universe": str(out_dir / "universe.json")}

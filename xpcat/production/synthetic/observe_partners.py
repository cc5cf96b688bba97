"""The partner surveys of the synthetic universe: 2MASS, unWISE, training labels, reddening priors.

Each function takes one chunk of the universe (``stars``: column name -> (n, ...)
array, see :mod:`xpcat.production.synthetic.universe`) and returns
``(columns, masks)``: column name -> array of the rows the survey has, and
column name -> bool array (True = null), in the raw schemas of
:mod:`xpcat.catalog_schema.raw`. Called by
:func:`xpcat.production.synthetic.observe.chunk_observables` in a fixed order
(the order of the random draws fixes the universe of a seed).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xpcat.config import SimulationConfig
from xpcat.production.synthetic import noise as noise_mod

__all__ = [
    "NIR_LIMITS_MAG",
    "nir_magnitudes",
    "designations",
    "tmass_columns",
    "unwise_columns",
    "label_columns",
    "reddening_columns",
]

logger = logging.getLogger(__name__)

Columns = tuple[dict[str, Any], dict[str, np.ndarray]]

#: J, H, Ks, W1, W2 magnitudes where the photometric error reaches 0.1 mag (Vega).
NIR_LIMITS_MAG = np.array([16.5, 16.0, 15.5, 17.5, 16.0])
#: J, H, Ks, W1, W2 error floors, mag.
_NIR_ERROR_FLOOR_MAG = np.array([0.02, 0.02, 0.02, 0.01, 0.01])


def nir_magnitudes(rng: np.random.Generator, nir_flux_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observed J, H, Ks, W1, W2 magnitudes and errors from the SED at the reference wavelengths.

    Parameters
    ----------
    nir_flux_w : (n, 5) W m^-2 nm^-1

    Returns
    -------
    mag, err : (n, 5) Vega mag
    """
    nir_mag = noise_mod.nir_flux_to_mag(nir_flux_w)
    err = np.sqrt(_NIR_ERROR_FLOOR_MAG**2 + (0.1 * 10.0 ** (0.4 * (nir_mag - NIR_LIMITS_MAG))) ** 2)
    return nir_mag + err * rng.standard_normal(nir_mag.shape), err


def designations(ra: np.ndarray, dec: np.ndarray) -> list[str]:
    """2MASS designations ``hhmmssss+ddmmsss`` of positions (deg)."""
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


def tmass_columns(
    rng: np.random.Generator, stars: dict[str, np.ndarray], mag: np.ndarray, err: np.ndarray, random_index: np.ndarray
) -> Columns:
    """The 2MASS best-neighbour join rows (the archive returns gaia_source's random_index).

    Parameters
    ----------
    mag, err : (n, 3) J, H, Ks observed magnitudes and errors (Vega mag)
    random_index : (n,) int64, the chunk's gaia_source random_index
    """
    n = mag.shape[0]
    lim = NIR_LIMITS_MAG[:3]
    detected = mag < lim[None, :] + 0.6
    keep = ~stars["no_tmass"] & detected.any(axis=1)
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
    ra = stars["ra"]
    dec = stars["dec"]
    tm_ra = ra + dra / np.cos(np.radians(dec))
    tm_dec = dec + ddec
    cols = {
        "random_index": random_index[keep],
        "source_id": stars["source_id"][keep],
        "ra": ra[keep],
        "dec": dec[keep],
        "designation": designations(tm_ra[keep], tm_dec[keep]),
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


def unwise_columns(stars: dict[str, np.ndarray], mag: np.ndarray, err: np.ndarray) -> Columns:
    """unWISE rows: sources with a match and W1 < 19; W2 is null fainter than 17.5.

    Parameters
    ----------
    mag, err : (n, 2) W1, W2 observed magnitudes and errors (Vega mag)
    """
    keep = ~stars["no_unwise"] & (mag[:, 0] < 19.0)
    cols = {
        "source_id": stars["source_id"][keep],
        "w1_mag": mag[keep, 0],
        "w1_mag_error": err[keep, 0],
        "w2_mag": mag[keep, 1],
        "w2_mag_error": err[keep, 1],
    }
    faint_w2 = mag[keep, 1] > 17.5
    return cols, {"w2_mag": faint_w2, "w2_mag_error": faint_w2}


def label_columns(rng: np.random.Generator, stars: dict[str, np.ndarray], mags: np.ndarray, config: SimulationConfig) -> Columns:
    """LAMOST-like labels (Hot Payne above ``config.hotpayne_teff_min``) for a G-weighted subset.

    Parameters
    ----------
    mags : (n, 3) noiseless G, BP, RP (Vega mag); stars brighter than G ~ 17 are preferred.
    """
    g_mag = mags[:, 0]
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
    teff = stars["teff"]
    hot = teff > config.hotpayne_teff_min
    s = snr_g
    t_err = np.where(hot, 0.03 * teff + 50.0, 25.0 + 2500.0 / s)
    f_err = np.where(hot, 0.15 + 2.0 / s, 0.02 + 2.5 / s)
    g_err = np.where(hot, 0.12 + 3.0 / s, 0.03 + 4.0 / s)

    def draw(true: np.ndarray, err: np.ndarray) -> np.ndarray:
        return true + err * rng.standard_normal(n)

    cols = {
        "source_id": stars["source_id"],
        "teff": draw(teff, t_err),
        "teff_error": t_err,
        "feh": draw(stars["feh"], f_err),
        "feh_error": f_err,
        "logg": draw(stars["logg"], g_err),
        "logg_error": g_err,
        "snr_g": snr_g,
        "snr_r": snr_r,
        "snr_i": snr_i,
        "label_source": np.where(hot, "hotpayne", "lamost"),
    }
    return {kk: (v[chosen] if not isinstance(v, list) else v) for kk, v in cols.items()}, {}


def reddening_columns(rng: np.random.Generator, stars: dict[str, np.ndarray]) -> Columns:
    """Bayestar-like reddening priors E and errors (mag) for sources in the PS1 sky (dec > -30 deg)."""
    dec = stars["dec"]
    e = stars["e"]
    n = e.size
    keep = dec > -30.0
    err = 0.015 + 0.06 * e
    e_obs = np.maximum(e * np.exp(rng.normal(0.0, 0.05, n)) + err * rng.standard_normal(n), 0.0)
    return {"source_id": stars["source_id"][keep], "e": e_obs[keep], "e_error": err[keep]}, {}

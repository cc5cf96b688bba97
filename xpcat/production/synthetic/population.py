"""Stellar population, positions, distances and dust of the synthetic Gaia universe.

Everything here is vectorised numpy driven by one ``numpy.random.Generator``,
so a seed fixes the universe. The observation model (spectra, photometry,
tables) is in :mod:`xpcat.production.synthetic.universe`.

Populations (fractions in :data:`POPULATION_FRACTIONS`):

- ``thin_disk``: main-sequence FGKM dwarfs, [Fe/H] ~ N(-0.05, 0.2), scale height 300 pc.
- ``thick_disk``: older, metal-poorer dwarfs, [Fe/H] ~ N(-0.6, 0.3), scale height 900 pc.
- ``halo``: metal-poor turn-off dwarfs and giants, [Fe/H] ~ N(-1.5, 0.5), power-law density.
- ``giant``: red-giant branch, Teff from a metallicity-dependent branch.
- ``red_clump``: Teff ~ 4700 K, logg ~ 2.45.
- ``hot``: young A/B stars, Teff log-uniform 7000..25000 K, scale height 100 pc.

Distances are drawn along each sight line from ``rho(d) d^2`` up to the
distance at which the star reaches the magnitude limit; E is the integral of
a 3D dust density (exponential disk with per-field clumpiness) along the
same sight line, so E grows with distance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.integrate import cumulative_trapezoid

__all__ = [
    "DUST_GRID_KPC",
    "GIANT_GAMMA",
    "IMF_ALPHA",
    "POPULATION_FRACTIONS",
    "Population",
    "R_SUN_KPC",
    "draw_in_fields",
    "draw_params",
    "draw_params_weighted",
    "draw_population",
    "disk_dust_profile",
    "dust_column",
    "field_centres",
    "galactic_to_icrs",
    "galactocentric",
    "stellar_density",
]

logger = logging.getLogger(__name__)

#: Fraction of each population among drawn stars.
POPULATION_FRACTIONS: dict[str, float] = {
    "thin_disk": 0.52,
    "thick_disk": 0.12,
    "halo": 0.05,
    "giant": 0.13,
    "red_clump": 0.08,
    "hot": 0.10,
}

#: Galactocentric radius of the Sun, kpc.
R_SUN_KPC = 8.2
_Z_SUN_KPC = 0.02
#: Dust: E per kpc in the mid-plane at the solar circle, scale height and length (kpc).
DUST_E_PER_KPC = 0.35
DUST_H_Z = 0.12
DUST_H_R = 3.5

_CHUNK = 20000
#: Distance grid of the dust integral, kpc (fine near the Sun, where high-latitude dust lies).
DUST_GRID_KPC = np.concatenate([[0.0], np.geomspace(0.005, 40.0, 160)])

_DENSITY = {  # (scale length kpc, scale height kpc) for disk-like populations
    "thin_disk": (2.6, 0.30),
    "thick_disk": (2.0, 0.90),
    "giant": (2.6, 0.45),
    "red_clump": (2.6, 0.35),
    "hot": (3.0, 0.10),
}


@dataclass(frozen=True)
class Population:
    """Drawn stars (all arrays (n,)).

    Attributes
    ----------
    teff : K; feh : dex; logg : dex(cm s^-2) -- the primary's parameters.
    population : str labels.
    l, b : deg, Galactic coordinates. ra, dec : deg, ICRS.
    distance : pc.
    e : mag, true reddening (E(B-V) of the law) at the star.
    r_v : R_V of the sight line.
    field : int, index of the sky field.
    """

    teff: np.ndarray
    feh: np.ndarray
    logg: np.ndarray
    population: np.ndarray
    l: np.ndarray
    b: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    distance: np.ndarray
    e: np.ndarray
    r_v: np.ndarray
    field: np.ndarray


def field_centres(rng: np.random.Generator, n_fields: int) -> tuple[np.ndarray, np.ndarray]:
    """Galactic (l, b) of the sky fields in degrees: spread over latitude bands, random longitude."""
    # stratify |b| so low-latitude (dusty) and high-latitude fields both occur
    u = (np.arange(n_fields) + rng.uniform(0.0, 1.0, n_fields)) / n_fields
    b = np.degrees(np.arcsin(u * 2.0 - 1.0))
    b = np.where(np.abs(b) < 2.0, np.sign(b + 1e-9) * 2.0, b)
    l = rng.uniform(0.0, 360.0, n_fields)
    return l, b


def draw_in_fields(rng, n, l0, b0, radius_deg):
    """Uniform positions in discs of ``radius_deg`` around the field centres."""
    k = rng.integers(0, l0.size, n)
    r = np.radians(radius_deg) * np.sqrt(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    b = np.clip(b0[k] + np.degrees(r * np.sin(phi)), -89.9, 89.9)
    l = (l0[k] + np.degrees(r * np.cos(phi)) / np.cos(np.radians(b0[k]))) % 360.0
    return l, b, k


def galactocentric(d_kpc, l_deg, b_deg):
    """Galactocentric cylindrical R and z (kpc) for distances (n, m) along sight lines (n,)."""
    lr, br = np.radians(l_deg)[:, None], np.radians(b_deg)[:, None]
    x = R_SUN_KPC - d_kpc * np.cos(br) * np.cos(lr)
    y = d_kpc * np.cos(br) * np.sin(lr)
    z = _Z_SUN_KPC + d_kpc * np.sin(br)
    return np.hypot(x, y), z


def stellar_density(pop: str, big_r: np.ndarray, z: np.ndarray,
                    scales: dict[str, tuple[float, float]] | None = None) -> np.ndarray:
    """Number density of population ``pop`` at Galactocentric (R, z) [kpc], 1 at the Sun for the disks.

    ``scales`` maps disk populations to (scale length, scale height) in kpc (default: the legacy
    universe's table); the halo is a flattened power law normalised to 5e-3 at the Sun.
    """
    if pop == "halo":
        r_sph = np.sqrt(big_r**2 + (z / 0.7) ** 2)
        return (np.maximum(r_sph, 0.5) / R_SUN_KPC) ** -2.8 * 5e-3
    h_r, h_z = (_DENSITY if scales is None else scales)[pop]
    return np.exp(-(big_r - R_SUN_KPC) / h_r - np.abs(z) / h_z)


def disk_dust_profile(d_kpc_grid: np.ndarray, l_deg: np.ndarray, b_deg: np.ndarray) -> np.ndarray:
    """(n, m) the exponential dust disk's density shape (1 at the Sun) along sight lines at grid distances.

    Parameters
    ----------
    d_kpc_grid : (m,) distances, kpc.
    l_deg, b_deg : (n,) Galactic coordinates, deg.
    """
    big_r, z = galactocentric(np.asarray(d_kpc_grid)[None, :], l_deg, b_deg)
    return np.exp(-(big_r - R_SUN_KPC) / DUST_H_R - np.abs(z) / DUST_H_Z)


def dust_column(d_kpc_grid: np.ndarray, l_deg: np.ndarray, b_deg: np.ndarray, clump: np.ndarray) -> np.ndarray:
    """E(d) along sight lines: the cumulative integral of the 3D dust density.

    Parameters
    ----------
    d_kpc_grid : (m,) distances, kpc, increasing from 0.
    l_deg, b_deg : (n,) Galactic coordinates, deg.
    clump : (n,) multiplicative clumpiness of each sight line.

    Returns
    -------
    (n, m) E in mag at each grid distance.
    """
    rho = DUST_E_PER_KPC * disk_dust_profile(d_kpc_grid, l_deg, b_deg) * clump[:, None]
    return cumulative_trapezoid(rho, d_kpc_grid, axis=1, initial=0.0)


def draw_params(rng: np.random.Generator, pop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teff [K], [Fe/H] [dex], logg [dex] of stars of the given populations, each (n,)."""
    return draw_params_weighted(rng, pop, IMF_ALPHA, GIANT_GAMMA)[:3]


#: Slope of the disks' mass function, dN/dM ~ M^-alpha over 0.35..1.5 (thin) or 0.35..1.1 (thick) Msun.
IMF_ALPHA = 2.3
#: Giant branch: logg = 3.6 - 2.8 u^GIANT_GAMMA, u uniform (more giants near the base of the branch).
GIANT_GAMMA = 0.7


def _ln_power_law_pdf(mass: np.ndarray, alpha: float, lo: float, hi: float) -> np.ndarray:
    """ln of the normalised pdf M^-alpha on [lo, hi] (alpha != 1)."""
    norm = (hi ** (1 - alpha) - lo ** (1 - alpha)) / (1 - alpha)
    return -alpha * np.log(mass) - np.log(norm)


def draw_params_weighted(
    rng: np.random.Generator, pop: np.ndarray, imf_alpha: float, giant_gamma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """As :func:`draw_params`, with proposal distributions: the disks' masses from slope ``imf_alpha``
    (instead of :data:`IMF_ALPHA`) and the giants' branch position with ``giant_gamma`` (instead of
    :data:`GIANT_GAMMA`).

    Returns
    -------
    teff, feh, logg : (n,) K, dex, dex
    ln_w : (n,) ln of the importance weight p / q that restores :func:`draw_params`'s distributions
        (0 for the other populations).
    """
    n = pop.size
    teff, feh, logg, ln_w = np.empty(n), np.empty(n), np.empty(n), np.zeros(n)
    for name in POPULATION_FRACTIONS:
        m = pop == name
        k = int(m.sum())
        if not k:
            continue
        if name in ("thin_disk", "thick_disk"):
            mu, sd = (-0.05, 0.2) if name == "thin_disk" else (-0.6, 0.3)
            fe = np.clip(rng.normal(mu, sd, k), -2.5, 0.5)
            # mass from a Kroupa-like slope over 0.35..1.5 Msun, age-dependent expansion
            alpha = imf_alpha
            u = rng.uniform(0.0, 1.0, k)
            m_hi = 1.5 if name == "thin_disk" else 1.1
            lo, hi = 0.35 ** (1 - alpha), m_hi ** (1 - alpha)
            mass = (lo + u * (hi - lo)) ** (1.0 / (1 - alpha))
            ln_w[m] = _ln_power_law_pdf(mass, IMF_ALPHA, 0.35, m_hi) - _ln_power_law_pdf(mass, alpha, 0.35, m_hi)
            evol = rng.uniform(0.0, 1.0, k) ** 2
            radius = mass**0.85 * (1.0 + 0.6 * evol * (mass > 0.8))
            te = 5772.0 * mass**0.6 * (1.0 - 0.05 * fe) / (1.0 + 0.08 * evol)
            lg = 4.44 + np.log10(mass) - 2.0 * np.log10(radius)
        elif name == "halo":
            fe = np.clip(rng.normal(-1.5, 0.5, k), -3.0, -0.3)
            giant = rng.uniform(0.0, 1.0, k) < 0.4
            lg = np.where(giant, rng.uniform(1.0, 3.5, k), rng.uniform(3.9, 4.6, k))
            te = np.where(
                giant,
                4900.0 + 280.0 * (lg - 2.5) - 150.0 * fe,
                6300.0 - 600.0 * (lg - 4.1) - 100.0 * fe - np.abs(rng.normal(0.0, 400.0, k)),
            )
        elif name == "giant":
            fe = np.clip(rng.normal(-0.25, 0.3, k), -2.5, 0.5)
            x = rng.uniform(0.0, 1.0, k) ** giant_gamma
            lg = 3.6 - 2.8 * x
            # x = u^gamma has pdf x^(1/gamma - 1) / gamma on (0, 1)
            ln_w[m] = (1.0 / GIANT_GAMMA - 1.0 / giant_gamma) * np.log(np.maximum(x, 1e-300)) + np.log(
                giant_gamma / GIANT_GAMMA)
            te = 4750.0 + 280.0 * (lg - 2.5) - 180.0 * fe
        elif name == "red_clump":
            fe = np.clip(rng.normal(-0.1, 0.2, k), -1.0, 0.5)
            lg = rng.normal(2.45, 0.08, k)
            te = 4700.0 - 250.0 * fe
        else:  # hot
            fe = np.clip(rng.normal(0.0, 0.15, k), -0.6, 0.4)
            te = np.exp(rng.uniform(np.log(7000.0), np.log(25000.0), k))
            lg = rng.uniform(3.7, 4.4, k)
        te = te + rng.normal(0.0, 60.0, k)
        teff[m], feh[m], logg[m] = te, fe, lg
    return np.clip(teff, 3100.0, 30000.0), feh, np.clip(logg, 0.5, 5.2), ln_w


def draw_population(
    rng: np.random.Generator,
    n: int,
    *,
    abs_g: Callable[[np.ndarray], np.ndarray],
    n_fields: int,
    field_radius_deg: float,
    g_limit: float,
    r_v_mean: float,
    r_v_scatter: float,
) -> Population:
    """Draw ``n`` stars: parameters, sight lines, distances and reddening.

    Parameters
    ----------
    rng : numpy Generator
    n : int
    abs_g : callable ((n, 3) theta -> (n,) G magnitude at 1 kpc without dust)
        Used to cut each star's distance range at the magnitude limit.
    n_fields, field_radius_deg : sky fields the stars fall in.
    g_limit : float, G magnitude limit (approximate: dust is added after).
    r_v_mean, r_v_scatter : R_V of each sight line ~ N(mean, scatter), clipped to 2.3..5.6.

    Returns
    -------
    Population
    """
    names = np.array(list(POPULATION_FRACTIONS))
    probs = np.array(list(POPULATION_FRACTIONS.values()))
    pop = names[rng.choice(names.size, size=n, p=probs / probs.sum())]
    teff, feh, logg = draw_params(rng, pop)

    l0, b0 = field_centres(rng, n_fields)
    l, b, field = draw_in_fields(rng, n, l0, b0, field_radius_deg)
    clump_field = np.exp(rng.normal(0.0, 0.4, n_fields))
    clump = clump_field[field] * np.exp(rng.normal(0.0, 0.1, n))

    g1kpc = abs_g(np.stack([teff, feh, logg], axis=1))
    d_max = np.clip(10.0 ** ((g_limit - g1kpc) / 5.0), 0.03, 40.0)  # kpc
    u_dist = rng.uniform(0.0, 1.0, n)
    d_kpc, e = np.empty(n), np.empty(n)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(n, lo + _CHUNK))
        d_kpc[sl] = _draw_distance(pop[sl], l[sl], b[sl], d_max[sl], u_dist[sl])
        e[sl] = _interp_rows(d_kpc[sl], DUST_GRID_KPC, dust_column(DUST_GRID_KPC, l[sl], b[sl], clump[sl]))
    e = e * np.exp(rng.normal(0.0, 0.05, n)) + 0.002  # small per-star structure; E > 0 always
    r_v = np.clip(rng.normal(r_v_mean, r_v_scatter, n), 2.3, 5.6) if r_v_scatter > 0 else np.full(n, float(r_v_mean))

    ra, dec = galactic_to_icrs(l, b)
    return Population(teff, feh, logg, pop, l, b, ra, dec, d_kpc * 1000.0, e, r_v, field)


def _draw_distance(pop, l, b, d_max, u):
    """Inverse-CDF draw of d (kpc) from rho(d) d^2 on [0.01, d_max] along each sight line."""
    n = pop.size
    frac = np.linspace(0.0, 1.0, 160)
    d_grid = 0.01 + (d_max[:, None] - 0.01) * frac[None, :] ** 1.5
    big_r, z = galactocentric(d_grid, l, b)
    dens = np.empty_like(d_grid)
    for name in POPULATION_FRACTIONS:
        sel = pop == name
        if sel.any():
            dens[sel] = stellar_density(name, big_r[sel], z[sel])
    w = dens * d_grid**2
    cdf = np.concatenate([np.zeros((n, 1)), np.cumsum(0.5 * (w[:, 1:] + w[:, :-1]) * np.diff(d_grid, axis=1), axis=1)], axis=1)
    cdf /= cdf[:, -1:]
    i = np.arange(n)
    idx = np.clip((cdf < u[:, None]).sum(axis=1), 1, frac.size - 1)
    c0, c1 = cdf[i, idx - 1], cdf[i, idx]
    t = np.clip((u - c0) / np.maximum(c1 - c0, 1e-300), 0.0, 1.0)
    return d_grid[i, idx - 1] + t * (d_grid[i, idx] - d_grid[i, idx - 1])


def _interp_rows(x: np.ndarray, grid: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Linear interpolation of each row of ``rows`` (n, m) on the common ``grid`` (m,) at x (n,)."""
    j = np.clip(np.searchsorted(grid, x) - 1, 0, grid.size - 2)
    t = (x - grid[j]) / (grid[j + 1] - grid[j])
    i = np.arange(x.size)
    return rows[i, j] * (1.0 - t) + rows[i, j + 1] * t


def galactic_to_icrs(l_deg: np.ndarray, b_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(l=l_deg * u.deg, b=b_deg * u.deg, frame="galactic").icrs
    return np.asarray(c.ra.deg, float), np.asarray(c.dec.deg, float)

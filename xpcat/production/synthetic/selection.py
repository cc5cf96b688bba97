"""Magnitude-limited selection of the realistic synthetic universe: stars kept by their reddened G.

The legacy universe (:func:`xpcat.production.synthetic.population.draw_population`)
draws each star's type first, with fixed fractions, and then a distance up to
the dust-free magnitude limit: faint types are never thinned out. Here the
selection is made the way a survey makes it:

1. A pool of ``POOL_FACTOR x n`` candidates is drawn: population (with the
   proposal fractions :data:`PROPOSAL_FRACTIONS`), parameters, sight line,
   R_V, per-star dust clumpiness.
2. For every candidate, along a distance grid out to the dust-free limit,
   the reddened G is ``G(d) = G_1kpc + 5 log10(d / kpc) + A_G(E(d))``,
   with ``A_G`` from the star's own SED at its own R_V (quadratic in E,
   fitted at E = 0.5 and 2) and E the dust column of the sight line
   (:func:`xpcat.production.synthetic.dust.dust_column`: the real SFD column
   spread along the line by a disk with a Local Bubble). The
   star can be seen out to the distance ``d_lim`` where ``G(d_lim) = g_limit``.
3. Each candidate's weight is the number of such stars a survey sees:
   ``w = (n_pop / q_pop) \\int_0^{d_lim} rho_pop(d) d^2 dd`` (local density
   weight over proposal fraction, times the effective volume of its sight
   line). Sight lines near the plane see more stars, so the sky density and
   the E distribution follow.
4. ``n`` candidates are kept by weighted sampling with replacement
   (probability ``w / sum w``, each weight capped at :data:`MAX_COPIES` expected copies; a
   candidate picked again gets its parameters jittered by 0.3 % in Teff and
   0.01 dex in [Fe/H] and logg), and each kept star gets a distance drawn
   from ``rho d^2`` on ``[0, d_lim]`` and the E of its sight line there. Its reddened G is then below ``g_limit`` by
   construction (the observed G adds mmag noise and, for binaries and
   crowded sources, extra light).

The local density weights :data:`LOCAL_DENSITY_WEIGHTS` are tuned so that the
mix at G < 17.65 matches Gaia's XP sample (``tests/production/synthetic/test_realistic_universe.py``);
the dust columns and the sky density are compared with real references (SFD and
Planck13 maps, APOGEE AK_TARG, DR3 counts at G < 10) in
``tests/production/synthetic/test_sky_dust_reference.py``
(``tests/data/sky_dust_reference/PROVENANCE.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from xpcat.errors import InputError
from xpcat.production.synthetic import dust
from xpcat.production.synthetic import population as pop_mod

__all__ = [
    "DISK_SCALES",
    "LOCAL_DENSITY_WEIGHTS",
    "POOL_FACTOR",
    "PROPOSAL_FRACTIONS",
    "density_weights",
    "draw_selected_population",
    "hot_ln_weight",
]

logger = logging.getLogger(__name__)

#: Relative number density of each population at the Sun (stars per unit volume, arbitrary unit).
#: The halo's density law already carries its own 5e-3 normalisation (population.py).
LOCAL_DENSITY_WEIGHTS: dict[str, float] = {
    "thin_disk": 1.0,
    "thick_disk": 0.08,
    "halo": 0.014,
    "giant": 0.009,
    "red_clump": 0.003,
    "hot": 0.035,
}
#: (scale length, scale height) in kpc of the disk populations. As the legacy universe's, except the
#: giants and the red clump: thin-disk scale height 0.30 kpc (Juric et al. 2008, ApJ 673, 864) instead
#: of 0.45 and 0.35 kpc; with 0.45 kpc the fraction of G < 10 stars at |b| < 10 deg was 0.24-0.28,
#: against 0.333 in Gaia DR3 (``tests/data/sky_dust_reference``), now 0.31-0.33.
DISK_SCALES: dict[str, tuple[float, float]] = {
    "thin_disk": (2.6, 0.30),
    "thick_disk": (2.0, 0.90),
    "giant": (2.6, 0.30),
    "red_clump": (2.6, 0.30),
    "hot": (3.0, 0.10),
}
#: Proposal fractions of the candidate pool (importance sampling; close to the selected mix).
PROPOSAL_FRACTIONS: dict[str, float] = {
    "thin_disk": 0.45,
    "thick_disk": 0.10,
    "halo": 0.05,
    "giant": 0.30,
    "red_clump": 0.05,
    "hot": 0.05,
}
#: Slope of the disks' proposal mass function (flatter than the IMF: bright dwarfs are seen in a larger volume).
PROPOSAL_IMF_ALPHA = -1.0
#: The giants' proposal branch exponent (smaller: more luminous giants, which are seen further).
PROPOSAL_GIANT_GAMMA = 0.35
#: Slope of the hot population's Teff distribution, dN/dln Teff ~ Teff^-slope.
HOT_TEFF_SLOPE = 2.17
#: Most copies of one candidate expected among the kept stars: its weight is capped there (the
#: most luminous candidates, B stars and bright giants in the plane, are thinned; the local density
#: weights are tuned with the cap in place).
MAX_COPIES = 2.0
#: Candidates drawn per kept star.
POOL_FACTOR = 3
_N_GRID = 160
_CHUNK = 20000
_BISECTIONS = 30
_D_MIN_KPC = 0.002
_D_MAX_KPC = 40.0
#: E of every sight line's first parsecs, mag (E > 0 always, as in the legacy universe).
_E_FLOOR = 0.002
#: Jitter of a candidate picked more than once: ln Teff and [Fe/H], logg [dex].
_JITTER_LN_TEFF = 0.003
_JITTER_DEX = 0.01


def density_weights(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Local density weights with ``overrides`` applied.

    Raises
    ------
    InputError
        An unknown population name, or a negative or non-finite weight, or all weights zero.
    """
    out = dict(LOCAL_DENSITY_WEIGHTS)
    for name, value in (overrides or {}).items():
        if name not in out:
            raise InputError(f"[simulate] population_weights: unknown population {name!r}; "
                             f"known: {', '.join(sorted(out))}")
        v = float(value)
        if not np.isfinite(v) or v < 0.0:
            raise InputError(f"[simulate] population_weights.{name} = {value!r}: must be a finite number >= 0")
        out[name] = v
    if not any(v > 0.0 for v in out.values()):
        raise InputError("[simulate] population_weights: every population has weight 0")
    return out


def hot_ln_weight(teff: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """ln weight turning the hot population's log-uniform Teff (7000..25000 K) into an IMF-like one.

    dN/dln Teff ~ Teff^-HOT_TEFF_SLOPE (dN/dM ~ M^-2.3 with Teff ~ M^0.6 on the upper main
    sequence gives 1.3 / 0.6 = 2.17), normalised over the same range; 0 for other populations.
    """
    lo, hi = np.log(7000.0), np.log(25000.0)
    k = HOT_TEFF_SLOPE
    norm = (np.exp(-k * lo) - np.exp(-k * hi)) / k / (hi - lo)
    ln_t = np.log(np.clip(teff, 7000.0, 25000.0))
    return np.where(pop == "hot", -k * ln_t - np.log(norm), 0.0)


def _column_at(column: np.ndarray, d_kpc: np.ndarray) -> np.ndarray:
    """E of each row's dust column (on :data:`population.DUST_GRID_KPC`) at distances (m,) or (m, k) kpc."""
    grid = pop_mod.DUST_GRID_KPC
    d2 = d_kpc if d_kpc.ndim == 2 else d_kpc[:, None]
    j = np.clip(np.searchsorted(grid, d2) - 1, 0, grid.size - 2)
    t = np.clip((d2 - grid[j]) / (grid[j + 1] - grid[j]), 0.0, 1.0)
    rows = np.arange(column.shape[0])[:, None]
    e = column[rows, j] * (1.0 - t) + column[rows, j + 1] * t + _E_FLOOR
    return e if d_kpc.ndim == 2 else e[:, 0]


def _seen_volume(
    pop: np.ndarray,
    l: np.ndarray,
    b: np.ndarray,
    clump: np.ndarray,
    g0: np.ndarray,
    a_g: np.ndarray,
    g_limit: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distance grid out to the reddened limit, E on it, cumulative seen volume and its total, per candidate.

    Parameters
    ----------
    pop : (m,) population names; l, b : (m,) deg; clump : (m,) dust clumpiness
    g0 : (m,) unreddened G at 1 kpc, mag
    a_g : (m, 2) A_G = a_g[:, 0] E + a_g[:, 1] E^2, mag
    g_limit : float, mag

    Returns
    -------
    d_grid : (m, k) kpc, from :data:`_D_MIN_KPC` to d_lim; e_grid : (m, k) mag;
    cdf : (m, k) kpc^3 (density-weighted, unnormalised); total : (m,) kpc^3 (0: never brighter than the limit).
    """
    m = pop.size
    column = dust.dust_column(pop_mod.DUST_GRID_KPC, l, b, clump)

    def g_at(d: np.ndarray) -> np.ndarray:
        e = _column_at(column, d)
        return g0 + 5.0 * np.log10(d) + a_g[:, 0] * e + a_g[:, 1] * e**2

    # G(d) increases with d: bisection in ln d for G(d_lim) = g_limit
    lo = np.full(m, np.log(_D_MIN_KPC))
    hi = np.log(np.clip(10.0 ** ((g_limit - g0) / 5.0), _D_MIN_KPC, _D_MAX_KPC))
    visible = g_at(np.exp(lo)) < g_limit
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        brighter = g_at(np.exp(mid)) < g_limit
        lo = np.where(brighter, mid, lo)
        hi = np.where(brighter, hi, mid)
    d_lim = np.where(visible, np.exp(lo), _D_MIN_KPC)
    frac = np.linspace(0.0, 1.0, _N_GRID)
    d_grid = _D_MIN_KPC + (d_lim[:, None] - _D_MIN_KPC) * frac[None, :] ** 1.5
    e_grid = _column_at(column, d_grid)
    big_r, z = pop_mod.galactocentric(d_grid, l, b)
    dens = np.empty_like(d_grid)
    for name in pop_mod.POPULATION_FRACTIONS:
        sel = pop == name
        if sel.any():
            dens[sel] = pop_mod.stellar_density(name, big_r[sel], z[sel], DISK_SCALES)
    w = dens * d_grid**2
    steps = 0.5 * (w[:, 1:] + w[:, :-1]) * np.diff(d_grid, axis=1)
    cdf = np.concatenate([np.zeros((m, 1)), np.cumsum(steps, axis=1)], axis=1)
    return d_grid, e_grid, cdf, np.where(visible, cdf[:, -1], 0.0)


def _draw_from_cdf(d_grid: np.ndarray, e_grid: np.ndarray, cdf: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-CDF distance (kpc) and E at it, per row."""
    n = u.size
    target = u * cdf[:, -1]
    idx = np.clip((cdf < target[:, None]).sum(axis=1), 1, cdf.shape[1] - 1)
    i = np.arange(n)
    c0, c1 = cdf[i, idx - 1], cdf[i, idx]
    t = np.clip((target - c0) / np.maximum(c1 - c0, 1e-300), 0.0, 1.0)
    d = d_grid[i, idx - 1] + t * (d_grid[i, idx] - d_grid[i, idx - 1])
    e = e_grid[i, idx - 1] + t * (e_grid[i, idx] - e_grid[i, idx - 1])
    return d, e


def draw_selected_population(
    rng: np.random.Generator,
    n: int,
    *,
    g_and_extinction: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    n_fields: int,
    field_radius_deg: float,
    g_limit: float,
    r_v_mean: float,
    r_v_scatter: float,
    weights: Mapping[str, float] | None = None,
) -> pop_mod.Population:
    """Draw ``n`` stars kept by their reddened G (see the module docstring).

    Parameters
    ----------
    rng : numpy Generator
    n : int, stars to keep
    g_and_extinction : callable ((m, 3) theta, (m,) R_V) -> (g0 (m,), a_g (m, 2))
        Unreddened G at 1 kpc [mag] and the quadratic A_G(E) coefficients.
    n_fields, field_radius_deg : sky fields
    g_limit : float, G limit on the reddened G, mag
    r_v_mean, r_v_scatter : R_V per star ~ N(mean, scatter) clipped to 2.3..5.6
    weights : population -> local density weight overrides

    Returns
    -------
    Population (the same fields as the legacy draw).

    Raises
    ------
    InputError
        Unknown population names, or no candidate can be seen at ``g_limit``.
    """
    dens_w = density_weights(weights)
    names = np.array(list(PROPOSAL_FRACTIONS))
    q = np.array([PROPOSAL_FRACTIONS[k] for k in names])
    q = q / q.sum()
    m = POOL_FACTOR * n
    pop = names[rng.choice(names.size, size=m, p=q)]
    teff, feh, logg, ln_imf = pop_mod.draw_params_weighted(rng, pop, PROPOSAL_IMF_ALPHA, PROPOSAL_GIANT_GAMMA)
    l0, b0 = pop_mod.field_centres(rng, n_fields)
    l, b, field = pop_mod.draw_in_fields(rng, m, l0, b0, field_radius_deg)
    clump_field = np.exp(rng.normal(0.0, dust.CLUMP_LN_SIGMA, n_fields))
    clump = clump_field[field] * np.exp(rng.normal(0.0, dust.STAR_CLUMP_LN_SIGMA, m))
    r_v = np.clip(rng.normal(r_v_mean, r_v_scatter, m), 2.3, 5.6) if r_v_scatter > 0 else np.full(m, float(r_v_mean))
    theta = np.stack([teff, feh, logg], axis=1)
    g0, a_g = g_and_extinction(theta, r_v)
    ratio = np.array([dens_w[k] / PROPOSAL_FRACTIONS[k] for k in names])
    ratio_of = np.empty(m)
    for k, r in zip(names, ratio):
        ratio_of[pop == k] = r
    total = np.empty(m)
    for lo in range(0, m, _CHUNK):
        sl = slice(lo, min(m, lo + _CHUNK))
        total[sl] = _seen_volume(pop[sl], l[sl], b[sl], clump[sl], g0[sl], a_g[sl], g_limit)[3]
    w = total * ratio_of * np.exp(ln_imf + hot_ln_weight(teff, pop))
    positive = np.count_nonzero(w > 0.0)
    if positive < n:
        raise InputError(f"[simulate] g_limit = {g_limit}: only {positive} of {m} candidate stars can be seen "
                         f"(need {n}); no star or too few stars after selection")
    for _ in range(5):  # cap: no candidate is expected more than MAX_COPIES times
        w = np.minimum(w, MAX_COPIES * w.sum() / n)
    keep = np.sort(rng.choice(m, size=n, replace=True, p=w / w.sum()))
    repeat = np.r_[False, keep[1:] == keep[:-1]]
    logger.info("selection: %d stars from %d candidates (%d seen), %.1f %% repeated candidates (parameters jittered)",
                n, m, positive, 100.0 * np.mean(repeat))
    drawn = {"pop": pop, "l": l, "b": b, "clump": clump, "g0": g0, "field": field, "r_v": r_v,
             "teff": teff, "feh": feh, "logg": logg}
    sub = {k: v[keep] for k, v in drawn.items()}
    k_rep = int(np.count_nonzero(repeat))
    sub["teff"][repeat] *= np.exp(rng.normal(0.0, _JITTER_LN_TEFF, k_rep))
    sub["feh"][repeat] += rng.normal(0.0, _JITTER_DEX, k_rep)
    sub["logg"][repeat] += rng.normal(0.0, _JITTER_DEX, k_rep)
    a_g = a_g[keep]
    u = rng.uniform(0.0, 1.0, n)
    d_kpc, e = np.empty(n), np.empty(n)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(n, lo + _CHUNK))
        d_grid, e_grid, cdf, _ = _seen_volume(sub["pop"][sl], sub["l"][sl], sub["b"][sl], sub["clump"][sl],
                                              sub["g0"][sl], a_g[sl], g_limit)
        d_kpc[sl], e[sl] = _draw_from_cdf(d_grid, e_grid, cdf, u[sl])
    ra, dec = pop_mod.galactic_to_icrs(sub["l"], sub["b"])
    return pop_mod.Population(sub["teff"], sub["feh"], sub["logg"], sub["pop"], sub["l"], sub["b"], ra, dec,
                              d_kpc * 1000.0, e, sub["r_v"], sub["field"])

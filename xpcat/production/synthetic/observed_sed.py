"""The noiseless light of a synthetic star: truth SED, reddening and distance.

The truth SED (:mod:`xpcat.production.synthetic.truth_sed`) is evaluated on
the fine XP grid followed by the five NIR reference wavelengths, reddened with
G23 at the star's R_V and scaled by parallax^2. The universe
(:mod:`xpcat.production.synthetic.universe`) and its observation model
(:mod:`xpcat.production.synthetic.observe`) build every observable from these
arrays; :func:`noiseless_fluxes` gives the 66 fluxes of SPEC §1 exactly as the
universe computes them, for tests and the truth model's checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from xpcat.production.synthetic import truth_sed as truth_model
from xpcat.production.synthetic.truth_sed_empirical import batched_ln_sed

__all__ = ["SED_BLOCK", "abs_g_at_1kpc", "extinction_terms", "g_and_extinction_at_1kpc", "g_and_extinction_table", "ln_sed", "noiseless_fluxes", "observed_sed", "sed_grid"]

logger = logging.getLogger(__name__)

#: Stars per truth-SED evaluation (one JAX compilation per wavelength grid).
SED_BLOCK = 1000
_LN10 = float(np.log(10.0))


def sed_grid(proj: truth_model.ProjectionArrays) -> np.ndarray:
    """(n_fine + 5,) wavelengths, nm: the fine XP grid followed by the 5 NIR reference wavelengths."""
    return np.concatenate([proj.fine_wavelengths, truth_model.NIR_WAVELENGTHS_NM])


def ln_sed(theta: np.ndarray, wl: np.ndarray, sed: str = "physical") -> np.ndarray:
    """ln absolute SED, evaluated in blocks of :data:`SED_BLOCK` stars (the last one padded).

    Parameters
    ----------
    theta : (n, 3) Teff [K], [Fe/H] [dex], logg [dex]
    wl : (m,) nm
    sed : the truth SED, ``physical`` (legacy universe) or ``empirical`` (realistic universe;
        :mod:`~xpcat.production.synthetic.truth_sed_empirical`)

    Returns
    -------
    (n, m) float64, ln of the flux at parallax 1 mas in the internal unit (1e-18 W m^-2 nm^-1).
    """
    n = theta.shape[0]
    out = np.empty((n, wl.size))
    for lo in range(0, n, SED_BLOCK):
        blk = theta[lo : lo + SED_BLOCK]
        short = SED_BLOCK - blk.shape[0]
        pad = np.concatenate([blk, np.repeat(blk[-1:], short, axis=0)]) if short else blk
        out[lo : lo + blk.shape[0]] = batched_ln_sed(pad, wl, sed)[: blk.shape[0]]
    return out


def extinction_terms(proj: truth_model.ProjectionArrays) -> tuple[np.ndarray, np.ndarray]:
    """G23's ``a`` and ``b`` (each (n_fine + 5,)) on :func:`sed_grid`."""
    return truth_model.extinction_coefficients(sed_grid(proj))


def observed_sed(
    ln_sed_abs: np.ndarray, parallax: np.ndarray, e: np.ndarray, r_v: np.ndarray, ext_a: np.ndarray, ext_b: np.ndarray
) -> np.ndarray:
    """Reddened flux at the star's parallax.

    Parameters
    ----------
    ln_sed_abs : (n, m) from :func:`ln_sed`
    parallax : (n,) mas
    e : (n,) mag, E of the universe's law
    r_v : (n,) R_V
    ext_a, ext_b : (m,) from :func:`extinction_terms`

    Returns
    -------
    (n, m) float64, internal unit (1e-18 W m^-2 nm^-1).
    """
    a_e = truth_model.a_over_e(ext_a, ext_b, r_v)  # (n, m) mag per unit E
    return np.exp(ln_sed_abs + 2.0 * np.log(parallax)[:, None] - 0.4 * _LN10 * e[:, None] * a_e)


def noiseless_fluxes(
    theta: np.ndarray,
    parallax: np.ndarray,
    e: np.ndarray,
    r_v: np.ndarray,
    projection: truth_model.ProjectionArrays | None = None,
    sed: str = "physical",
) -> np.ndarray:
    """The 66 noiseless fluxes of single stars exactly as the universe computes them.

    Parameters
    ----------
    theta : (n, 3) Teff [K], [Fe/H], logg
    parallax : (n,) mas
    e : (n,) mag (E of the universe's law)
    r_v : (n,) R_V
    sed : the truth SED (:func:`ln_sed`)

    Returns
    -------
    (n, 66) float64, internal unit (1e-18 W m^-2 nm^-1).
    """
    proj = truth_model.projection_arrays() if projection is None else projection
    ext_a, ext_b = extinction_terms(proj)
    obs = observed_sed(ln_sed(np.asarray(theta, float), sed_grid(proj), sed), np.asarray(parallax, float), np.asarray(e, float),
                       np.asarray(r_v, float), ext_a, ext_b)
    nf = proj.fine_wavelengths.size
    return np.concatenate([obs[:, :nf] @ proj.to_xp, obs[:, nf:]], axis=1)


def abs_g_at_1kpc(proj: truth_model.ProjectionArrays, sed: str = "physical") -> Callable[[np.ndarray], np.ndarray]:
    """A function ``theta (n, 3) -> (n,)`` G magnitude at parallax 1 mas, unreddened.

    Uses every 5th fine sample, enough for the universe's magnitude limit (~0.01 mag).
    """
    def g_at_1kpc(theta: np.ndarray) -> np.ndarray:
        wl = proj.fine_wavelengths[::5]
        weights = 5.0 * proj.to_phot[::5, 0] * truth_model.FLUX_UNIT_W_M2_NM
        flux = np.exp(ln_sed(theta, wl, sed)) @ weights
        return -2.5 * np.log10(np.maximum(flux, 1e-40)) + proj.phot_zero_points[0]

    return g_at_1kpc


def g_and_extinction_at_1kpc(
    proj: truth_model.ProjectionArrays, ext: tuple[np.ndarray, np.ndarray], sed: str = "physical"
) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A function ``(theta (n, 3), r_v (n,)) -> (g0 (n,), a_g (n, 2))`` for the truth SED ``sed``.

    ``g0`` is the unreddened G at parallax 1 mas [mag]; ``A_G(E) = a_g[:, 0] E + a_g[:, 1] E^2``
    [mag] is the G-band extinction of the star's own SED at its R_V, exact at E = 0, 0.5 and 2
    (E = E(B-V) of the universe's law). Every fine sample: the projection's rows are not smooth,
    so :func:`abs_g_at_1kpc`'s every-5th-sample sum is biased by 0.1-0.6 mag (kept for the legacy universe).
    """
    nf = proj.fine_wavelengths.size

    def g_and_ext(theta: np.ndarray, r_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        weights = proj.to_phot[:, 0] * truth_model.FLUX_UNIT_W_M2_NM
        a_e = truth_model.a_over_e(ext[0][:nf], ext[1][:nf], r_v)  # (n, m) mag per unit E
        # on the universe's own grid (one JAX compilation serves both), NIR wavelengths dropped
        sed_fine = np.exp(ln_sed(theta, sed_grid(proj), sed)[:, :nf])
        mags = []
        for e in (0.0, 0.5, 2.0):
            flux = (sed_fine * 10.0 ** (-0.4 * e * a_e)) @ weights
            mags.append(-2.5 * np.log10(np.maximum(flux, 1e-40)))
        a05, a2 = mags[1] - mags[0], mags[2] - mags[0]
        quad = (a2 - 4.0 * a05) / 3.0
        return mags[0] + proj.phot_zero_points[0], np.stack([2.0 * a05 - 0.5 * quad, quad], axis=1)

    return g_and_ext


#: Nodes of :func:`g_and_extinction_table`: Teff [K] (geometric), [Fe/H], logg.
_TABLE_TEFF = np.geomspace(3000.0, 31000.0, 48)
_TABLE_FEH = np.linspace(-3.1, 0.6, 8)
_TABLE_LOGG = np.linspace(0.4, 5.3, 15)


def g_and_extinction_table(
    proj: truth_model.ProjectionArrays, ext: tuple[np.ndarray, np.ndarray], r_v_mean: float, sed: str = "physical"
) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """:func:`g_and_extinction_at_1kpc` tabulated on a (ln Teff, [Fe/H], logg) grid, for large candidate pools.

    The exact function is evaluated once at every node and at R_V = ``r_v_mean`` +- 0.5, then
    interpolated trilinearly in (ln Teff, [Fe/H], logg) and linearly in R_V (agreement with the
    exact function: ~0.01 mag in G, see the tests). Same call signature and return values.
    """
    from scipy.interpolate import RegularGridInterpolator

    exact = g_and_extinction_at_1kpc(proj, ext, sed)
    grid = np.stack(np.meshgrid(_TABLE_TEFF, _TABLE_FEH, _TABLE_LOGG, indexing="ij"), axis=-1).reshape(-1, 3)
    r_lo, r_hi = max(2.3, r_v_mean - 0.5), min(5.6, r_v_mean + 0.5)
    g0, a_lo = exact(grid, np.full(grid.shape[0], r_lo))
    _, a_hi = exact(grid, np.full(grid.shape[0], r_hi))
    shape = (_TABLE_TEFF.size, _TABLE_FEH.size, _TABLE_LOGG.size)
    values = np.concatenate([g0[:, None], a_lo, a_hi], axis=1).reshape(*shape, 5)
    interp = RegularGridInterpolator((np.log(_TABLE_TEFF), _TABLE_FEH, _TABLE_LOGG), values,
                                     bounds_error=False, fill_value=None)

    def g_and_ext(theta: np.ndarray, r_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = np.stack([np.log(theta[:, 0]), theta[:, 1], theta[:, 2]], axis=1)
        v = interp(pts)
        t = ((np.asarray(r_v, float) - r_lo) / (r_hi - r_lo))[:, None]
        return v[:, 0], v[:, 1:3] * (1.0 - t) + v[:, 3:5] * t

    return g_and_ext

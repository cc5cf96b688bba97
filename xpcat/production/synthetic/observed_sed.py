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

__all__ = ["SED_BLOCK", "sed_grid", "ln_sed", "extinction_terms", "observed_sed", "noiseless_fluxes", "abs_g_at_1kpc"]

logger = logging.getLogger(__name__)

#: Stars per truth-SED evaluation (one JAX compilation per wavelength grid).
SED_BLOCK = 1000
_LN10 = float(np.log(10.0))


def sed_grid(proj: truth_model.ProjectionArrays) -> np.ndarray:
    """(n_fine + 5,) wavelengths, nm: the fine XP grid followed by the 5 NIR reference wavelengths."""
    return np.concatenate([proj.fine_wavelengths, truth_model.NIR_WAVELENGTHS_NM])


def ln_sed(theta: np.ndarray, wl: np.ndarray) -> np.ndarray:
    """ln absolute SED, evaluated in blocks of :data:`SED_BLOCK` stars (the last one padded).

    Parameters
    ----------
    theta : (n, 3) Teff [K], [Fe/H] [dex], logg [dex]
    wl : (m,) nm

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
        out[lo : lo + blk.shape[0]] = truth_model.batched_ln_sed(pad, wl)[: blk.shape[0]]
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
    ext_a, ext_b = extinction_terms(proj)
    obs = observed_sed(ln_sed(np.asarray(theta, float), sed_grid(proj)), np.asarray(parallax, float), np.asarray(e, float),
                       np.asarray(r_v, float), ext_a, ext_b)
    nf = proj.fine_wavelengths.size
    return np.concatenate([obs[:, :nf] @ proj.to_xp, obs[:, nf:]], axis=1)


def abs_g_at_1kpc(proj: truth_model.ProjectionArrays) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``theta (n, 3) -> (n,)`` G magnitude at parallax 1 mas, unreddened.

    Uses every 5th fine sample, enough for the universe's magnitude limit (~0.01 mag).
    """
    def g_at_1kpc(theta: np.ndarray) -> np.ndarray:
        wl = proj.fine_wavelengths[::5]
        weights = 5.0 * proj.to_phot[::5, 0] * truth_model.FLUX_UNIT_W_M2_NM
        flux = np.exp(ln_sed(theta, wl)) @ weights
        return -2.5 * np.log10(np.maximum(flux, 1e-40)) + proj.phot_zero_points[0]

    return g_at_1kpc

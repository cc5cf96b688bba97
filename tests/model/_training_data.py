"""Synthetic training arrays from a known forward model (truth SED or a teacher network).

Used by the training tests: stars on a rough HR diagram, Eq. 2-like covariances
(diagonal noise + 0.5 % correlated), labels with errors, Gaia-like parallaxes,
Bayestar-like E, and optional near-equal-mass binaries (flux x 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.model import forward as fw
from xpcat.model.training import TrainingData

IU = np.triu_indices(66)
WL = np.concatenate([np.arange(392.0, 993.0, 10.0), [1235.0, 1662.0, 2159.0, 3352.6, 4602.8]])


def teacher_model() -> fw.ForwardModel:
    """A random smooth 'teacher' network (2 x 8 tanh) with a known extinction curve R = 3.1 (lambda / 550 nm)^-1.3."""
    scaler = {"mean": np.array([5500.0, -0.2, 3.8], np.float32), "scale": np.array([700.0, 0.3, 1.0], np.float32)}
    params = fw.init_params(jax.random.PRNGKey(11), n_hidden=2, width=8,
                            out_bias=np.log(60.0) - 1e-3 * (WL - 600.0) ** 2 / 1000.0,
                            ln_r=np.log(3.1 * (WL / 550.0) ** -1.3))
    params["layers"] = [{k: v * 0.3 for k, v in layer.items()} for layer in params["layers"]]
    return fw.ForwardModel(params, scaler, "tanh")


def draw_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    giant = rng.random(n) < 0.3
    teff = np.where(giant, rng.uniform(4100, 5200, n), rng.uniform(4300, 6800, n))
    logg = np.where(giant, 1.6 + (teff - 4100) / 1100 * 1.6, 4.65 - (teff - 4300) / 2500 * 0.6)
    logg = logg + rng.normal(0, np.where(giant, 0.15, 0.08))
    feh = np.clip(rng.normal(-0.2, 0.3, n), -1.5, 0.5)
    return np.column_stack([teff, feh, logg])


def make_training_data(predict_flux, n: int, seed: int = 0, binary_fraction: float = 0.0, hq_fraction: float = 0.8):
    """Training arrays and the truth.

    Parameters
    ----------
    predict_flux : callable (theta (3,), ln_plx, ln_e) -> (66,), a JAX forward model.

    Returns
    -------
    data : TrainingData
    truth : dict with theta (n, 3), plx (n,), e (n,), is_binary (n,), f_true (n, 66) noiseless (singles' flux).
    """
    rng = np.random.default_rng(seed)
    theta = draw_labels(rng, n)
    dist = rng.uniform(0.3, 2.0, n)  # kpc
    plx = 1.0 / dist
    e = rng.exponential(0.3, n) + 0.01
    f = np.asarray(jax.jit(jax.vmap(predict_flux))(jnp.asarray(theta), jnp.asarray(np.log(plx)), jnp.asarray(np.log(e))),
                   dtype=np.float64)
    is_bin = rng.random(n) < binary_fraction
    f_obs_true = f * np.where(is_bin, 2.0, 1.0)[:, None]
    # covariance: per-sample noise (SNR 30..200) + Eq. 2 inflation terms
    snr = rng.uniform(30, 200, (n, 1))
    sig = f_obs_true / snr
    sig[:, 61:] = np.maximum(sig[:, 61:], 0.02 * f_obs_true[:, 61:])
    cov = np.einsum("ni,ij->nij", sig**2 + (0.005 * f_obs_true) ** 2, np.eye(66))
    xp = f_obs_true.copy()
    xp[:, 61:] = 0.0
    cov += 0.005**2 * np.einsum("ni,nj->nij", xp, xp)
    chol = np.linalg.cholesky(cov)
    flux = f_obs_true + np.einsum("nij,nj->ni", chol, rng.standard_normal((n, 66)))
    prec = np.linalg.inv(cov)
    prec = 0.5 * (prec + np.transpose(prec, (0, 2, 1)))
    U = np.transpose(np.linalg.cholesky(prec), (0, 2, 1))  # U^T U = prec
    hq = rng.random(n) < hq_fraction
    th_err = np.where(hq[:, None], [80.0, 0.08, 0.12], [300.0, 0.3, 0.35]) * rng.uniform(0.8, 1.2, (n, 3))
    plx_err = np.where(hq, plx / rng.uniform(12, 60, n), plx / rng.uniform(3.5, 9, n))
    e_err = np.where(hq, 0.04, 0.15) * np.ones(n)
    data = TrainingData(
        source_id=np.arange(n, dtype=np.int64) * 1000 + 7,
        flux=flux.astype(np.float32),
        flux_error=np.sqrt(np.einsum("nii->ni", cov)).astype(np.float32),
        factor_triu=U[:, IU[0], IU[1]].astype(np.float32),
        theta_obs=(theta + th_err * rng.standard_normal((n, 3))).astype(np.float32),
        theta_err=th_err.astype(np.float32),
        plx_obs=np.abs(plx + plx_err * rng.standard_normal(n)).astype(np.float32),
        plx_err=plx_err.astype(np.float32),
        e_obs=np.maximum(e + e_err * rng.standard_normal(n), 0.0).astype(np.float32),
        e_err=e_err.astype(np.float32),
        hq=hq,
    )
    return data, {"theta": theta, "plx": plx, "e": e, "is_binary": is_bin, "f_true": f}

"""Synthetic inference problems with known truth, for the inference tests and benchmark.

Stars are drawn from a forward model (the synthetic universe's truth model, or a
small network emulating it) with a known, correlated noise covariance shaped
like Eq. 2 (diagonal noise, 0.5 % diagonal and common-mode terms, 0.1 % BP / RP
common modes), so the whitening factor and
the truth are known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.model.prior import GMMParams, fit_gmm

N_FLUX = 66
N_XP = 61


def draw_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) Teff [K], [Fe/H], logg: a main sequence, a red-giant branch and some hot stars."""
    n_ms = int(n * 0.6)
    n_rg = int(n * 0.3)
    n_hot = n - n_ms - n_rg
    t_ms = rng.uniform(3800, 7500, n_ms)
    ms = np.column_stack([t_ms, rng.normal(-0.2, 0.7, n_ms), 4.5 - (t_ms - 4000) * 1.7e-4 + rng.normal(0, 0.35, n_ms)])
    t_rg = rng.uniform(3800, 5600, n_rg)
    rg = np.column_stack([t_rg, rng.normal(-0.3, 0.7, n_rg), 1.2 + (t_rg - 4000) * 1.6e-3 + rng.normal(0, 0.45, n_rg)])
    t_h = rng.uniform(6500, 10000, n_hot)
    hot = np.column_stack([t_h, rng.normal(-0.1, 0.6, n_hot), rng.uniform(3.0, 4.6, n_hot)])
    out = np.vstack([ms, rg, hot])
    return out[rng.permutation(n)]


@dataclass
class Problem:
    """A batch of synthetic stars with their truth.

    theta (n, 3) [K, dex, dex]; plx, e (n,); flux (n, 66); factor (n, 66, 66) upper R with
    R^T R = C^-1; flux_error (n, 66); plx_obs, plx_err (n,); f_true (n, 66).
    """

    theta: np.ndarray
    plx: np.ndarray
    e: np.ndarray
    flux: np.ndarray
    factor: np.ndarray
    flux_error: np.ndarray
    plx_obs: np.ndarray
    plx_err: np.ndarray
    f_true: np.ndarray


def make_gmm(seed: int = 0, n_labels: int = 4000, n_components: int = 16) -> tuple[GMMParams, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return fit_gmm(draw_labels(rng, n_labels), n_components=n_components, seed=seed), rng


def covariance(f: np.ndarray, rel: float, rng: np.random.Generator) -> np.ndarray:
    """(66, 66) covariance of one star's fluxes, shaped like Eq. 2.

    XP: diagonal relative noise ``rel`` plus a floor, the 0.5 % diagonal and common-mode
    terms and 0.1 % BP-only and RP-only common modes (BP: <= 632 nm, RP: >= 652 nm,
    the 642 nm sample split 1:7); NIR: 2 % diagonal.
    """
    fx = f[:N_XP]
    wl = np.arange(392, 993, 10)
    w_bp = np.where(wl <= 632, 1.0, np.where(wl == 642, 0.125, 0.0))
    f_bp, f_rp = fx * w_bp, fx * (1 - w_bp)
    c = np.zeros((N_FLUX, N_FLUX))
    floor = 0.05 * np.median(np.abs(fx)) * rel / 0.01
    c[:N_XP, :N_XP] = (np.diag((rel * fx) ** 2 + floor**2 + (0.005 * fx) ** 2) + 0.005**2 * np.outer(fx, fx)
                       + 0.001**2 * (np.outer(f_bp, f_bp) + np.outer(f_rp, f_rp)))
    nir = f[N_XP:]
    c[N_XP:, N_XP:] = np.diag((0.02 * nir) ** 2 + (0.3 * floor) ** 2)
    return c


def whitening_factor(c: np.ndarray) -> np.ndarray:
    """Upper-triangular R with R^T R = C^-1."""
    p = np.linalg.inv(c)
    p = 0.5 * (p + p.T)
    return np.linalg.cholesky(p).T


def make_problem(model, theta: np.ndarray, rng: np.random.Generator, *, plx_range=(0.3, 3.0),
                 e_range=(0.03, 1.5), rel_range=(0.004, 0.012), plx_err_range=(0.02, 0.1)) -> Problem:
    """Draw plx, E, noise levels and noisy fluxes for the given truth Theta."""
    n = theta.shape[0]
    plx = np.exp(rng.uniform(*np.log(plx_range), n))
    e = np.exp(rng.uniform(*np.log(e_range), n))
    pf = jax.jit(jax.vmap(model.predict_flux))
    f_true = np.asarray(pf(jnp.asarray(theta, jnp.float32), jnp.asarray(np.log(plx), jnp.float32),
                           jnp.asarray(np.log(e), jnp.float32)), dtype=np.float64)
    rel = np.exp(rng.uniform(*np.log(rel_range), n))
    flux = np.empty((n, N_FLUX))
    factor = np.empty((n, N_FLUX, N_FLUX))
    ferr = np.empty((n, N_FLUX))
    for i in range(n):
        c = covariance(f_true[i], rel[i], rng)
        flux[i] = f_true[i] + np.linalg.cholesky(c) @ rng.standard_normal(N_FLUX)
        factor[i] = whitening_factor(c)
        ferr[i] = np.sqrt(np.diag(c))
    plx_err = rng.uniform(*plx_err_range, n)
    plx_obs = plx + plx_err * rng.standard_normal(n)
    return Problem(theta=theta, plx=plx, e=e, flux=flux, factor=factor, flux_error=ferr, plx_obs=plx_obs,
                   plx_err=plx_err, f_true=f_true)


def emulator(truth_model, seed: int = 0, n_train: int = 6000, steps: int = 3000):
    """A paper-sized network (3 x 32, tanh) fitted to the truth model's ln absolute flux, with R = truth R.

    Returns an :class:`xpcat.model.forward.ForwardModel`; the emulator is then the exact model of
    stars drawn from it (used for speed: it costs what a trained artifact costs).
    """
    import optax

    from xpcat.model.forward import ForwardModel, init_params, ln_flux_abs_batch, make_scaler

    rng = np.random.default_rng(seed)
    theta = draw_labels(rng, n_train)
    y = jnp.asarray(np.asarray(jax.jit(jax.vmap(truth_model.ln_flux_abs))(jnp.asarray(theta, jnp.float32))))
    scaler = make_scaler(theta)
    params = init_params(jax.random.PRNGKey(seed), out_bias=np.asarray(y.mean(0)),
                         ln_r=np.log(np.asarray(truth_model.R)))
    t = jnp.asarray(theta, jnp.float32)
    opt = optax.adam(optax.exponential_decay(3e-3, steps // 3, 0.3))
    layers = params["layers"]
    state = opt.init(layers)

    def loss(layers):
        pred = ln_flux_abs_batch({"layers": layers, "ln_R": params["ln_R"]}, scaler, t)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def run(layers, state):
        def step(_, c):
            layers, state = c
            g = jax.grad(loss)(layers)
            upd, state = opt.update(g, state)
            return optax.apply_updates(layers, upd), state

        return jax.lax.fori_loop(0, steps, step, (layers, state))

    layers, _ = run(layers, state)
    return ForwardModel({"layers": layers, "ln_R": params["ln_R"]}, scaler, "tanh")

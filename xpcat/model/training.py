"""Training losses and jitted steps of Sec. 3.2 (Eqs. 12-14).

The phases, self-cleaning and checkpoints of Table 1 are in
:mod:`xpcat.model.training_phases`; the training stars' arrays
(:class:`~xpcat.model.training_data.TrainingData`) and variables are in
:mod:`xpcat.model.training_data` (re-exported here); this module holds the
losses and the compiled steps the phases use.

Star variables
--------------
Each training star has variables ``(Theta, ln plx, ln E)``. **[resolved]**
The star steps act on Theta in the catalog's units (Teff in kK, [Fe/H] and
logg in dex), so one learning rate is meaningful for all three; the forward
model is always called with Teff in K. The star objective of a batch is the
batch *mean* of the per-star losses (Eqs. 13-14), as when one loss tensor is
reduced and differentiated; so the effective per-star step is lr / batch_size.
Each star update is also limited to a maximum length (``max_star_step`` in the
internal units) so that one very bright star cannot diverge; this only acts on
steps that would otherwise overshoot.

Star optimisers: plain SGD (the paper), per-star Adam, or ``"gn"``: damped
Gauss-Newton (Levenberg-Marquardt) on the whitened residuals of the star loss
(:func:`star_residuals`, :func:`gn_star_step`), which converges in a few steps
and is what the ``quick`` preset uses (a documented preset choice; the default
is the paper's SGD).

The model optimiser minimises Eq. 12 divided by the number of fluxes
(:func:`_model_objective`, **[resolved]**): same minimum, but the paper's
learning rates (SGD lr 1e-3, momentum 0.5) are then stable; on the summed
chi^2 they diverge (measured top Hessian eigenvalue ~2e5).

Losses
------
- model (Eq. 12): mean over the batch of chi^2_f + ||W||^2 / n_W;
- star (Eqs. 13-14): chi^2_f + ((plx - plx_obs)/s_plx)^2 + ((E - E_obs)/s_E)^2
  + sum_i ((Theta_i - Theta_obs,i)/s_i)^2 - 2 ln plx - 2 ln E,
  the parallax term written ``((plx - plx_obs) * inv_plx_err)^2`` so that it drops
  (``inv_plx_err = 0``) for a star without a usable parallax (SPEC Sec. 1.4;
  :mod:`xpcat.model.training_parallax`),

with chi^2_f = |U (f_pred - f_obs)|^2 and U the conditioned upper-triangular
factor (zero rows and columns for missing fluxes).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xpcat.model.forward import N_OUT, predict_flux, weight_l2
from xpcat.model.training_data import (
    E_FLOOR,
    THETA_UNIT,
    StarState,
    TrainingData,
    TrainingDataError,
    initial_stars,
)

__all__ = [
    "THETA_UNIT",
    "E_FLOOR",
    "TrainingData",
    "StarState",
    "TrainingDataError",
    "chi2_flux",
    "star_loss",
    "model_loss",
    "initial_stars",
    "init_star_opt",
    "make_epoch_fn",
    "make_star_fit_fn",
    "make_star_gn_fit_fn",
    "gn_star_step",
    "star_residuals",
    "batch_diagnostics",
]

logger = logging.getLogger(__name__)


def chi2_flux(params, scaler, activation: str, star: dict, obs: dict) -> jax.Array:
    """chi^2_f of one star: |U (f_pred - f_obs)|^2 (Theta of ``star`` in kK, dex, dex)."""
    theta = star["theta"] * jnp.asarray(THETA_UNIT, star["theta"].dtype)
    f = predict_flux(params, scaler, theta, star["ln_plx"], star["ln_e"], activation)
    r = obs["factor"] @ (f - obs["flux"])
    return jnp.sum(r * r)


def star_loss(params, scaler, activation: str, star: dict, obs: dict) -> jax.Array:
    """Per-star loss of Eqs. 13-14 (scalar)."""
    chi2 = chi2_flux(params, scaler, activation, star, obs)
    plx = jnp.exp(star["ln_plx"])
    e = jnp.exp(star["ln_e"])
    prior = (((plx - obs["plx_obs"]) * obs["inv_plx_err"]) ** 2 + ((e - obs["e_obs"]) / obs["e_err"]) ** 2
             + jnp.sum(((star["theta"] - obs["th_obs"]) / obs["th_err"]) ** 2))
    return chi2 + prior - 2.0 * star["ln_plx"] - 2.0 * star["ln_e"]


def _star_vec(star: dict) -> jax.Array:
    """(5,) internal star variables: Teff/kK, [Fe/H], logg, ln plx, ln E."""
    return jnp.concatenate([star["theta"], star["ln_plx"][None], star["ln_e"][None]])


def _vec_star(x: jax.Array) -> dict:
    return {"theta": x[:3], "ln_plx": x[3], "ln_e": x[4]}


def star_residuals(params, scaler, activation: str, x: jax.Array, obs: dict) -> jax.Array:
    """Whitened residuals of one star's loss (Eqs. 13-14), shape (66 + 5,).

    ``[U (f_pred - f_obs), (plx - plx_obs)/s_plx, (E - E_obs)/s_E, (Theta - Theta_obs)/s_Theta]``
    (the parallax entry 0 for a star without a usable parallax: ``inv_plx_err = 0``)
    for the internal variables ``x`` (5,) = (Teff/kK, [Fe/H], logg, ln plx, ln E); the star loss
    is ``|r|^2 - 2 x[3] - 2 x[4]``.
    """
    star = _vec_star(x)
    theta = star["theta"] * jnp.asarray(THETA_UNIT, x.dtype)
    f = predict_flux(params, scaler, theta, star["ln_plx"], star["ln_e"], activation)
    r_f = obs["factor"] @ (f - obs["flux"])
    r_p = jnp.stack([(jnp.exp(star["ln_plx"]) - obs["plx_obs"]) * obs["inv_plx_err"],
                     (jnp.exp(star["ln_e"]) - obs["e_obs"]) / obs["e_err"]])
    r_t = (star["theta"] - obs["th_obs"]) / obs["th_err"]
    return jnp.concatenate([r_f, r_p, r_t])


#: Largest change of each internal star variable in one Gauss-Newton step (kK, dex, dex, ln, ln).
GN_MAX_STEP = np.array([0.5, 0.5, 0.5, 0.5, 1.0])
_GN_LIN = np.array([0.0, 0.0, 0.0, 1.0, 1.0])  # half the gradient of -(-2 ln plx - 2 ln E)
_GN_LAMBDA_MIN, _GN_LAMBDA_MAX = 1e-6, 1e8
#: Starting Gauss-Newton damping.
GN_LAMBDA0 = 1e-2


def _gn_step_one(params, scaler, activation: str, x: jax.Array, obs: dict, lam: jax.Array):
    """One damped Gauss-Newton (Levenberg-Marquardt) step of one star's loss.

    Solves ``(J^T J + lam diag(J^T J)) d = -(J^T r - c)`` (c from the ``-2 ln plx - 2 ln E``
    terms), limits each component to :data:`GN_MAX_STEP`, and accepts the step only when
    the loss decreases (``lam`` /3) else keeps ``x`` (``lam`` x4).

    Returns ``(x_new, lam_new, loss_new)``.
    """
    def res(z):
        return star_residuals(params, scaler, activation, z, obs)

    def loss_of(r, z):
        return jnp.sum(r * r) - 2.0 * z[3] - 2.0 * z[4]

    r = res(x)
    J = jax.jacfwd(res)(x)
    lin = jnp.asarray(_GN_LIN, x.dtype)
    g = J.T @ r - lin
    H = J.T @ J
    d_h = jnp.diag(H)
    A = H + jnp.diag(lam * d_h + 1e-9 * (1.0 + jnp.max(d_h)))
    step = -jnp.linalg.solve(A, g)
    mx = jnp.asarray(GN_MAX_STEP, x.dtype)
    step = step * jnp.minimum(1.0, jnp.min(mx / jnp.maximum(jnp.abs(step), 1e-30)))
    x_new = x + step
    l0 = loss_of(r, x)
    l1 = loss_of(res(x_new), x_new)
    good = jnp.isfinite(l1) & (l1 <= l0) & jnp.all(jnp.isfinite(step))
    x_out = jnp.where(good, x_new, x)
    lam_out = jnp.clip(jnp.where(good, lam / 3.0, lam * 4.0), _GN_LAMBDA_MIN, _GN_LAMBDA_MAX)
    return x_out, lam_out, jnp.where(good, l1, l0)


def gn_star_step(params, scaler, activation: str, stars: dict, obs: dict, lam: jax.Array):
    """:func:`_gn_step_one` over a batch: stars (m, ...), lam (m,) -> (stars, lam, loss (m,))."""
    x = jax.vmap(_star_vec)(stars)
    x, lam, loss = jax.vmap(lambda xi, oi, li: _gn_step_one(params, scaler, activation, xi, oi, li))(x, obs, lam)
    return jax.vmap(_vec_star)(x), lam, loss


def _batch_chi2(params, scaler, activation, stars, obs):
    return jax.vmap(lambda s, o: chi2_flux(params, scaler, activation, s, o))(stars, obs)


def _batch_star_loss(params, scaler, activation, stars, obs):
    return jax.vmap(lambda s, o: star_loss(params, scaler, activation, s, o))(stars, obs)


def model_loss(params, scaler, activation: str, stars: dict, obs: dict, weight: jax.Array) -> jax.Array:
    """Eq. 12: weighted mean of chi^2_f over the batch + ||W||^2 / n_W (``weight`` masks padding)."""
    chi2 = _batch_chi2(params, scaler, activation, stars, obs)
    return jnp.sum(weight * chi2) / jnp.maximum(jnp.sum(weight), 1.0) + weight_l2(params)


def _model_objective(params, scaler, activation: str, stars: dict, obs: dict, weight: jax.Array) -> jax.Array:
    """What the model optimiser minimises: Eq. 12 divided by the number of fluxes (66).

    **[resolved]** The same minimum as Eq. 12; only the scale that the learning rates act on
    changes (a mean over the batch *and* the flux axis, as a ``reduce_mean`` of the squared
    whitened residuals gives). With the loss summed over 66 fluxes the top Hessian eigenvalue
    of Eq. 12 on realistic data is ~2e5 (per-flux SNR up to ~200 after the Eq. 2 inflation,
    times the hidden-unit activations), so plain SGD at the paper's lr 1e-3 with momentum 0.5 is
    unstable by two orders of magnitude (heavy-ball SGD needs lr x lambda < 2 (1 + momentum));
    per flux it is at the edge of stability, where the paper's schedule runs. Adam is
    invariant to this scale.
    """
    return model_loss(params, scaler, activation, stars, obs, weight) / N_OUT


def _take(tree: dict, idx: jax.Array) -> dict:
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _clip_star_step(step: dict, max_step: float) -> dict:
    """Limit each star's update to length ``max_step`` (in kK / dex / ln units)."""
    sq = jnp.sum(step["theta"] ** 2, axis=-1) + step["ln_plx"] ** 2 + step["ln_e"] ** 2
    scale = jnp.minimum(1.0, max_step / jnp.sqrt(jnp.maximum(sq, 1e-30)))
    return {"theta": step["theta"] * scale[:, None], "ln_plx": step["ln_plx"] * scale, "ln_e": step["ln_e"] * scale}


def init_star_opt(stars: StarState) -> dict:
    """Per-star optimiser state: Adam moments and step counts (``star_optimizer = "adam"``) and the
    Gauss-Newton damping ``lam`` (``star_optimizer = "gn"``)."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, stars)
    return {"m": zeros, "v": jax.tree_util.tree_map(jnp.zeros_like, stars),
            "t": jnp.zeros(stars["ln_plx"].shape, jnp.int32),
            "lam": jnp.full(stars["ln_plx"].shape, GN_LAMBDA0, stars["ln_plx"].dtype)}


def _star_adam(g: dict, opt_b: dict, lr, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """One Adam step for a batch of stars with per-star step counts; returns (step, new moments)."""
    t = opt_b["t"] + 1
    m = jax.tree_util.tree_map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, opt_b["m"], g)
    v = jax.tree_util.tree_map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, opt_b["v"], g)
    tf = t.astype(g["ln_plx"].dtype)
    c1, c2 = 1 - b1 ** tf, 1 - b2 ** tf

    def upd(m_, v_):
        shape = (-1,) + (1,) * (m_.ndim - 1)
        return -lr * (m_ / c1.reshape(shape)) / (jnp.sqrt(v_ / c2.reshape(shape)) + eps)

    return jax.tree_util.tree_map(upd, m, v), {"m": m, "v": v, "t": t}


def make_epoch_fn(activation: str, model_tx: optax.GradientTransformation | None, update_stars: bool,
                  batch_size: int, max_star_step: float, star_optimizer: str = "sgd"):
    """A jitted function running one epoch of model and/or star steps.

    ``epoch(params, opt_state, stars, star_opt, obs, scaler, batches, weights, star_lr, flux_weight=1.0)``
    with ``batches`` (n_batches, batch_size) int32 star indices and
    ``weights`` (n_batches, batch_size) 1 for real entries, 0 for padding, and
    ``flux_weight`` (default 1) the factor on chi^2_f in the star steps only (1 / T of
    the tempered phases, :mod:`xpcat.model.training_phases`; 1 = Eqs. 13-14).
    Each step: the model step on the batch (if ``model_tx``), then the
    batch's star step with the updated model (if ``update_stars``): SGD
    without momentum (the paper) or per-star Adam (``star_optimizer="adam"``,
    moments in ``star_opt`` from :func:`init_star_opt`). A step whose loss is
    not finite is skipped (state unchanged) and reported in the returned
    ``finite`` flags, so the caller can stop and name it.

    Returns ``(params, opt_state, stars, star_opt, losses (n_batches, 2), finite (n_batches,))``
    where ``losses[:, 0]`` is the model loss and ``losses[:, 1]`` the mean star loss.
    """

    def step(carry, inp):
        params, opt_state, stars, star_opt, scaler, obs, star_lr, flux_weight = carry
        idx, w = inp
        s_b, o_b = _take(stars, idx), _take(obs, idx)
        # the star step sees chi^2_f scaled by flux_weight (1 = Eqs. 13-14; < 1 = tempered, see train_model)
        o_s = dict(o_b, factor=o_b["factor"] * jnp.sqrt(flux_weight).astype(o_b["factor"].dtype))
        ok = jnp.array(True)
        if model_tx is not None:
            lm, g = jax.value_and_grad(_model_objective)(params, scaler, activation, s_b, o_b, w)
            lm = lm * N_OUT
            upd, new_opt = model_tx.update(g, opt_state, params)
            new_params = optax.apply_updates(params, upd)
            ok = jnp.isfinite(lm) & _all_finite(g)
            params = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_params, params)
            opt_state = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_opt, opt_state)
        else:
            lm = jnp.sum(w * _batch_chi2(params, scaler, activation, s_b, o_b)) / jnp.maximum(jnp.sum(w), 1.0)
        if update_stars and star_optimizer == "gn":
            lam_b = star_opt["lam"][idx]
            new_sb, new_lam, l_star = gn_star_step(params, scaler, activation, s_b, o_s, lam_b)
            sok = jnp.all(jnp.isfinite(jnp.where(w > 0, l_star, 0.0)))
            ok = ok & sok
            real = (w > 0) & sok
            stepv = jax.tree_util.tree_map(lambda a, b: a - b, new_sb, s_b)
            stars = jax.tree_util.tree_map(lambda a, d: a.at[idx].add(_bmask(real, d).astype(a.dtype)), stars, stepv)
            star_opt = dict(star_opt, lam=star_opt["lam"].at[idx].add(_bmask(real, new_lam - lam_b)))
            ls = jnp.sum(jnp.where(w > 0, l_star, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
        elif update_stars:
            def obj(sb):
                return jnp.sum(w * _batch_star_loss(params, scaler, activation, sb, o_s)) / batch_size
            ls, gs = jax.value_and_grad(obj)(s_b)
            sok = jnp.isfinite(ls) & _all_finite(gs)
            ok = ok & sok
            real = (w > 0) & sok
            # padding entries point at star 0 with weight 0: their step is masked out of the scatter
            if star_optimizer == "adam":
                adam_state = {k: star_opt[k] for k in ("m", "v", "t")}
                opt_b = _take(adam_state, idx)
                stepv, new_b = _star_adam(gs, opt_b, star_lr)
                adam_state = jax.tree_util.tree_map(
                    lambda a, new, old: a.at[idx].add(_bmask(real, new - old).astype(a.dtype)), adam_state, new_b, opt_b)
                star_opt = dict(star_opt, **adam_state)
            else:
                stepv = jax.tree_util.tree_map(lambda g: -star_lr * g, gs)
            stepv = _clip_star_step(stepv, max_star_step)
            stars = jax.tree_util.tree_map(lambda a, d: a.at[idx].add(_bmask(real, d).astype(a.dtype)), stars, stepv)
            ls = ls * batch_size / jnp.maximum(jnp.sum(w), 1.0)
        else:
            ls = jnp.nan
        return (params, opt_state, stars, star_opt, scaler, obs, star_lr, flux_weight), (jnp.stack([lm, jnp.asarray(ls, lm.dtype)]), ok)

    @jax.jit
    def epoch(params, opt_state, stars, star_opt, obs, scaler, batches, weights, star_lr, flux_weight=1.0):
        carry = (params, opt_state, stars, star_opt, scaler, obs, star_lr, jnp.asarray(flux_weight, star_lr.dtype))
        (params, opt_state, stars, star_opt, _, _, _, _), (losses, ok) = jax.lax.scan(step, carry, (batches, weights))
        return params, opt_state, stars, star_opt, losses, ok

    return epoch


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _bmask(mask: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def make_star_gn_fit_fn(activation: str, n_steps: int):
    """Like :func:`make_star_fit_fn` with ``n_steps`` damped Gauss-Newton steps per star (:func:`gn_star_step`).

    ``fit(params, scaler, stars_b, obs_b, w) -> (stars_b, losses (n_steps,), finite (n_steps,))``;
    ``losses`` is the weighted mean star loss after each step. A star whose loss is
    not finite keeps its previous values and is flagged.
    """

    @jax.jit
    def fit(params, scaler, stars_b, obs_b, w):
        lam0 = jnp.full(w.shape, GN_LAMBDA0, w.dtype)

        def body(carry, _):
            sb, lam = carry
            sb2, lam2, ls = gn_star_step(params, scaler, activation, sb, obs_b, lam)
            fin = jnp.isfinite(ls) | (w == 0)
            sb2 = jax.tree_util.tree_map(lambda a, b: _bmask(fin, a) + _bmask(~fin, b), sb2, sb)
            mean = jnp.sum(jnp.where(w > 0, ls, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
            return (sb2, lam2), (mean, jnp.all(fin))

        (sb, _), (losses, ok) = jax.lax.scan(body, (stars_b, lam0), None, length=n_steps)
        return sb, losses, ok

    return fit


def make_star_fit_fn(activation: str, tx: optax.GradientTransformation, n_steps: int, batch_size: int,
                     max_star_step: float | None):
    """A jitted function running ``n_steps`` star-only steps on one batch (model fixed).

    ``fit(params, scaler, stars_b, obs_b, w) -> (stars_b, losses (n_steps,), finite (n_steps,))``.
    With a fixed model the stars are independent, so running all steps of a
    batch at once equals interleaving them over epochs (phases 3 and 6).
    Steps with a non-finite loss or gradient are skipped and flagged.
    """

    def obj(sb, params, scaler, ob, w):
        return jnp.sum(w * _batch_star_loss(params, scaler, activation, sb, ob)) / batch_size

    @jax.jit
    def fit(params, scaler, stars_b, obs_b, w):
        def body(carry, _):
            sb, st = carry
            ls, g = jax.value_and_grad(obj)(sb, params, scaler, obs_b, w)
            upd, st2 = tx.update(g, st, sb)
            if max_star_step is not None:
                upd = _clip_star_step(upd, max_star_step)
            ok = jnp.isfinite(ls) & _all_finite(g)
            sb2 = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), optax.apply_updates(sb, upd), sb)
            st2 = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), st2, st)
            return (sb2, st2), (ls * batch_size / jnp.maximum(jnp.sum(w), 1.0), ok)

        (sb, _), (losses, ok) = jax.lax.scan(body, (stars_b, tx.init(stars_b)), None, length=n_steps)
        return sb, losses, ok

    return fit


@functools.partial(jax.jit, static_argnames="activation")
def batch_diagnostics(params, scaler, activation: str, stars: dict, obs: dict, flux_error: jax.Array):
    """Per-star diagnostics for self-cleaning and reports.

    Returns
    -------
    dict of arrays: ``chi2`` (n,), ``f_pred`` (n, 66), ``chi`` (n, 66) = (f_pred - f_obs) / flux_error
    (0 where the error is infinite).
    """
    theta = stars["theta"] * jnp.asarray(THETA_UNIT, stars["theta"].dtype)
    f = jax.vmap(lambda t, p, e: predict_flux(params, scaler, t, p, e, activation))(theta, stars["ln_plx"], stars["ln_e"])
    chi2 = _batch_chi2(params, scaler, activation, stars, obs)
    chi = jnp.where(jnp.isfinite(flux_error), (f - obs["flux"]) / flux_error, 0.0)
    return {"chi2": chi2, "f_pred": f, "chi": chi}

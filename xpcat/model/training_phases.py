"""The six training phases of Table 1, self-cleaning, checkpoints and resume.

=====  =====  ========  ==========  ===============================================
phase  data   model lr  star lr     notes
=====  =====  ========  ==========  ===============================================
1      HQ     1e-3      fixed       stars held at observed values
2      HQ     1e-5      1e-4        each step: model, then the batch's stars
3      all    fixed     1e-4        ``phase3_steps`` steps per star
4                                   self-cleaning (parameter and flux criteria)
5      clean  1e-7      1e-5        last model update
6      all    fixed     Adam 1e-2   halved every ``phase6_halve_every`` steps
=====  =====  ========  ==========  ===============================================

Model steps use SGD with momentum 0.5 (``model_optimizer = "sgd"``, the
paper) or Adam (an option for short schedules), on Eq. 12 per flux (see
:mod:`xpcat.model.training`); star steps SGD without momentum (the paper),
per-star Adam, or damped Gauss-Newton (``star_optimizer = "gn"``, the quick
preset; then phases 3 and 6 take ``phase3_steps`` / ``phase6_steps``
Gauss-Newton steps per star instead of SGD / Adam). Learning rates drop x10 at ``lr_drop_epochs``. The model
gradient may be clipped to a global norm (``grad_clip``; 0 = off).

Tempered star steps (phases 2 and 5) and the stretching of short schedules: see
:mod:`xpcat.model.training_schedule`.

What tempering does not fix (same universe, measured; the strict xfails of
``tests/production/test_training_truth.py``): stars that no HQ star
resembles are never trained on before self-cleaning judges them. The
universe's hot stars carry Hot Payne labels with s_Teff = 3 % + 50 K, so none
is HQ (Eq. 15: s_Teff < 200 K); phase 4 removes 89 % of them and at their
true parameters the model is off by median |chi| ~30. And the parameter
criterion of self-cleaning (any of Theta, plx > 4 sigma) catches few of the
injected q ~ U(0.7, 1) binaries: the median one is only 52 % brighter than
its primary, which the fit absorbs with a 1.3 sigma logg and 0.4 sigma
parallax shift (at best 8 % of them can move > 4 sigma).

After phase 5 the extinction zero point is anchored to the reddening priors
(``anchor_extinction``, default on; :mod:`xpcat.model.extinction_zero_point`):
Eq. 14's -2 ln E otherwise lifts every star's E, and the model's ln f_abs by
the same Delta R, by ~0.006 mag on the synthetic universe.

Stars without a usable parallax train with the parallax term dropped; when
no training star has one, the level of f_abs is pinned after every epoch of
phases 2 and 5 (the mean ln plx stays at the reference distances' mean;
:mod:`xpcat.model.training_parallax`), and ``history["flux_scale"]`` records
the mode and the shifts.

After every phase the state is written to ``checkpoint_dir/phase<k>.npz``
with a JSON marker written last; :func:`train_model` resumes after the last
phase whose marker matches the data and schedule fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xpcat.errors import StageError
from xpcat.progress import progress
from xpcat.model.extinction_zero_point import extinction_offset, shift_extinction_zero_point
from xpcat.model.forward import init_params, ln_flux_abs_batch, make_scaler
from xpcat.model.training import (
    batch_diagnostics,
    init_star_opt,
    make_epoch_fn,
    make_star_fit_fn,
    make_star_gn_fit_fn,
)
from xpcat.model.training_checkpoints import load_checkpoint, save_checkpoint, unflatten_params
from xpcat.model.training_data import E_FLOOR, THETA_UNIT, TrainingData, initial_stars
from xpcat.model.training_parallax import generic_ln_r, pin_flux_scale
from xpcat.model.training_schedule import Schedule, flux_weight, lr_at, model_transform

__all__ = ["Schedule", "TrainingResult", "TrainingDivergedError", "train_model", "generic_ln_r", "self_clean"]

logger = logging.getLogger(__name__)

PHASES = (1, 2, 3, 4, 5, 6)


class TrainingDivergedError(StageError):
    """A loss became NaN or infinite; training stops and names the batch."""


@dataclass
class TrainingResult:
    """What training produces.

    Attributes
    ----------
    params, scaler : the trained forward model.
    stars : dict of numpy arrays for every training star after phase 6:
        ``theta`` (n, 3) [K, dex, dex], ``plx`` (n,) [mas], ``e`` (n,) [mag].
    removed_param, removed_flux : (n,) bool, self-cleaning criteria (phase 4).
    history : per-phase loss curves and counts (JSON-able).
    resumed_from : last phase loaded from a checkpoint (0 = none).
    """

    params: dict[str, Any]
    scaler: dict[str, np.ndarray]
    stars: dict[str, np.ndarray]
    removed_param: np.ndarray
    removed_flux: np.ndarray
    history: dict[str, Any] = field(default_factory=dict)
    resumed_from: int = 0


# --------------------------------------------------------------------------- helpers


def _batches(idx: np.ndarray, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(idx)
    nb = max(1, -(-perm.size // batch_size))
    pad = nb * batch_size - perm.size
    b = np.concatenate([perm, np.zeros(pad, dtype=perm.dtype)]).reshape(nb, batch_size).astype(np.int32)
    w = np.concatenate([np.ones(perm.size, np.float32), np.zeros(pad, np.float32)]).reshape(nb, batch_size)
    return b, w


def _fingerprint(data: TrainingData, s: Schedule) -> str:
    h = hashlib.sha256(np.ascontiguousarray(data.source_id, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(data.flux[:, :8]).tobytes())
    h.update(json.dumps(asdict(s), sort_keys=True, default=list).encode())
    return h.hexdigest()


def _raise_diverged(phase: int, epoch: int, bad: np.ndarray, batches: np.ndarray, weights: np.ndarray,
                    source_id: np.ndarray) -> None:
    b = int(np.flatnonzero(~bad)[0]) if bad.dtype == bool else int(bad)
    members = batches[b][weights[b] > 0]
    sids = source_id[members]
    raise TrainingDivergedError(
        f"non-finite loss in phase {phase}, epoch {epoch}, batch {b} ({members.size} stars, source_id "
        f"{', '.join(map(str, sids[:5]))}{', ...' if sids.size > 5 else ''}); training stopped without applying "
        "that step. Check those stars' inputs or lower the learning rates")


def _init_model(data: TrainingData, s: Schedule, wavelengths: np.ndarray, key: jax.Array, dtype: Any):
    """Initial model: a warm start by least squares in ln flux on the HQ stars at their observed values.

    Minimises the mean over valid fluxes of (NN(Theta_obs) - E_obs R + 2 ln plx_0 - ln f_obs)^2
    (plx_0: the observed parallax, or the reference distance of a star without one)
    with Adam (``init_steps`` full-batch steps on at most 20000 HQ stars), starting from
    Glorot weights, the median ln absolute flux as output bias and the generic R of
    :func:`generic_ln_r`. This only places the network where chi^2 is finite and
    smooth; the phases of Table 1 then train on chi^2.
    """
    scaler = make_scaler(data.theta_obs, dtype=np.float32)
    ln_r0 = generic_ln_r(wavelengths)
    sel = np.flatnonzero(data.hq if data.hq.sum() >= 50 else np.ones(data.n, bool))
    sel = np.random.default_rng(s.seed).permutation(sel)[:20000]
    f, err = data.flux[sel], data.flux_error[sel]
    ok = np.isfinite(err) & (f > 0) & (f > 3 * np.where(np.isfinite(err), err, np.inf))
    e0 = np.maximum(data.e_obs[sel], 0.0).astype(np.float64)
    target = np.log(np.where(ok, f, 1.0)) - 2 * data.start_ln_plx()[sel][:, None]
    out_bias = np.array([np.median(target[ok[:, j], j] + e0[ok[:, j]] * np.exp(ln_r0[j])) if ok[:, j].any() else 0.0
                         for j in range(target.shape[1])])
    params = init_params(key, n_hidden=s.n_hidden, width=s.width, ln_r=ln_r0, out_bias=out_bias, dtype=dtype)
    sc = {k: jnp.asarray(v, dtype) for k, v in scaler.items()}
    th = jnp.asarray(data.theta_obs[sel], dtype)
    tg, wt, ee = jnp.asarray(target, dtype), jnp.asarray(ok, dtype), jnp.asarray(e0, dtype)

    def loss(p):
        pred = ln_flux_abs_batch(p, sc, th, s.activation) - ee[:, None] * jnp.exp(p["ln_R"])[None, :]
        return jnp.sum(wt * (pred - tg) ** 2) / jnp.sum(wt)

    tx = optax.adam(optax.cosine_decay_schedule(1e-2, s.init_steps, 0.01))

    @jax.jit
    def run(p):
        def body(c, _):
            p, st = c
            val, g = jax.value_and_grad(loss)(p)
            u, st = tx.update(g, st, p)
            return (optax.apply_updates(p, u), st), val
        (p, _), vals = jax.lax.scan(body, (p, tx.init(p)), None, length=s.init_steps)
        return p, vals

    if s.init_steps > 0:
        params, vals = run(params)
        vals = np.asarray(vals)
        logger.info("warm start: rms ln-flux residual %.4f -> %.4f over %d steps on %d HQ stars",
                    np.sqrt(vals[0]), np.sqrt(vals[-1]), s.init_steps, sel.size)
    return params, scaler


def self_clean(params, scaler, activation: str, stars: dict, obs: dict, flux_error: jax.Array, sigma: float,
               batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Phase 4: the two self-cleaning criteria.

    Returns
    -------
    removed_param : (n,) bool, any of Theta or plx more than ``sigma`` from its observed value
        (a star without a usable parallax is judged on Theta only).
    removed_flux : (n,) bool, any flux residual more than ``sigma`` flux errors.
    """
    n = stars["ln_plx"].shape[0]
    rp, rf = np.zeros(n, bool), np.zeros(n, bool)
    for lo in range(0, n, batch_size):
        sl = slice(lo, min(n, lo + batch_size))
        sb = jax.tree_util.tree_map(lambda a: a[sl], stars)
        ob = jax.tree_util.tree_map(lambda a: a[sl], obs)
        d = batch_diagnostics(params, scaler, activation, sb, ob, flux_error[sl])
        dth = np.abs(np.asarray(sb["theta"] - ob["th_obs"]) / np.asarray(ob["th_err"]))
        dplx = np.abs(np.exp(np.asarray(sb["ln_plx"])) - np.asarray(ob["plx_obs"])) * np.asarray(ob["inv_plx_err"])
        rp[sl] = (dth > sigma).any(axis=1) | (dplx > sigma)
        rf[sl] = (np.abs(np.asarray(d["chi"])) > sigma).any(axis=1)
    return rp, rf


# --------------------------------------------------------------------------- phases


def train_model(data: TrainingData, schedule: Schedule, wavelengths: np.ndarray, *,
                checkpoint_dir: str | Path | None = None, validation: TrainingData | None = None,
                dtype: Any = jnp.float32) -> TrainingResult:
    """Run the six phases of Table 1 (resuming from checkpoints when possible).

    Parameters
    ----------
    data : the training stars (80 % split), with the HQ mask.
    schedule : the training schedule.
    wavelengths : (66,) nm, for the starting extinction curve.
    checkpoint_dir : where to write / read the phase checkpoints (None: no checkpoints).
    validation : held-out stars; their median chi^2 at observed labels is recorded per epoch.
    dtype : float32 (default) or float64.

    Raises
    ------
    TrainingDivergedError
        When a loss becomes non-finite (naming phase, epoch, batch and stars).
    StageError
        When the HQ set or the training set is smaller than one batch.
    """
    s = schedule
    B = s.batch_size
    if data.n < B:
        raise StageError(f"training set has {data.n} stars, fewer than one batch ({B}); "
                         "add labelled stars or lower [training] batch_size")
    if int(data.hq.sum()) < B:
        raise StageError(f"only {int(data.hq.sum())} training stars pass the HQ cut (Eq. 15), fewer than one batch "
                         f"({B}); add labelled stars or lower [training] batch_size")
    rng = np.random.default_rng(s.seed)
    fp = _fingerprint(data, s)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    done, ck = load_checkpoint(ckdir, fp, PHASES) if ckdir is not None else (0, None)
    obs = data.device_arrays(dtype)
    flux_error = jnp.asarray(data.flux_error, dtype)
    vobs = validation.device_arrays(dtype) if validation is not None and validation.n else None
    vstars = initial_stars(validation, dtype) if vobs is not None else None
    history: dict[str, Any]
    if ck is not None:
        logger.info("resuming training after phase %d from %s", done, ckdir)
        params = unflatten_params(ck, dtype)
        scaler = {"mean": ck["scaler/mean"], "scale": ck["scaler/scale"]}
        stars = {k: jnp.asarray(ck[f"stars/{k}"], dtype) for k in ("theta", "ln_plx", "ln_e")}
        removed = (ck["removed_param"], ck["removed_flux"])
        history = ck["history"]
        rng = np.random.default_rng([s.seed, done])
    else:
        params, scaler = _init_model(data, s, wavelengths, jax.random.PRNGKey(s.seed), dtype)
        stars = initial_stars(data, dtype)
        removed = (np.zeros(data.n, bool), np.zeros(data.n, bool))
        history = {"phases": {}}
    scaler = {k: jnp.asarray(v, dtype) for k, v in scaler.items()}
    pin = not data.has_parallax.any()
    ref_mean = float(np.mean(data.start_ln_plx())) if pin else float("nan")
    history.setdefault("flux_scale", {"mode": "pinned_mean_ln_plx" if pin else "gaia_parallaxes",
                                      "n_without_parallax": int((~data.has_parallax).sum()),
                                      "reference_mean_ln_plx": ref_mean if pin else None})
    if pin:
        logger.info("no training star has a usable parallax: the level of f_abs is pinned by keeping the mean ln plx "
                    "at %.4f (reference distances; xpcat.model.training_parallax)", ref_mean)
    all_idx = np.arange(data.n)

    def val_chi2(p) -> float:
        if vobs is None:
            return float("nan")
        d = batch_diagnostics(p, scaler, s.activation, vstars, vobs, jnp.asarray(validation.flux_error, dtype))
        return float(np.median(np.asarray(d["chi2"])))

    def model_phase(phase: int, idx: np.ndarray, model_lr: float, star_lr: float | None, temper: bool = False):
        nonlocal params, stars
        nb = -(-idx.size // B)
        sp = s.for_batches(nb)
        if sp is not s:
            logger.info("phase %d: %d stars make %d batches an epoch: %d epochs instead of %d, for at least "
                        "min_model_steps = %d model steps", phase, idx.size, nb, sp.epochs, s.epochs, s.min_model_steps)
        tx = model_transform(sp, model_lr, nb)
        opt_state = tx.init(params)
        epoch_fn = make_epoch_fn(s.activation, tx, star_lr is not None, B, s.max_star_step, s.star_optimizer)
        star_opt = init_star_opt(stars)
        curves = {"epoch": [], "model_loss": [], "star_loss": [], "val_median_chi2": [], "seconds": [], "flux_weight": [],
                  "flux_scale_shift": []}
        t0 = time.perf_counter()
        for ep in progress(range(sp.epochs), f"train phase {phase}", total=sp.epochs, unit="epoch"):
            batches, weights = _batches(idx, B, rng)
            slr = lr_at(star_lr, ep, sp.lr_drop_epochs) if star_lr is not None else 0.0
            fw = flux_weight(sp, ep) if temper else 1.0
            params, opt_state, stars, star_opt, losses, ok = epoch_fn(params, opt_state, stars, star_opt, obs, scaler,
                                                            jnp.asarray(batches), jnp.asarray(weights),
                                                            jnp.asarray(slr, dtype), jnp.asarray(fw, dtype))
            ok = np.asarray(ok)
            if not ok.all():
                _raise_diverged(phase, ep, ok, batches, weights, data.source_id)
            if pin and star_lr is not None:
                params, stars["ln_plx"], c = pin_flux_scale(params, stars["ln_plx"], ref_mean)
                curves["flux_scale_shift"].append(c)
            losses = np.asarray(losses, dtype=np.float64)
            curves["epoch"].append(ep)
            curves["model_loss"].append(float(losses[:, 0].mean()))
            curves["star_loss"].append(float(np.nanmean(losses[:, 1])) if star_lr is not None else None)
            curves["val_median_chi2"].append(val_chi2(params))
            curves["flux_weight"].append(fw)  # star_loss of a tempered epoch is that of chi^2_f * flux_weight
            curves["seconds"].append(time.perf_counter() - t0)
            logger.debug("phase %d epoch %d: model loss %.4g", phase, ep, curves["model_loss"][-1])
        logger.info("phase %d: %d epochs on %d stars, final model loss %.4g (%.1f s)", phase, sp.epochs, idx.size,
                    curves["model_loss"][-1], curves["seconds"][-1])
        return {"n_stars": int(idx.size), "n_batches": nb, "epochs": sp.epochs, "steps": nb * sp.epochs, **curves}

    def star_phase(phase: int, tx: optax.GradientTransformation | None, n_steps: int, max_step: float | None):
        nonlocal stars
        fit = make_star_gn_fit_fn(s.activation, n_steps) if tx is None else make_star_fit_fn(s.activation, tx, n_steps,
                                                                                              B, max_step)
        batches, weights = _batches(all_idx, B, rng)
        curve = np.zeros(n_steps)
        t0 = time.perf_counter()
        for b in progress(range(batches.shape[0]), f"train phase {phase}", total=batches.shape[0], unit="batch"):
            idx = jnp.asarray(batches[b])
            sb = jax.tree_util.tree_map(lambda a: a[idx], stars)
            ob = jax.tree_util.tree_map(lambda a: a[idx], obs)
            sb, losses, ok = fit(params, scaler, sb, ob, jnp.asarray(weights[b]))
            ok = np.asarray(ok)
            if not ok.all():
                _raise_diverged(phase, int(np.flatnonzero(~ok)[0]), np.array(b), batches, weights, data.source_id)
            real = batches[b][weights[b] > 0]
            keep = weights[b] > 0
            stars = {k: stars[k].at[jnp.asarray(real)].set(v[jnp.asarray(keep)]) for k, v in sb.items()}
            curve += np.asarray(losses, np.float64) * keep.sum() / data.n
        dt = time.perf_counter() - t0
        logger.info("phase %d: %d steps per star on %d stars, mean loss %.4g -> %.4g (%.1f s)", phase, n_steps,
                    data.n, curve[0], curve[-1], dt)
        return {"n_stars": data.n, "steps_per_star": n_steps, "mean_star_loss": curve.tolist(), "seconds": dt}

    hq_idx = np.flatnonzero(data.hq)
    for phase in PHASES:
        if phase <= done:
            continue
        if phase == 1:
            history["phases"]["1"] = model_phase(1, hq_idx, s.model_lr[0], None)
        elif phase == 2:
            history["phases"]["2"] = model_phase(2, hq_idx, s.model_lr[1], s.star_lr[0], temper=True)
        elif phase == 3:
            tx3 = {"adam": optax.adam(s.star_lr[1]), "sgd": optax.sgd(s.star_lr[1]), "gn": None}[s.star_optimizer]
            history["phases"]["3"] = star_phase(3, tx3, s.phase3_steps, s.max_star_step)
        elif phase == 4:
            removed = self_clean(params, scaler, s.activation, stars, obs, flux_error, s.clean_sigma)
            rp, rf = removed
            counts = {"n": data.n, "removed_param": int(rp.sum()), "removed_flux": int(rf.sum()),
                      "removed_union": int((rp | rf).sum()), "kept": int((~(rp | rf)).sum())}
            counts.update({f"{k}_fraction": v / data.n for k, v in list(counts.items()) if k != "n"})
            logger.info("self-cleaning: parameter criterion %d (%.1f %%), flux criterion %d (%.1f %%), union %d "
                        "(%.1f %%) of %d", counts["removed_param"], 100 * counts["removed_param_fraction"],
                        counts["removed_flux"], 100 * counts["removed_flux_fraction"], counts["removed_union"],
                        100 * counts["removed_union_fraction"], data.n)
            history["phases"]["4"] = counts
        elif phase == 5:
            clean_idx = np.flatnonzero(~(removed[0] | removed[1]))
            if clean_idx.size < B:
                raise StageError(f"self-cleaning kept {clean_idx.size} stars, fewer than one batch ({B})")
            history["phases"]["5"] = model_phase(5, clean_idx, s.model_lr[2], s.star_lr[2], temper=True)
            if s.anchor_extinction:
                delta = extinction_offset(np.exp(np.asarray(stars["ln_e"]))[clean_idx], data.e_obs[clean_idx],
                                          data.e_err[clean_idx])
                params, stars["ln_e"] = shift_extinction_zero_point(params, stars["ln_e"], delta, E_FLOOR)
                logger.info("extinction zero point anchored to the reddening priors: E and ln f_abs shifted by "
                            "%+.4f mag", -delta)
                history["phases"]["5"]["extinction_zero_point_shift"] = -delta
        elif phase == 6:
            lr = optax.exponential_decay(s.phase6_lr, s.phase6_halve_every, 0.5, staircase=True)
            tx6 = None if s.star_optimizer == "gn" else optax.adam(lr)
            history["phases"]["6"] = star_phase(6, tx6, s.phase6_steps, None)
        if ckdir is not None:
            save_checkpoint(ckdir, phase, fp, params, scaler, stars, removed, history)
    unit = THETA_UNIT
    out_stars = {"theta": np.asarray(stars["theta"], np.float64) * unit, "plx": np.exp(np.asarray(stars["ln_plx"], np.float64)),
                 "e": np.exp(np.asarray(stars["ln_e"], np.float64))}
    return TrainingResult(params=jax.tree_util.tree_map(np.asarray, params),
                          scaler={k: np.asarray(v) for k, v in scaler.items()}, stars=out_stars,
                          removed_param=removed[0], removed_flux=removed[1], history=history, resumed_from=done)

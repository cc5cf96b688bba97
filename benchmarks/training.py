"""Training throughput: steps/s at batch 512 and the projected paper-scale wall time.

Measures, on synthetic arrays (a random 3 x 32 network as the truth, Eq. 2-like
covariances), the jitted steps of :mod:`xpcat.model.training`:

- ``model_star_steps_per_s``: phase 2/5 steps (model SGD step, then the batch's star step);
- ``model_steps_per_s``: phase 1 steps (model only);
- ``star_steps_per_s``: star-only steps of one batch (phases 3 and 6);
- ``gn_star_steps_per_s``, ``model_gn_star_steps_per_s``: the same with the quick preset's
  Gauss-Newton star steps (``star_optimizer = "gn"``; model steps Adam).

The projection uses the paper's sizes (Sec. 3.2, Table 1): 2,575,354 training stars,
1,861,666 HQ, 1,556,666 after self-cleaning; 128 epochs in phases 1, 2 and 5;
128 steps per star in phase 3 and 4096 in phase 6.

Usage: ``python benchmarks/training.py [--steps N]``; prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from xpcat.model import forward as fw  # noqa: E402
from xpcat.model.training import (  # noqa: E402
    TrainingData,
    init_star_opt,
    initial_stars,
    make_epoch_fn,
    make_star_fit_fn,
    make_star_gn_fit_fn,
)

PAPER = {"n_train": 2_575_354, "n_hq": 1_861_666, "n_clean": 1_556_666, "epochs": 128, "phase3_steps": 128,
         "phase6_steps": 4096}


def synthetic(n: int, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    theta = np.column_stack([rng.uniform(4000, 7000, n), rng.uniform(-1, 0.4, n), rng.uniform(1, 5, n)])
    params = fw.init_params(jax.random.PRNGKey(seed), out_bias=np.full(66, 4.0))
    scaler = fw.make_scaler(theta)
    plx, e = rng.uniform(0.3, 3, n), rng.uniform(0.01, 1, n)
    f = np.asarray(fw.predict_flux_batch(params, scaler, jnp.asarray(theta, jnp.float32),
                                         jnp.log(jnp.asarray(plx, jnp.float32)), jnp.log(jnp.asarray(e, jnp.float32))))
    err = 0.01 * f
    iu = np.triu_indices(66)
    U = np.zeros((n, 66, 66), np.float32)
    U[:, np.arange(66), np.arange(66)] = 1 / err
    return TrainingData(source_id=np.arange(n, dtype=np.int64), flux=(f + err * rng.standard_normal(f.shape)).astype(np.float32),
                        flux_error=err.astype(np.float32), factor_triu=U[:, iu[0], iu[1]],
                        theta_obs=theta.astype(np.float32), theta_err=np.tile([100.0, 0.1, 0.1], (n, 1)).astype(np.float32),
                        plx_obs=plx.astype(np.float32), plx_err=(0.05 * plx).astype(np.float32),
                        e_obs=e.astype(np.float32), e_err=np.full(n, 0.05, np.float32), hq=np.ones(n, bool))


def _time(fn, repeats: int) -> float:
    fn()  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=16, help="batches per timed epoch")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    B = 512
    data = synthetic(B * args.batches)
    obs = data.device_arrays()
    stars = initial_stars(data)
    params = fw.init_params(jax.random.PRNGKey(1))
    scaler = {k: jnp.asarray(v) for k, v in fw.make_scaler(data.theta_obs).items()}
    batches = jnp.asarray(np.arange(data.n, dtype=np.int32).reshape(args.batches, B))
    weights = jnp.ones((args.batches, B), jnp.float32)
    out = {}
    with jax.default_matmul_precision("highest"):
        for name, update_stars in (("model_star_steps_per_s", True), ("model_steps_per_s", False)):
            tx = optax.sgd(1e-5, momentum=0.5)
            st = tx.init(params)
            fn = make_epoch_fn("tanh", tx, update_stars, B, 0.5)
            so = init_star_opt(stars)

            def run():
                r = fn(params, st, stars, so, obs, scaler, batches, weights, jnp.float32(1e-4))
                jax.block_until_ready(r[4])

            out[name] = args.batches / _time(run, args.repeats)
        n_steps = 64
        fit = make_star_fit_fn("tanh", optax.adam(1e-2), n_steps, B, None)
        idx = batches[0]
        sb = jax.tree_util.tree_map(lambda a: a[idx], stars)
        ob = jax.tree_util.tree_map(lambda a: a[idx], obs)

        def run_fit():
            jax.block_until_ready(fit(params, scaler, sb, ob, weights[0])[1])

        out["star_steps_per_s"] = n_steps / _time(run_fit, args.repeats)
        # the quick preset's star optimiser: damped Gauss-Newton steps of one batch (phases 3 and 6)
        n_gn = 16
        gn = make_star_gn_fit_fn("tanh", n_gn)

        def run_gn():
            jax.block_until_ready(gn(params, scaler, sb, ob, weights[0])[1])

        out["gn_star_steps_per_s"] = n_gn / _time(run_gn, args.repeats)
        tx = optax.adam(1e-3)
        st = tx.init(params)
        fn = make_epoch_fn("tanh", tx, True, B, 0.5, "gn")
        so = init_star_opt(stars)

        def run_gn_epoch():
            jax.block_until_ready(fn(params, st, stars, so, obs, scaler, batches, weights, jnp.float32(0.0))[4])

        out["model_gn_star_steps_per_s"] = args.batches / _time(run_gn_epoch, args.repeats)
    p = PAPER
    steps_model = p["epochs"] * (2 * p["n_hq"] + p["n_clean"]) / B
    phase_s = {
        "phase1": p["epochs"] * p["n_hq"] / B / out["model_steps_per_s"],
        "phase2": p["epochs"] * p["n_hq"] / B / out["model_star_steps_per_s"],
        "phase3": p["n_train"] / B * p["phase3_steps"] / out["star_steps_per_s"],
        "phase5": p["epochs"] * p["n_clean"] / B / out["model_star_steps_per_s"],
        "phase6": p["n_train"] / B * p["phase6_steps"] / out["star_steps_per_s"],
    }
    dev = jax.devices()[0]
    result = {
        "benchmark": "training",
        "batch_size": B,
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        **{k: round(v, 2) for k, v in out.items()},
        "paper_scale": {**p, "model_steps": int(steps_model),
                        "projected_hours_by_phase": {k: round(v / 3600, 2) for k, v in phase_s.items()},
                        "projected_hours_total": round(sum(phase_s.values()) / 3600, 2),
                        "projected_hours_4x128_epochs_model_phases": round(
                            4 * p["epochs"] * p["n_hq"] / B / out["model_star_steps_per_s"] / 3600, 2)},
        "machine": machine_info(),
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main()))

"""Inference speed: the default (screen start + LM) vs the paper (full grid start + Adam/SGD schedule).

Stars are drawn from a paper-sized network (3 x 32 tanh, 4484 parameters) fitted to
the synthetic universe's truth SED, so each model evaluation costs what a trained
artifact costs; the noise has the shape of Eq. 2. Both pipelines fit the SAME
stars, including start, optimisation and Fisher uncertainties; jit compilation is
done on a separate warm-up set of the same shapes and not timed.

Prints one JSON object (last line): n_stars, default_stars_per_s, paper_stars_per_s,
ratio_vs_paper, frac_loss_within_0.01 (default loss <= paper loss + 0.01),
default_stars_per_s_large (default on --n-large stars), device, machine.

Both pipelines fit the same ``--n-stars`` (default 1024: a batch large enough that
per-call overheads do not dominate either, as in production where batches hold
4096 stars); the default's throughput is also measured on ``--n-large`` stars.

Usage: python benchmarks/inference.py [--n-stars 1024] [--n-large 4096] [--batch-size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "model"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _machine import machine_info  # noqa: E402
from inference_problem import draw_labels, emulator, make_gmm, make_problem  # noqa: E402

from xpcat.model.inference import Inference, InferenceSettings, prepare_stars  # noqa: E402
from xpcat.model.optimise import PaperSchedule  # noqa: E402
from xpcat.production.synthetic.truth_sed import build_truth_model  # noqa: E402


def _run(inf: Inference, prob, start: str, optimizer: str, schedule: PaperSchedule | None = None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    prep = prepare_stars(prob.flux, prob.factor, prob.plx_obs, prob.plx_err, prob.flux_error, dtype=inf.dtype)
    x0 = inf.start(prep, start)
    opt = inf.optimise(prep, x0, optimizer, schedule)
    out = inf.summarise(prep, opt["x"], opt["loss"], opt["converged"], opt["n_iter"])
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-stars", type=int, default=1024, help="stars fitted by both pipelines")
    ap.add_argument("--n-large", type=int, default=4096, help="stars for the default pipeline's throughput")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_setup = time.perf_counter()
    truth = build_truth_model()
    model = emulator(truth, seed=args.seed)
    gmm, rng = make_gmm(seed=args.seed)
    prob = make_problem(model, draw_labels(rng, args.n_stars), rng)
    warm = make_problem(model, draw_labels(rng, args.n_stars), rng)
    large = make_problem(model, draw_labels(rng, args.n_large), rng)
    warm_large = make_problem(model, draw_labels(rng, args.n_large), rng)
    setup_s = time.perf_counter() - t_setup

    inf = Inference(model, gmm, InferenceSettings(batch_size=args.batch_size, seed=args.seed))
    _ = inf.grid
    # warm-up (jit compiles) on other stars of the same shapes
    _run(inf, warm, "screen", "lm")
    _run(inf, warm_large, "screen", "lm")
    tiny = PaperSchedule(adam_steps=2, sgd_steps=2, max_rounds=1, stop_fraction=0.0)
    _run(inf, warm, "paper", "paper", tiny)

    t_def, out_def = _run(inf, prob, "screen", "lm")
    t_large, out_large = _run(inf, large, "screen", "lm")
    t_pap, out_pap = _run(inf, prob, "paper", "paper", PaperSchedule())

    d = out_def["loss"] - out_pap["loss"]
    ok = np.isfinite(out_def["loss"]) & np.isfinite(out_pap["loss"])
    result = {
        "benchmark": "inference",
        "n_stars": args.n_stars,
        "default_stars_per_s": round(args.n_stars / t_def, 1),
        "paper_stars_per_s": round(args.n_stars / t_pap, 3),
        "ratio_vs_paper": round(t_pap / t_def, 1),
        "frac_loss_within_0.01": round(float(np.mean(ok & (d <= 0.01))), 4),
        "median_loss_default_minus_paper": round(float(np.median(d[ok])), 4),
        "frac_default_converged": round(float(np.mean(out_def["fit_status"] == 0)), 4),
        "frac_paper_converged": round(float(np.mean(out_pap["fit_status"] == 0)), 4),
        "median_lm_iterations": float(np.median(out_def["n_iter"])),
        "n_large": args.n_large,
        "default_stars_per_s_large": round(args.n_large / t_large, 1),
        "default_seconds": round(t_def, 3),
        "paper_seconds": round(t_pap, 2),
        "batch_size": args.batch_size,
        "setup_seconds": round(setup_s, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
        "model": "3x32 tanh network emulating the truth SED (4484 parameters)",
        "machine": machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

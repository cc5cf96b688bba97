"""Convergence of the default fit, before and after the refit of unconverged stars (issue 15 item 4).

On a demo run directory's stars (all conditioned partitions, the run's trained
model), per Teff range (the synthetic truth's Teff when the run has it, else the
fitted Teff):

* ``not_converged_before`` / ``_after``: fraction of the fitted stars with
  ``fit_status = 1`` with the refit off (``InferenceSettings(refit=False)``, the
  LM fit alone) and on (the default: float64 exact-Hessian polish, then the
  paper optimiser for those still unconverged; :mod:`xpcat.model.refit`);
* on a seeded sample of ``--sample`` stars per range, the paper optimiser
  (full published schedule, SPEC §4) from the same start points, and
  ``lm_le_paper_before`` / ``_after``: the fraction whose final loss is <= the
  paper's + tol, all losses re-evaluated in float64 at the returned variables,
  tol = max(0.01, 1e-6 |L_paper|) (float32 loss rounding at |L| ~ 1e6 is ~0.1);
* throughput of ``Inference.fit`` on all the stars, refit off and on, measured
  twice alternately in the same process after a warm-up (jit compiled), the
  best of each kept; the cost is their ratio.

Prints one JSON object (last line) and writes it to ``--out``.

Usage: python benchmarks/convergence.py [--run-dir /tmp/demo-base] [--sample 300] [--out FILE]
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _machine import machine_info  # noqa: E402

from xpcat.catalog_schema.flags import FitStatus  # noqa: E402
from xpcat.catalog_schema.triangle import n_triu  # noqa: E402
from xpcat.model.artifact import load_artifact  # noqa: E402
from xpcat.model.inference import Inference, InferenceSettings, prepare_stars  # noqa: E402
from xpcat.model.objective import Objective, StarData  # noqa: E402
from xpcat.model.refit import RefitStage, cast_model  # noqa: E402
from xpcat.production.run_dir import RunPaths  # noqa: E402

TEFF_RANGES = ((0.0, 4000.0), (4000.0, 5000.0), (5000.0, 6500.0), (6500.0, 7500.0), (7500.0, np.inf))


def _stars(run_dir: Path) -> dict[str, np.ndarray]:
    paths = RunPaths.of(run_dir)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(paths.conditioned.glob("*.parquet"))])

    def lists(name: str, width: int, dtype=np.float64) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width).astype(dtype)

    out = {"flux": lists("flux", 66), "flux_error": lists("flux_error", 66),
           "factor": lists("flux_factor_triu", n_triu(66), np.float32),
           "parallax": table.column("parallax").to_numpy().astype(np.float64),
           "parallax_error": table.column("parallax_error").to_numpy().astype(np.float64),
           "source_id": table.column("source_id").to_numpy()}
    truth = paths.truth / "truth.parquet"
    if not truth.exists():
        truth = run_dir / "universe" / "truth" / "truth.parquet"
    if truth.exists():
        t = pq.read_table(truth, columns=["source_id", "teff"]).to_pandas().set_index("source_id")
        out["teff_truth"] = t["teff"].reindex(out["source_id"]).to_numpy(dtype=np.float64)
    return out


def _fit(inf: Inference, s: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = inf.fit(s["flux"], s["factor"], s["parallax"], s["parallax_error"], s["flux_error"])
    return time.perf_counter() - t0, out


def _loss64(inf: Inference, x: np.ndarray, prep, idx: np.ndarray) -> np.ndarray:
    """Eq. 19 in float64 at the internal variables x (k, 5) of the prepared stars idx."""
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        obj = Objective(cast_model(inf.objective.model, np.float64), inf.objective.gmm, dtype=np.float64)
        stars = StarData(*(jnp.asarray(np.asarray(a)[idx], dtype=np.float64)
                           for a in (prep.flux, prep.factor, prep.plx_obs, prep.inv_plx_err)))
        xs = jnp.asarray(np.where(np.isfinite(x), x, 0.0), dtype=np.float64)
        loss = np.asarray(jax.jit(jax.vmap(obj.loss))(xs, stars))
    return np.where(np.all(np.isfinite(x), axis=1), loss, np.inf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/demo-base"))
    ap.add_argument("--model", type=Path, default=None, help="model artifact (default: RUN_DIR/model)")
    ap.add_argument("--sample", type=int, default=300, help="stars per Teff range compared with the paper optimiser")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "convergence.json")
    args = ap.parse_args()

    art = load_artifact(args.model or RunPaths.of(args.run_dir).model)
    s = _stars(args.run_dir)
    n = len(s["flux"])
    on = Inference(art.forward_model(dtype=np.float32), art.gmm,
                   InferenceSettings(batch_size=args.batch_size, seed=args.seed))
    off = on.with_settings(refit=False)

    _fit(off, s)  # warm-up: jit compiles (start grid, LM, refit shapes)
    _fit(on, s)
    t_off, t_on = [], []
    for _ in range(2):
        t, out_off = _fit(off, s)
        t_off.append(t)
        t, out_on = _fit(on, s)
        t_on.append(t)
    load = os.getloadavg()

    teff = s.get("teff_truth", out_on["theta"][:, 0])
    teff_source = "truth" if "teff_truth" in s else "fitted"
    fitted = out_on["fit_status"] != FitStatus.NO_USABLE_DATA
    prep = prepare_stars(s["flux"], s["factor"], s["parallax"], s["parallax_error"], s["flux_error"], dtype=on.dtype)
    rng = np.random.default_rng(args.seed)
    ranges = []
    t_paper = 0.0
    for lo, hi in TEFF_RANGES:
        sel = fitted & (teff >= lo) & (teff < hi)
        pool = np.flatnonzero(sel)
        row = {"teff_min": lo, "teff_max": None if not np.isfinite(hi) else hi, "n_stars": int(sel.sum())}
        if pool.size == 0:
            ranges.append(row)
            continue
        for name, out in (("before", out_off), ("after", out_on)):
            row[f"not_converged_{name}"] = float(np.mean(out["fit_status"][sel] == FitStatus.NOT_CONVERGED))
        idx = np.sort(rng.choice(pool, min(args.sample, pool.size), replace=False))
        t0 = time.perf_counter()
        sub = prepare_stars(s["flux"][idx], s["factor"][idx], s["parallax"][idx], s["parallax_error"][idx],
                            s["flux_error"][idx], dtype=on.dtype)
        paper = on.optimise(sub, out_on["x0"][idx], "paper")
        t_paper += time.perf_counter() - t0
        l_paper = _loss64(on, paper["x"], prep, idx)
        tol = np.maximum(0.01, 1e-6 * np.abs(np.where(np.isfinite(l_paper), l_paper, 0.0)))
        row["n_sample"] = int(idx.size)
        for name, out in (("before", out_off), ("after", out_on)):
            x = np.column_stack([out["params5"][idx, :3], np.log(out["params5"][idx, 4]),
                                 np.log(out["params5"][idx, 3])])
            l_lm = _loss64(on, x, prep, idx)
            ok = l_lm <= l_paper + tol
            row[f"lm_le_paper_{name}"] = float(np.mean(ok))
            row[f"worst_excess_{name}"] = float(np.max(np.where(ok, 0.0, l_lm - l_paper)))
        row["refit_polish"] = int(np.sum(out_on["refit"][sel] == RefitStage.POLISH))
        row["refit_paper"] = int(np.sum(out_on["refit"][sel] == RefitStage.PAPER))
        ranges.append(row)
        print(json.dumps(row), flush=True)

    res = {
        "run_dir": str(args.run_dir), "n_stars": n, "n_fitted": int(fitted.sum()), "teff_source": teff_source,
        "loss_tolerance": "max(0.01, 1e-6 |L_paper|), losses in float64",
        "ranges": ranges,
        "not_converged_before": float(np.mean(out_off["fit_status"][fitted] == FitStatus.NOT_CONVERGED)),
        "not_converged_after": float(np.mean(out_on["fit_status"][fitted] == FitStatus.NOT_CONVERGED)),
        "refit_polished": int(np.sum(out_on["refit"] == RefitStage.POLISH)),
        "refit_paper": int(np.sum(out_on["refit"] == RefitStage.PAPER)),
        "fit_seconds_refit_off": [round(t, 2) for t in t_off],
        "fit_seconds_refit_on": [round(t, 2) for t in t_on],
        "stars_per_s_refit_off": round(n / min(t_off), 1),
        "stars_per_s_refit_on": round(n / min(t_on), 1),
        "throughput_ratio_on_vs_off": round(min(t_off) / min(t_on), 3),
        "paper_sample_seconds": round(t_paper, 1),
        "load_average": [round(v, 2) for v in load],
        "device": str(jax.devices()[0]),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

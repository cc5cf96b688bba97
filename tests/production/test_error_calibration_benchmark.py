"""``benchmarks/error_calibration.py``: its scoring of calibrated errors against a truth and its label-noise table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from xpcat.model import model_error as ME

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "error_calibration.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("error_calibration", BENCHMARK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stars(n: int, rng: np.random.Generator, sd: np.ndarray) -> dict:
    truth = np.column_stack([rng.uniform(4.0, 7.0, n), rng.uniform(-1, 0.3, n), rng.uniform(1, 5, n),
                             rng.uniform(0, 1, n), rng.uniform(0.2, 2, n)])
    cov = np.broadcast_to(np.diag(sd**2), (n, 5, 5)).copy()
    est = truth + sd * rng.standard_normal((n, 5))
    return {"source_id": np.arange(1, n + 1, dtype=np.int64), "params5": est, "cov5": cov, "truth": truth,
            "quality": np.ones(n), "basic": np.ones(n, bool), "parallax": truth[:, 4],
            "parallax_error": np.full(n, np.inf), "g": rng.uniform(9, 18, n)}


def _no_model_error(fisher_scale: float) -> ME.ModelError:
    beta = np.zeros((5, ME.N_Z))
    beta[:, 0] = -60.0  # no model error: only the (scaled) Fisher part
    return ME.ModelError(beta=beta, z_lo=np.full(ME.N_Z, -1e9), z_hi=np.full(ME.N_Z, 1e9), rho=np.eye(5),
                         fisher_scale=np.full(5, fisher_scale))


def test_score_finds_calibrated_errors_calibrated_and_too_large_ones_out_of_band():
    bench = _benchmark()
    d = _stars(4000, np.random.default_rng(0), np.array([0.1, 0.1, 0.1, 0.03, 0.05]))
    good = bench.score(d, _no_model_error(1.0))
    assert good["stars"] == 4000
    assert all(0.93 < s < 1.07 for s in good["overall"].values()), good["overall"]
    assert good["bins_significantly_outside"] <= 3  # chance: ~2 of ~100
    wide = bench.score(d, _no_model_error(1.6))  # errors 1.6x too large: pulls ~0.62 everywhere
    assert all(0.55 < s < 0.7 for s in wide["overall"].values()), wide["overall"]
    assert wide["bins_outside"] == wide["bins_checked"] > 50


def test_label_noise_compares_label_errors_with_the_estimates_true_scatter():
    bench = _benchmark()
    rng = np.random.default_rng(1)
    d = _stars(3000, rng, np.array([0.05, 0.1, 0.1, 0.03, 0.05]))
    pick = np.sort(rng.choice(3000, 1000, replace=False))
    ref5 = np.column_stack([d["truth"][pick, 0] + 0.15 * rng.standard_normal(1000), d["truth"][pick, 1:3],
                            np.full((1000, 2), np.nan)])
    ls = {"source_id": d["source_id"][pick], "params5": d["params5"][pick], "ref5": ref5,
          "ref_var5": np.column_stack([np.full(1000, 0.15**2), np.full((1000, 2), 0.2**2), np.zeros((1000, 2))])}
    rows = bench.label_noise(d, ls)
    full = [r for r in rows if r["n"] >= 100]
    assert len(full) >= 4 and sum(r["n"] for r in rows) == 1000
    for r in full:  # labels 150 K against the estimates' 50 K; logg 0.2 against 0.1
        assert abs(r["teff"]["label_error_median"] - 150.0) < 1e-6
        assert 40.0 < r["teff"]["estimate_true_scatter"] < 60.0
        assert 0.08 < r["logg"]["estimate_true_scatter"] < 0.12

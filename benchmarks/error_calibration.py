"""Calibration of the reported errors on a synthetic run, per bin, and what the labels can teach (issue 15 item 1).

On a finished demo / simulate run directory (it has ``truth/``), every conditioned
star is fitted again with the run's model (Fisher covariances, the fit's quality),
the model error is learned exactly as ``xpcat train-confidence`` learns it (the
same learning set, :func:`xpcat.production.train_model_error.learning_set`: the
validation split's labelled stars and the unlabelled sample's reddening priors),
and the calibrated errors of the basic-cut stars are scored against the truth:

* ``pulls``: the report's own error calibration
  (:func:`xpcat.production.report.reliability.error_calibration`): robust sigma
  of (estimate - truth) / error per parameter, in the bins of G, true E and
  true Teff, with the verdict (bins of >= 20 stars outside 0.85-1.2, and
  outside by more than two standard errors);
* ``label_noise``: per bin of the labels' Teff, for the learning stars, the
  median label error against the robust scatter of estimate - truth: where the
  labels are noisier than the estimates, their residuals cannot say how large
  the model error is, and the learned form there is an extrapolation.

The fits are the catalog's (the same model and settings), so the figures equal
the run's report whenever its model error was learned by the same code.

Prints one JSON object (last line) and writes it to ``--out``.

Usage: python benchmarks/error_calibration.py --run-dir xpcat-demo/run [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _machine import machine_info  # noqa: E402

from xpcat.catalog_schema import PARAM_NAMES  # noqa: E402
from xpcat.catalog_schema.flags import FitStatus  # noqa: E402
from xpcat.config import read_run_config  # noqa: E402
from xpcat.model import model_error as ME  # noqa: E402
from xpcat.model.pull_statistics import robust_sigma  # noqa: E402
from xpcat.model.uncertainty import quality_flag_bits  # noqa: E402
from xpcat.production import train_confidence as TC  # noqa: E402
from xpcat.production.report.data import REPORT_SCALE, ReportData, load_g_mag  # noqa: E402
from xpcat.production.report.reliability import CALIBRATION_BINS, error_calibration  # noqa: E402
from xpcat.production.run_dir import RunPaths  # noqa: E402
from xpcat.production.train_model_error import (  # noqa: E402
    learning_set,
    read_reddening_prior,
    unlabelled_with_prior,
)

LABEL_COLUMNS = ("teff", "teff_error", "feh", "feh_error", "logg", "logg_error")


def fit_run(run_dir: Path) -> dict[str, np.ndarray]:
    """Fit every conditioned star of ``run_dir`` with its model; the truth, labels, E prior and G beside."""
    from xpcat.model.artifact import load_artifact
    from xpcat.model.inference import Inference, InferenceSettings

    config = read_run_config(run_dir)
    paths = RunPaths.of(run_dir, config)
    artifact = load_artifact(paths.model)
    inference = Inference(artifact.forward_model(), artifact.gmm, InferenceSettings.from_config(config))
    sid = np.sort(np.concatenate([pq.read_table(f, columns=["source_id"]).column("source_id").to_numpy()
                                  for f in sorted(paths.conditioned.glob("*.parquet")) if not f.name.startswith(".")]))
    cond = TC.read_conditioned(run_dir, sid)
    fit = TC.fit_stars(inference, cond, config.inference.batch_size)
    sid = cond["source_id"]
    p5 = np.asarray(fit["params5"], np.float64)
    bits = quality_flag_bits(fit["chi2"], fit["ln_prior"], p5[:, 4], cond["parallax"], cond["parallax_error"],
                             float(artifact.gmm.ln_prior_cut))
    basic = (bits == 0) & (np.asarray(fit["fit_status"]) == FitStatus.CONVERGED) & np.all(np.isfinite(p5), axis=1)
    truth = pq.read_table(paths.truth / "truth.parquet").to_pandas().set_index("source_id").reindex(sid)
    labels = TC.read_labels(run_dir, config).to_pandas().set_index("source_id")
    e_prior, e_prior_error = read_reddening_prior(run_dir, config, sid)
    return {
        "config": config, "paths": paths, "source_id": sid, "params5": p5,
        "cov5": np.asarray(fit["cov5"], np.float64), "quality": ME.fit_quality(fit["chi2"], fit["n_valid_flux"]),
        "basic": basic, "parallax": cond["parallax"], "parallax_error": cond["parallax_error"],
        "truth": np.column_stack([truth.teff / 1000.0, truth.feh, truth.logg, truth.e, truth.parallax]),
        "labels": labels.reindex(sid)[list(LABEL_COLUMNS)].to_numpy(np.float64),
        "labelled_ids": labels.index.to_numpy(np.int64), "e_prior": e_prior, "e_prior_error": e_prior_error,
        "g": load_g_mag(run_dir, sid),
    }


def learn(d: dict) -> tuple[ME.ModelError | None, dict, dict]:
    """The model error as train-confidence learns it, from the fits in ``d``."""
    config, paths = d["config"], d["paths"]
    lab = np.isfinite(d["labels"][:, 0])
    ref = {c: d["labels"][lab, j] for j, c in enumerate(LABEL_COLUMNS)}
    unl = np.isin(d["source_id"], unlabelled_with_prior(paths.root, config, d["labelled_ids"])[0])
    unlabelled = {"source_id": d["source_id"][unl], "params5": d["params5"][unl], "cov5": d["cov5"][unl],
                  "parallax": d["parallax"][unl], "parallax_error": d["parallax_error"][unl],
                  "usable": d["basic"][unl], "e_prior": d["e_prior"][unl], "e_prior_error": d["e_prior_error"][unl],
                  "quality": d["quality"][unl]}
    ls = learning_set(paths, config, paths.model, d["source_id"][lab], d["params5"][lab], d["cov5"][lab], ref,
                      d["parallax"][lab], d["parallax_error"][lab], d["basic"][lab], unlabelled, d["quality"][lab])
    me, report = ME.learn_model_error(ls["params5"], ls["cov5"], ls["inv_plx_err"], ls["ref5"], ls["ref_var5"],
                                      quality=ls["quality"])
    return me, report, ls


def score(d: dict, me: ME.ModelError) -> dict:
    """The report's error calibration (:func:`xpcat.production.report.reliability.error_calibration`) of the
    basic-cut stars' calibrated errors against the truth, overall and per bin."""
    rows = d["basic"]
    n = int(rows.sum())
    p5, c5 = d["params5"][rows], d["cov5"][rows]
    plx_err = d["parallax_error"][rows]
    has = np.isfinite(d["parallax"][rows]) & np.isfinite(plx_err) & (plx_err > 0)
    inv = np.where(has, 1.0 / np.where(has, plx_err, 1.0), 0.0)
    cov, _ = ME.calibrated_covariance(c5, p5, inv, me, d["quality"][rows])
    scale = np.array([REPORT_SCALE[p] for p in PARAM_NAMES])
    truth = d["truth"][rows] * scale
    ref = {p: truth[:, j] for j, p in enumerate(PARAM_NAMES)} | {f"{p}_error": np.zeros(n) for p in PARAM_NAMES}
    zeros = np.zeros(n)
    data = ReportData(source_id=d["source_id"][rows], ra=zeros, dec=zeros, est=p5 * scale,
                      err=np.sqrt(np.einsum("nii->ni", cov)) * scale, chi2=zeros, ln_prior=zeros,
                      confidence=np.ones((n, 3)), quality_flags=np.zeros(n, np.uint8),
                      fit_status=np.zeros(n, np.uint8), ref=ref, ref_kind="truth")
    out = error_calibration(data, d["g"][rows], None)
    verdict = out["bins_verdict"]
    return {"stars": out["stars"], "overall": {p: out[p]["pull_sigma"] for p in ME.PARAMS},
            "bins_checked": verdict["checked"], "bins_outside": len(verdict["outside"]),
            "bins_significantly_outside": len(verdict["significantly_outside"]),
            "significantly_outside": [{k: e[k] for k in ("parameter", "bin", "lo", "hi", "n", "pull_sigma",
                                                         "pull_sigma_se")}
                                      for e in verdict["significantly_outside"]]}


def label_noise(d: dict, ls: dict) -> list[dict]:
    """Per bin of the labels' Teff: the learning stars' median label error and their estimates' true scatter."""
    est = ls["params5"]
    lab = ls["ref5"]
    idx = np.searchsorted(d["source_id"], ls["source_id"])  # d["source_id"] is sorted and holds every learner
    truth = d["truth"][idx]
    rows = []
    for lo, hi in zip(CALIBRATION_BINS["Teff"][:-1], CALIBRATION_BINS["Teff"][1:], strict=True):
        m = np.isfinite(lab[:, 0]) & (1000.0 * lab[:, 0] >= lo) & (1000.0 * lab[:, 0] < hi)
        row: dict = {"teff_lo": lo, "teff_hi": hi, "n": int(m.sum())}
        for j, p in enumerate(ME.PARAMS[:3]):
            scale = 1000.0 if j == 0 else 1.0
            row[p] = {"label_error_median": float(np.median(np.sqrt(ls["ref_var5"][m, j]))) * scale if m.any()
                      else float("nan"),
                      "estimate_true_scatter": robust_sigma(est[m, j] - truth[m, j]) * scale}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path, help="a finished demo / simulate run (with truth/)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    d = fit_run(args.run_dir)
    t_fit = time.perf_counter() - t0
    me, report, ls = learn(d)
    result = {
        "benchmark": "error_calibration",
        "run_dir": str(args.run_dir),
        "stars": int(d["source_id"].size),
        "stars_basic_cut": int(d["basic"].sum()),
        "learning_stars": {"validation_basic_cut": ls["learned_from"]["stars_basic_cut"],
                           "unlabelled_basic_cut": ls["learned_from"]["stars_unlabelled_basic_cut"]},
        "fisher_scale": None if me is None else [float(k) for k in me.fisher_scale],
        "pulls": None if me is None else score(d, me),
        "label_noise": label_noise(d, ls),
        "seconds_fit": t_fit,
        "seconds": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    text = json.dumps(result, default=float)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()

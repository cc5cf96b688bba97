"""``xpcat train-confidence``: train the three confidence classifiers into the model artifact.

Sec. 4.4 / Appendix B, SPEC §7:

1. The labelled stars (``raw/labels``, or ``[data] labels``) are fitted with
   the trained model and type prior **without their labels** (Eq. 19,
   :mod:`xpcat.model.inference`), from their conditioned partitions. By
   default (``[confidence] label_set = "all"``) that is every labelled star,
   as Sec. 4.4 does ("we withhold 20 % of the LAMOST sources"): the forward
   model's training stars are inferred exactly as any other star, and bad
   estimates are rare enough that the classifiers need all of them. With
   ``label_set = "validation"`` only the stars the model did not train on
   (the training stage's validation split,
   :func:`xpcat.production.train.split_is_validation`) are used;
   when that split has too few good or bad stars for a classifier (small
   runs) the labelled training stars are added. The summary's ``label_set``
   says which set was used.
2. chi^2_eps against the labels gives good (< 4) / bad (> 9) per parameter;
   only stars passing the basic cut (quality_flags bits 3-5 clear) are used.
3. The ROC AUC of each classifier on stars it did not see, with its
   bootstrap standard error: beyond the paper, by default
   (``[confidence] folds = 5``) every usable star is scored by the network of
   the k-fold cross-validation that did not see it, then each classifier is
   trained on all the stars (a 20 % hold-out of a small run holds a handful
   of bad stars, so its AUC is too uncertain to judge); ``folds = 1`` is the
   paper's 20 % hold-out (``holdout_fraction``). Folds and hold-out are a
   stable hash of the source_id.
   A classifier with too few good or bad stars (``min_per_class``) is not
   trained and falls back to the placeholder rule alone; the others train.
4. The classifiers are stored in the model artifact as the ``confidence``
   component (:func:`xpcat.model.artifact.add_component`), with the report
   (per parameter: AUC, or the fallback and its reason) in its metadata; the
   report is also written to ``RUN_DIR/state/confidence.json``.
5. The validation-split stars among them teach the model's own error, stored
   as the ``model_error`` component (:mod:`xpcat.production.train_model_error`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xpcat.catalog_schema.catalog import TEFF_K_PER_UNIT
from xpcat.config import RunConfig, config_to_dict
from xpcat.errors import InputError, StageError
from xpcat.fileio import atomic_path, write_text_atomic
from xpcat.model import confidence as C
from xpcat.model.model_error import fit_quality
from xpcat.production.run_dir import RunPaths
from xpcat.production.run_lock import run_lock
from xpcat.production.train_model_error import (
    train_model_error,
    unlabelled_with_prior,
)
from xpcat.progress import progress

logger = logging.getLogger(__name__)

__all__ = [
    "COMPONENT",
    "CONDITIONED_COLUMNS",
    "read_labels",
    "read_conditioned",
    "fit_stars",
    "training_set",
    "holdout_mask",
    "fold_index",
    "train_confidence_run",
]

#: Name of the artifact component holding the classifiers.
COMPONENT = "confidence"
#: Conditioned columns the fit and the features need.
CONDITIONED_COLUMNS = (
    "source_id", "flux", "flux_error", "flux_factor_triu", "parallax", "parallax_error", "n_valid_flux",
    "phot_g_mean_mag", "phot_g_mean_flux_over_error", "phot_bp_mean_flux_over_error",
    "phot_rp_mean_flux_over_error", "phot_bp_rp_excess_factor", "ruwe", "fidelity_v2", "norm_dg",
    "bp_chi_squared", "rp_chi_squared",
)
_LABEL_COLUMNS = ("source_id", "teff", "teff_error", "feh", "feh_error", "logg", "logg_error")


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))


def _read_parquets(files: list[Path], columns: list[str] | tuple[str, ...], what: str) -> pa.Table:
    tables = []
    for f in files:
        try:
            t = pq.read_table(f, columns=list(columns))
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"{what} file {f} cannot be read ({err})") from err
        except KeyError as err:
            raise InputError(f"{what} file {f} lacks column {err}") from err
        tables.append(t.select(list(columns)))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def read_labels(run_dir: Path, config: RunConfig) -> pa.Table:
    """The label table (``[data] labels`` if set, else ``<raw_dir>/labels``), one row per source_id.

    Raises
    ------
    StageError
        When there is no label table.
    InputError
        When a source_id appears twice or a file is unreadable.
    """
    paths = RunPaths.of(run_dir, config)
    path = paths.user_file(config.data.labels) or paths.raw_table("labels")
    files = _parquet_files(path) if path.exists() else []
    if not files:
        raise StageError(
            f"no label table at {path}: the confidence classifiers need labelled stars "
            "(raw/labels from `xpcat fetch` / `xpcat simulate`, or [data] labels)"
        )
    t = _read_parquets(files, _LABEL_COLUMNS, "label")
    sid = t.column("source_id").to_numpy()
    uniq, counts = np.unique(sid, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1]
        raise InputError(f"label table {path}: {dup.size} source_id(s) appear more than once (first {int(dup[0])})")
    return t.sort_by("source_id")


def _fixed_list(col: pa.ChunkedArray, width: int) -> np.ndarray:
    arr = col.combine_chunks()
    flat = arr.flatten() if hasattr(arr, "flatten") else arr.values
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(len(arr), width)


def read_conditioned(run_dir: Path, source_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Conditioned columns of the stars ``source_ids`` (sorted), from ``RUN_DIR/conditioned``.

    Returns
    -------
    dict of numpy arrays, rows sorted by source_id: scalars (n,), ``flux`` and
    ``flux_error`` (n, 66), ``flux_factor_triu`` (n, 2211). Stars without a
    conditioned row are absent (the caller compares ``source_id``).

    Raises
    ------
    StageError
        When there are no conditioned partitions.
    """
    conditioned = RunPaths.of(run_dir).conditioned
    files = _parquet_files(conditioned)
    if not files:
        raise StageError(f"no conditioned partitions in {conditioned}: run `xpcat condition` first")
    want = pa.array(np.asarray(source_ids, dtype=np.int64))
    parts = []
    for f in progress(files, "read", total=len(files), unit="part"):
        t = _read_parquets([f], CONDITIONED_COLUMNS, "conditioned")
        t = t.filter(pc.is_in(t.column("source_id"), value_set=want))
        if t.num_rows:
            parts.append(t)
    if not parts:
        return {c: np.zeros((0,)) for c in CONDITIONED_COLUMNS}
    t = pa.concat_tables(parts).sort_by("source_id")
    out: dict[str, np.ndarray] = {}
    for c in CONDITIONED_COLUMNS:
        if c == "flux_factor_triu":
            out[c] = _fixed_list(t.column(c), C.N_FLUX * (C.N_FLUX + 1) // 2)
        elif c in ("flux", "flux_error"):
            out[c] = _fixed_list(t.column(c), C.N_FLUX)
        elif c == "source_id":
            out[c] = t.column(c).to_numpy()
        else:
            out[c] = np.asarray(t.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
    return out


def fit_stars(inference: Any, cond: dict[str, np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """Fit the conditioned stars without labels (Eq. 19), in chunks of ``chunk`` stars.

    Parameters
    ----------
    inference : :class:`xpcat.model.inference.Inference`
    cond : output of :func:`read_conditioned`
    chunk : stars per call

    Returns
    -------
    The concatenated :func:`xpcat.model.inference.fit_batch` dicts.
    """
    n = len(cond["source_id"])
    outs = []
    for lo in progress(range(0, n, chunk), "confidence fit", total=-(-n // chunk), unit="batch"):
        hi = min(lo + chunk, n)
        outs.append(inference.fit(cond["flux"][lo:hi], cond["flux_factor_triu"][lo:hi], cond["parallax"][lo:hi],
                                  cond["parallax_error"][lo:hi], cond["flux_error"][lo:hi]))
    keys = [k for k in outs[0] if isinstance(outs[0][k], np.ndarray)]
    return {k: np.concatenate([o[k] for o in outs]) for k in keys}


def training_set(
    fit: dict[str, np.ndarray], cond: dict[str, np.ndarray], ref: dict[str, np.ndarray], ln_prior_cut: float
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Features, chi^2_eps labels and the basic-cut mask of fitted labelled stars.

    Parameters
    ----------
    fit : :func:`fit_stars` output (n rows).
    cond : the same stars' conditioned columns.
    ref : reference values and errors, (n,) each: ``teff`` [K], ``teff_error``,
        ``feh``, ``feh_error``, ``logg``, ``logg_error`` (error 0 for a truth).
    ln_prior_cut : the type prior's bit-4 level (:attr:`xpcat.model.prior.GMMParams.ln_prior_cut`).

    Returns
    -------
    features : (n, F) array
    labels : {"teff" | "feh" | "logg": (n,) 1 good / 0 bad / NaN unused}
    basic : (n,) bool, passes the basic cut (bits 3-5 clear, fit converged)
    """
    from xpcat.catalog_schema.flags import FitStatus
    from xpcat.model.uncertainty import quality_flag_bits

    features = C.confidence_features(fit, cond)
    params5 = np.asarray(fit["params5"], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        err5 = np.sqrt(np.einsum("nii->ni", np.asarray(fit["cov5"], dtype=np.float64)))
    bits = quality_flag_bits(fit["chi2"], fit["ln_prior"], params5[:, 4], cond["parallax"], cond["parallax_error"],
                             ln_prior_cut)
    basic = (bits == 0) & (np.asarray(fit["fit_status"]) == FitStatus.CONVERGED) & np.all(np.isfinite(params5), axis=1)
    unit = {"teff": TEFF_K_PER_UNIT, "feh": 1.0, "logg": 1.0}  # catalog Teff is kK, labels K
    col = {"teff": 0, "feh": 1, "logg": 2}
    labels = {}
    for p in C.PARAMETERS:
        chi2 = C.chi2_eps(params5[:, col[p]] * unit[p], err5[:, col[p]] * unit[p], ref[p], ref[f"{p}_error"],
                          C.EPSILON[p])
        labels[p] = np.where(basic, C.chi2_eps_labels(chi2), np.nan)
    return features, labels, basic


def _hash_unit(source_id: np.ndarray, seed: int) -> np.ndarray:
    """A stable uniform number in [0, 1) per (source_id, seed): the splitmix64 finaliser."""
    from xpcat.production.train import splitmix64_unit

    return splitmix64_unit(np.asarray(source_id, dtype=np.int64).view(np.uint64)
                           ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64))


def holdout_mask(source_id: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Stars held out for the ROC AUC: a stable hash of (source_id, seed) below ``fraction``.

    Parameters
    ----------
    source_id : (n,) int64
    fraction : float in [0, 1)
    seed : int

    Returns
    -------
    (n,) bool; the same star is held out in every run with the same seed.
    """
    return _hash_unit(source_id, seed) < fraction


def fold_index(source_id: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Cross-validation fold of each star: the same stable hash as :func:`holdout_mask`, cut into ``folds`` parts.

    Returns
    -------
    (n,) int64 in [0, folds); the same star has the same fold in every run with the same seed.
    """
    return np.minimum((_hash_unit(source_id, seed) * max(int(folds), 1)).astype(np.int64), max(int(folds), 1) - 1)


def _write_stars(path: Path, source_id: np.ndarray, features: np.ndarray, est: np.ndarray, ref: np.ndarray,
                 labels: dict[str, np.ndarray], keep: np.ndarray, split: np.ndarray, final: np.ndarray,
                 unseen: np.ndarray) -> None:
    """Save the per-star training set (for diagnostics and Fig. 10-style checks), atomically.

    Arrays: ``source_id`` (n,), ``features`` (n, F), ``est`` and ``ref`` (n, 3)
    Teff [K], [Fe/H], logg, ``labels`` (n, 3) 1/0/NaN, ``used`` (n,) basic cut
    and finite features, ``holdout`` (n,) bool: stars scored by a network that
    did not see them (the hold-out; every star with k folds), ``fold`` (n,) the
    fold of each star (-1 with the hold-out), ``confidence`` (n, 3): that
    unseen network's score where ``holdout`` and defined, else the final
    classifiers', ``confidence_final`` (n, 3): the final classifiers'.
    """
    by_fold = split.dtype != bool
    confidence = np.where(np.isfinite(unseen), unseen, final)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, source_id=source_id, features=features, est=est, ref=ref,
                 labels=np.column_stack([labels[p] for p in C.PARAMETERS]), used=keep,
                 holdout=np.ones(split.shape, bool) if by_fold else split,
                 fold=split if by_fold else np.full(split.shape, -1), confidence=confidence,
                 confidence_final=final, feature_names=np.asarray(C.FEATURE_NAMES))


def _fit_unlabelled(run_dir: Path, config: RunConfig, inference: Any, ln_prior_cut: float,
                    labelled: np.ndarray) -> dict[str, np.ndarray] | None:
    """Fit ``[confidence] model_error_unlabelled`` stars without labels for the model error of E.

    Returns
    -------
    None when there are none, else ``source_id``, ``params5``, ``cov5``, ``parallax``,
    ``parallax_error``, ``usable`` (basic cut, converged) and the reddening prior ``e_prior``,
    ``e_prior_error`` [mag] of the fitted stars.
    """
    sid, e_prior, e_err = unlabelled_with_prior(run_dir, config, labelled)
    cond = read_conditioned(run_dir, sid) if sid.size else {"source_id": sid}
    n = len(cond["source_id"])
    if n == 0:
        return None
    logger.info("model error: fitting %d stars without labels (their reddening prior: E only)", n)
    fit = fit_stars(inference, cond, config.inference.batch_size)
    _, _, basic = training_set(fit, cond, {c: np.full(n, np.nan) for c in _LABEL_COLUMNS[1:]}, ln_prior_cut)
    row = np.searchsorted(sid, cond["source_id"])  # sid is sorted; cond holds a sorted subset of it
    return {"source_id": cond["source_id"], "params5": np.asarray(fit["params5"], np.float64),
            "cov5": np.asarray(fit["cov5"], np.float64), "parallax": cond["parallax"],
            "parallax_error": cond["parallax_error"], "usable": basic, "e_prior": e_prior[row],
            "e_prior_error": e_err[row], "quality": fit_quality(fit["chi2"], fit["n_valid_flux"])}


def _validation_mask(source_id: np.ndarray, config: RunConfig, artifact: Any) -> np.ndarray | None:
    """Which labelled stars the model did not train on: the training stage's validation split (by source_id).

    The split ``xpcat train`` recorded in the artifact (``validation_hash_range``; the project's
    [0, validation_fraction) for artifacts made before it was recorded).
    """
    from xpcat.production.train import in_hash_range, recorded_validation_range

    hash_range = recorded_validation_range(artifact.data_summary, config.training.validation_fraction)
    return np.asarray(in_hash_range(source_id, hash_range), dtype=bool)


def train_confidence_run(run_dir: Path, config: RunConfig, *, model_dir: Path | None = None,
                         forward_model: Any = None) -> dict:
    """Train the confidence classifiers of a run and store them in its model artifact.

    Parameters
    ----------
    run_dir : Path
        Run directory with ``conditioned/``, ``raw/labels`` and ``model/``.
    config : RunConfig
        ``[confidence]`` settings, ``[inference]`` for the fits, ``run.seed``.
    model_dir : Path, optional
        Model artifact (default ``RUN_DIR/model``).
    forward_model : optional
        Forward model used for the fits instead of the artifact's (tests use
        the synthetic universe's truth model); the type prior is the artifact's.

    Returns
    -------
    dict
        ``auc_teff``, ``auc_feh``, ``auc_logg``, per-class counts, star counts,
        the new content hash and the seconds spent.

    Raises
    ------
    StageError
        Missing model, labels or conditioned partitions. A classifier with too
        few good or bad stars is not an error: it falls back to the placeholder
        rule alone (``fallback`` in the summary names it and why).
    RunLockedError
        When another process works in the run directory.
    """
    paths = RunPaths.of(run_dir, config)
    with run_lock(paths.state, "train-confidence"):
        return _train_confidence(paths, config, Path(model_dir) if model_dir is not None else paths.model,
                                 forward_model)


def _train_confidence(paths: RunPaths, config: RunConfig, model_dir: Path, forward_model: Any) -> dict:
    from xpcat.model.artifact import add_component, artifact_exists, load_artifact
    from xpcat.model.inference import Inference, InferenceSettings

    t0 = time.perf_counter()
    run_dir = paths.root
    if not artifact_exists(model_dir):
        raise StageError(f"no model artifact at {model_dir}: run `xpcat train {run_dir}` first")
    artifact = load_artifact(model_dir)
    labels = read_labels(run_dir, config)
    sid_all = labels.column("source_id").to_numpy()
    model = forward_model if forward_model is not None else artifact.forward_model()
    inference = Inference(model, artifact.gmm, InferenceSettings.from_config(config))
    settings = C.ClassifierSettings.from_config(config.confidence)

    def fit_subset(mask: np.ndarray) -> tuple[dict, dict, np.ndarray, dict, np.ndarray]:
        """Fit the labelled stars in ``mask``: (est | ref arrays, cond, features, labels, keep)."""
        sub = labels.filter(pa.array(mask))
        cond = read_conditioned(run_dir, sub.column("source_id").to_numpy())
        lab = sub.filter(pc.is_in(sub.column("source_id"), value_set=pa.array(cond["source_id"])))
        ref = {c: np.asarray(lab.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
               for c in _LABEL_COLUMNS[1:]}
        logger.info("confidence: fitting %d labelled stars without their labels", len(cond["source_id"]))
        m = len(cond["source_id"])
        if m == 0:
            return ({"est": np.zeros((0, 3)), "ref": np.zeros((0, 3)), "ref_err": np.zeros((0, 3)),
                     "params5": np.zeros((0, 5)), "cov5": np.zeros((0, 5, 5)), "quality": np.zeros(0)}, cond, np.zeros((0, C.N_FEATURES)),
                    {p: np.zeros(0) for p in C.PARAMETERS}, np.zeros(0, bool))
        fit = fit_stars(inference, cond, config.inference.batch_size)
        features, ylab, basic = training_set(fit, cond, ref, float(artifact.gmm.ln_prior_cut))
        core = [C.FEATURE_NAMES.index(k) for k in C.CORE_FEATURES]
        keep = basic & np.all(np.isfinite(features[:, core]), axis=1)
        est = np.asarray(fit["params5"], dtype=np.float64)[:, :3] * np.array([1000.0, 1.0, 1.0])
        er = {"est": est, "ref": np.column_stack([ref["teff"], ref["feh"], ref["logg"]]),
              "ref_err": np.column_stack([ref["teff_error"], ref["feh_error"], ref["logg_error"]]),
              "params5": np.asarray(fit["params5"], np.float64), "cov5": np.asarray(fit["cov5"], np.float64),
              "quality": fit_quality(fit["chi2"], fit["n_valid_flux"])}
        return er, cond, features, ylab, keep

    def split(sid: np.ndarray) -> np.ndarray:
        """(n,) fold index (k folds) or hold-out mask (the paper's hold-out) of the stars ``sid``."""
        if settings.folds >= 2:
            return fold_index(sid, settings.folds, config.run.seed)
        return holdout_mask(sid, settings.holdout_fraction, config.run.seed)

    def enough(ylab: dict, keep: np.ndarray, sid: np.ndarray) -> bool:
        s = split(sid)
        trains = [keep & (s != f) for f in range(settings.folds)] if settings.folds >= 2 else [keep & ~s]
        return all(min(np.sum(y[t] == 1), np.sum(y[t] == 0)) >= settings.min_per_class
                   for y in ylab.values() for t in trains)

    val = _validation_mask(sid_all, config, artifact) if config.confidence.label_set == "validation" else None
    if val is not None and val.any():
        logger.info("confidence: %d of %d labelled stars are in the model's validation split", val.sum(), val.size)
        which = "validation"
        er, cond, features, ylab, keep = fit_subset(val)
        if not enough(ylab, keep, cond["source_id"]) and (~val).any():
            logger.warning("confidence: too few good or bad validation stars; also using the %d labelled training "
                           "stars (fitted without their labels)", int((~val).sum()))
            which = "all labelled (validation split too small)"
            er2, cond2, f2, y2, k2 = fit_subset(~val)
            order = np.argsort(np.concatenate([cond["source_id"], cond2["source_id"]]), kind="stable")
            cond = {k: np.concatenate([cond[k], cond2[k]])[order] for k in cond}
            er = {k: np.concatenate([er[k], er2[k]])[order] for k in er}
            features = np.concatenate([features, f2])[order]
            ylab = {p: np.concatenate([ylab[p], y2[p]])[order] for p in ylab}
            keep = np.concatenate([keep, k2])[order]
    else:
        logger.info("confidence: using all %d labelled stars (label_set = %r)", sid_all.size,
                    config.confidence.label_set)
        which = "all labelled"
        er, cond, features, ylab, keep = fit_subset(np.ones(sid_all.size, bool))
    n = len(cond["source_id"])
    if n == 0:
        raise StageError("none of the labelled stars is in the conditioned partitions; nothing to train on")
    star_split = split(cond["source_id"])
    by_fold = settings.folds >= 2
    clf, report = C.train_confidence_classifiers(  # a classifier without enough good / bad stars falls back alone
        features[keep], {p: y[keep] for p, y in ylab.items()}, settings, seed=config.run.seed,
        holdout=None if by_fold else star_split[keep], folds=star_split[keep] if by_fold else None,
    )
    oof = np.full((n, len(C.PARAMETERS)), np.nan)
    oof[keep] = report["oof_confidence"]
    refs = {k: er[a][:, j] for j, p in enumerate(C.PARAMETERS) for k, a in ((p, "ref"), (f"{p}_error", "ref_err"))}
    unlabelled = _fit_unlabelled(run_dir, config, inference, float(artifact.gmm.ln_prior_cut), sid_all)
    model_error = train_model_error(paths, config, model_dir, cond["source_id"], er["params5"], er["cov5"], refs,
                                    cond["parallax"], cond["parallax_error"], keep, unlabelled=unlabelled,
                                    quality=er["quality"])
    _write_stars(paths.confidence_stars, cond["source_id"], features, er["est"], er["ref"], ylab, keep,
                 star_split, C.predict_confidence(clf, features), oof)
    summary: dict[str, Any] = {
        "stars_labelled": int(n),
        "stars_basic_cut": int(keep.sum()),
        "label_set": which,
        "n_features": C.N_FEATURES,
        **{f"auc_{p}": report[p]["auc"] for p in C.PARAMETERS},
        **{f"auc_{p}_se": report[p]["auc_se"] for p in C.PARAMETERS},
        "auc_method": report[C.PARAMETERS[0]]["auc_method"],
        "fallback": {p: report[p]["reason"] for p in C.PARAMETERS if report[p]["fallback"]},
        "classifiers": {p: report[p] for p in C.PARAMETERS},
        "model_error": {k: model_error[k] for k in ("status", "reason", "learned_from", "report") if k in model_error},
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
    }
    meta = {k: v for k, v in summary.items() if k != "model_error"}
    meta["feature_names"] = list(C.FEATURE_NAMES)
    summary["content_hash"] = add_component(model_dir, COMPONENT, C.classifiers_to_arrays(clf), meta)
    summary["seconds"] = time.perf_counter() - t0
    summary["config"] = config_to_dict(config)["confidence"]
    write_text_atomic(paths.confidence_state, json.dumps(summary, indent=1, default=float))
    logger.info("confidence classifiers stored in %s: AUC teff %.3f, feh %.3f, logg %.3f",
                model_dir, summary["auc_teff"], summary["auc_feh"], summary["auc_logg"])
    return {k: v for k, v in summary.items() if k != "classifiers"} | {
        f"{p}_train_good_bad": [report[p]["n_train_good"], report[p]["n_train_bad"]] for p in C.PARAMETERS
    }

"""The model-error part of ``xpcat train-confidence``: calibrated uncertainties (SPEC §5, beyond the paper).

``xpcat train-confidence`` fits every labelled star without its label. Of
those, the stars of the training stage's validation split (the hash interval
the training recorded in the artifact's data summary,
:func:`xpcat.production.train.validation_hash_range`; normally the project's
:func:`xpcat.production.train.split_is_validation`) are stars the forward
model never saw; their residuals against the references (labels for Teff,
[Fe/H], logg; the reddening prior for E; the Gaia parallax) teach the model's
own error (:func:`xpcat.model.model_error.learn_model_error`). It is stored in
the model artifact as the ``model_error`` component, with what it was learned
from; ``xpcat infer`` adds it to the Fisher covariance when
``[inference] uncertainty = "calibrated"`` (the default).

E has a reference for nearly every star (the reddening prior), not only for
the labelled ones: up to ``[confidence] model_error_unlabelled`` conditioned
stars without labels (never trained on; :func:`unlabelled_sample`, spread over
the partitions) are fitted too, and their E residuals join the validation
stars'. On the 6,000-star demo the catalog's E pulls were 0.83 with the model
error of E learned from the 449 validation stars alone, 0.97 with 3,000
unlabelled stars added. Their parallaxes are not used: with the learner of
f33499b they made the catalog's parallax pulls 1.15 (0.96 without); with today's
(ln q, pooled calibration prior) that does not reproduce (offline, same demo:
0.985, labelled 0.99, unlabelled 0.98, against 0.992 without; G < 13 bins
0.66/0.76 against 0.63/0.74), a gain too small to change.

A validation split too small to learn it (fewer than
:data:`xpcat.model.model_error.MIN_STARS` stars with a reference for every
parameter) stores the component with ``status = "fallback"`` and the reason:
inference then reports the paper's Fisher-only errors and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from xpcat.config import RunConfig
from xpcat.model import model_error as ME
from xpcat.production.run_dir import RunPaths

__all__ = ["COMPONENT", "learning_set", "read_reddening_prior", "reference_arrays", "train_model_error",
           "unlabelled_sample", "unlabelled_with_prior", "validation_range"]

logger = logging.getLogger(__name__)

#: Name of the artifact component holding the model error.
COMPONENT = "model_error"


def validation_range(model_dir: Path, config: RunConfig) -> tuple[float, float]:
    """The hash interval of the training stage's validation split, as ``xpcat train`` recorded it
    (:func:`xpcat.production.train.recorded_validation_range` of the artifact's data summary)."""
    from xpcat.model.artifact import load_artifact
    from xpcat.production.train import recorded_validation_range

    return recorded_validation_range(load_artifact(model_dir).data_summary, config.training.validation_fraction)


def read_reddening_prior(run_dir: Path, config: RunConfig, source_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reddening prior (E, s_E) [mag] of ``source_id`` (NaN where the table or the star is absent).

    Reads ``[data] reddening`` if set, else ``<raw_dir>/reddening`` (the table ``xpcat train`` uses).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = RunPaths.of(run_dir, config)
    path = paths.user_file(config.data.reddening) or paths.raw_table("reddening")
    n = len(source_id)
    e, s = np.full(n, np.nan), np.full(n, np.nan)
    files = [path] if path.is_file() else sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        logger.warning("model error: no reddening prior at %s; E's model error is not learned", path)
        return e, s
    try:
        t = pa.concat_tables([pq.read_table(f, columns=["source_id", "e", "e_error"]) for f in files])
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        logger.warning("model error: reddening prior %s unreadable (%s); E's model error is not learned", path, err)
        return e, s
    rs = t.column("source_id").to_numpy()
    order = np.argsort(rs)
    pos = np.clip(np.searchsorted(rs, source_id, sorter=order), 0, max(rs.size - 1, 0))
    if rs.size:
        hit = rs[order[pos]] == source_id
        idx = order[pos]
        e = np.where(hit, np.asarray(t.column("e").to_numpy(zero_copy_only=False), np.float64)[idx], np.nan)
        s = np.where(hit, np.asarray(t.column("e_error").to_numpy(zero_copy_only=False), np.float64)[idx], np.nan)
    return e, s


def reference_arrays(ref: dict[str, np.ndarray], e_prior: np.ndarray, e_prior_err: np.ndarray,
                     parallax: np.ndarray, parallax_error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """References of the five reported parameters, their variances and 1 / s_plx.

    Parameters
    ----------
    ref : labels ``teff`` [K], ``teff_error``, ``feh``, ``feh_error``, ``logg``, ``logg_error`` (n,) each.
    e_prior, e_prior_err : (n,) reddening prior [mag].
    parallax, parallax_error : (n,) Gaia parallax [mas].

    Returns
    -------
    ref5, ref_var5 : (n, 5) in catalog units (Teff kK); NaN where there is no
        usable reference (a non-positive error counts as none).
    inv_plx_err : (n,) 1 / s_plx [1/mas], 0 where the fit had no usable parallax.
    """
    def err_ok(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(x) & (x > 0), x, np.nan)

    plx, plx_err = np.asarray(parallax, np.float64), err_ok(parallax_error)
    has_plx = np.isfinite(plx) & np.isfinite(plx_err)
    ref5 = np.column_stack([np.asarray(ref["teff"], np.float64) / 1000.0, ref["feh"], ref["logg"], e_prior,
                            np.where(has_plx, plx, np.nan)])
    sd5 = np.column_stack([err_ok(ref["teff_error"]) / 1000.0, err_ok(ref["feh_error"]), err_ok(ref["logg_error"]),
                           err_ok(e_prior_err), plx_err])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(has_plx, 1.0 / np.where(has_plx, plx_err, 1.0), 0.0)
    return ref5.astype(np.float64), sd5**2, inv


def unlabelled_sample(run_dir: Path, labelled: np.ndarray, n_max: int) -> np.ndarray:
    """Up to ``n_max`` source_ids of conditioned stars without labels, spread over the sky, deterministic.

    Reads the row counts of every conditioned partition (Parquet footers) and the
    source_id column of about 64 of them, evenly spaced in partition order
    (partitions are HEALPix-ordered), and keeps the stars of lowest
    :func:`xpcat.production.train.stable_unit_hash`.

    Parameters
    ----------
    run_dir : the run directory (``conditioned/``).
    labelled : (m,) source_ids with labels (excluded).
    n_max : most stars returned (0: none).

    Returns
    -------
    (k,) int64 source_ids, sorted, k <= n_max.
    """
    import pyarrow.parquet as pq

    from xpcat.production.train import stable_unit_hash

    files = sorted(p for p in RunPaths.of(run_dir).conditioned.glob("*.parquet") if not p.name.startswith("."))
    if n_max <= 0 or not files:
        return np.zeros(0, np.int64)
    chosen = files[:: max(1, len(files) // 64)]
    ids = []
    for f in chosen:
        try:
            ids.append(pq.read_table(f, columns=["source_id"]).column("source_id").to_numpy())
        except (OSError, ValueError) as err:  # a damaged partition: infer reports it; the sample skips it
            logger.warning("model error: skipping %s for the unlabelled sample (%s)", f, err)
    sid = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    sid = sid[~np.isin(sid, np.asarray(labelled, np.int64))]
    keep = np.argsort(stable_unit_hash(sid), kind="stable")[:n_max]
    return np.sort(sid[keep]).astype(np.int64)


def unlabelled_with_prior(run_dir: Path, config: RunConfig,
                          labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``[confidence] model_error_unlabelled`` sample (:func:`unlabelled_sample`) that has a reddening prior.

    Only stars with a prior teach E's model error, so train-confidence fits no others.

    Returns
    -------
    source_id (k,) int64 sorted, e_prior and e_prior_error (k,) [mag].
    """
    sid = unlabelled_sample(run_dir, labelled, config.confidence.model_error_unlabelled)
    if not sid.size:
        return sid, np.zeros(0), np.zeros(0)
    e_prior, e_err = read_reddening_prior(run_dir, config, sid)
    has_prior = np.isfinite(e_prior)
    return sid[has_prior], e_prior[has_prior], e_err[has_prior]


def learning_set(paths: RunPaths, config: RunConfig, model_dir: Path, source_id: np.ndarray,
                 params5: np.ndarray, cov5: np.ndarray, ref: dict[str, np.ndarray], parallax: np.ndarray,
                 parallax_error: np.ndarray, usable: np.ndarray,
                 unlabelled: dict[str, np.ndarray] | None = None,
                 quality: np.ndarray | None = None) -> dict[str, Any]:
    """The stars the model error is learned from: the validation split's and the unlabelled sample's.

    Parameters are those of :func:`train_model_error`.

    Returns
    -------
    dict: ``source_id`` (m,), ``params5`` (m, 5), ``cov5`` (m, 5, 5), ``inv_plx_err`` (m,), ``ref5`` and
    ``ref_var5`` (m, 5) (:func:`reference_arrays`; the unlabelled stars' E only), ``quality`` (m,) or None, and
    ``learned_from`` (what and how many, for the artifact's metadata).
    """
    from xpcat.production.train import in_hash_range

    hash_range = validation_range(model_dir, config)
    val = np.asarray(in_hash_range(source_id, hash_range), bool)
    sel = val & np.asarray(usable, bool)
    e_prior, e_err = read_reddening_prior(paths.root, config, np.asarray(source_id)[sel])
    ref_sel = {k: np.asarray(v)[sel] for k, v in ref.items()}
    ref5, ref_var5, inv = reference_arrays(ref_sel, e_prior, e_err, np.asarray(parallax)[sel],
                                           np.asarray(parallax_error)[sel])
    params5, cov5 = np.asarray(params5)[sel], np.asarray(cov5)[sel]
    q = None if quality is None else np.asarray(quality, np.float64)[sel]
    rows = np.asarray(source_id, np.int64)[sel]
    n_unlabelled = 0
    if unlabelled is not None and len(unlabelled["source_id"]):
        u = np.asarray(unlabelled["usable"], bool)
        n_unlabelled = int(u.sum())
        ue, ue_err = np.asarray(unlabelled["e_prior"])[u], np.asarray(unlabelled["e_prior_error"])[u]
        none = {k: np.full(n_unlabelled, np.nan) for k in ref}
        r5, rv5, inv_u = reference_arrays(none, ue, ue_err, np.asarray(unlabelled["parallax"])[u],
                                          np.asarray(unlabelled["parallax_error"])[u])
        r5[:, 4] = np.nan  # E only: their parallaxes gain nothing (module docstring)
        ref5, ref_var5, inv = np.concatenate([ref5, r5]), np.concatenate([ref_var5, rv5]), np.concatenate([inv, inv_u])
        params5 = np.concatenate([params5, np.asarray(unlabelled["params5"])[u]])
        cov5 = np.concatenate([cov5, np.asarray(unlabelled["cov5"])[u]])
        rows = np.concatenate([rows, np.asarray(unlabelled["source_id"], np.int64)[u]])
        if q is not None:
            q = np.concatenate([q, np.asarray(unlabelled.get("quality", np.full(u.size, np.nan)), np.float64)[u]])
    learned_from = {
        "split": "the training stage's validation split (stable hash of source_id in "
                 f"[{hash_range[0]:g}, {hash_range[1]:g}), xpcat.production.train.validation_hash_range), "
                 "fitted without their labels",
        "hash_range": list(hash_range),
        "stars_validation": int(val.sum()),
        "stars_basic_cut": int(sel.sum()),
        "stars_unlabelled_basic_cut": n_unlabelled,
        "unlabelled": "conditioned stars without labels, never trained on (xpcat.production.train_model_error."
                      "unlabelled_sample): their reddening prior teaches the model error of E only",
        "references": {"teff": "labels", "feh": "labels", "logg": "labels", "e": "reddening prior",
                       "plx": "Gaia parallax (the fit's own datum)"},
        "min_stars": ME.MIN_STARS,
    }
    return {"source_id": rows, "params5": params5, "cov5": cov5, "inv_plx_err": inv, "ref5": ref5,
            "ref_var5": ref_var5, "quality": q, "learned_from": learned_from}


def train_model_error(paths: RunPaths, config: RunConfig, model_dir: Path, source_id: np.ndarray,
                      params5: np.ndarray, cov5: np.ndarray, ref: dict[str, np.ndarray], parallax: np.ndarray,
                      parallax_error: np.ndarray, usable: np.ndarray,
                      unlabelled: dict[str, np.ndarray] | None = None,
                      quality: np.ndarray | None = None) -> dict[str, Any]:
    """Learn the model error from the validation-split stars and store it in the artifact.

    Parameters
    ----------
    paths, config : the run.
    model_dir : the model artifact.
    source_id : (n,) the labelled stars fitted without their labels.
    params5, cov5 : (n, 5), (n, 5, 5) their estimates and Fisher covariances (catalog units).
    ref : their labels (see :func:`reference_arrays`).
    parallax, parallax_error : (n,) the Gaia parallax the fits used [mas].
    usable : (n,) bool, the stars passing the basic cut with a converged fit.
    unlabelled : optional stars without labels, never trained on: ``source_id``, ``params5``,
        ``cov5``, ``parallax``, ``parallax_error``, ``usable`` as above and their reddening prior
        ``e_prior``, ``e_prior_error`` [mag] and optionally ``quality``; they teach the model error of E only.
    quality : (n,) q = chi^2 / n_flux of the fits (:func:`xpcat.model.model_error.fit_quality`), a feature
        of the model error; None: the model error does not follow the fits' quality.

    Returns
    -------
    dict: ``status`` ("calibrated" or "fallback"), ``reason`` on fallback,
    ``learned_from`` (what and how many), the learning report and the new content hash.
    """
    from xpcat.model.artifact import add_component

    ls = learning_set(paths, config, model_dir, source_id, params5, cov5, ref, parallax, parallax_error, usable,
                      unlabelled, quality)
    learned_from = ls["learned_from"]
    me, report = ME.learn_model_error(ls["params5"], ls["cov5"], ls["inv_plx_err"], ls["ref5"], ls["ref_var5"],
                                      quality=ls["quality"])
    summary: dict[str, Any] = {"learned_from": learned_from, "report": report}
    if me is None:
        reason = (f"validation split too small to learn the model error: {learned_from['stars_basic_cut']} "
                  f"validation stars pass the basic cut, no parameter has {ME.MIN_STARS} with a reference; the "
                  "reported errors are the paper's Fisher-only ones")
        logger.warning("model error: %s", reason)
        summary.update(status="fallback", reason=reason)
        arrays: dict[str, np.ndarray] = {}
    else:
        summary["status"] = "calibrated"
        arrays = ME.model_error_to_arrays(me)
        logger.info("model error learned from %d validation stars: pull sigma %s -> %s",
                    learned_from["stars_basic_cut"],
                    [round(report[p]["pull_sigma_fisher"], 2) for p in ME.PARAMS],
                    [round(report[p]["pull_sigma_calibrated"], 2) for p in ME.PARAMS])
    summary["content_hash"] = add_component(model_dir, COMPONENT, arrays, summary)
    return summary

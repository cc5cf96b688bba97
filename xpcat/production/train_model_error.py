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

__all__ = ["COMPONENT", "read_reddening_prior", "reference_arrays", "train_model_error", "validation_range"]

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


def train_model_error(paths: RunPaths, config: RunConfig, model_dir: Path, source_id: np.ndarray,
                      params5: np.ndarray, cov5: np.ndarray, ref: dict[str, np.ndarray], parallax: np.ndarray,
                      parallax_error: np.ndarray, usable: np.ndarray) -> dict[str, Any]:
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

    Returns
    -------
    dict: ``status`` ("calibrated" or "fallback"), ``reason`` on fallback,
    ``learned_from`` (what and how many), the learning report and the new content hash.
    """
    from xpcat.model.artifact import add_component
    from xpcat.production.train import in_hash_range

    hash_range = validation_range(model_dir, config)
    val = np.asarray(in_hash_range(source_id, hash_range), bool)
    sel = val & np.asarray(usable, bool)
    e_prior, e_err = read_reddening_prior(paths.root, config, np.asarray(source_id)[sel])
    ref_sel = {k: np.asarray(v)[sel] for k, v in ref.items()}
    ref5, ref_var5, inv = reference_arrays(ref_sel, e_prior, e_err, np.asarray(parallax)[sel],
                                           np.asarray(parallax_error)[sel])
    learned_from = {
        "split": "the training stage's validation split (stable hash of source_id in "
                 f"[{hash_range[0]:g}, {hash_range[1]:g}), xpcat.production.train.validation_hash_range), "
                 "fitted without their labels",
        "hash_range": list(hash_range),
        "stars_validation": int(val.sum()),
        "stars_basic_cut": int(sel.sum()),
        "references": {"teff": "labels", "feh": "labels", "logg": "labels", "e": "reddening prior",
                       "plx": "Gaia parallax (the fit's own datum)"},
        "min_stars": ME.MIN_STARS,
    }
    me, report = ME.learn_model_error(params5[sel], cov5[sel], inv, ref5, ref_var5)
    summary: dict[str, Any] = {"learned_from": learned_from, "report": report}
    if me is None:
        reason = (f"validation split too small to learn the model error: {int(sel.sum())} validation stars pass "
                  f"the basic cut, no parameter has {ME.MIN_STARS} with a reference; the reported errors are the "
                  "paper's Fisher-only ones")
        logger.warning("model error: %s", reason)
        summary.update(status="fallback", reason=reason)
        arrays: dict[str, np.ndarray] = {}
    else:
        summary["status"] = "calibrated"
        arrays = ME.model_error_to_arrays(me)
        logger.info("model error learned from %d validation stars: pull sigma %s -> %s", int(sel.sum()),
                    [round(report[p]["pull_sigma_fisher"], 2) for p in ME.PARAMS],
                    [round(report[p]["pull_sigma_calibrated"], 2) for p in ME.PARAMS])
    summary["content_hash"] = add_component(model_dir, COMPONENT, arrays, summary)
    return summary

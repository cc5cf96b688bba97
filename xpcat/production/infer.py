"""The ``infer`` stage: fit every star of the conditioned partitions into catalog partitions.

:func:`infer_partition` is the per-partition task (what a Dask worker runs):
it streams ``RUN_DIR/conditioned/<name>.parquet`` in row batches of
``[inference] batch_size`` (memory is bounded whatever the partition size),
fits them with :class:`xpcat.model.inference.Inference`, computes the
confidences and ``quality_flags`` and writes ``RUN_DIR/fitted/<name>.parquet``
(schema :data:`xpcat.catalog_schema.CATALOG`) atomically with its done marker.
It returns a small summary dict, never the data.

The engine (:mod:`xpcat.production.run`) maps :func:`infer_partition` over
the partitions on Dask workers, for ``xpcat infer`` and ``xpcat run`` alike.

Rows: every input source_id gives exactly one output row. A star with no usable
data gets ``fit_status = 2`` (NO_USABLE_DATA), NaN estimates and every
quality bit 0-5 set; a fit that did not converge gets ``fit_status = 1`` and
keeps its last estimate.

quality_flags bits 0-2 come from the confidence classifiers when the artifact
has the ``confidence`` component; a parameter without a classifier (none in
the artifact, or its classifier fell back for lack of good or bad stars) has
null confidences and its bit follows
:data:`xpcat.model.uncertainty.PLACEHOLDER_CONFIDENCE_RULE`; the partition
metadata says which, per parameter (``confidence_source``, ``confidence_fallback``).

Uncertainties: ``[inference] uncertainty = "calibrated"`` (default) reports
the Fisher covariance plus the model's own error (the artifact's
``model_error`` component, :mod:`xpcat.model.model_error`) in
``stellar_params_err`` and both covariance triangles; ``"paper"``, or a model
without a learned model error, reports the Fisher covariance alone. The
metadata's ``uncertainty`` says which was used and why. The estimates, chi^2,
confidences and quality_flags do not depend on it (the classifiers see the
Fisher errors).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpcat.catalog_schema import (
    CATALOG,
    FLUX_UNIT_W_M2_NM,
    N_FACTOR,
    SCHEMA_VERSION,
    pack_triu,
    read_metadata,
    with_metadata,
)
from xpcat.catalog_schema import flags as qf
from xpcat.config import RunConfig
from xpcat.errors import InputError, StageError
from xpcat.model.inference import Inference, InferenceSettings
from xpcat.model.model_error import (
    ModelError,
    calibrated_covariance,
    fit_quality,
    model_error_from_arrays,
)
from xpcat.model.prior import PRIOR_MASS
from xpcat.model.uncertainty import (
    PLACEHOLDER_CONFIDENCE_RULE,
    placeholder_confidence_bits,
    quality_flag_bits,
)
from xpcat.production.infer_steps import (
    INFER_STEPS,
    MIN_PIECE,
    fit_pieces,
    fit_steps,
)
from xpcat.production.partitions import atomic_write_parquet
from xpcat.progress import timed

__all__ = [
    "CONDITIONED_INPUT_COLUMNS",
    "INFER_STEPS",
    "classifiers_for",
    "fit_pieces",
    "fit_steps",
    "fit_table",
    "infer_partition",
    "inference_for",
    "uncertainty_for",
]

logger = logging.getLogger(__name__)

#: Scalar conditioned columns the confidence features use (read when present).
_AUX_COLUMNS = (
    "phot_g_mean_mag", "phot_g_mean_flux_over_error", "phot_bp_mean_flux_over_error",
    "phot_rp_mean_flux_over_error", "phot_bp_rp_excess_factor", "ruwe", "fidelity_v2", "norm_dg",
    "bp_chi_squared", "rp_chi_squared",
)
#: Columns of a conditioned partition that inference reads.
CONDITIONED_INPUT_COLUMNS = (
    "source_id", "ra", "dec", "parallax", "parallax_error", "flux", "flux_error", "flux_factor_triu",
    "n_valid_flux", "condition_flags",
) + _AUX_COLUMNS

_ALL_QUALITY_BITS = 0b111111
_CACHE: dict[tuple, Inference] = {}
_CLASSIFIERS: dict[Any, Any] = {}


def inference_for(model: Any, config: RunConfig) -> Inference:
    """The (cached, per process) :class:`Inference` of a model artifact and the run's settings.

    Parameters
    ----------
    model : ModelArtifact (``xpcat.model.artifact``) or an :class:`Inference` (returned as is).
    config : RunConfig
    """
    if isinstance(model, Inference):
        return model
    settings = InferenceSettings.from_config(config)
    key = (getattr(model, "content_hash", id(model)), settings)
    if key not in _CACHE:
        dtype = np.float64 if config.model.dtype == "float64" else np.float32
        _CACHE[key] = Inference(model.forward_model(dtype=dtype), model.gmm, settings)
    return _CACHE[key]


def classifiers_for(confidence: Any) -> Any:
    """The (cached, per process) :class:`xpcat.model.confidence.ConfidenceClassifiers` of a ``confidence`` component.

    Converting the artifact's flat arrays into networks once per worker, not once per batch.

    Parameters
    ----------
    confidence : the artifact's ``confidence`` component (mapping of arrays), already converted
        classifiers, or None.
    """
    from xpcat.model.confidence import ConfidenceClassifiers, classifiers_from_arrays

    if confidence is None or isinstance(confidence, ConfidenceClassifiers):
        return confidence
    key = id(confidence)
    hit = _CLASSIFIERS.get(key)
    if hit is None or hit[0] is not confidence:  # keep the component alive with its conversion: ids are not reused
        hit = (confidence, classifiers_from_arrays(confidence))
        _CLASSIFIERS[key] = hit
    return hit[1]


def _list_column(batch: pa.RecordBatch, name: str, width: int, dtype: Any = np.float64) -> np.ndarray:
    col = batch.column(batch.schema.get_field_index(name))
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    vals = col.flatten().to_numpy(zero_copy_only=False)
    if vals.size != len(col) * width:
        raise InputError(f"conditioned column {name!r} must hold {width} values per row; got {vals.size} values "
                         f"for {len(col)} rows")
    return vals.reshape(len(col), width).astype(dtype, copy=False)


def _scalar_column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    idx = batch.schema.get_field_index(name)
    if idx < 0:
        return np.full(batch.num_rows, np.nan)
    return batch.column(idx).to_numpy(zero_copy_only=False).astype(np.float64)


def fit_table(batch: pa.RecordBatch | pa.Table, inference: Inference, confidence: Any = None,
              model_error: ModelError | None = None, times: dict[str, float] | None = None) -> pa.Table:
    """Fit the stars of a conditioned batch and return their catalog rows.

    Parameters
    ----------
    batch : conditioned rows (schema ``CONDITIONED``).
    inference : Inference
    confidence : the artifact's ``confidence`` component arrays, or None for the placeholder rule.
    model_error : the model's own error, added to the Fisher covariance of the
        reported errors and triangles; None reports the Fisher covariance alone.
    times : dict, optional
        Seconds per step (:data:`INFER_STEPS`) are added to it.

    Returns
    -------
    pyarrow.Table with schema ``CATALOG`` (same row order as the input).
    """
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], batch.schema)
    n = batch.num_rows
    with timed(times, "columns"):
        flux = _list_column(batch, "flux", 66)
        flux_error = _list_column(batch, "flux_error", 66)
        factor = _list_column(batch, "flux_factor_triu", N_FACTOR, inference.dtype)  # the fit's dtype, one copy
        plx = _scalar_column(batch, "parallax")
        plx_err = _scalar_column(batch, "parallax_error")
    fit = fit_steps(inference, flux, factor, plx, plx_err, flux_error, times)
    status = fit["fit_status"]
    p5 = fit["params5"]
    cov5, icov5 = fit["cov5"], fit["icov5"]
    with timed(times, "model_error"):
        if model_error is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                inv_plx = np.where(np.isfinite(plx) & np.isfinite(plx_err) & (plx_err > 0), 1.0 / plx_err, 0.0)
            cov5, icov5 = calibrated_covariance(cov5, p5, inv_plx, model_error,
                                                fit_quality(fit["chi2"], fit["n_valid_flux"]))
        err5 = np.sqrt(np.einsum("nii->ni", cov5))
    with timed(times, "flags"):
        bits = quality_flag_bits(fit["chi2"], fit["ln_prior"], p5[:, 4], plx, plx_err,
                                 float(inference.objective.gmm.ln_prior_cut))
    with timed(times, "confidence"):
        if confidence is not None:
            from xpcat.model.confidence import (
                confidence_features,
                confidence_quality_bits,
                predict_confidence,
                trained_parameters,
            )

            classifiers = classifiers_for(confidence)
            cond = {"flux": flux, "flux_error": flux_error, "parallax": plx, "parallax_error": plx_err,
                    "n_valid_flux": fit["n_valid_flux"].astype(np.float64)}
            for name in _AUX_COLUMNS:
                cond[name] = _scalar_column(batch, name)
            conf = _confidences(predict_confidence, classifiers, confidence_features(fit, cond))
            bits = bits | confidence_quality_bits(conf, fit_status=status, trained=trained_parameters(classifiers))
        else:
            conf = np.full((n, 3), np.nan, dtype=np.float32)
            bits = bits | placeholder_confidence_bits(status)
    bits = np.where(status == qf.FitStatus.NO_USABLE_DATA, _ALL_QUALITY_BITS, bits).astype(np.uint8)

    with timed(times, "table"):
        return _catalog_table(batch, n, p5, err5, fit, conf, bits, cov5, icov5, status)


def _confidences(predict: Any, classifiers: Any, features: np.ndarray) -> np.ndarray:
    """(n, 3) float32 confidences, the classifiers run on a power-of-two number of rows.

    ``predict_confidence`` evaluates the rows whose features are defined, a
    count that differs from batch to batch, and its jitted network compiles
    once per count: every batch paid a compilation. The rows are padded here
    with copies of a defined row, so that count is a power of two (at least 64)
    and the few shapes compile once per worker; the padding rows are dropped.

    Parameters
    ----------
    predict : :func:`xpcat.model.confidence.predict_confidence`
    classifiers : ConfidenceClassifiers
    features : (n, F) confidence features.
    """
    n = features.shape[0]
    ok = np.flatnonzero(classifiers.standardise(features)[1])
    if ok.size:
        size = max(MIN_PIECE, 1 << (int(ok.size) - 1).bit_length())
        features = np.concatenate([features, np.repeat(features[ok[:1]], size - ok.size, axis=0)])
    return np.asarray(predict(classifiers, features)[:n], dtype=np.float32)


def _catalog_table(batch: pa.RecordBatch, n: int, p5: np.ndarray, err5: np.ndarray, fit: dict[str, np.ndarray],
                   conf: np.ndarray, bits: np.ndarray, cov5: np.ndarray, icov5: np.ndarray,
                   status: np.ndarray) -> pa.Table:
    """The ``CATALOG`` rows of a fitted batch (shapes as in :func:`fit_table`)."""

    def fixed(a: np.ndarray, k: int) -> pa.FixedSizeListArray:
        a = np.ascontiguousarray(a, dtype=np.float32).reshape(n * k)
        return pa.FixedSizeListArray.from_arrays(pa.array(a, type=pa.float32()), k)

    def f32(a: np.ndarray) -> pa.Array:
        a = np.asarray(a, dtype=np.float32)
        return pa.array(a, type=pa.float32(), mask=~np.isfinite(a))

    cols = {
        "gdr3_source_id": batch.column(batch.schema.get_field_index("source_id")).cast(pa.int64()),
        "ra": batch.column(batch.schema.get_field_index("ra")).cast(pa.float64()),
        "dec": batch.column(batch.schema.get_field_index("dec")).cast(pa.float64()),
        "stellar_params_est": fixed(p5, 5),
        "stellar_params_err": fixed(err5, 5),
        "chi2_opt": f32(fit["chi2"]),
        "ln_prior": f32(fit["ln_prior"]),
        "teff_confidence": f32(conf[:, 0]),
        "feh_confidence": f32(conf[:, 1]),
        "logg_confidence": f32(conf[:, 2]),
        "quality_flags": pa.array(bits, type=pa.uint8()),
        "stellar_params_icov_triu": fixed(pack_triu(icov5), 15),
        "stellar_params_cov_triu": fixed(pack_triu(cov5), 15),
        "fit_status": pa.array(status.astype(np.uint8), type=pa.uint8()),
        "condition_flags": batch.column(batch.schema.get_field_index("condition_flags")).cast(pa.uint16()),
    }
    return pa.Table.from_arrays([cols[f.name] for f in CATALOG], schema=CATALOG)


def _confidence_component(model: Any) -> Any:
    comps = getattr(model, "components", None) or {}
    return comps.get("confidence")


def _confidence_info(model: Any, confidence: Any) -> dict[str, Any]:
    """Metadata: per parameter "classifier" or "placeholder", and why a classifier fell back."""
    from xpcat.model.confidence import PARAMETERS, trained_parameters

    trained = trained_parameters(confidence) if confidence is not None else ()
    meta = (getattr(model, "component_meta", None) or {}).get("confidence", {})
    reasons = dict(meta.get("fallback") or {})
    for p in PARAMETERS:
        if p not in trained and p not in reasons:
            reasons[p] = "no confidence classifiers in the model artifact (run `xpcat train-confidence`)"
    per = {p: "classifier" if p in trained else "placeholder" for p in PARAMETERS}
    source = "classifiers" if len(trained) == len(PARAMETERS) else "placeholder" if not trained else "mixed"
    return {"confidence_source": source, "confidence_per_parameter": per, "confidence_fallback": reasons,
            "confidence_rule": PLACEHOLDER_CONFIDENCE_RULE if reasons else None}


def uncertainty_for(model: Any, config: RunConfig) -> tuple[ModelError | None, dict[str, Any]]:
    """The model error to add to the Fisher covariance, and the metadata saying which errors are reported.

    Returns
    -------
    model_error : ModelError or None (Fisher-only errors)
    info : ``requested`` ([inference] uncertainty), ``used`` ("calibrated" or
        "paper"), ``reason`` when they differ, and the component's summary
        (what it was learned from, the pull sigmas before / after).
    """
    requested = config.inference.uncertainty
    comps = getattr(model, "components", None) or {}
    meta = (getattr(model, "component_meta", None) or {}).get("model_error")
    info: dict[str, Any] = {"requested": requested, "used": "paper"}
    if meta is not None:
        rep = meta.get("report", {})
        info["model_error"] = {"status": meta.get("status"), "learned_from": meta.get("learned_from"),
                               "pull_sigma": {p: {k: rep[p].get(k) for k in ("pull_sigma_fisher",
                                                                             "pull_sigma_calibrated", "learned")}
                                              for p in ("teff", "feh", "logg", "e", "plx") if p in rep}}
    if requested == "paper":
        return None, info
    if meta is None or "model_error" not in comps:
        info["reason"] = "the model artifact has no model_error component (run `xpcat train-confidence`)"
        return None, info
    if meta.get("status") != "calibrated":
        info["reason"] = meta.get("reason", "the model error could not be learned")
        return None, info
    info["used"] = "calibrated"
    return model_error_from_arrays(comps["model_error"]), info


def infer_partition(conditioned_path: str | Path, out_path: str | Path, model: Any, config: RunConfig,
                    times: dict[str, float] | None = None) -> dict:
    """Fit one conditioned partition and write its catalog partition atomically.

    Parameters
    ----------
    conditioned_path : ``RUN_DIR/conditioned/<name>.parquet``.
    out_path : ``RUN_DIR/fitted/<name>.parquet``.
    model : ModelArtifact (or a ready :class:`Inference`, then without classifiers).
    config : RunConfig (``[inference]`` settings, ``run.seed``).
    times : dict, optional
        Seconds per step (:data:`INFER_STEPS`) are added to it (the benchmark's profile).

    Returns
    -------
    dict: partition, rows, counts per fit_status, passing the basic cut, seconds, stars_per_s,
    the done-marker's sha256.

    Raises
    ------
    InputError
        If the conditioned file is missing, corrupt or lacks a required column (names the path).
    """
    src, out = Path(conditioned_path), Path(out_path)
    t0 = time.perf_counter()
    if not src.exists():
        raise InputError(f"infer: conditioned partition not found: {src}")
    try:
        pf = pq.ParquetFile(src)
        names = set(pf.schema_arrow.names)
        src_meta = read_metadata(pf.schema_arrow)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"infer: cannot read conditioned partition {src} (corrupt or truncated): {err}") from err
    missing = [c for c in CONDITIONED_INPUT_COLUMNS[:8] if c not in names]
    if missing:
        raise InputError(f"infer: conditioned partition {src} lacks columns {missing}")
    with timed(times, "setup"):
        inference = inference_for(model, config)
        confidence = None if isinstance(model, Inference) else classifiers_for(_confidence_component(model))
        model_error, uncertainty_info = uncertainty_for(model, config)
    columns = [c for c in CONDITIONED_INPUT_COLUMNS if c in names]
    pieces = []
    try:
        batches = pf.iter_batches(batch_size=config.inference.batch_size, columns=columns)
        while True:
            with timed(times, "read"):
                batch = next(batches, None)
            if batch is None:
                break
            pieces.append(fit_table(batch, inference, confidence, model_error, times))
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"infer: cannot read conditioned partition {src} (corrupt or truncated): {err}") from err
    table = pa.concat_tables(pieces) if pieces else CATALOG.empty_table()
    n = table.num_rows
    if n != pf.metadata.num_rows:
        raise StageError(f"infer: {src} has {pf.metadata.num_rows} rows but {n} were fitted")
    status = np.asarray(table.column("fit_status").to_numpy())
    qflags = np.asarray(table.column("quality_flags").to_numpy())
    seconds = time.perf_counter() - t0
    summary = {
        "partition": src.stem,
        "rows": int(n),
        "converged": int(np.sum(status == qf.FitStatus.CONVERGED)),
        "not_converged": int(np.sum(status == qf.FitStatus.NOT_CONVERGED)),
        "no_usable_data": int(np.sum(status == qf.FitStatus.NO_USABLE_DATA)),
        "basic_cut": int(np.sum(qf.passes_basic_cut(qflags))),
        "seconds": round(seconds, 3),
        "stars_per_s": round(n / seconds, 1) if seconds > 0 else None,
    }
    s = inference.settings
    info = {
        "stage": "infer",
        "schema_version": SCHEMA_VERSION,
        "model_hash": getattr(model, "content_hash", None),
        "flux_unit_w_m2_nm": src_meta.get("flux_unit_w_m2_nm", FLUX_UNIT_W_M2_NM),
        "source_partition": src.name,
        "inference": {"optimizer": s.optimizer, "start": s.start, "batch_size": s.batch_size,
                      "n_prior_samples": s.n_prior_samples, "n_refine": s.n_refine,
                      "max_iterations": s.max_iterations, "tolerance": s.tolerance, "seed": s.seed},
        **_confidence_info(model, confidence),
        "uncertainty": uncertainty_info,
        "fit_status": {m.name: int(m.value) for m in qf.FitStatus},
        "params_units": ["kK", "dex", "dex", "mag", "mas"],
        "ln_prior_cut": float(inference.objective.gmm.ln_prior_cut),
        "ln_prior_cut_mass": PRIOR_MASS,
    }
    with timed(times, "write"):
        table = with_metadata(table, info)
        out.parent.mkdir(parents=True, exist_ok=True)
        marker = atomic_write_parquet(table, out, schema=CATALOG, expected_rows=n,
                                      info={k: summary[k] for k in ("rows", "converged", "not_converged",
                                                                     "no_usable_data", "basic_cut")})
    summary["sha256"] = marker.get("sha256")
    logger.info("infer %s: %d stars in %.1f s (%d not converged, %d no data)", src.name, n, seconds,
                summary["not_converged"], summary["no_usable_data"])
    return summary

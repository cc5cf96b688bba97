"""The model-dependent parts of the report: the learned extinction curve and the flux residuals.

- :func:`load_model`: the run's model artifact, if any;
- :func:`truth_extinction_curve`: the truth law's R at the model's wavelengths;
- :func:`extinction_curve_deviation`: issue 5's criterion, learned vs truth R;
- :func:`xp_toolkit_extinction_curve`, :func:`ccm89_extinction_curve`: the reference curves
  (the XP curve of ``XP-Extinction-Toolkit``, packaged in ``data/``; CCM89);
- :func:`extinction_comparison`: the learned R against each reference curve;
- :func:`flux_residuals`: (f_pred - f_obs) / s_f of basic-cut stars (Fig. 9).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpcat.catalog_schema.conditioned import N_XP
from xpcat.production.report.data import ReportData
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = [
    "CCM_R_V",
    "MAX_FLUX_STARS",
    "ccm89_extinction_curve",
    "extinction_comparison",
    "extinction_curve_deviation",
    "flux_residuals",
    "load_model",
    "truth_extinction_curve",
    "xp_toolkit_extinction_curve",
]

#: Most stars drawn for the per-star flux residual figure.
MAX_FLUX_STARS = 20000
#: R_V of the CCM89 curve the learned curve is compared with.
CCM_R_V = 3.1


def load_model(run_dir: Path) -> Any | None:
    """The run's model artifact (``RUN_DIR/model``), or None when it has none."""
    from xpcat.model.artifact import artifact_exists, load_artifact

    mdir = RunPaths.of(run_dir).model
    if not artifact_exists(mdir):
        return None
    return load_artifact(mdir)


def truth_extinction_curve(wavelengths_nm: np.ndarray, r_v: float) -> np.ndarray:
    """The truth law's R per unit E at ``wavelengths_nm`` (m,), in ln-flux units as the learned R; (m,) float64."""
    from xpcat.production.synthetic.truth_sed import a_over_e, extinction_coefficients

    a, b = extinction_coefficients(wavelengths_nm)
    return 0.4 * np.log(10.0) * a_over_e(a, b, r_v)


def extinction_curve_deviation(learned: np.ndarray, truth: np.ndarray) -> float:
    """Largest relative deviation of the learned extinction curve from the truth law over 392-992 nm.

    Parameters
    ----------
    learned, truth : (66,) or (61,) arrays
        R per unit E (ln-flux units) at the model's samples; only the first
        ``N_XP`` = 61 (the XP samples, 392..992 nm in 10 nm steps) are compared,
        as issue 5's criterion: the 2MASS/unWISE bands carry little of the
        extinction signal and their R is a small number whose relative error is
        not a statement about the curve's shape.

    Returns
    -------
    float
        max |r_l - r_t| / r_t with r = R / R(392 nm) (sample 0).
    """
    rl = np.asarray(learned, float)[:N_XP] / float(learned[0])
    rt = np.asarray(truth, float)[:N_XP] / float(truth[0])
    return float(np.max(np.abs(rl - rt) / np.abs(rt)))


def xp_toolkit_extinction_curve(wavelengths_nm: np.ndarray) -> np.ndarray:
    """The XP extinction curve of ``XP-Extinction-Toolkit`` 1.0, A(lambda) / A(550 nm), at ``wavelengths_nm`` (m,).

    Read from the packaged table ``data/xp_extinction_curve.csv`` (see its
    ``PROVENANCE.md``): exact at xpcat's 61 XP samples and 5 NIR bands,
    linear interpolation in wavelength elsewhere, NaN outside 392-4602.8 nm.

    Returns
    -------
    (m,) float64, dimensionless.
    """
    from xpcat.production.report.xp_extinction_data import TABLE_FILE

    tab = np.genfromtxt(TABLE_FILE, delimiter=",", names=True, dtype=None, encoding="utf-8")
    wl = np.asarray(wavelengths_nm, np.float64)
    w, a = np.asarray(tab["wavelength_nm"], np.float64), np.asarray(tab["a_over_a550"], np.float64)
    out = np.interp(wl, w, a)
    out[(wl < w[0]) | (wl > w[-1])] = np.nan
    return out


def ccm89_extinction_curve(wavelengths_nm: np.ndarray, r_v: float = CCM_R_V) -> np.ndarray:
    """CCM89 (``dust_extinction``) A(lambda) / A(V) at ``wavelengths_nm`` (m,); NaN outside its 0.3-10 um^-1.

    Returns
    -------
    (m,) float64, dimensionless.
    """
    import astropy.units as u
    from dust_extinction.parameter_averages import CCM89

    wl = np.asarray(wavelengths_nm, np.float64)
    x = 1000.0 / wl
    ok = (x >= CCM89.x_range[0]) & (x <= CCM89.x_range[1])
    out = np.full(wl.shape, np.nan)
    if ok.any():
        out[ok] = np.asarray(CCM89(Rv=r_v)(wl[ok] * u.nm), np.float64)
    return out


def extinction_comparison(learned: np.ndarray | None, wavelengths_nm: np.ndarray | None,
                          truth: np.ndarray | None = None) -> dict[str, Any]:
    """The learned extinction curve against the XP curve, CCM89 R_V = 3.1 and (when known) the truth law.

    Every curve is normalised to its value at 392 nm (the first XP sample, as
    the paper's Fig. 15); a curve's deviation is :func:`extinction_curve_deviation`:
    max |r_learned - r_ref| / r_ref over the 61 XP samples (392-992 nm).

    Parameters
    ----------
    learned : (66,) array or None
        The model's R per unit E (ln-flux units); None without a model artifact.
    wavelengths_nm : (66,) array or None
        The model's wavelengths.
    truth : (66,) array or None
        The truth law's R (synthetic runs).

    Returns
    -------
    dict
        ``normalisation``, ``range_nm`` and per curve (``xp_extinction_toolkit``,
        ``ccm89_rv3.1``, ``truth``) ``{"max_rel_dev": float | None, "curve": str}``.
    """
    out: dict[str, Any] = {"normalisation": "each curve / its value at 392 nm", "range_nm": [392.0, 992.0]}
    refs = {
        "xp_extinction_toolkit": ("XP extinction curve, XP-Extinction-Toolkit 1.0 (Zhang R. et al. 2024)",
                                  None if wavelengths_nm is None else xp_toolkit_extinction_curve(wavelengths_nm)),
        "ccm89_rv3.1": (f"CCM89, R_V = {CCM_R_V} (dust_extinction)",
                        None if wavelengths_nm is None else ccm89_extinction_curve(wavelengths_nm)),
        "truth": ("the truth law of the synthetic universe", truth),
    }
    for key, (words, ref) in refs.items():
        dev = None
        if learned is not None and ref is not None and np.all(np.isfinite(np.asarray(ref)[:N_XP])):
            dev = extinction_curve_deviation(learned, ref)
        out[key] = {"max_rel_dev": dev, "curve": words}
    return out


def flux_residuals(run_dir: Path, artifact: Any, data: ReportData) -> np.ndarray | None:
    """Normalised flux residuals (f_pred - f_obs) / s_f of basic-cut stars.

    Parameters
    ----------
    run_dir : Path
        The run directory (its ``conditioned/*.parquet`` hold f_obs and s_f).
    artifact : model artifact or None
    data : ReportData
        The catalog; at most :data:`MAX_FLUX_STARS` basic-cut stars with finite,
        positive E and parallax are drawn (seeded).

    Returns
    -------
    (m, 66) float64 array, dimensionless (NaN where the flux or its error is
    missing), or None without a model artifact or conditioned partitions.
    """
    import jax
    import jax.numpy as jnp

    files = sorted(RunPaths.of(run_dir).conditioned.glob("*.parquet"))
    if artifact is None or not files:
        return None
    ok = data.basic & np.all(np.isfinite(data.est), axis=1) & (data.est[:, 3] > 0) & (data.est[:, 4] > 0)
    idx = np.flatnonzero(ok)
    if idx.size > MAX_FLUX_STARS:
        idx = np.sort(np.random.default_rng(0).choice(idx, MAX_FLUX_STARS, replace=False))
    want = data.source_id[idx]
    cond_sid, flux, ferr = [], [], []
    for f in files:
        t = pq.read_table(f, columns=["source_id", "flux", "flux_error"])
        sid = t.column("source_id").to_numpy()
        m = np.isin(sid, want)
        if not m.any():
            continue
        t = t.filter(pa.array(m))
        n = t.num_rows
        cond_sid.append(sid[m])
        for acc, c in ((flux, "flux"), (ferr, "flux_error")):
            acc.append(np.asarray(t.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                  dtype=np.float64).reshape(n, -1))
    if not cond_sid:
        return None
    csid = np.concatenate(cond_sid)
    order = np.argsort(csid)
    csid, fl, fe = csid[order], np.concatenate(flux)[order], np.concatenate(ferr)[order]
    pos = np.searchsorted(want, csid)
    rows = idx[pos]
    model = artifact.forward_model(np.float32)
    theta = jnp.asarray(data.est[rows, :3], dtype=jnp.float32)
    ln_plx = jnp.asarray(np.log(data.est[rows, 4]), dtype=jnp.float32)
    ln_e = jnp.asarray(np.log(data.est[rows, 3]), dtype=jnp.float32)
    pred = np.asarray(jax.jit(jax.vmap(model.predict_flux))(theta, ln_plx, ln_e), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (pred - fl) / fe
    z[~(np.isfinite(fe) & (fe > 0) & np.isfinite(fl))] = np.nan
    return z

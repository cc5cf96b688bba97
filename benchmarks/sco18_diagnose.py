"""Why 18 Sco's [Fe/H] comes out low: the diagnostics of issue 14 item 7, on a trained real_apogee run.

Given a run directory of ``benchmarks/real_apogee.py`` (its model, conditioned
partitions and catalog), this measures, for 18 Sco (Gaia DR3
4345775217221821312, DR3 coefficients with full covariance, a solar twin at
about 5800 K / +0.05 / 4.45) and for the held-out library stars:

a. brightness: held-out [Fe/H] residuals (xpcat - APOGEE) of solar-type
   dwarfs (Teff 5500-6100 K, logg 4.1-4.7) against G, and of the brightest
   held-out stars of any type;
b. input route: 18 Sco conditioned from its coefficients (full covariance, the
   production route) against the same spectrum with only its diagonal errors
   given as a sampled spectrum (the route every library star took), and its
   shape against library solar twins' (median of the twins' shapes, after
   scale) per sample, in units of 18 Sco's errors;
c. covariance: the fit with the full conditioned covariance, with its
   diagonal only, and the library route;
d. basin: the fit from the screen start, from the literature values, and the
   chi^2 profile in [Fe/H] (every other variable optimised);
e. the near-infrared: every library star has 2MASS J/H/K, 18 Sco none (J ~ 4
   is deep in 2MASS saturation); the held-out solar-type dwarfs refitted with
   their NIR fluxes removed show what XP alone gives for such stars;
f. the bright-star signature: the model's mismatch at the APOGEE labels
   (f_obs / f_pred - 1 per sample, E and scale fitted) in G bins, 18 Sco's at
   its literature values, and 18 Sco refitted after dividing out the median
   mismatch of the library's G < 9 and G < 10 stars.

Prints one JSON line; ``--out`` also writes it.

Usage::

    python benchmarks/sco18_diagnose.py --run-dir /tmp/h14-e640 --out /tmp/h14-sco18.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from xpcat.catalog_schema.conditioned import FLUX_UNIT_W_M2_NM

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_apogee as bench

logger = logging.getLogger("benchmarks.sco18_diagnose")

#: Solar-type dwarfs of the library: Teff [K] and logg windows.
SOLAR_TEFF, SOLAR_LOGG = (5500.0, 6100.0), (4.1, 4.7)
#: Library solar twins for the shape comparison: Teff, logg, |[Fe/H]| and AK_TARG windows.
TWIN_TEFF, TWIN_LOGG, TWIN_FEH, TWIN_AK = (5700.0, 5900.0), (4.3, 4.6), 0.1, 0.03
#: G-magnitude bins of item a.
G_BINS = (5.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 18.0)
#: [Fe/H] grid of the profile (dex).
FEH_GRID = tuple(np.round(np.arange(-0.7, 0.41, 0.1), 2))


def sco18_inputs(cfg: Any) -> dict[str, np.ndarray]:
    """18 Sco conditioned three ways: (1, 66) flux, (1, 66) error and (1, 66, 66) factor R each.

    ``full``: the production route (coefficients, full covariance, Eq. 2, Eqs. 3-4);
    ``diagonal``: the same flux with R = diag(1 / error) (the conditioned diagonal errors only);
    ``library``: the coefficients sampled to flux and flux_error, then conditioned as a sampled spectrum
    (diagonal C_gaia plus Eq. 2), the route of every library star.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from xpcat import catalog_schema as cs
    from xpcat.catalog_schema.raw import GAIA_SOURCE
    from xpcat.production.condition.covariance import condition_arrays
    from xpcat.production.condition.sampled import sampled_xp
    from xpcat.production.condition.tables import condition_tables
    from xpcat.production.condition.xp_sampling import sample_xp

    xp = pacsv.read_csv(bench.SCO18_CSV)
    n = xp.num_rows
    cols = {"source_id": xp.column("source_id").cast(pa.int64()), "phot_g_mean_mag": xp.column("phot_g_mean_mag")}
    gaia = pa.table({f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type)
                     for f in GAIA_SOURCE}, schema=GAIA_SOURCE)
    cond = condition_tables(gaia, xp, None, None, cfg, what="18 Sco")
    arr = lambda c, w: np.asarray(cond.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                  dtype=np.float64).reshape(n, w)
    flux, err = arr("flux", 66), arr("flux_error", 66)
    full = cs.unpack_triu(arr("flux_factor_triu", 66 * 67 // 2), dtype=np.float64)
    ok = np.isfinite(flux) & np.isfinite(err)
    diag = np.zeros_like(full)
    d = np.arange(66)
    diag[:, d, d] = np.where(ok, 1.0 / np.where(ok, err, 1.0), 0.0)
    smp = sample_xp(xp, with_covariance=False)
    sampled = pa.table({"source_id": cols["source_id"],
                        "flux": pa.array([list(r) for r in smp.flux]),
                        "flux_error": pa.array([list(r) for r in smp.flux_error]),
                        "input_form": pa.array(["sampled"] * n)})
    lib = condition_arrays(sampled_xp(sampled, what="18 Sco as sampled"), np.full((n, 5), np.nan),
                           np.full((n, 5), np.inf), floor=cfg.conditioning.eigenvalue_floor)
    lib_factor = cs.unpack_triu(lib.factor, dtype=np.float64)
    return {"flux": flux, "error": err, "full": full, "diagonal": diag,
            "condition_flags": np.asarray(cond.column("condition_flags").to_numpy(), dtype=int),
            "library_flux": lib.flux.astype(np.float64), "library_error": lib.flux_error.astype(np.float64),
            "library": lib_factor, "raw_error": smp.flux_error}


def load_inference(run_dir: Path, cfg: Any) -> Any:
    """The run's trained model and GMM prior as an :class:`~xpcat.model.inference.Inference`."""
    from xpcat.model.artifact import load_artifact
    from xpcat.model.inference import Inference, InferenceSettings

    art = load_artifact(run_dir / "model")
    return Inference(art.forward_model(), art.gmm, InferenceSettings.from_config(cfg))


def fit(inf: Any, flux: np.ndarray, factor: np.ndarray, error: np.ndarray,
        x0: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fit m stars without parallax: from the screen start (``x0`` None) or from ``x0`` (m, 5) internal variables."""
    from xpcat.model.inference import prepare_stars

    m = flux.shape[0]
    nan = np.full(m, np.nan)
    if x0 is None:
        return inf.fit(flux, factor, nan, nan, error)
    prep = prepare_stars(flux, factor, nan, nan, error, dtype=inf.dtype)
    opt = inf.optimise(prep, np.asarray(x0, dtype=inf.dtype))
    out = inf.summarise(prep, opt["x"], opt["loss"], opt["converged"], opt["n_iter"])
    out["x0"] = x0
    return out


def summary(res: dict[str, np.ndarray], i: int = 0) -> dict[str, Any]:
    """One fitted star: Teff [K], [Fe/H], logg, E, chi^2, loss (Eq. 19) and their errors."""
    theta = res["theta"][i]
    err = np.sqrt(np.diag(res["cov5"][i]))[:3] * bench.UNIT_K
    return {"teff": round(float(theta[0]), 1), "feh": round(float(theta[1]), 3), "logg": round(float(theta[2]), 3),
            "teff_err": round(float(err[0]), 1), "feh_err": round(float(err[1]), 3),
            "logg_err": round(float(err[2]), 3), "e": round(float(res["e"][i]), 4),
            "chi2": round(float(res["chi2"][i]), 2), "loss": round(float(res["loss"][i]), 2),
            "fit_status": int(res["fit_status"][i])}


def x_at(inf: Any, theta: np.ndarray, flux: np.ndarray, factor: np.ndarray, e: float = 0.01) -> np.ndarray:
    """(5,) internal variables at Theta (K, dex, dex) and E, ln plx set by the weighted least-squares scale."""
    import jax.numpy as jnp

    th = np.asarray(theta, dtype=np.float64)
    pred = np.asarray(inf.objective.model.predict_flux(jnp.asarray(th, dtype=inf.dtype), jnp.asarray(0.0, inf.dtype),
                                                       jnp.asarray(np.log(e), inf.dtype)), dtype=np.float64)
    ok = np.isfinite(flux)
    a, b = factor[:, ok] @ pred[ok], factor[:, ok] @ flux[ok]
    scale = float(a @ b / (a @ a))  # flux ~ plx^2 * f_abs: scale = plx^2
    return np.array([th[0] / 1000.0, th[1], th[2], 0.5 * np.log(scale), np.log(e)])


def feh_profile(inf: Any, flux: np.ndarray, factor: np.ndarray, x_best: np.ndarray) -> list[dict[str, float]]:
    """Eq. 19 and chi^2 minimised over Teff, logg, ln plx, ln E at each [Fe/H] of :data:`FEH_GRID`."""
    import jax
    import jax.numpy as jnp
    from scipy.optimize import minimize

    from xpcat.model.objective import StarData

    f = np.where(np.isfinite(flux), flux, 0.0)
    star = StarData(jnp.asarray(f, inf.dtype), jnp.asarray(factor, inf.dtype), jnp.asarray(0.0, inf.dtype),
                    jnp.asarray(0.0, inf.dtype))
    obj = inf.objective

    def full_x(z, feh):
        return jnp.concatenate([z[:1], jnp.asarray([feh], inf.dtype), z[1:]])

    loss = jax.jit(lambda z, feh: obj.loss(full_x(z, feh), star))
    grad = jax.jit(jax.grad(lambda z, feh: obj.loss(full_x(z, feh), star)))
    chi2 = jax.jit(lambda z, feh: obj.chi2(full_x(z, feh), star))
    out = []
    z = np.delete(np.asarray(x_best, dtype=np.float64), 1)
    for feh in FEH_GRID:
        best = None
        for start in (z, np.delete(x_at(inf, np.array([5800.0, feh, 4.45]), flux, factor), 1)):
            r = minimize(lambda q, v=feh: float(loss(jnp.asarray(q, inf.dtype), v)), start,
                         jac=lambda q, v=feh: np.asarray(grad(jnp.asarray(q, inf.dtype), v), dtype=np.float64),
                         method="L-BFGS-B")
            if best is None or r.fun < best.fun:
                best = r
        z = best.x
        out.append({"feh": float(feh), "loss": round(float(best.fun), 2),
                    "chi2": round(float(chi2(jnp.asarray(best.x, inf.dtype), feh)), 2),
                    "teff": round(float(best.x[0]) * 1000.0, 1), "logg": round(float(best.x[1]), 3),
                    "e": round(float(np.exp(best.x[3])), 4)})
    return out


def whitened_residuals(inf: Any, x: np.ndarray, flux: np.ndarray, error: np.ndarray) -> dict[str, Any]:
    """(f_obs / f_pred - 1) and (f_obs - f_pred) / error per XP sample at ``x`` (the diagonal errors)."""
    import jax.numpy as jnp

    pred = np.asarray(inf.objective.predict(jnp.asarray(x, inf.dtype)), dtype=np.float64)[:61]
    wl = np.arange(392, 993, 10)
    rel = flux[:61] / pred - 1.0
    z = (flux[:61] - pred) / error[:61]
    return {"wavelength_nm": wl[::5].tolist(), "rel": np.round(rel[::5], 4).tolist(),
            "z": np.round(z[::5], 2).tolist(), "rel_err": np.round((error[:61] / flux[:61])[::5], 4).tolist(),
            "sum_z2_diag": round(float(np.nansum(z**2)), 1)}


def twin_shapes(rows: dict[str, np.ndarray], flux: np.ndarray, error: np.ndarray) -> dict[str, Any]:
    """18 Sco's shape (flux / its sum) against the median of library solar twins', per sample."""
    from xpcat.production.ingest.sampled import XP_TAKE

    best = bench.best_rows(rows["gaiaedr3_source_id"], rows["snr"])
    t, lg, fe, ak = (rows[c][best].astype(np.float64) for c in ("teff", "logg", "fe_h", "ak_targ"))
    tw = best[(t > TWIN_TEFF[0]) & (t < TWIN_TEFF[1]) & (lg > TWIN_LOGG[0]) & (lg < TWIN_LOGG[1])
              & (np.abs(fe) < TWIN_FEH) & (ak < TWIN_AK)]
    lf = rows["flux"][tw][:, XP_TAKE].astype(np.float64) * rows["medflux"][tw][:, None] / FLUX_UNIT_W_M2_NM
    sh = lf / lf.sum(axis=1, keepdims=True)
    med = np.median(sh, axis=0)
    scatter = 1.4826 * np.median(np.abs(sh / med - 1.0), axis=0)
    s18 = flux[:61] / np.nansum(flux[:61])
    rel = s18 / med - 1.0
    g = rows["gaiaedr3_phot_g_mean_mag"][tw].astype(np.float64)
    return {"n_twins": int(tw.size), "twins_g_median": round(float(np.median(g)), 2),
            "twins_g_min": round(float(g.min()), 2), "wavelength_nm": np.arange(392, 993, 50).tolist(),
            "rel": np.round(rel[::5], 4).tolist(), "twin_scatter": np.round(scatter[::5], 4).tolist(),
            "rel_over_sco18_error": np.round((rel / (error[:61] / flux[:61]))[::5], 2).tolist()}


def scored_stars(rows: dict[str, np.ndarray], run_dir: Path, cfg: Any) -> dict[str, np.ndarray]:
    """Held-out library stars (the project's validation split) with catalog estimates: labels, G, est, flags."""
    from xpcat.production.train import split_is_validation

    best = bench.best_rows(rows["gaiaedr3_source_id"], rows["snr"])
    sid = rows["gaiaedr3_source_id"][best]
    held = split_is_validation(sid, cfg.training.validation_fraction)
    lab = np.column_stack([rows[c][best].astype(np.float64) for c in ("teff", "fe_h", "logg")])
    snr = rows["snr"][best].astype(np.float64)
    good = held & (snr > bench.SNR_MIN) & (lab[:, 0] < bench.TEFF_MAX) & np.all(np.isfinite(lab), axis=1)
    cat = bench.read_catalog(run_dir)
    order = np.argsort(cat["source_id"])
    pos = np.clip(np.searchsorted(cat["source_id"][order], sid[good]), 0, order.size - 1)
    ci = order[pos]
    found = cat["source_id"][ci] == sid[good]
    return {"source_id": sid[good][found], "label": lab[good][found],
            "g": rows["gaiaedr3_phot_g_mean_mag"][best][good][found].astype(np.float64),
            "ak": rows["ak_targ"][best][good][found].astype(np.float64),
            "est": cat["est"][ci][found], "flags": cat["flags"][ci][found]}


def solar_type(s: dict[str, np.ndarray]) -> np.ndarray:
    lab = s["label"]
    return ((lab[:, 0] > SOLAR_TEFF[0]) & (lab[:, 0] < SOLAR_TEFF[1]) & (lab[:, 2] > SOLAR_LOGG[0])
            & (lab[:, 2] < SOLAR_LOGG[1]))


def residual_stats(d: np.ndarray) -> dict[str, Any]:
    d = d[np.isfinite(d)]
    if not d.size:
        return {"n": 0}
    return {"n": int(d.size), "median": round(float(np.median(d)), 3),
            "robust_sigma": round(float(bench.robust_sigma(d)), 3)}


def brightness(s: dict[str, np.ndarray]) -> dict[str, Any]:
    """Item a: held-out [Fe/H] (and Teff, logg) residuals against G, solar-type dwarfs and all stars."""
    basic = s["flags"] < 8
    res = s["est"] - s["label"]
    out: dict[str, Any] = {"solar_type": {}, "all": {}}
    for name, sel in (("solar_type", solar_type(s) & basic), ("all", basic)):
        for lo, hi in itertools.pairwise(G_BINS):
            m = sel & (s["g"] >= lo) & (s["g"] < hi)
            out[name][f"G {lo:g}-{hi:g}"] = {p: residual_stats(res[m, i]) for i, p in enumerate(bench.PARAMS)}
    bright = basic & (s["g"] < 8.0)
    out["brightest"] = [{"source_id": int(s["source_id"][i]), "g": round(float(s["g"][i]), 2),
                         "label": np.round(s["label"][i], 2).tolist(), "est": np.round(s["est"][i], 2).tolist()}
                        for i in np.flatnonzero(bright)[np.argsort(s["g"][bright])][:10]]
    return out


def conditioned_rows(run_dir: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """flux (m, 66), flux_error (m, 66), factor (m, 66, 66) of the given source_ids from RUN_DIR/conditioned."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from xpcat import catalog_schema as cs
    from xpcat.production.run_dir import RunPaths

    wanted = pa.array(np.asarray(ids, dtype=np.int64))
    parts = []
    for f in sorted(RunPaths.of(run_dir).conditioned.glob("*.parquet")):
        t = pq.read_table(f, columns=["source_id", "flux", "flux_error", "flux_factor_triu"])
        t = t.filter(pc.is_in(t.column("source_id"), value_set=wanted))
        if t.num_rows:
            parts.append(t)
    t = pa.concat_tables(parts)
    n = t.num_rows
    arr = lambda c, w: np.asarray(t.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                  dtype=np.float64).reshape(n, w)
    return {"source_id": t.column("source_id").to_numpy().astype(np.int64), "flux": arr("flux", 66),
            "error": arr("flux_error", 66), "factor": cs.unpack_triu(arr("flux_factor_triu", 2211), dtype=np.float64)}


def without_nir(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same stars with the 5 NIR fluxes removed (XP and NIR are uncorrelated: R is block diagonal)."""
    out = dict(c)
    out["flux"] = c["flux"].copy()
    out["flux"][:, 61:] = np.nan
    out["error"] = c["error"].copy()
    out["error"][:, 61:] = np.inf
    out["factor"] = c["factor"].copy()
    out["factor"][:, 61:, :] = 0.0
    out["factor"][:, :, 61:] = 0.0
    return out


def nir_test(inf: Any, s: dict[str, np.ndarray], run_dir: Path, max_stars: int) -> dict[str, Any]:
    """Item e: held-out solar-type dwarfs (basic cut, low AK) refitted with and without their NIR fluxes."""
    sel = np.flatnonzero(solar_type(s) & (s["flags"] < 8))[:max_stars]
    c = conditioned_rows(run_dir, s["source_id"][sel])
    order = np.searchsorted(s["source_id"][sel], c["source_id"])
    lab, g = s["label"][sel][order], s["g"][sel][order]
    out: dict[str, Any] = {"n": int(c["source_id"].size)}
    for name, data in (("with_nir", c), ("xp_only", without_nir(c))):
        r = fit(inf, data["flux"], data["factor"], data["error"])
        d = r["theta"] - lab
        out[name] = {p: residual_stats(d[:, i]) for i, p in enumerate(bench.PARAMS)}
        out[name]["g_lt_9"] = {p: residual_stats(d[g < 9.0, i]) for i, p in enumerate(bench.PARAMS)}
        out[name]["e_median"] = round(float(np.nanmedian(r["e"])), 4)
    return out


def sco18(inf: Any, cfg: Any) -> dict[str, Any]:
    """Items b-d for 18 Sco: fits on the three input routes, from the start grid and from the literature values,
    the [Fe/H] profile, the residuals at both solutions."""
    data = sco18_inputs(cfg)
    flux, err = data["flux"], data["error"]
    truth = np.array([bench.SCO18_REFERENCE[p] for p in bench.PARAMS])
    out: dict[str, Any] = {"reference": bench.SCO18_REFERENCE}
    routes = {"full": (flux, data["full"], err), "diagonal": (flux, data["diagonal"], err),
              "library": (data["library_flux"], data["library"], data["library_error"])}
    fits = {}
    for name, (f, r, e) in routes.items():
        fits[name] = fit(inf, f, r, e)
        x_true = x_at(inf, truth, f[0], r[0])
        from_truth = fit(inf, f, r, e, x0=x_true[None, :])
        out[name] = {"screen_start": summary(fits[name]), "from_reference": summary(from_truth),
                     "at_reference_start": {"x": np.round(x_true, 4).tolist()}}
    p_full = data["full"][0, :61, :61].T @ data["full"][0, :61, :61]
    p_lib = data["library"][0, :61, :61].T @ data["library"][0, :61, :61]
    ev_c = 1.0 / np.linalg.eigvalsh(p_full)
    out["conditioning"] = {
        "condition_flags": int(data["condition_flags"][0]),
        "eigenvalue_floor": cfg.conditioning.eigenvalue_floor,
        "cov_eigenvalues_below_floor": int((ev_c < cfg.conditioning.eigenvalue_floor).sum()),
        "cov_min_eigenvalue": float(ev_c.min()),
        "precision_max_eigenvalue_full_over_library_route": float(np.linalg.eigvalsh(p_full).max()
                                                                  / np.linalg.eigvalsh(p_lib).max()),
        "flux_max_rel_diff_full_vs_library_route": float(np.nanmax(np.abs(data["library_flux"][0, :61]
                                                                          / flux[0, :61] - 1.0))),
    }
    out["input_error_ratio_full_over_library"] = np.round((err[0, :61] / data["library_error"][0, :61])[::5],
                                                          3).tolist()
    out["raw_relative_error"] = np.round((data["raw_error"][0] / FLUX_UNIT_W_M2_NM / flux[0, :61])[::5], 4).tolist()
    x_fit = np.array([fits["full"]["theta"][0, 0] / 1000.0, *fits["full"]["theta"][0, 1:3],
                      np.log(fits["full"]["plx"][0]), np.log(fits["full"]["e"][0])])
    out["profile_full"] = feh_profile(inf, flux[0], data["full"][0], x_fit)
    out["profile_diagonal"] = feh_profile(inf, flux[0], data["diagonal"][0], x_fit)
    x_ref = x_at(inf, truth, flux[0], data["full"][0], e=0.01)
    out["residuals_at_fit"] = whitened_residuals(inf, x_fit, flux[0], err[0])
    out["residuals_at_reference_e0.01"] = whitened_residuals(inf, x_ref, flux[0], err[0])
    return out


#: Reddening grid of :func:`residual_at_labels` [mag of the model's E].
E_GRID = np.arange(0.0, 0.8001, 0.005)


def residual_at_labels(inf: Any, theta: np.ndarray, flux: np.ndarray, error: np.ndarray) -> np.ndarray:
    """(n, 61) f_obs / f_pred - 1 of the XP samples at the given labels Theta (n, 3) [K, dex, dex].

    f_pred is the model at Theta with the E of :data:`E_GRID` and the flux scale (plx^2) that minimise the
    diagonal chi^2 (``error`` (n, 61), the same unit as ``flux``): the spectral mismatch of the model at the
    star's reference labels.
    """
    import jax
    import jax.numpy as jnp

    model = inf.objective.model
    lnf = np.asarray(jax.jit(jax.vmap(model.ln_flux_abs))(jnp.asarray(theta, inf.dtype)), np.float64)[:, :61]
    r = np.asarray(model.R, np.float64)[:61]
    w = np.where(np.isfinite(flux) & np.isfinite(error) & (error > 0), 1.0 / np.where(error > 0, error, 1.0) ** 2, 0.0)
    f = np.where(w > 0, flux, 0.0)
    best_chi2 = np.full(theta.shape[0], np.inf)
    best_pred = np.zeros_like(f)
    for e in E_GRID:
        m = np.exp(lnf - e * r)
        s = (w * f * m).sum(1) / (w * m * m).sum(1)
        pred = s[:, None] * m
        c = (w * (f - pred) ** 2).sum(1)
        better = c < best_chi2
        best_chi2[better] = c[better]
        best_pred[better] = pred[better]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w > 0, f / best_pred - 1.0, np.nan)


def bright_pattern(inf: Any, rows: dict[str, np.ndarray], sco18_flux: np.ndarray,
                   sco18_error: np.ndarray) -> dict[str, Any]:
    """The model's spectral mismatch at the labels, by G: library stars (SNR > 50, Teff < 7000 K) and 18 Sco.

    Library errors get Eq. 2's diagonal 0.5 % in quadrature, as conditioning does. Median of f_obs / f_pred - 1
    per sample (every 50 nm) in G bins, for all such stars and for solar-type dwarfs; 18 Sco at its literature
    values (its conditioned diagonal errors).
    """
    from xpcat.production.ingest.sampled import XP_TAKE

    best = bench.best_rows(rows["gaiaedr3_source_id"], rows["snr"])
    lab = np.column_stack([rows[c][best].astype(np.float64) for c in ("teff", "fe_h", "logg")])
    snr = rows["snr"][best].astype(np.float64)
    ok = (snr > bench.SNR_MIN) & (lab[:, 0] < bench.TEFF_MAX) & np.all(np.isfinite(lab), axis=1)
    idx, lab = best[ok], lab[ok]
    scale = rows["medflux"][idx].astype(np.float64)[:, None] / FLUX_UNIT_W_M2_NM
    flux = rows["flux"][idx][:, XP_TAKE].astype(np.float64) * scale
    from astropy.io import fits

    with fits.open(bench.library_path(None), memmap=False) as hdul:
        raw_err = np.asarray(hdul[1].data["flux_error"][idx][:, XP_TAKE], dtype=np.float64) * scale
    err = np.hypot(raw_err, 0.005 * flux)
    rel = np.concatenate([residual_at_labels(inf, lab[i:i + 4096], flux[i:i + 4096], err[i:i + 4096])
                          for i in range(0, idx.size, 4096)])
    g = rows["gaiaedr3_phot_g_mean_mag"][idx].astype(np.float64)
    solar = ((lab[:, 0] > SOLAR_TEFF[0]) & (lab[:, 0] < SOLAR_TEFF[1]) & (lab[:, 2] > SOLAR_LOGG[0])
             & (lab[:, 2] < SOLAR_LOGG[1]))
    out: dict[str, Any] = {"wavelength_nm": np.arange(392, 993, 50).tolist(), "all": {}, "solar_type": {}}
    for name, sel in (("all", np.ones(idx.size, bool)), ("solar_type", solar)):
        for lo, hi in itertools.pairwise(G_BINS):
            m = sel & (g >= lo) & (g < hi)
            if m.sum():
                out[name][f"G {lo:g}-{hi:g}"] = {"n": int(m.sum()),
                                                  "median_rel": np.round(np.nanmedian(rel[m], 0)[::5], 4).tolist()}
    truth = np.array([[bench.SCO18_REFERENCE[p] for p in bench.PARAMS]])
    out["sco18_at_reference"] = np.round(residual_at_labels(inf, truth, sco18_flux[None, :61],
                                                            sco18_error[None, :61])[0, ::5], 4).tolist()
    return out


def bright_corrected_fits(inf: Any, cfg: Any, rows: dict[str, np.ndarray], g_max: float) -> dict[str, Any]:
    """Item f: 18 Sco divided by the model's median mismatch at the labels of library stars with G < ``g_max``.

    The correction c(lambda) = 1 + median(f_obs / f_pred - 1) over those stars (SNR > 50, Teff < 7000 K, any
    type; :func:`residual_at_labels`) is the bright-star spectral signature the library shows; 18 Sco's flux is
    divided by it (its covariance by c c^T) and refitted, full and diagonal covariance, from the start grid and
    from the literature values. A test of the explanation, not a calibration xpcat applies.
    """
    from xpcat.production.ingest.sampled import XP_TAKE

    best = bench.best_rows(rows["gaiaedr3_source_id"], rows["snr"])
    lab = np.column_stack([rows[c][best].astype(np.float64) for c in ("teff", "fe_h", "logg")])
    g = rows["gaiaedr3_phot_g_mean_mag"][best].astype(np.float64)
    ok = ((rows["snr"][best] > bench.SNR_MIN) & (lab[:, 0] < bench.TEFF_MAX) & np.all(np.isfinite(lab), axis=1)
          & (g < g_max))
    idx = best[ok]
    scale = rows["medflux"][idx].astype(np.float64)[:, None] / FLUX_UNIT_W_M2_NM
    flux = rows["flux"][idx][:, XP_TAKE].astype(np.float64) * scale
    from astropy.io import fits

    with fits.open(bench.library_path(None), memmap=False) as hdul:
        raw_err = np.asarray(hdul[1].data["flux_error"][idx][:, XP_TAKE], dtype=np.float64) * scale
    rel = residual_at_labels(inf, lab[ok], flux, np.hypot(raw_err, 0.005 * flux))
    corr = np.ones(66)
    corr[:61] = 1.0 + np.nanmedian(rel, axis=0)
    data = sco18_inputs(cfg)
    f, e = data["flux"] / corr, data["error"] / corr
    truth = np.array([bench.SCO18_REFERENCE[p] for p in bench.PARAMS])
    out: dict[str, Any] = {"g_max": g_max, "n_library_stars": int(idx.size),
                           "correction_minus_1": np.round(corr[:61:5] - 1.0, 4).tolist()}
    for name in ("full", "diagonal"):
        r = data[name] * corr[None, None, :]  # R' = R diag(c): chi^2 of f / c under C / (c c^T) is unchanged in form
        out[name] = {"screen_start": summary(fit(inf, f, r, e)),
                     "from_reference": summary(fit(inf, f, r, e, x0=x_at(inf, truth, f[0], r[0])[None, :]))}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished benchmarks/real_apogee.py run")
    ap.add_argument("--library", type=Path, default=None)
    ap.add_argument("--nir-stars", type=int, default=400, help="solar-type dwarfs refitted without NIR (item e)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("jax", "xpcat"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from xpcat.config import load_config
    from xpcat.fileio import write_json_atomic

    run_dir = args.run_dir.resolve()
    cfg = load_config(run_dir / "config.toml")
    rows = bench.read_library(bench.library_path(args.library))
    inf = load_inference(run_dir, cfg)
    result: dict[str, Any] = {"run_dir": str(run_dir), "model": {
        "epochs": cfg.training.epochs, "hidden_width": cfg.model.hidden_width, "n_hidden": cfg.model.n_hidden,
        "clean_sigma": cfg.training.clean_sigma, "preset": cfg.training.preset}}
    result["sco18"] = sco18(inf, cfg)
    data = sco18_inputs(cfg)
    result["sco18_vs_twins"] = twin_shapes(rows, data["flux"][0], data["error"][0])
    result["mismatch_at_labels"] = bright_pattern(inf, rows, data["flux"][0], data["error"][0])
    result["bright_corrected"] = {f"G<{gm:g}": bright_corrected_fits(inf, cfg, rows, gm) for gm in (9.0, 10.0)}
    s = scored_stars(rows, run_dir, cfg)
    result["brightness"] = brightness(s)
    result["nir"] = nir_test(inf, s, run_dir, args.nir_stars)
    if args.out is not None:
        write_json_atomic(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

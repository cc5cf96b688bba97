"""Pulls of reported errors: their robust sigma and the calibration verdict (issue 15).

``robust_sigma`` is the one definition of a robust width used for pulls (the
model error's learning, its deconvolution, validation.json and the report);
:func:`robust_sigma_se` its bootstrap standard error; :func:`pull_calibration`
turns residuals and errors into the numbers and the sentences that the report
prints.

A bin's pull sigma is a noisy number: from n Gaussian pulls the MAD-based
width scatters by ~1.17 / sqrt(n) (0.13 at 84 stars, 0.05 at 500), as wide
as half the calibrated band. Each bin therefore carries its standard error,
and the verdict separates bins whose pull sigma lies outside the band from
those outside it by more than :data:`SIGNIFICANCE` standard errors (the ones
whose error bars are miscalibrated beyond what the bin's size explains).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy.stats import bootstrap, median_abs_deviation

__all__ = ["BIN_MIN_STARS", "PARAMS", "PULL_SIGMA_BAND", "SIGNIFICANCE", "band_excess", "pull_calibration",
           "robust_sigma", "robust_sigma_se"]

#: Reported parameters, catalog order.
PARAMS = ("teff", "feh", "logg", "e", "plx")


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of the finite values (NaN for fewer than 3)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def robust_sigma_se(x: np.ndarray, n_resamples: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`robust_sigma` of the finite values (NaN for fewer than 3).

    Parameters
    ----------
    x : (n,) array (non-finite values skipped).
    n_resamples : bootstrap resamples.
    seed : the resampling's seed (the same data give the same error).
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return float("nan")
    res = bootstrap((x,), lambda v, axis: median_abs_deviation(v, axis=axis, scale="normal"), n_resamples=n_resamples,
                    method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.standard_error)


#: The band a pull robust sigma must fall in for the error bars to count as calibrated (issue 15).
PULL_SIGMA_BAND = (0.85, 1.2)
#: Fewest stars in a bin whose pull sigma enters the bins' verdict.
BIN_MIN_STARS = 20
#: A bin is significantly outside the band when its pull sigma is further out than this many standard errors.
SIGNIFICANCE = 2.0


def pull_calibration(resid: np.ndarray, err: np.ndarray, ref_err: np.ndarray | None = None,
                     bins: dict[str, tuple[np.ndarray, list[float]]] | None = None,
                     band: tuple[float, float] = PULL_SIGMA_BAND) -> dict[str, Any]:
    """Are the reported error bars calibrated? validation.json's numbers and the report's sentence.

    Parameters
    ----------
    resid : (n, k) estimate - reference, catalog units (k = 5 for the synthetic truth, 3 for labels).
    err : (n, k) reported errors (``stellar_params_err``).
    ref_err : (n, k) reference errors (0 / None for a truth).
    bins : optional ``{"G": (values (n,), edges), "E": ..., "Teff": ...}``: the same per bin.
    band : the calibrated band of the pull robust sigma.

    Returns
    -------
    dict (JSON-able): ``band``, per parameter (Teff, [Fe/H], logg, E, plx; the first k) ``{"n", "pull_sigma",
    "calibrated"}``, ``calibrated`` (every parameter in the band), ``worst`` (the
    parameter furthest out and by how much), ``bins`` (per bin: lo, hi, n and
    the pull sigma per parameter with its bootstrap standard error ``pull_sigma_se``),
    ``bins_verdict`` (of the bins with >= :data:`BIN_MIN_STARS` stars: how many
    (bin, parameter) pairs were checked, which lie ``outside`` the band and
    which ``significantly_outside``, further than :data:`SIGNIFICANCE` standard
    errors), ``statement`` (one sentence) and ``bins_statement`` (one sentence on the bins).
    """
    resid = np.asarray(resid, dtype=np.float64)
    k = resid.shape[1]
    var = np.asarray(err, dtype=np.float64) ** 2
    if ref_err is not None:
        var = var + np.asarray(ref_err, dtype=np.float64) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        pulls = resid / np.sqrt(var)
    names = PARAMS[:k]
    out: dict[str, Any] = {"band": list(band)}
    off = {}
    for j, p in enumerate(names):
        sig = robust_sigma(pulls[:, j])
        ok = bool(band[0] <= sig <= band[1])
        out[p] = {"n": int(np.isfinite(pulls[:, j]).sum()), "pull_sigma": sig, "calibrated": ok}
        if np.isfinite(sig) and not ok:
            off[p] = sig - (band[1] if sig > band[1] else band[0])
    out["calibrated"] = all(out[p]["calibrated"] for p in names)
    out["worst"] = max(off.items(), key=lambda kv: abs(kv[1])) if off else None
    out["bins"] = {}
    for name, (values, edges) in (bins or {}).items():
        values = np.asarray(values, dtype=np.float64)
        rows = []
        for lo, hi in itertools.pairwise(edges):
            m = (values >= lo) & (values < hi)
            rows.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()),
                         "pull_sigma": {p: robust_sigma(pulls[m, j]) for j, p in enumerate(names)},
                         "pull_sigma_se": {p: robust_sigma_se(pulls[m, j]) for j, p in enumerate(names)}})
        out["bins"][name] = rows
    out["bins_verdict"] = _bins_verdict(out["bins"], names, band)
    sig_txt = ", ".join(f"{p} {out[p]['pull_sigma']:.2f}" for p in names)
    if out["calibrated"]:
        out["statement"] = (f"The error bars are calibrated: the pull robust sigma is within "
                            f"{band[0]}-{band[1]} for every parameter ({sig_txt}).")
    else:
        bad = ", ".join(p for p in names if not out[p]["calibrated"])
        out["statement"] = (f"The error bars are not calibrated for {bad}: pull robust sigma {sig_txt} "
                            f"(calibrated band {band[0]}-{band[1]}).")
    out["bins_statement"] = _bins_statement(out["bins_verdict"], band)
    return out


def band_excess(sigma: float, se: float | None, band: tuple[float, float] = PULL_SIGMA_BAND) -> dict[str, Any] | None:
    """How far a pull sigma lies outside ``band``: None when inside (or not finite).

    Parameters
    ----------
    sigma : a robust pull sigma.
    se : its standard error (None, NaN or <= 0 when unknown).
    band : the accepted (low, high) range.

    Returns
    -------
    ``{"distance": float, "standard_errors_out": float | None, "significant": bool}``: the distance to the
    nearer band edge, that distance in standard errors, and whether it exceeds :data:`SIGNIFICANCE` of them.
    """
    if sigma is None or not np.isfinite(sigma) or band[0] <= sigma <= band[1]:
        return None
    dist = float(band[0] - sigma if sigma < band[0] else sigma - band[1])
    known = se is not None and bool(np.isfinite(se)) and se > 0
    return {"distance": dist, "standard_errors_out": dist / se if known else None,
            "significant": bool(known and dist > SIGNIFICANCE * se)}


def _bins_verdict(bins: dict[str, list[dict[str, Any]]], names: tuple[str, ...],
                  band: tuple[float, float]) -> dict[str, Any]:
    """The (bin, parameter) pairs of >= :data:`BIN_MIN_STARS` stars outside ``band``, and those significantly so."""
    checked, outside, significant = 0, [], []
    for name, rows in bins.items():
        for row in rows:
            if row["n"] < BIN_MIN_STARS:
                continue
            for p in names:
                sig, se = row["pull_sigma"][p], row["pull_sigma_se"][p]
                if not np.isfinite(sig):
                    continue
                checked += 1
                excess = band_excess(sig, se, band)
                if excess is None:
                    continue
                entry = {"bin": name, "lo": row["lo"], "hi": row["hi"], "n": row["n"], "parameter": p,
                         "pull_sigma": sig, "pull_sigma_se": se, "standard_errors_out": excess["standard_errors_out"]}
                outside.append(entry)
                if excess["significant"]:
                    significant.append(entry)
    return {"min_stars": BIN_MIN_STARS, "significance": SIGNIFICANCE, "checked": checked, "outside": outside,
            "significantly_outside": significant}


def _bins_statement(verdict: dict[str, Any], band: tuple[float, float]) -> str:
    """One sentence on the bins: how many of the checked pairs are outside the band, and which significantly."""
    n, out, sig = verdict["checked"], verdict["outside"], verdict["significantly_outside"]
    if n == 0:
        return f"No bin holds {verdict['min_stars']} stars: the error bars are not judged per bin."
    verb = "lies" if len(out) == 1 else "lie"
    head = (f"Of {n} bin pull sigmas (bins of >= {verdict['min_stars']} stars), {len(out)} {verb} outside "
            f"{band[0]}-{band[1]}")
    if not out:
        return head + "."
    if not sig:
        return head + (f", none by more than {verdict['significance']:g} standard errors (consistent with the bins' "
                       "sizes).")
    worst = ", ".join(f"{e['parameter']} {e['pull_sigma']:.2f} +- {e['pull_sigma_se']:.2f} at {e['bin']} "
                      f"{e['lo']:g}-{e['hi']:g} ({e['n']} stars)" for e in sig)
    return head + f"; {len(sig)} by more than {verdict['significance']:g} standard errors: {worst}."

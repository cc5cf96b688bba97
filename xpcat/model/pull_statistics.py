"""Pulls of reported errors: their robust sigma and the calibration verdict (issue 15).

``robust_sigma`` is the one definition of a robust width used for pulls (the
model error's learning, its deconvolution, validation.json and the report);
:func:`pull_calibration` turns residuals and errors into the numbers and the
sentence that the report prints. Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PARAMS", "PULL_SIGMA_BAND", "robust_sigma", "pull_calibration"]

#: Reported parameters, catalog order.
PARAMS = ("teff", "feh", "logg", "e", "plx")


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of the finite values (NaN for fewer than 3)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


#: The band a pull robust sigma must fall in for the error bars to count as calibrated (issue 15).
PULL_SIGMA_BAND = (0.85, 1.2)


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
    the pull sigma per parameter) and ``statement`` (one sentence).
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
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (values >= lo) & (values < hi)
            rows.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()),
                         "pull_sigma": {p: robust_sigma(pulls[m, j]) for j, p in enumerate(names)}})
        out["bins"][name] = rows
    sig_txt = ", ".join(f"{p} {out[p]['pull_sigma']:.2f}" for p in names)
    if out["calibrated"]:
        out["statement"] = (f"The error bars are calibrated: the pull robust sigma is within "
                            f"{band[0]}-{band[1]} for every parameter ({sig_txt}).")
    else:
        bad = ", ".join(p for p in names if not out[p]["calibrated"])
        out["statement"] = (f"The error bars are not calibrated for {bad}: pull robust sigma {sig_txt} "
                            f"(calibrated band {band[0]}-{band[1]}).")
    return out

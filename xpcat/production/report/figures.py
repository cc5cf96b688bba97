"""The report's figures: matplotlib (Agg) PNGs written into the report folder.

Each ``*_figure`` function draws one figure, saves it as ``<out>/<name>.png``
and returns the file name (the page links it by that name):

- :func:`kiel_figure`: Kiel diagram coloured by count;
- :func:`residuals_figure`: residuals against the reference, raw or normalised (Figs. 7-8);
- :func:`pulls_figure`: pull distributions against N(0, 1);
- :func:`flux_residuals_figure`: normalised flux residuals against wavelength (Fig. 9);
- :func:`extinction_figure`: the learned R(lambda) against the XP curve of XP-Extinction-Toolkit,
  CCM89 (R_V = 2.8, 3.1, 3.4) and the truth law;
- :func:`sky_figure`: the sky map of the median E;
- :func:`confidence_figure`: held-out confident vs not-confident residuals (Fig. 10).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from xpcat.catalog_schema import PARAM_NAMES
from xpcat.catalog_schema.flags import CONFIDENCE_THRESHOLD
from xpcat.production.report.data import ReportData
from xpcat.production.report.statistics import format_number, robust_sigma
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = [
    "AXIS_LABELS",
    "confidence_figure",
    "extinction_figure",
    "flux_residuals_figure",
    "kiel_figure",
    "pulls_figure",
    "pyplot",
    "residuals_figure",
    "save_figure",
    "sky_figure",
]

#: Axis label of each parameter, in report units.
AXIS_LABELS = {"teff": "Teff [K]", "feh": "[Fe/H] [dex]", "logg": "logg [dex]", "extinction": "E [mag]",
               "parallax": "parallax [mas]"}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, with LaTeX text rendering off."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # GaiaXPy's plotter sets text.usetex = True at import; the report must not need LaTeX
    plt.rcParams["text.usetex"] = False
    return plt


def save_figure(fig: Any, path: Path) -> str:
    """Save ``fig`` as PNG at ``path``, close it, and return the file name."""
    fig.savefig(path, dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return path.name


def kiel_figure(data: ReportData, out: Path) -> str:
    """Kiel diagram (Teff K vs logg dex) of the basic-cut stars, coloured by count; ``kiel.png``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ok = data.basic & np.isfinite(data.est[:, 0]) & np.isfinite(data.est[:, 2])
    if ok.any():
        from matplotlib.colors import LogNorm

        h = ax.hist2d(data.est[ok, 0], data.est[ok, 2], bins=60, cmap="viridis", norm=LogNorm(), cmin=1)
        fig.colorbar(h[3], ax=ax, label="stars per pixel")
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel("Teff [K]")
    ax.set_ylabel("logg [dex]")
    ax.set_title(f"Kiel diagram ({int(ok.sum())} stars, basic cut)")
    return save_figure(fig, out / "kiel.png")


def _percentile_lines(ax: Any, x: np.ndarray, y: np.ndarray, bins: np.ndarray) -> None:
    """The 15th, 50th and 84th percentiles of ``y`` in ``bins`` of ``x`` (bins with >= 5 points)."""
    centers, lines = [], []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (x >= lo) & (x < hi)
        if m.sum() >= 5:
            centers.append(0.5 * (lo + hi))
            lines.append(np.percentile(y[m], [15, 50, 84]))
    if centers:
        lines_a = np.array(lines)
        for k, style in enumerate(("--", "-", "--")):
            ax.plot(centers, lines_a[:, k], style, color="gold", lw=1.2)


def residuals_figure(data: ReportData, stats: dict, out: Path, normalised: bool) -> str:
    """Residuals (or pulls when ``normalised``) against the reference value, per parameter (Figs. 7-8).

    ``stats`` is :func:`~xpcat.production.report.statistics.validation_numbers` (for the titles).
    Returns ``residuals.png`` or ``residuals_normalised.png``.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for j, (p, ax) in enumerate(zip(PARAM_NAMES, axes)):
        res, pull, used = data.residuals(j)
        y = pull if normalised else res
        x = data.ref[p]
        if used.sum() > 1:
            lo, hi = np.percentile(y[used], [1, 99])
            span = max(hi - lo, 1e-9)
            ax.hist2d(x[used], np.clip(y[used], lo - 0.2 * span, hi + 0.2 * span), bins=40, cmap="Blues", cmin=1)
            _percentile_lines(ax, x[used], y[used], np.linspace(np.min(x[used]), np.max(x[used]) + 1e-12, 12))
        ax.axhline(0, color="k", lw=0.6)
        s = stats[p]
        sig, bias = (s["pull_robust_sigma"], s["pull_median"]) if normalised else (s["robust_sigma"], s["bias"])
        ax.set_title(f"{p}: sigma={format_number(sig)} bias={format_number(bias)}", fontsize=9)
        ax.set_xlabel(f"reference {AXIS_LABELS[p]}")
        ax.set_ylabel("pull" if normalised else "estimate - reference")
    fig.suptitle(("normalised " if normalised else "") + f"residuals vs {data.ref_kind} (basic cut)")
    return save_figure(fig, out / ("residuals_normalised.png" if normalised else "residuals.png"))


def pulls_figure(data: ReportData, stats: dict, out: Path) -> str:
    """Histogram of the pulls of each parameter against N(0, 1); ``pulls.png``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    grid = np.linspace(-5, 5, 201)
    for j, (p, ax) in enumerate(zip(PARAM_NAMES, axes)):
        _, pull, used = data.residuals(j)
        if used.any():
            ax.hist(np.clip(pull[used], -5, 5), bins=50, range=(-5, 5), density=True, color="C0", alpha=0.7)
        ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "k-", lw=1, label="N(0, 1)")
        median, sigma = format_number(stats[p]["pull_median"]), format_number(stats[p]["pull_robust_sigma"])
        ax.set_title(f"{p}: median={median} sigma={sigma}", fontsize=9)
        ax.set_xlabel("pull")
    axes[0].legend(fontsize=8)
    return save_figure(fig, out / "pulls.png")


def flux_residuals_figure(z: np.ndarray | None, wavelengths: np.ndarray | None, out: Path) -> str:
    """15/50/84th percentiles of the (m, 66) normalised flux residuals ``z`` per sample (Fig. 9).

    ``wavelengths`` (66,) nm label the axis; either None draws a note instead. Returns ``flux_residuals.png``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    if z is not None and wavelengths is not None and np.isfinite(z).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanpercentile(z, [15, 50, 84], axis=0)
        idx = np.arange(z.shape[1])
        ax.fill_between(idx, q[0], q[2], color="C0", alpha=0.3, label="15-84 %")
        ax.plot(idx, q[1], "C0-", label="median")
        ticks = idx[::6].tolist() + [61, 62, 63, 64, 65]
        labels = [f"{wavelengths[i]:.0f}" for i in idx[::6]] + ["J", "H", "Ks", "W1", "W2"]
        ax.set_xticks(sorted(set(ticks)))
        ax.set_xticklabels([labels[ticks.index(t)] for t in sorted(set(ticks))], rotation=60, fontsize=7)
        ax.legend(fontsize=8)
        ax.set_title(f"normalised flux residuals (f_pred - f_obs) / s_f, {z.shape[0]} stars (basic cut)")
    else:
        ax.text(0.5, 0.5, "no conditioned partitions or model artifact: flux residuals unavailable",
                ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("wavelength [nm] / band")
    ax.set_ylabel("Delta f / sigma")
    return save_figure(fig, out / "flux_residuals.png")


def extinction_figure(
    R: np.ndarray | None, wavelengths: np.ndarray | None, R_truth: np.ndarray | None, out: Path
) -> str:
    """The learned R(lambda) (66,) against the XP curve, CCM89 (R_V = 2.8, 3.1, 3.4) and the truth law.

    Every curve is normalised to its value at 392 nm (as Fig. 15 and the
    deviations in validation.json); the lower panel shows learned / reference - 1
    over the XP samples for the XP curve, CCM89 R_V = 3.1 and the truth law.
    ``R_truth`` (66,) is drawn when known. Returns ``extinction_curve.png``.
    """
    from xpcat.production.report.evaluation import (
        CCM_R_V,
        ccm89_extinction_curve,
        xp_toolkit_extinction_curve,
    )

    plt = pyplot()
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    if R is not None and wavelengths is not None:
        wl = np.asarray(wavelengths, float)
        um = wl / 1000
        learned = np.asarray(R, float) / float(R[0])
        ax.plot(um, learned, "ko-", ms=3, label="learned R", zorder=5)
        refs = {"XP curve (XP-Extinction-Toolkit)": (xp_toolkit_extinction_curve(wl), "C2", "-")}
        for rv in (2.8, 3.1, 3.4):
            refs[f"CCM89 R_V = {rv}"] = (ccm89_extinction_curve(wl, rv), "C0", {2.8: ":", 3.1: "-", 3.4: "--"}[rv])
        if R_truth is not None:
            refs["truth law"] = (np.asarray(R_truth, float), "r", "--")
        xp = slice(0, 61)
        for name, (curve, color, style) in refs.items():
            ok = np.isfinite(curve)
            norm = curve / curve[0]
            ax.plot(um[ok], norm[ok], style, color=color, lw=1, label=name)
            if name in ("XP curve (XP-Extinction-Toolkit)", f"CCM89 R_V = {CCM_R_V}", "truth law"):
                axr.plot(um[xp], learned[xp] / norm[xp] - 1, style, color=color, lw=1, label=name)
        ax.set_xscale("log")
        ax.legend(fontsize=8)
        axr.axhline(0, color="k", lw=0.6)
        axr.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no model artifact", ha="center", va="center", transform=ax.transAxes)
    axr.set_xlabel("wavelength [um]")
    ax.set_ylabel("A(lambda) / A(392 nm)")
    axr.set_ylabel("learned / ref - 1")
    ax.set_title("extinction curve (normalised at 392 nm)")
    return save_figure(fig, out / "extinction_curve.png")


def sky_figure(data: ReportData, out: Path) -> str:
    """Mollweide map of the median E of the basic-cut stars in Galactic coordinates; ``sky_median_e.png``."""
    plt = pyplot()
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from scipy.stats import binned_statistic_2d

    ok = data.basic & np.isfinite(data.est[:, 3])
    fig = plt.figure(figsize=(9, 4.8))
    ax = fig.add_subplot(111, projection="mollweide")
    if ok.any():
        g = SkyCoord(ra=data.ra[ok] * u.deg, dec=data.dec[ok] * u.deg, frame="icrs").galactic
        lon = -np.radians(((g.l.deg + 180.0) % 360.0) - 180.0)  # astronomical convention: l grows to the left
        lat = np.radians(g.b.deg)
        nb = int(np.clip(np.sqrt(ok.sum() / 4), 8, 180))
        xe = np.linspace(-np.pi, np.pi, 2 * nb + 1)
        ye = np.linspace(-np.pi / 2, np.pi / 2, nb + 1)
        stat, _, _, _ = binned_statistic_2d(lon, lat, data.est[ok, 3], statistic="median", bins=[xe, ye])
        mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(stat.T), cmap="magma_r", shading="flat")
        fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, label="median E [mag]")
    ax.grid(True, alpha=0.3)
    ax.set_title("median E (Galactic coordinates, basic cut)")
    return save_figure(fig, out / "sky_median_e.png")


def confidence_figure(run_dir: Path, out: Path) -> tuple[str, dict[str, Any]]:
    """Fig. 10: held-out residuals (estimate - label) of stars labelled confident vs not confident.

    Reads ``state/confidence_stars.npz`` written by ``xpcat train-confidence``.
    Returns the figure name and, per parameter, the robust sigma of each group.
    """
    plt = pyplot()
    path = RunPaths.of(run_dir).confidence_stars
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    scatter: dict[str, Any] = {}
    if path.is_file():
        d = np.load(path)
        sel = d["used"] & d["holdout"]
        for j, (p, ax) in enumerate(zip(("teff", "feh", "logg"), axes)):
            res = d["est"][:, j] - d["ref"][:, j]
            conf = d["confidence"][:, j] > CONFIDENCE_THRESHOLD
            good, bad = sel & conf & np.isfinite(res), sel & ~conf & np.isfinite(res)
            scatter[p] = {"confident": robust_sigma(res[good]), "not_confident": robust_sigma(res[bad]),
                          "n_confident": int(good.sum()), "n_not_confident": int(bad.sum())}
            ax.plot(d["ref"][good, j], res[good], ".", ms=3, color="C0", label=f"confident ({int(good.sum())})")
            ax.plot(d["ref"][bad, j], res[bad], ".", ms=3, color="C3", label=f"not confident ({int(bad.sum())})")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel(f"label {AXIS_LABELS[p]}")
            ax.set_ylabel("estimate - label")
            sig_good, sig_bad = format_number(scatter[p]["confident"]), format_number(scatter[p]["not_confident"])
            ax.set_title(f"{p}: sigma {sig_good} vs {sig_bad}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("held-out classifier stars (basic cut): confident vs not confident (as Fig. 10)")
    else:
        axes[1].text(0.5, 0.5, "no confidence training set (run `xpcat train-confidence`)", ha="center",
                     va="center", transform=axes[1].transAxes)
    return save_figure(fig, out / "confidence.png"), scatter

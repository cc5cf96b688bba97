"""The figures of residuals against the reference value as the paper's Figs. 7 and 16 draw them.

- :func:`fig7_figure`: the 5 parameters, Fig. 7's validation selection: density
  of residual vs reference (log colour), the running median and median +- robust
  sigma per bin; ``residuals_fig7.png``;
- :func:`fig16_figure`: Teff, [Fe/H], logg (columns) for each of
  :data:`~xpcat.production.report.binned_residuals.FIG16_SELECTIONS` (rows):
  density normalised by its maximum in each pixel column, the 15th, 50th and
  84th percentiles in orange; ``residuals_fig16.png``.

The lines are :func:`~xpcat.production.report.binned_residuals.binned_residual_numbers`'s
numbers (validation.json's ``binned_residuals``); the density is drawn from the catalog.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from xpcat.catalog_schema import PARAM_NAMES
from xpcat.production.report.binned_residuals import (
    BIN_EDGES,
    FIG7_PARAMS,
    FIG16_PARAMS,
    FIG16_SELECTIONS,
    SELECTIONS,
    selection,
)
from xpcat.production.report.data import ReportData
from xpcat.production.report.figures import AXIS_LABELS, pyplot, save_figure
from xpcat.production.report.statistics import format_number

logger = logging.getLogger(__name__)

__all__ = [
    "DENSITY_SUBBINS",
    "fig7_figure",
    "fig16_figure",
    "residual_range",
]

#: Density pixels per statistics bin along the reference axis.
DENSITY_SUBBINS = 4


def residual_range(y: np.ndarray) -> float:
    """Half-height of a residual panel: 1.3 x the larger |1st|, |99th| percentile of ``y`` (1 when empty)."""
    y = np.asarray(y, float)
    y = y[np.isfinite(y)]
    if y.size < 2:
        return 1.0
    lo, hi = np.percentile(y, [1, 99])
    return float(max(1.3 * max(abs(lo), abs(hi)), 1e-9))


def _density(data: ReportData, p: str, m: np.ndarray, half: float, ny: int = 40) -> tuple[np.ndarray, ...]:
    """2D histogram of (reference, residual) of the rows ``m``: ``(counts (nx, ny), x_edges, y_edges)``."""
    j = PARAM_NAMES.index(p)
    e = BIN_EDGES[p]
    xe = np.linspace(e[0], e[-1], (e.size - 1) * DENSITY_SUBBINS + 1)
    ye = np.linspace(-half, half, ny + 1)
    x, y = data.ref[p][m], np.clip(data.est[m, j] - data.ref[p][m], -half, half)
    h, _, _ = np.histogram2d(x, y, bins=[xe, ye])
    return h, xe, ye


def _lines(ax: Any, stats: dict[str, Any], keys: tuple[str, ...], color: str, styles: tuple[str, ...]) -> None:
    """Draw ``stats[key]`` (per bin) against the bin centres, one line style per key."""
    xc = np.asarray(stats["bin_centers"])
    for key, style in zip(keys, styles):
        ax.plot(xc, np.asarray(stats[key], float), style, color=color, lw=1.3)


def fig7_figure(data: ReportData, binned: dict[str, Any], out: Path) -> str:
    """Fig. 7: residuals of the 5 parameters against the reference, the validation selection.

    Parameters
    ----------
    data : ReportData
    binned : dict
        validation.json's ``binned_residuals``.
    out : Path
        The report folder.

    Returns
    -------
    str
        ``residuals_fig7.png``.
    """
    from matplotlib.colors import LogNorm

    plt = pyplot()
    fig, axes = plt.subplots(1, len(FIG7_PARAMS), figsize=(4.6 * len(FIG7_PARAMS), 3.8))
    for ax, p in zip(axes, FIG7_PARAMS):
        j = PARAM_NAMES.index(p)
        m = selection(data, "validation", j)
        s = binned["fig7"][p]
        half = residual_range(data.est[m, j] - data.ref[p][m])
        h, xe, ye = _density(data, p, m, half)
        if h.sum() > 0:
            mesh = ax.pcolormesh(xe, ye, np.ma.masked_equal(h.T, 0), cmap="Blues", norm=LogNorm(), shading="flat")
            fig.colorbar(mesh, ax=ax, pad=0.01)
        else:
            ax.text(0.5, 0.5, "no stars in this selection", ha="center", va="center", transform=ax.transAxes)
        med, sig = np.asarray(s["median"], float), np.asarray(s["robust_sigma"], float)
        ax.plot(s["bin_centers"], med, "-", color="C3", lw=1.3, label="median")
        ax.plot(s["bin_centers"], med - sig, "--", color="C3", lw=1, label="median +- robust sigma")
        ax.plot(s["bin_centers"], med + sig, "--", color="C3", lw=1)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylim(-half, half)
        ax.set_title(f"{p}: sigma={format_number(s['robust_sigma_total'])} "
                     f"median={format_number(s['median_total'])} ({s['n_total']})", fontsize=9)
        ax.set_xlabel(f"{binned['reference']} {AXIS_LABELS[p]}")
        ax.set_ylabel("estimate - reference")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"residuals vs {binned['reference']} (as Fig. 7): {SELECTIONS['validation']}", fontsize=10)
    return save_figure(fig, out / "residuals_fig7.png")


def fig16_figure(data: ReportData, binned: dict[str, Any], out: Path) -> str:
    """Fig. 16: Teff, [Fe/H], logg residuals against the reference, one row per quality selection.

    The density is normalised by its maximum in each pixel column; the orange
    lines are the 15th, 50th and 84th percentiles per bin (the paper's yellow).

    Parameters
    ----------
    data : ReportData
    binned : dict
        validation.json's ``binned_residuals``.
    out : Path
        The report folder.

    Returns
    -------
    str
        ``residuals_fig16.png``.
    """
    plt = pyplot()
    nr, nc = len(FIG16_SELECTIONS), len(FIG16_PARAMS)
    fig, axes = plt.subplots(nr, nc, figsize=(5 * nc, 3.2 * nr), squeeze=False)
    halves = {}
    for p in FIG16_PARAMS:
        j = PARAM_NAMES.index(p)
        m = selection(data, "converged", j)
        halves[p] = residual_range(data.est[m, j] - data.ref[p][m])
    for r, name in enumerate(FIG16_SELECTIONS):
        for c, p in enumerate(FIG16_PARAMS):
            ax = axes[r, c]
            m = selection(data, name, PARAM_NAMES.index(p))
            s = binned["fig16"][name][p]
            h, xe, ye = _density(data, p, m, halves[p])
            colmax = h.max(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                norm = np.where(colmax > 0, h / colmax, np.nan)
            ax.pcolormesh(xe, ye, np.ma.masked_invalid(norm.T), cmap="Blues", vmin=0, vmax=1, shading="flat")
            _lines(ax, s, ("p15", "median", "p84"), "darkorange", ("--", "-", "--"))
            ax.axhline(0, color="k", lw=0.5)
            if h.sum() == 0:
                ax.text(0.5, 0.5, "no stars in this selection", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylim(-halves[p], halves[p])
            ax.set_title(f"{p}, {name}: sigma={format_number(s['robust_sigma_total'])} "
                         f"median={format_number(s['median_total'])} ({s['n_total']})", fontsize=8)
            if r == nr - 1:
                ax.set_xlabel(f"{binned['reference']} {AXIS_LABELS[p]}")
            if c == 0:
                ax.set_ylabel("estimate - reference")
    fig.suptitle(f"residuals vs {binned['reference']} by quality selection (as Fig. 16); "
                 "density normalised per column, 15/50/84th percentiles", fontsize=10)
    return save_figure(fig, out / "residuals_fig16.png")


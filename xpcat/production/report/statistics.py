"""The report's statistics: robust sigma and bias of the residuals and pulls, Table 3's cut counts.

``robust_sigma`` = 1.4826 x the median absolute deviation from the median
(:func:`xpcat.model.pull_statistics.robust_sigma`, the model error's own; NaN
under 3 finite values), ``bias`` = the
median residual (estimate - reference; Teff in K); pulls are
residual / sqrt(err_est^2 + err_ref^2) (err_ref = 0 for a truth). They use
the stars that pass the basic cut (quality_flags < 8), converged, and have
finite estimates, errors and reference values (:meth:`ReportData.residuals`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xpcat.catalog_schema import PARAM_NAMES
from xpcat.catalog_schema.flags import CONFIDENCE_THRESHOLD
from xpcat.model.pull_statistics import robust_sigma
from xpcat.production.report.data import ReportData

logger = logging.getLogger(__name__)

__all__ = [
    "cut_counts",
    "finite_median",
    "format_number",
    "robust_sigma",
    "validation_numbers",
]


def finite_median(x: np.ndarray) -> float:
    """Median of the finite values of ``x`` (NaN when there are none)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def validation_numbers(data: ReportData) -> dict[str, Any]:
    """The per-parameter statistics of validation.json (without AUCs and run facts).

    Returns
    -------
    dict
        ``reference`` (``"truth"`` | ``"labels"``), ``n_stars``, for each of the
        5 parameters ``{robust_sigma, bias, pull_robust_sigma, pull_median, n}``
        (report units: Teff K, [Fe/H] dex, logg dex, E mag, parallax mas; pulls
        dimensionless), ``basic_cut_fraction`` and ``strict_cut_fraction``.
    """
    out: dict[str, Any] = {"reference": data.ref_kind, "n_stars": int(data.source_id.size)}
    for j, p in enumerate(PARAM_NAMES):
        res, pull, used = data.residuals(j)
        out[p] = {
            "robust_sigma": robust_sigma(res[used]),
            "bias": finite_median(res[used]),
            "pull_robust_sigma": robust_sigma(pull[used]),
            "pull_median": finite_median(pull[used]),
            "n": int(used.sum()),
        }
    n = max(int(data.source_id.size), 1)
    out["basic_cut_fraction"] = float(np.sum(data.basic)) / n
    out["strict_cut_fraction"] = float(np.sum(data.quality_flags == 0)) / n
    return out


def cut_counts(data: ReportData) -> list[tuple[str, int, float]]:
    """Table 3: ``(cut, stars, fraction of all stars)`` rows."""
    n = int(data.source_id.size)
    conf = data.confidence > CONFIDENCE_THRESHOLD
    b = data.basic
    rows = [
        ("all stars", n),
        ("Basic cut", int(b.sum())),
        ("Basic cut + Confident in Teff", int((b & conf[:, 0]).sum())),
        ("Basic cut + Confident in logg", int((b & conf[:, 2]).sum())),
        ("Basic cut + Confident in [Fe/H]", int((b & conf[:, 1]).sum())),
        ("Basic cut + Confident in (Teff, [Fe/H], logg)", int((b & conf.all(axis=1)).sum())),
        ("quality_flags == 0 (strict)", int((data.quality_flags == 0).sum())),
    ]
    return [(name, c, c / max(n, 1)) for name, c in rows]


def format_number(x: Any) -> str:
    """The one number format of the page and the figure titles: integers as is, floats to 4 digits, "n/a"."""
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    return "n/a" if not np.isfinite(x) else f"{x:.4g}"

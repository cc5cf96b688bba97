"""``xpcat report RUN_DIR``: the validation page an astronomer would otherwise make by hand.

:func:`write_report` writes ``RUN_DIR/report/index.html`` (self-contained:
inline CSS, PNG figures beside it; rendered from the Jinja template
``templates/index.html.j2``) and ``RUN_DIR/report/validation.json``:

- Kiel diagram coloured by count;
- residuals against the truth table (synthetic universes) or the labels
  (LAMOST-like labels, the reddening table, Gaia parallaxes), raw and
  normalised (as the paper's Figs. 7-8), with the robust sigma and bias;
- residuals in bins of the reference value as Fig. 7 (validation selection)
  and Fig. 16 (by quality selection), their per-bin median and robust sigma
  in validation.json's ``binned_residuals``;
- normalised flux residuals against wavelength (Fig. 9);
- the learned extinction curve R(lambda) against the XP extinction curve of
  XP-Extinction-Toolkit, CCM89 for R_V = 2.8, 3.1, 3.4 (and the truth law
  when known), with the largest relative deviation over 392-992 nm from the
  XP curve, CCM89 R_V = 3.1 and the truth law;
- the sky map of the median E;
- Table 3: stars passing each cut;
- in words: whether the error bars are calibrated (pull robust sigma per
  parameter against the 0.85-1.2 band, also in bins of G, E and Teff;
  ``error_calibration``) and which errors the catalog reports, the fraction
  of catastrophic failures per cut (``catastrophic_failures``), and per
  confidence parameter whether its classifier was trained or fell back and
  why (``confidence_status``);
- pull distributions;
- run facts: stars, partitions, model hash, timings.

The inputs are read by :mod:`~xpcat.production.report.data`, the numbers
computed by :mod:`~xpcat.production.report.statistics` and
:mod:`~xpcat.production.report.evaluation`, the PNGs drawn by
:mod:`~xpcat.production.report.figures`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from xpcat.catalog_schema import PARAM_NAMES
from xpcat.fileio import write_json_atomic, write_text_atomic
from xpcat.production.report.binned_figures import fig7_figure, fig16_figure
from xpcat.production.report.binned_residuals import binned_residual_numbers
from xpcat.production.report.confidence_status import (
    confidence_status,
    read_confidence_summary,
)
from xpcat.production.report.data import (
    ReportData,
    load_catalog,
    load_g_mag,
    load_reference,
)
from xpcat.production.report.evaluation import (
    extinction_comparison,
    flux_residuals,
    load_model,
    truth_extinction_curve,
)
from xpcat.production.report.figures import (
    confidence_figure,
    extinction_figure,
    flux_residuals_figure,
    kiel_figure,
    pulls_figure,
    residuals_figure,
    sky_figure,
)
from xpcat.production.report.reliability import catastrophic_failures, error_calibration
from xpcat.production.report.statistics import (
    cut_counts,
    format_number,
    validation_numbers,
)
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = [
    "PAGE_FILE",
    "REPORT_DIR",
    "SUMMARY_KEYS",
    "VALIDATION_FILE",
    "json_clean",
    "render_page",
    "run_facts",
    "write_report",
]

REPORT_DIR = "report"
VALIDATION_FILE = "validation.json"
PAGE_FILE = "index.html"
#: The page's template, in the package's ``templates/`` folder.
TEMPLATE = "index.html.j2"
#: validation.json keys shown in the page's summary table.
SUMMARY_KEYS = ("n_stars", "basic_cut_fraction", "strict_cut_fraction", "extinction_curve_max_rel_dev",
                "extinction_curve_max_rel_dev_xp_toolkit", "extinction_curve_max_rel_dev_ccm89_rv31",
                "auc_teff", "auc_feh", "auc_logg")


def json_clean(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and non-finite floats as None (for validation.json)."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _state_timings(state: Path) -> list[tuple[str, str]]:
    """``("time: <file>" | "time: stage <name>", "<s> s")`` from the run state's JSON files."""
    facts = []
    for f in sorted(state.glob("*")) if state.is_dir() else []:
        if not f.is_file() or f.suffix not in (".json", ".done"):
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):  # a state file being rewritten, or not JSON: no timing from it
            continue
        if not isinstance(doc, dict):
            continue
        for k in ("seconds", "wall_s", "elapsed_s"):
            if isinstance(doc.get(k), (int, float)):
                facts.append((f"time: {f.name}", f"{float(doc[k]):.1f} s"))
        stages = doc.get("stages")
        for st, sd in stages.items() if isinstance(stages, dict) else []:
            if isinstance(sd, dict) and isinstance(sd.get("seconds"), (int, float)):
                facts.append((f"time: stage {st}", f"{float(sd['seconds']):.1f} s"))
    return facts


def run_facts(run_dir: Path, cat_info: dict[str, Any], artifact: Any, data: ReportData) -> list[tuple[str, str]]:
    """The page's "Run facts" table: ``(fact, value)`` rows.

    Parameters
    ----------
    run_dir : Path
    cat_info : dict
        :func:`~xpcat.production.report.data.load_catalog`'s info.
    artifact : model artifact or None
    data : ReportData

    Returns
    -------
    list of (str, str)
        Stars, catalog source, partitions, model hash, reference kind, timings
        from ``state/``, the last logs and the time the report was written (UTC).
    """
    paths = RunPaths.of(run_dir)
    facts = [
        ("run directory", str(paths.root)),
        ("stars in catalog", format_number(int(data.source_id.size))),
        ("catalog read from", f"{cat_info['source']} ({cat_info['files']} files)"),
        ("partitions (conditioned)", format_number(len(list(paths.conditioned.glob("*.parquet"))))),
        ("partitions (fitted)", format_number(len(list(paths.fitted.glob("*.parquet"))))),
        ("model hash", artifact.content_hash if artifact is not None else "no model artifact"),
        ("reference", data.ref_kind),
    ]
    if cat_info.get("model_hashes"):
        facts.append(("model hash recorded in catalog", ", ".join(h[:16] for h in cat_info["model_hashes"])))
    facts.extend(_state_timings(paths.state))
    logs = sorted(paths.logs.glob("*.log")) if paths.logs.is_dir() else []
    if logs:
        facts.append(("logs", ", ".join(p.name for p in logs[-3:])))
    facts.append(("report written", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))
    return facts


@functools.cache
def _environment() -> jinja2.Environment:
    """The Jinja environment of the report's templates (autoescaped; an unknown name is an error)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("xpcat.production.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["number"] = format_number
    return env


def render_page(validation: dict[str, Any], counts: list[tuple[str, int, float]], facts: list[tuple[str, str]],
                figures: dict[str, str]) -> str:
    """The HTML of ``index.html``.

    Parameters
    ----------
    validation : dict
        validation.json's content (before :func:`json_clean`; NaN shows as "n/a").
    counts : list of (cut, stars, fraction)
        :func:`~xpcat.production.report.statistics.cut_counts`.
    facts : list of (fact, value)
        :func:`run_facts`.
    figures : dict
        Figure key -> PNG file name in the report folder.

    Returns
    -------
    str
        The page, every value HTML-escaped.
    """
    return _environment().get_template(TEMPLATE).render(
        validation=validation, params=PARAM_NAMES, summary_keys=SUMMARY_KEYS, counts=counts, facts=facts,
        figures=figures,
    )




def write_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/report/index.html``, its PNG figures and ``validation.json``.

    Parameters
    ----------
    run_dir : Path
        A run directory with a catalog (``fitted/`` or ``catalog/``).

    Returns
    -------
    Path of ``index.html``.

    Raises
    ------
    StageError
        When the run has no catalog yet (names the stage to run).
    InputError
        When a catalog or reference file cannot be read.
    """
    run_dir = Path(run_dir)
    table, cat_info = load_catalog(run_dir)
    sid = table.column("gdr3_source_id").to_numpy()
    ref, kind = load_reference(run_dir, sid)
    data = ReportData.from_table(table, ref, kind)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    validation = validation_numbers(data)
    artifact = load_model(run_dir)
    R = wl = R_truth = None
    if artifact is not None:
        from xpcat.model.forward import extinction_vector

        R = np.asarray(extinction_vector(artifact.params), dtype=np.float64)
        wl = np.asarray(artifact.wavelengths, dtype=np.float64)
        if kind == "truth" and np.isfinite(ref["r_v"]).any():
            R_truth = truth_extinction_curve(wl, float(np.nanmedian(ref["r_v"])))
    comparison = extinction_comparison(R, wl, R_truth)
    validation["extinction_curve_comparison"] = comparison
    validation["extinction_curve_max_rel_dev"] = comparison["truth"]["max_rel_dev"]
    validation["extinction_curve_max_rel_dev_xp_toolkit"] = comparison["xp_extinction_toolkit"]["max_rel_dev"]
    validation["extinction_curve_max_rel_dev_ccm89_rv31"] = comparison["ccm89_rv3.1"]["max_rel_dev"]
    validation["binned_residuals"] = binned_residual_numbers(data)
    conf_summary, conf_source = read_confidence_summary(run_dir, artifact)
    validation.update({f"auc_{p}": (conf_summary or {}).get(f"auc_{p}") for p in ("teff", "feh", "logg")})
    g_mag = load_g_mag(run_dir, sid)
    validation["error_calibration"] = error_calibration(data, g_mag, cat_info["metadata"].get("uncertainty"))
    validation["catastrophic_failures"] = catastrophic_failures(data, g_mag)
    validation["confidence_status"] = confidence_status(cat_info["metadata"], conf_summary, conf_source)
    counts = cut_counts(data)
    validation["cuts"] = {name: {"stars": c, "fraction": f} for name, c, f in counts}
    validation["model_hash"] = artifact.content_hash if artifact is not None else None

    figures = {
        "kiel": kiel_figure(data, out),
        "residuals": residuals_figure(data, validation, out, normalised=False),
        "residuals_normalised": residuals_figure(data, validation, out, normalised=True),
        "residuals_fig7": fig7_figure(data, validation["binned_residuals"], out),
        "residuals_fig16": fig16_figure(data, validation["binned_residuals"], out),
        "pulls": pulls_figure(data, validation, out),
        "flux_residuals": flux_residuals_figure(flux_residuals(run_dir, artifact, data), wl, out),
        "extinction_curve": extinction_figure(R, wl, R_truth, out),
        "sky": sky_figure(data, out),
    }
    figures["confidence"], validation["confidence_scatter"] = confidence_figure(run_dir, out)
    validation["figures"] = figures
    facts = run_facts(run_dir, cat_info, artifact, data)
    write_json_atomic(out / VALIDATION_FILE, json_clean(validation), indent=1)
    page = out / PAGE_FILE
    write_text_atomic(page, render_page(validation, counts, facts, figures))
    logger.info("report written to %s", page)
    return page

"""Were the confidence classifiers trained, or did they fall back, and why: validation.json's ``confidence_status``.

- :func:`read_confidence_summary`: what ``xpcat train-confidence`` recorded
  (``state/confidence.json``, else the model artifact's ``confidence`` metadata);
- :func:`confidence_status`: per parameter (Teff, [Fe/H], logg) "trained",
  "fell back" (with the reason) or "unknown", from the catalog's metadata
  (``confidence_per_parameter``, ``confidence_fallback``, ``confidence_rule``)
  and that summary, with the sentences the page states.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIDENCE_PARAMETERS",
    "confidence_status",
    "read_confidence_summary",
]

#: The parameters with a confidence column, in the catalog's order.
CONFIDENCE_PARAMETERS = ("teff", "feh", "logg")
#: Their words on the page.
WORDS = {"teff": "Teff", "feh": "[Fe/H]", "logg": "logg"}


def read_confidence_summary(run_dir: Path, artifact: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The train-confidence summary (AUCs, ``fallback``) and where it was read.

    Returns
    -------
    summary : dict or None
        ``state/confidence.json``, else the artifact's ``component_meta["confidence"]``, else None.
    source : str or None
        ``"state/confidence.json"``, ``"model artifact"`` or None.
    """
    path = RunPaths.of(run_dir).confidence_state
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("report: %s cannot be read (%s)", path, err)
        else:
            if isinstance(doc, dict):
                return doc, "state/confidence.json"
    meta = (getattr(artifact, "component_meta", None) or {}).get("confidence") if artifact is not None else None
    if isinstance(meta, dict) and meta:
        return meta, "model artifact"
    return None, None


def _classifier_kind(summary: dict[str, Any] | None, p: str) -> str | None:
    """What the stored classifier of ``p`` is: the paper's network or the logistic candidate (with its C)."""
    report = ((summary or {}).get("classifiers") or {}).get(p) or {}
    kinds = report.get("architecture")
    if not isinstance(kinds, list) or not kinds:
        return None
    if kinds[-1] == "logistic":  # the stored classifier trains last
        c = (report.get("inverse_l2") or [None])[-1]
        return (f"a logistic regression, L2 penalty C = {c:.3g} chosen by cross-validation"
                if isinstance(c, (int, float)) else "a logistic regression")
    settings = (summary or {}).get("settings") or {}
    n, width = settings.get("n_hidden"), settings.get("hidden_width")
    return f"a {n} x {width} network" if n and width else "a network"


def _sentence(p: str, row: dict[str, Any]) -> str:
    word = WORDS[p]
    if row["status"] == "trained":
        auc, se, method = row.get("auc"), row.get("auc_se"), row.get("auc_method")
        parts = [row["classifier"]] if row.get("classifier") else []
        if isinstance(auc, (int, float)) and math.isfinite(auc):
            se_txt = f" +- {se:.3f}" if isinstance(se, (int, float)) and math.isfinite(se) else ""
            how = f"{method}, stars the classifier did not see" if method else "held-out stars"
            parts.append(f"AUC {auc:.3f}{se_txt} on {how}")
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"{word}: the confidence classifier was trained{detail}."
    if row["status"] == "fell back":
        return (f"{word}: the confidence classifier fell back: {str(row['reason']).rstrip('.')}. No star is confident in {word}, "
                f"so Table 3's rows confident in {word} count none.")
    return f"{word}: {str(row['reason']).rstrip('.')}."


def confidence_status(metadata: dict[str, Any], summary: dict[str, Any] | None,
                      summary_source: str | None = None) -> dict[str, Any]:
    """Per confidence parameter: trained or fell back, and why.

    Parameters
    ----------
    metadata : dict
        The catalog's metadata (:func:`~xpcat.production.report.data.load_catalog`'s
        ``info["metadata"]``): ``confidence_per_parameter`` ("classifier" |
        "placeholder"), ``confidence_fallback`` (reasons), ``confidence_rule``.
        It says what the catalog's confidences are, so it wins over ``summary``.
    summary : dict or None
        :func:`read_confidence_summary`'s summary (``auc_<p>``, ``auc_<p>_se``,
        ``auc_method``, ``fallback``).
    summary_source : str or None
        Where ``summary`` was read (for the JSON).

    Returns
    -------
    dict
        Per parameter ``{"status": "trained" | "fell back" | "unknown", "reason",
        "auc", "auc_se", "auc_method", "classifier", "from"}`` (the AUC's bootstrap
        standard error, how its stars were chosen and what the stored classifier is, None when not
        recorded), ``source`` (the metadata's ``confidence_source``),
        ``rule`` (the placeholder rule when any fell back), ``any_fallback``,
        ``all_trained``, ``all_fallback`` and ``statements`` (one sentence per parameter, then the rule).
    """
    per = metadata.get("confidence_per_parameter") or {}
    meta_reasons = metadata.get("confidence_fallback") or {}
    state_reasons = (summary or {}).get("fallback") or {}
    out: dict[str, Any] = {}
    for p in CONFIDENCE_PARAMETERS:
        auc = (summary or {}).get(f"auc_{p}")
        if p in per:
            trained = per[p] == "classifier"
            reason = None if trained else (meta_reasons.get(p) or state_reasons.get(p) or "no reason recorded")
            row = {"status": "trained" if trained else "fell back", "reason": reason, "from": "catalog metadata"}
        elif summary is not None:
            trained = p not in state_reasons
            row = {"status": "trained" if trained else "fell back", "reason": state_reasons.get(p),
                   "from": summary_source}
        else:
            row = {"status": "unknown", "from": None,
                   "reason": "neither the catalog's metadata nor state/confidence.json says whether a classifier "
                             "was trained (run `xpcat train-confidence`)"}
        row["auc"] = auc if row["status"] == "trained" else None
        if row["status"] == "trained":
            row["auc_se"] = (summary or {}).get(f"auc_{p}_se")
            row["auc_method"] = (summary or {}).get("auc_method")
            row["classifier"] = _classifier_kind(summary, p)
        out[p] = row
    fell = [p for p in CONFIDENCE_PARAMETERS if out[p]["status"] == "fell back"]
    statements = [_sentence(p, out[p]) for p in CONFIDENCE_PARAMETERS]
    rule = metadata.get("confidence_rule") if fell else None
    if rule:
        statements.append(f"Confidences without a classifier follow the placeholder rule: {str(rule).rstrip('.')}.")
    out.update({"source": metadata.get("confidence_source"), "rule": rule, "any_fallback": bool(fell),
                "all_trained": all(out[p]["status"] == "trained" for p in CONFIDENCE_PARAMETERS),
                "all_fallback": len(fell) == len(CONFIDENCE_PARAMETERS), "statements": statements})
    for p in fell:
        logger.info("report: %s confidence classifier fell back: %s", p, out[p]["reason"])
    return out

"""What ``benchmarks/pipeline.py`` checks and derives after a run: every star once, and how cost scales.

- :func:`stars_check`: the fitted partitions and the HATS catalog each hold
  every star of the universe's truth table exactly once;
- :func:`scaling`: task-seconds per star of each stage across the committed
  ``pipeline_1e<k>.json`` results and this run, relative to the smallest run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

__all__ = ["SCALING_STAGES", "scaling", "stars_check"]

logger = logging.getLogger("benchmarks.pipeline_checks")

#: Stages whose cost per star is compared across sizes.
SCALING_STAGES = ("condition", "infer_first_pass", "infer", "catalog")


def _ids(files: list[Path], column: str) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = [pq.read_table(f, columns=[column]).column(column).to_numpy() for f in files]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _once(ids: np.ndarray, truth: np.ndarray | None, n: int) -> dict:
    uniq = np.unique(ids)
    out = {"rows": int(ids.size), "unique": int(uniq.size), "duplicates": int(ids.size - uniq.size)}
    if truth is not None:
        out["missing"] = int(np.setdiff1d(truth, uniq, assume_unique=True).size)
        out["extra"] = int(np.setdiff1d(uniq, truth, assume_unique=True).size)
    out["ok"] = bool(out["rows"] == n and out["duplicates"] == 0 and out.get("missing", 0) == 0
                     and out.get("extra", 0) == 0)
    return out


def stars_check(work: Path, n: int) -> dict:
    """Every star exactly once in ``work/fitted`` and ``work/catalog``.

    Parameters
    ----------
    work : Path
        The benchmark's run directory (``truth/truth.parquet``, ``fitted/``, ``catalog/dataset/``).
    n : int
        Stars simulated.

    Returns
    -------
    dict: ``expected`` (n and the truth table's unique ids), per product ``rows``,
    ``unique``, ``duplicates``, ``missing`` / ``extra`` against the truth, ``ok``;
    ``ok`` overall.
    """
    truth_file = work / "truth" / "truth.parquet"
    truth = np.unique(_ids([truth_file], "source_id")) if truth_file.exists() else None
    out: dict = {"expected": n, "truth_unique": None if truth is None else int(truth.size)}
    fitted = sorted((work / "fitted").glob("*.parquet"))
    catalog = sorted((work / "catalog" / "dataset").glob("Norder=*/**/*.parquet"))
    out["fitted"] = _once(_ids(fitted, "gdr3_source_id"), truth, n)
    out["catalog"] = _once(_ids(catalog, "gdr3_source_id"), truth, n)
    out["ok"] = bool(out["fitted"]["ok"] and out["catalog"]["ok"] and (truth is None or truth.size == n))
    if not out["ok"]:
        logger.error("stars check failed: %s", out)
    return out


def _per_star(doc: dict) -> dict[str, float]:
    """Task-seconds per star of each stage of one pipeline JSON [s]."""
    n = float(doc["stars"])
    out = {}
    for st in SCALING_STAGES:
        s = doc.get("stages", {}).get(st)
        if s and s.get("task_seconds"):
            out[st] = float(s["task_seconds"]) / n
    return out


def scaling(result: dict, results_dir: Path) -> dict:
    """How each stage's cost per star changes with the number of stars.

    Parameters
    ----------
    result : dict
        This run's JSON (``stars``, ``stages``).
    results_dir : Path
        Folder of the other runs' ``pipeline_1e<k>.json`` (unreadable ones are skipped).

    Returns
    -------
    dict: ``task_seconds_per_star`` (stars -> {stage: task-seconds per star, load, partition
    level and count}), ``relative_to_smallest`` (stars -> {stage: per-star cost over the
    smallest run's}): linear cost is 1.0; below 1, fixed costs (each worker's start, each
    partition's) were a larger share of the smaller run.
    """
    runs: dict[int, dict] = {}
    for f in sorted(results_dir.glob("pipeline_1e*.json")):
        try:
            doc = json.loads(f.read_text())
            runs[int(doc["stars"])] = {"file": f.name, "load_average": doc.get("load_average"),
                                       "partition_level": doc.get("partition_level"),
                                       "partitions": doc.get("partitions"), **_per_star(doc)}
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("scaling: skipping %s (%s)", f, err)
    runs[int(result["stars"])] = {"file": "this run", "load_average": result.get("load_average"),
                                  "partition_level": result.get("partition_level"),
                                  "partitions": result.get("partitions"), **_per_star(result)}
    smallest = runs[min(runs)]
    relative = {n: {st: round(r[st] / smallest[st], 3) for st in SCALING_STAGES if st in r and smallest.get(st)}
                for n, r in sorted(runs.items())}
    return {"task_seconds_per_star": {str(n): r for n, r in sorted(runs.items())},
            "relative_to_smallest": {str(n): r for n, r in relative.items()}}

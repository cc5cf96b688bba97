"""Compare two run directories of the same inputs: is the output the same?

    python benchmarks/compare_runs.py RUN_A RUN_B

For a refactoring that must not change behaviour (issue 17): ``raw/`` and
``conditioned/`` are compared by the sha256 in their done markers (the
Parquet files' bytes), ``fitted/`` row by row and column by column to float
tolerance (NaN where NaN). Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _markers(run: Path, sub: str) -> dict[str, str]:
    return {str(p.relative_to(run)): json.loads(p.read_text())["sha256"] for p in sorted((run / sub).rglob("*.done"))}


def _column_rel_diff(a: list, b: list) -> float:
    x, y = np.array(a, dtype=float), np.array(b, dtype=float)
    if not np.array_equal(np.isfinite(x), np.isfinite(y)):
        return float("inf")
    ok = np.isfinite(x)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(x[ok] - y[ok]) / np.maximum(1e-6, np.abs(x[ok]))))


def compare(run_a: Path, run_b: Path) -> dict:
    """Checksums of raw/ and conditioned/, and the largest relative difference in fitted/."""
    out: dict = {"run_a": str(run_a), "run_b": str(run_b)}
    for sub in ("raw", "conditioned"):
        ma, mb = _markers(run_a, sub), _markers(run_b, sub)
        out[sub] = {"files": len(ma), "same_names": sorted(ma) == sorted(mb),
                    "identical": sum(ma[k] == mb.get(k) for k in ma)}
    fa, fb = sorted((run_a / "fitted").glob("*.parquet")), sorted((run_b / "fitted").glob("*.parquet"))
    worst, rows, columns = 0.0, 0, {}
    for x, y in zip(fa, fb):
        ta, tb = pq.read_table(x), pq.read_table(y)
        if ta.schema.names != tb.schema.names or ta.num_rows != tb.num_rows:
            worst = float("inf")
            continue
        rows += ta.num_rows
        for c in ta.schema.names:
            d = _column_rel_diff(ta.column(c).to_pylist(), tb.column(c).to_pylist())
            columns[c] = max(columns.get(c, 0.0), d)
            worst = max(worst, d)
    out["fitted"] = {"files": len(fa), "same_names": [p.name for p in fa] == [p.name for p in fb], "rows": rows,
                     "max_rel_diff": worst, "max_rel_diff_by_column": columns}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args(argv)
    result = compare(args.run_a, args.run_b)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

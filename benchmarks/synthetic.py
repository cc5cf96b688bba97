"""Benchmark: time to write a synthetic Gaia universe (``xpcat simulate``).

Usage: ``python benchmarks/synthetic.py [--stars 100000] [--seed 1]``.
Prints one JSON object as its last stdout line: stars, seconds (total and
the one-off GaiaXPy basis set-up separately), stars per second, bytes written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info

from xpcat.config import SimulationConfig
from xpcat.production.synthetic import truth_sed as truth
from xpcat.production.synthetic.universe import simulate_universe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stars", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    t0 = time.perf_counter()
    truth.projection_arrays()  # GaiaXPy's bases on the fine grid, built once per process
    t_setup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "universe"
        t1 = time.perf_counter()
        summary = simulate_universe(out, SimulationConfig(n_stars=args.stars, seed=args.seed))
        t_sim = time.perf_counter() - t1
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {
        "benchmark": "synthetic_universe",
        "stars": args.stars,
        "seed": args.seed,
        "seconds_total": round(t_setup + t_sim, 2),
        "seconds_setup_bases": round(t_setup, 2),
        "seconds_simulate": round(t_sim, 2),
        "stars_per_second": round(args.stars / t_sim, 1),
        "bytes_written": size,
        "rows": summary["rows"],
        "machine": machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

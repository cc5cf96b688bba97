"""Throughput of archive ingest: astroquery through the local archive, and bulk files.

    python benchmarks/fetch.py [--stars 2000] [--level 3] [--structure RAW]

1. Simulates a universe of ``--stars`` stars (``xpcat simulate``; not timed as
   part of the fetch).
2. Serves it with the local archive and runs ``fetch_run`` through
   astroquery (census, Appendix A async ADQL jobs, DataLink XP_CONTINUOUS
   batches) at partition level ``--level``: rows/s of gaia_source and of XP
   spectra. The local archive runs in the same process, so its own work
   (DuckDB, formatting the archive's CSV) is included: a lower bound on what
   the client alone sustains.
3. Writes the universe's XP and gaia_source tables as Gaia DR3 bulk files
   (gzipped ECSV) and ingests them with ``ingest_files`` in a child process:
   rows/s, MB/s (compressed) and the child's peak RSS next to the files'
   uncompressed size (streaming keeps it well below).

Prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

os.environ.setdefault("XPCAT_PROGRESS", "0")


def _ingest_child(run_dir: str, files: list[str], queue) -> None:
    """Bulk ingest in a fresh process, so its peak RSS is its own."""
    from xpcat.jobs.memory import peak_rss_mib
    from xpcat.production.ingest.bulk import ingest_files

    t0 = time.perf_counter()
    summary = ingest_files(Path(run_dir), [Path(f) for f in files])
    queue.put({"summary": summary, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mib()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=2000)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--structure", choices=["RAW", "INDIVIDUAL"], default="RAW")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from xpcat.config import RunConfig, SimulationConfig, config_from_dict, config_to_dict, write_config
    from xpcat.production.ingest.archive import FetchOptions, fetch_run
    from xpcat.production.synthetic.archive_server import LocalArchive
    from xpcat.production.ingest.bulk import write_bulk_file
    from xpcat.production.synthetic.universe import simulate_universe

    d = config_to_dict(RunConfig())
    d["data"]["partition_level"] = args.level
    config = config_from_dict(d)
    out: dict = {"benchmark": "fetch", "stars": args.stars, "partition_level": args.level,
                 "datalink_structure": args.structure}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        simulate_universe(tmp / "universe", SimulationConfig(n_stars=args.stars, seed=args.seed))
        out["simulate_s"] = round(time.perf_counter() - t0, 2)

        with LocalArchive(tmp / "universe") as archive:
            t0 = time.perf_counter()
            s = fetch_run(tmp / "run", config, archive_url=archive.url, login=False,
                          options=FetchOptions(data_structure=args.structure))
            dt = time.perf_counter() - t0
            stats = archive.stats
        n_gaia = s["rows"]["gaia_source"]
        n_xp = s["rows"]["xp_continuous_mean_spectrum"]
        out["archive"] = {
            "seconds": round(dt, 3), "ranges": s["ranges"], "failed": len(s["failed"]),
            "gaia_source_rows": n_gaia, "xp_rows": n_xp, "tmass_rows": s["rows"]["tmass"],
            "gaia_source_rows_per_s": round(n_gaia / dt, 1), "xp_rows_per_s": round(n_xp / dt, 1),
            "http_requests": stats["requests"], "adql_jobs": stats["jobs"], "datalink_requests": stats["datalink_requests"],
        }

        files = []
        for table, name in (("xp_continuous_mean_spectrum", "XpContinuousMeanSpectrum_000000-786431.csv.gz"),
                            ("gaia_source", "GaiaSource_000000-786431.csv.gz")):
            rows = pq.read_table(tmp / "universe" / "raw" / table)
            files.append(write_bulk_file(rows, tmp / name, compresslevel=1))
        raw_bytes = sum(len(gzip.decompress(f.read_bytes())) for f in files)
        write_config(config, tmp / "bulk")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_ingest_child, args=(str(tmp / "bulk"), [str(f) for f in files], queue))
        child.start()
        res = queue.get()
        child.join()
        b, dt = res["summary"], res["seconds"]
        size = sum(f.stat().st_size for f in files)
        out["bulk"] = {
            "seconds": round(dt, 3), "files": len(files), "failed": len(b["failed"]),
            "rows": b["rows_read"], "rows_per_s": round(b["rows_read"] / dt, 1),
            "xp_rows": b["partition_rows"]["xp_continuous_mean_spectrum"],
            "compressed_mb": round(size / 1e6, 2), "compressed_mb_per_s": round(size / 1e6 / dt, 2),
            "uncompressed_mb": round(raw_bytes / 1e6, 2), "peak_rss_mb": None if res["peak_rss_mb"] is None else round(res["peak_rss_mb"], 1),
        }
    out["machine"] = machine_info()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Throughput of archive ingest: astroquery through the local archive, and bulk files.

    python benchmarks/fetch.py [--stars 2000] [--level 3] [--structure RAW] [--xp continuous|sampled]

1. Simulates a universe of ``--stars`` stars (``xpcat simulate``; not timed as
   part of the fetch).
2. Serves it with the local archive and runs ``fetch_run`` through
   astroquery (census, Appendix A async ADQL jobs, DataLink XP_CONTINUOUS
   batches, or XP_SAMPLED with ``--xp sampled``: ``[fetch] xp``) at partition
   level ``--level``: rows/s of gaia_source and of XP
   spectra. The local archive runs in the same process, so its own work
   (DuckDB, formatting the archive's CSV) is included: a lower bound on what
   the client alone sustains.
3. Writes the universe's XP and gaia_source tables as Gaia DR3 bulk files
   (gzipped ECSV) and ingests them with ``ingest_files`` in a child process:
   rows/s, MB/s (compressed) and the child's peak RSS next to the files'
   uncompressed size (streaming keeps it well below).

With ``--faulty``, instead: the universe is served by ``xpcat archive serve``
with ``--error-rate 0.2 --short-rate 0.3 --stall-rate 0.05`` (stalls of 30 s)
in a child process and fetched by ``xpcat fetch`` in another, exactly as a
user would (``--stars 1500 --level 5`` is the case of issue 19): wall time,
exit code, the command's last stderr line, and the stars fetched (unique XP
source_ids in ``raw/``) against those the universe serves, with duplicates.
``--code DIR`` runs both children on the ``xpcat`` of another tree (old code).

Prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import multiprocessing as mp
import os
import socket
import subprocess
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children_cpu() -> float:
    """User + system CPU seconds of the waited-for child processes (and theirs)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _faulty_fetch(tmp: Path, config, args) -> dict:
    """``xpcat archive serve`` with faults and ``xpcat fetch`` against it, each in its own process."""
    import numpy as np

    from xpcat.config import write_config
    from xpcat.production.ingest.ranges import fetched_tables

    port = _free_port()
    env = {**os.environ, "XPCAT_PROGRESS": "0"}
    if args.code:
        env["PYTHONPATH"] = str(Path(args.code).resolve())
    rates = ["--error-rate", str(args.error_rate), "--short-rate", str(args.short_rate),
             "--stall-rate", str(args.stall_rate)]
    server = subprocess.Popen([sys.executable, "-m", "xpcat.cli", "archive", "serve", str(tmp / "universe"),
                               "--port", str(port), "--seed", str(args.seed), *rates],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the local archive did not start")
            time.sleep(0.2)
        run = tmp / "run"
        write_config(config, run)
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "xpcat.cli", "fetch", str(run), "--archive",
                                   f"http://127.0.0.1:{port}/"], capture_output=True, text=True, env=env,
                                  cwd=tmp, timeout=args.max_seconds)  # not this tree's cwd: `-m` puts it first
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, err = None, (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        dt = time.perf_counter() - t0
        cpu_fetch = _children_cpu() - cpu0  # the fetch and its worker processes
    finally:
        server.terminate()
        server.wait(timeout=30)
    cpu_server = _children_cpu() - cpu0 - cpu_fetch
    def source_ids(folder: Path) -> np.ndarray:  # *.parquet only: the .done markers sit beside them
        files = sorted(folder.glob("*.parquet"))
        return np.concatenate([pq.read_table(f, columns=["source_id"]).column("source_id").to_numpy() for f in files]
                              or [np.array([], dtype=np.int64)])

    want = np.unique(source_ids(tmp / "universe" / "raw" / "xp_continuous_mean_spectrum"))
    got = source_ids(run / "raw" / fetched_tables(config.fetch.xp)[2])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return {
        "code": str(args.code or Path(__file__).resolve().parents[1]),
        "seconds": round(dt, 1), "exit_code": code, "timed_out": code is None,
        "faults": {"error_rate": args.error_rate, "short_rate": args.short_rate, "stall_rate": args.stall_rate,
                   "stall_seconds": 30},
        "stars_served": int(len(want)), "stars_fetched": int(len(np.intersect1d(np.unique(got), want))),
        "duplicates": int(len(got) - len(np.unique(got))),
        "rows_per_s": round(len(got) / dt, 2),
        "cpu_s": {"fetch": round(cpu_fetch, 1), "archive": round(cpu_server, 1)},
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        "last_stderr_line": lines[-1][:400] if lines else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=2000)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--structure", choices=["RAW", "INDIVIDUAL"], default="RAW")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--xp", choices=["continuous", "sampled"], default="continuous",
                    help="[fetch] xp: the DataLink XP product fetched (XP_CONTINUOUS or XP_SAMPLED)")
    ap.add_argument("--faulty", action="store_true", help="CLI fetch against a fault-injecting archive (see above).")
    ap.add_argument("--error-rate", type=float, default=0.2)
    ap.add_argument("--short-rate", type=float, default=0.3)
    ap.add_argument("--stall-rate", type=float, default=0.05)
    ap.add_argument("--code", default="", help="With --faulty: run the children on the xpcat of this tree.")
    ap.add_argument("--max-seconds", type=float, default=3 * 3600, help="Kill the fetch after this long.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from xpcat.config import RunConfig, SimulationConfig, config_from_dict, config_to_dict, write_config
    from xpcat.production.ingest.archive import FetchOptions, fetch_run
    from xpcat.production.ingest.ranges import fetched_tables
    from xpcat.production.synthetic.archive_server import LocalArchive
    from xpcat.production.ingest.bulk_format import write_bulk_file
    from xpcat.production.synthetic.universe import simulate_universe

    d = config_to_dict(RunConfig())
    d["data"]["partition_level"] = args.level
    d["fetch"]["xp"] = args.xp
    config = config_from_dict(d)
    out: dict = {"benchmark": "fetch", "stars": args.stars, "partition_level": args.level,
                 "datalink_structure": args.structure, "xp": args.xp}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        simulate_universe(tmp / "universe", SimulationConfig(n_stars=args.stars, seed=args.seed))
        out["simulate_s"] = round(time.perf_counter() - t0, 2)
        if args.faulty:
            out["faulty_fetch"] = _faulty_fetch(tmp, config, args)
            out["machine"] = machine_info()
            print(json.dumps(out))
            return

        with LocalArchive(tmp / "universe") as archive:
            t0 = time.perf_counter()
            s = fetch_run(tmp / "run", config, archive_url=archive.url, login=False,
                          options=FetchOptions(data_structure=args.structure, xp=args.xp))
            dt = time.perf_counter() - t0
            stats = archive.stats
        n_gaia = s["rows"]["gaia_source"]
        n_xp = s["rows"][fetched_tables(args.xp)[2]]
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

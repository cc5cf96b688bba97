"""The infer stage step by step against the fit kernel: same stars, same model, same threads, same process.

``benchmarks/pipeline.py`` runs this in a fresh process pinned to ``--threads``
CPUs (a worker's ``threads_per_worker``), on a finished run directory:

1. **first pass**: :func:`xpcat.production.infer.infer_partition` on the
   selected partitions (the first ones in name order until ``--stars`` stars,
   none larger than that) in the fresh process, with the run's JAX compilation
   cache, as a new worker runs them;
2. **stage**: the same partitions again, each step timed
   (:data:`xpcat.production.infer.INFER_STEPS`), outputs in a temporary
   folder: a worker's steady state. ``worker_start_s`` = first pass - this:
   what a new worker pays once (tracing every batch shape, loading the compiled
   kernels, building the start grid);
3. **kernel**: :meth:`xpcat.model.inference.Inference.fit` on the same stars,
   already numpy arrays in memory, in chunks of ``[inference] batch_size``
   (each shape warmed first), its four steps timed.

Prints one JSON object (last stdout line): ``stage_stars_per_s``,
``kernel_stars_per_s``, ``stage_vs_kernel`` (their ratio, measured side by
side), ``infer_profile_s`` (seconds per step of the stage), ``kernel_profile_s``,
``worker_start_s`` (first pass minus the steady one) and the load.

Usage::

    python benchmarks/infer_profile.py RUN_DIR [--stars 20000] [--threads 1] [--batch-size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _pin(threads: int, offset: int = 0) -> list[int]:
    """Pin this process to ``threads`` CPUs from the ``offset``-th on (before JAX starts its threads); returns them."""
    allowed = sorted(os.sched_getaffinity(0))
    cpus = [allowed[(offset + k) % len(allowed)] for k in range(max(threads, 1))]
    os.sched_setaffinity(0, cpus)
    return sorted(set(cpus))


def _select(conditioned: Path, stars: int) -> list[tuple[Path, int]]:
    """The first partitions (name order) until ``stars`` stars, skipping any larger than ``stars``: [(path, rows)]."""
    import pyarrow.parquet as pq

    out, total, big = [], 0, None
    for f in sorted(conditioned.glob("*.parquet")):
        rows = pq.ParquetFile(f).metadata.num_rows
        if rows > stars:
            big = big or (f, rows)
            continue
        out.append((f, rows))
        total += rows
        if total >= stars:
            break
    if not out and big is not None:  # every partition is larger than asked: profile the first one
        out.append(big)
    if not out:
        raise SystemExit(f"no conditioned partitions in {conditioned}")
    return out


def _kernel_inputs(files: list[Path]) -> dict:
    """The fit's inputs of every star of ``files`` as numpy arrays (flux, factor, parallax, errors)."""
    import numpy as np
    import pyarrow.parquet as pq

    from xpcat.catalog_schema import N_FACTOR

    cols = ("flux", "flux_error", "flux_factor_triu", "parallax", "parallax_error")
    parts = {c: [] for c in cols}
    for f in files:
        t = pq.read_table(f, columns=list(cols))
        for c, width in (("flux", 66), ("flux_error", 66), ("flux_factor_triu", N_FACTOR)):
            flat = t.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            parts[c].append(flat.reshape(t.num_rows, width))
        for c in ("parallax", "parallax_error"):
            parts[c].append(t.column(c).to_numpy(zero_copy_only=False).astype(np.float64))
    out = {c: np.concatenate(v) for c, v in parts.items()}
    out["flux"] = out["flux"].astype(np.float64)
    out["flux_error"] = out["flux_error"].astype(np.float64)
    return out


def _kernel(inference, data: dict, batch_size: int, times: dict | None) -> float:
    """Seconds to fit every star of ``data`` with :meth:`Inference.fit` in chunks of ``batch_size`` (steps timed)."""
    n = data["flux"].shape[0]
    factor = data["flux_factor_triu"].astype(inference.dtype, copy=False)
    t0 = time.perf_counter()
    for lo in range(0, n, batch_size):
        sl = slice(lo, min(lo + batch_size, n))
        inference.fit(data["flux"][sl], factor[sl], data["parallax"][sl], data["parallax_error"][sl],
                      data["flux_error"][sl], times=times)
    return time.perf_counter() - t0


def profile(run_dir: Path, stars: int, threads: int, batch_size: int, seed: int = 0) -> dict:
    """Steps 1-3 of the module docstring on ``run_dir`` (already pinned); the JSON dict."""
    from xpcat.config import RunConfig
    from xpcat.jobs.compile_cache import enable_compilation_cache
    from xpcat.jobs.plugins import load_model
    from xpcat.production.infer import INFER_STEPS, infer_partition, inference_for
    from xpcat.production.run_dir import RunPaths

    paths = RunPaths(run_dir)
    cfg = RunConfig().replace(inference={"batch_size": batch_size}, run={"seed": seed})
    if cfg.inference.compilation_cache:
        enable_compilation_cache(paths.jax_cache)
    t0 = time.perf_counter()
    model = load_model(run_dir / "model")
    load_s = time.perf_counter() - t0
    chosen = _select(run_dir / "conditioned", stars)
    n = sum(r for _, r in chosen)
    with tempfile.TemporaryDirectory(prefix="xpcat-infer-profile-") as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        for f, _ in chosen:  # a fresh worker: traces every shape, loads the compiled kernels, builds the start grid
            infer_partition(f, out / f"first-{f.name}", model, cfg)
        first_s = time.perf_counter() - t0
        times = {k: 0.0 for k in INFER_STEPS}
        t0 = time.perf_counter()
        for f, _ in chosen:  # the same partitions again: a worker's steady state
            infer_partition(f, out / f.name, model, cfg, times=times)
        stage_s = time.perf_counter() - t0
    inference = inference_for(model, cfg)
    data = _kernel_inputs([f for f, _ in chosen])
    warm_n = min(n, batch_size)
    _kernel(inference, {k: v[:warm_n] for k, v in data.items()}, batch_size, None)  # the full-batch shape, warm
    _kernel(inference, {k: v[warm_n:] for k, v in data.items()} if n > warm_n else data, batch_size, None)
    ktimes: dict[str, float] = {}
    kernel_s = _kernel(inference, data, batch_size, ktimes)
    stage_rate, kernel_rate = n / stage_s, n / kernel_s
    return {
        "stars": n,
        "partitions": [f.name for f, _ in chosen],
        "threads": threads,
        "batch_size": batch_size,
        "load_model_s": round(load_s, 3),
        "first_pass_seconds": round(first_s, 3),
        "worker_start_s": round(first_s - stage_s, 3),
        "stage_seconds": round(stage_s, 3),
        "stage_stars_per_s": round(stage_rate, 1),
        "kernel_seconds": round(kernel_s, 3),
        "kernel_stars_per_s": round(kernel_rate, 1),
        "stage_vs_kernel": round(stage_rate / kernel_rate, 3),
        "infer_profile_s": {k: round(v, 3) for k, v in times.items()},
        "infer_profile_other_s": round(stage_s - sum(times.values()), 3),
        "kernel_profile_s": {k: round(v, 3) for k, v in ktimes.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--stars", type=int, default=20_000, help="stars to profile (whole partitions, name order)")
    ap.add_argument("--threads", type=int, default=1, help="CPUs this process is pinned to (a worker's threads)")
    ap.add_argument("--batch-size", type=int, default=4096, help="[inference] batch_size")
    ap.add_argument("--seed", type=int, default=0, help="[run] seed (the start grid's)")
    ap.add_argument("--cpu-offset", type=int, default=0,
                    help="first CPU to pin to (one process per worker, side by side, as the workers share the machine)")
    args = ap.parse_args(argv)
    cpus = _pin(args.threads, args.cpu_offset)
    result = profile(args.run_dir, args.stars, args.threads, args.batch_size, args.seed)
    result["cpus"] = cpus
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

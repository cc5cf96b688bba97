"""The production chain on a synthetic universe: stars/s per stage, peak memory, bytes per star.

Runs, in a work folder: simulate (``xpcat.production.synthetic.universe``) -> condition
(Dask, ``run_stages``) -> train (quick preset, unless ``--model`` gives an
artifact) -> ``run_pipeline`` (infer -> catalog on a LocalCluster; the
conditioned partitions are already done). Prints one JSON object as
the last stdout line:

- ``stages.<stage>.stars_per_s``: stars / wall-clock seconds of the stage on
  ``workers`` workers;
- ``stages.<stage>.stars_per_s_per_worker``: stars / summed task seconds (the
  rate of one worker process, what ``xpcat plan`` scales);
- ``stages.infer`` is measured on a second pass (fitted outputs removed, new
  worker processes) that finds the run's JAX compilation cache warm
  (``RUN_DIR/state/jax-cache``), as every worker but the first of a long run
  does; ``stages.infer_first_pass`` is the first pass, whose workers compile
  the inference kernels themselves (``--no-second-pass`` skips the second);
- ``peak_memory_mib_per_worker``: largest peak RSS reported by a task
  (``peak_memory_ok``: under ``--memory-limit``);
- ``bytes_per_star``: on-disk bytes of raw, conditioned, fitted and catalog
  products divided by the number of stars;
- ``stars_check``: the fitted partitions and the catalog hold every simulated
  star exactly once (rows, unique ``gdr3_source_id``, the truth's ids);
- ``infer_profile``: ``benchmarks/infer_profile.py`` on the finished run, in a
  fresh process per worker, side by side, each pinned to its own
  ``threads_per_worker`` CPUs: the infer stage step by
  step (``infer_profile_s``: read, columns, fit_prepare, fit_start,
  fit_optimise, fit_summary, model_error, confidence, flags, table, write) and
  the fit kernel on the same stars and model (``kernel_stars_per_s``),
  side by side; ``worker_start_s`` is what a fresh worker pays once;
- ``infer_vs_kernel``: ``stages.infer.stars_per_s_per_worker`` over the
  kernel's stars/s on the same number of threads (the issue's figure: it
  includes each worker's start, ``worker_start_s``, and the load of the
  moment, so compare it at 10^5 stars or more), and
  ``infer_steady_vs_kernel``: the stage (partitions already compiled) over the
  kernel in the same processes;
- ``scaling``: per stage, task-seconds per star of this run and of the other
  ``pipeline_1e<k>.json`` files beside ``--out`` (10^4, 10^5, 10^6), each
  relative to the smallest run: 1.0 everywhere means linear cost;
- ``wall_seconds_total`` and ``under_one_hour``.

``--million`` (10^6 stars) writes ``benchmarks/results/pipeline_1e6.json`` unless
``--out`` says otherwise, skips the second inference pass (the first pass's
compilation is a small part of 10^6 fits) and partitions at HEALPix level 6:
the synthetic universe's densest field holds ~60 % of its stars in one pixel
up to level 3 (59,499 of 10^5 at levels 1-3; 7,074 at level 6, 128
partitions), so at level 1 one worker would condition and fit ~600,000 stars
alone, beyond the 4 GiB per worker of ``--memory-limit`` (the 59,499-star
partition peaked at 2.7 GiB) and the hour. It needs about 36 GB of disk (raw
~26 kB, conditioned ~9.5 kB per star) in the work folder. ``xpcat plan`` reads its JSON first
when it is there.

Usage::

    python benchmarks/pipeline.py                  # 10^5 stars
    python benchmarks/pipeline.py --million        # 10^6 stars -> benchmarks/results/pipeline_1e6.json
    python benchmarks/pipeline.py --stars 10000 --train-batch-size 128 --out benchmarks/results/pipeline_1e4.json
    python benchmarks/pipeline.py --stars 2000 --out benchmarks/results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info
from pipeline_checks import scaling, stars_check

logger = logging.getLogger("benchmarks.pipeline")


RESULTS = Path(__file__).resolve().parent / "results"
#: Where ``--million`` writes its JSON (``xpcat plan`` reads it first, see xpcat.production.capacity).
MILLION_JSON = RESULTS / "pipeline_1e6.json"


def _infer_profile(work: Path, stars: int, threads: int, workers: int, batch_size: int, seed: int) -> dict:
    """``benchmarks/infer_profile.py`` on the finished run: one fresh process per worker, side by side.

    Each process is pinned to its own ``threads`` CPUs and profiles the same
    stars, so the kernel shares the machine as the stage's workers did. Returns
    the first process's profile with ``kernel_stars_per_s`` and
    ``stage_vs_kernel`` averaged over the processes (each process's in ``per_process``).
    """
    procs = []
    for w in range(workers):
        cmd = [sys.executable, str(Path(__file__).with_name("infer_profile.py")), str(work), "--stars", str(stars),
               "--threads", str(threads), "--batch-size", str(batch_size), "--seed", str(seed),
               "--cpu-offset", str(w * threads)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    docs = []
    for proc in procs:
        out, err = proc.communicate()
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            logger.error("infer profile failed (exit %d): %s", proc.returncode, err[-2000:])
            return {"error": f"exit {proc.returncode}", "stderr_tail": err[-2000:]}
        docs.append(json.loads(lines[-1]))
    result = dict(docs[0])
    for key in ("kernel_stars_per_s", "stage_stars_per_s", "stage_vs_kernel", "worker_start_s", "first_pass_seconds"):
        result[key] = round(sum(d[key] for d in docs) / len(docs), 3)
    result["processes"] = len(docs)
    result["per_process"] = [{k: d[k] for k in ("cpus", "kernel_stars_per_s", "stage_stars_per_s", "stage_vs_kernel",
                                                "worker_start_s", "load_average")} for d in docs]
    return result


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _wavelengths_nm():
    """(66,) nm: the 61 XP samples, then J H Ks W1 W2."""
    import numpy as np

    from xpcat.catalog_schema.conditioned import NIR_WAVELENGTHS_UM, XP_WAVELENGTHS_NM

    return np.array(XP_WAVELENGTHS_NM + tuple(1000.0 * w for w in NIR_WAVELENGTHS_UM))


def _untrained_artifact(work: Path, cfg) -> None:
    """A randomly initialised network of the configured size and a GMM of the universe's labels."""
    import jax
    import numpy as np
    import pyarrow.parquet as pq

    from xpcat.catalog_schema import FLUX_UNIT_W_M2_NM
    from xpcat.model.artifact import save_artifact
    from xpcat.model.forward import init_params, make_scaler
    from xpcat.model.prior import fit_gmm

    truth = pq.read_table(work / "truth" / "truth.parquet").to_pandas()
    cols = [c for c in ("teff", "feh", "logg") if c in truth.columns]
    if len(cols) != 3:
        raise SystemExit(f"truth table lacks teff/feh/logg columns: {list(truth.columns)}")
    labels = truth[cols].to_numpy(dtype=float)
    params = jax.tree_util.tree_map(np.asarray, init_params(jax.random.PRNGKey(cfg.run.seed), n_hidden=cfg.model.n_hidden,
                                                            width=cfg.model.hidden_width))
    save_artifact(work / "model", params=params, scaler=make_scaler(labels), activation=cfg.model.activation,
                  gmm=fit_gmm(labels, n_components=cfg.training.gmm_components, seed=cfg.run.seed),
                  wavelengths=_wavelengths_nm(), flux_unit=FLUX_UNIT_W_M2_NM)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stars", type=int, default=100_000, help="stars in the synthetic universe (default 10^5)")
    ap.add_argument("--million", action="store_true", help="10^6 stars")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster workers")
    ap.add_argument("--memory-limit", default="4GiB", help="memory per worker")
    ap.add_argument("--partition-level", type=int, default=None,
                    help="HEALPix level of the working partitions (default: about 8 partitions per worker)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train-batch-size", type=int, default=512,
                    help="[training] batch_size (lower it for small universes: the training set must fill a batch)")
    ap.add_argument("--model", type=Path, default=None, help="an existing model artifact (skips training)")
    ap.add_argument("--untrained-model", action="store_true",
                    help="skip training: a randomly initialised network of the configured size (same cost per "
                         "evaluation) and a GMM prior fitted to the universe's labels")
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--no-second-pass", action="store_true",
                    help="report the first inference pass only (workers compiling their kernels; --million's default)")
    ap.add_argument("--profile-stars", type=int, default=20_000,
                    help="stars (whole partitions) of the infer-vs-kernel profile (0 skips it)")
    args = ap.parse_args(argv)
    if args.million:
        args.no_second_pass = True
        if args.out is None:
            args.out = MILLION_JSON
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("distributed", "jax", "hats", "lsdb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from xpcat.config import RunConfig, SimulationConfig
    from xpcat.production.run import run_pipeline, run_stages
    from xpcat.production.stages import condition_stage
    from xpcat.production.synthetic.universe import simulate_universe

    n = 1_000_000 if args.million else args.stars
    work = args.workdir or Path(tempfile.mkdtemp(prefix="xpcat-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    level = args.partition_level
    if level is None:  # Gaia-like sky: about 8 partitions per worker, at least level 1
        level = 1
        while 12 * 4**level < 8 * args.workers and level < 6:
            level += 1
        if n >= 1_000_000:  # the universe's densest field holds ~60 % of the stars in one pixel up to level 3
            level = max(level, 6)
    cfg = RunConfig().replace(
        data={"partition_level": level},
        training={"preset": "quick", "batch_size": args.train_batch_size},
        cluster={"n_workers": args.workers, "memory_limit": args.memory_limit, "threads_per_worker": 1},
    )
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    simulate_universe(work, SimulationConfig(n_stars=n, seed=args.seed))
    timings["simulate"] = time.perf_counter() - t0
    model_kind = "given" if args.model is not None else "trained (quick preset)"
    # condition first (training reads the conditioned partitions), then train, then the rest of the run
    t0 = time.perf_counter()
    cond = run_stages(work, cfg, [condition_stage()], catalog=False)
    timings["condition"] = time.perf_counter() - t0
    if args.model is not None:
        shutil.copytree(args.model, work / "model", dirs_exist_ok=True)
    elif args.untrained_model:
        _untrained_artifact(work, cfg)
        model_kind = "untrained"
    elif not (work / "model").exists():
        from xpcat.production.train import train_run

        t0 = time.perf_counter()
        train_run(work, cfg)
        timings["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = run_pipeline(work, cfg)
    timings["infer+catalog"] = time.perf_counter() - t0
    summary["stages"]["condition"] = cond["stages"]["condition"]
    if not args.no_second_pass:
        # the same fits again on new worker processes, which load the kernels the first pass compiled
        summary["stages"]["infer_first_pass"] = summary["stages"]["infer"]
        for f in (work / "fitted").glob("*.parquet*"):
            f.unlink()
        t0 = time.perf_counter()
        again = run_pipeline(work, cfg)
        timings["infer+catalog_second_pass"] = time.perf_counter() - t0
        summary["stages"]["infer"] = again["stages"]["infer"]

    stages = {}
    for name in [k for k in ("condition", "infer_first_pass", "infer", "catalog") if k in summary["stages"]]:
        st = summary["stages"][name]
        wall = float(st.get("wall_seconds") or 0.0)
        task_s = float(st.get("task_seconds") or 0.0)
        if name == "catalog":  # catalog tasks are short and many; its wall time on all workers is the cost
            task_s = wall * summary.get("workers", args.workers)
        stages[name] = {
            "wall_seconds": wall,
            "task_seconds": task_s,
            "stars_per_s": n / wall if wall else None,
            "stars_per_s_per_worker": n / task_s if task_s else None,
        }
    peak = max(float(summary["stages"][s].get("peak_rss_mib") or 0.0) for s in stages if s != "catalog")
    sizes = {k: _dir_bytes(work / k) for k in ("raw", "conditioned", "fitted", "catalog")}
    check = stars_check(work, n)
    profile = {}
    if args.profile_stars > 0:
        t0 = time.perf_counter()
        profile = _infer_profile(work, args.profile_stars, 1, args.workers, cfg.inference.batch_size, cfg.run.seed)
        timings["infer_profile"] = time.perf_counter() - t0
    kernel_rate = profile.get("kernel_stars_per_s")
    stage_rate = stages.get("infer", {}).get("stars_per_s_per_worker")
    from dask.utils import parse_bytes

    limit_mib = parse_bytes(args.memory_limit) / 2**20
    result = {
        "benchmark": "pipeline",
        "stars": n,
        "partitions": summary["partitions"],
        "partition_level": level,
        "workers": args.workers,
        "threads_per_worker": 1,
        "timings_s": timings,
        "model": model_kind,
        "compilation_cache": cfg.inference.compilation_cache,
        "stages": stages,
        "peak_memory_mib_per_worker": peak,
        "memory_limit_mib": limit_mib,
        "peak_memory_ok": bool(peak < limit_mib),
        "bytes_per_star": {k: v / n for k, v in sizes.items()},
        "stars_check": check,
        "infer_vs_kernel": round(stage_rate / kernel_rate, 3) if stage_rate and kernel_rate else None,
        "infer_steady_vs_kernel": profile.get("stage_vs_kernel"),
        "infer_profile_s": profile.get("infer_profile_s"),
        "infer_profile": profile,
        "wall_seconds_total": time.perf_counter() - t_all,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(),
    }
    result["under_one_hour"] = result["wall_seconds_total"] < 3600.0
    result["scaling"] = scaling(result, args.out.parent if args.out is not None else RESULTS)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

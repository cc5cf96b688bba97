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
- ``peak_memory_mib_per_worker``: largest ru_maxrss reported by a task;
- ``bytes_per_star``: on-disk bytes of raw, conditioned, fitted and catalog
  products divided by the number of stars.

Usage::

    python benchmarks/pipeline.py                  # 10^5 stars
    python benchmarks/pipeline.py --million        # 10^6 stars
    python benchmarks/pipeline.py --stars 2000 --out benchmarks/results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info  # noqa: E402

logger = logging.getLogger("benchmarks.pipeline")


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
                    help="report the first inference pass only (workers compiling their kernels)")
    args = ap.parse_args(argv)
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
    cfg = RunConfig().replace(
        data={"partition_level": level},
        training={"preset": "quick", "batch_size": args.train_batch_size},
        cluster={"n_workers": args.workers, "memory_limit": args.memory_limit, "threads_per_worker": 1},
    )
    timings: dict[str, float] = {}
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
        "bytes_per_star": {k: v / n for k, v in sizes.items()},
        "machine": machine_info(),
    }
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""``xpcat demo``: the whole chain on a built-in synthetic Gaia universe.

simulate -> local archive + fetch (the real astroquery code path) -> partner
tables -> condition (Dask, LocalCluster) -> train (quick preset) -> confidence
classifiers (quick) -> infer + HATS catalog (Dask) -> report. Everything goes
under the work directory; every step is resumable (re-running the demo does
only what is missing).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from xpcat.config import RunConfig, config_to_dict
from xpcat.errors import StageError
from xpcat.production.demo_preflight import check_demo_size, check_demo_workdir, universe_config

logger = logging.getLogger(__name__)

__all__ = ["DEMO_STARS", "DEMO_LEVEL", "demo_config", "run_demo"]

#: Stars in the demo universe unless ``--stars`` says otherwise.
DEMO_STARS = 6000
#: HEALPix level of the demo's working partitions (48 source_id ranges).
DEMO_LEVEL = 1
#: The first query the demo shows.
FIRST_QUERY = (
    "SELECT count(*) AS stars, "
    "count(*) FILTER (WHERE quality_flags < 8) AS basic_cut, "
    "count(*) FILTER (WHERE quality_flags = 0) AS strict_cut, "
    "CAST(round(median(stellar_params_est[1]) * 1000) AS INTEGER) AS median_teff_K "
    "FROM catalog"
)


def demo_config(base: RunConfig, universe: Path, n_stars: int | None, seed: int | None) -> RunConfig:
    """The demo's run configuration.

    ``base`` with: the universe's size (``n_stars``, default :data:`DEMO_STARS`)
    and seed, the universe's partner tables (labels, reddening, unWISE), the
    partition level :data:`DEMO_LEVEL`, and the ``quick`` presets of training
    and the confidence classifiers where ``base`` asks for the paper's.
    """
    from xpcat.config import config_from_dict

    raw = universe / "raw"
    quick = {s: {"preset": "quick"} for s in ("training", "confidence") if getattr(base, s).preset == "paper"}
    d = config_to_dict(base.replace(**quick))  # values the user set in base stay; the rest follow the preset
    d["simulate"]["n_stars"] = n_stars or DEMO_STARS
    if seed is not None:
        d["simulate"]["seed"] = seed
    d["data"].update(
        {
            "partition_level": DEMO_LEVEL,
            "labels": str(raw / "labels" / "part-0000.parquet"),
            "reddening": str(raw / "reddening" / "part-0000.parquet"),
            "unwise": str(raw / "unwise" / "part-0000.parquet"),
        }
    )
    return config_from_dict(d)


def _step(name: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            logger.info("demo: %s ...", name)
            self.t0 = time.perf_counter()

        def __exit__(self, exc_type, *_):
            timings[name] = round(time.perf_counter() - self.t0, 2)
            if exc_type is None:
                logger.info("demo: %s done in %.1f s", name, timings[name])

    return _Timer()


def run_demo(workdir: Path, config: RunConfig, n_stars: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Run the whole chain under ``workdir`` and return a summary.

    Parameters
    ----------
    workdir : Path
        Everything goes here: ``universe/`` (the simulated archive side),
        ``raw/`` (fetched), ``truth/``, ``conditioned/``, ``model/``, ``fitted/``,
        ``catalog/`` (HATS), ``report/``, ``logs/``, ``state/``.
    config : RunConfig
        Base configuration (see :func:`demo_config`).
    n_stars, seed : int, optional
        Size and seed of the universe.

    Returns
    -------
    dict
        Paths, per-step seconds, stage summaries and the first query's answer.

    Raises
    ------
    InputError
        Before anything is made, when the universe is too small to train on
        (:func:`xpcat.production.demo_preflight.check_demo_size`).
    StageError
        Before anything is made, when ``workdir`` holds a demo made with other
        parameters (:func:`xpcat.production.demo_preflight.check_demo_workdir`);
        when any step fails (the message names it); finished steps are kept.
    """
    from xpcat.model.confidence import TooFewLabelsError
    from xpcat.production.catalog import query_catalog
    from xpcat.production.ingest.archive import fetch_run
    from xpcat.production.report.page import write_report
    from xpcat.production.run import condition_stage, run_pipeline, run_stages
    from xpcat.production.synthetic.archive_server import LocalArchive
    from xpcat.production.synthetic.universe import simulate_universe
    from xpcat.production.train import train_run
    from xpcat.production.train_confidence import train_confidence_run

    workdir = Path(workdir).resolve()
    universe = workdir / "universe"
    cfg = demo_config(config, universe, n_stars, seed)
    check_demo_size(cfg)
    check_demo_workdir(workdir, cfg)
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"workdir": str(workdir), "stars": cfg.simulate.n_stars, "seed": cfg.simulate.seed}

    with _step("simulate", timings):
        if universe_config(universe) == config_to_dict(cfg)["simulate"]:
            logger.info("demo: universe in %s already simulated", universe)
        else:
            simulate_universe(universe, cfg.simulate)
        (workdir / "truth").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(universe / "truth" / "truth.parquet", workdir / "truth" / "truth.parquet")

    with _step("fetch", timings), LocalArchive(universe) as archive:
        fetched = fetch_run(workdir, cfg, archive_url=archive.url)
        if fetched["failed"]:
            raise StageError(f"demo: fetch failed for {len(fetched['failed'])} range(s): {fetched['failed'][:3]}")
        summary["fetch"] = {k: fetched[k] for k in ("ranges", "done", "skipped", "rows", "missing_xp")}

    with _step("condition", timings):
        cond = run_stages(workdir, cfg, [condition_stage()], catalog=False)
        summary["condition"] = cond["stages"].get("condition")

    with _step("train", timings):
        summary["train"] = _small(train_run(workdir, cfg))

    with _step("train-confidence", timings):
        try:
            summary["confidence"] = _small(train_confidence_run(workdir, cfg))
        except StageError as err:
            # a small universe can lack bad estimates among the stars passing the basic
            # cut; the catalog then carries the placeholder rule and its metadata says so
            if not isinstance(err.__cause__, TooFewLabelsError):
                raise
            logger.warning("demo: confidence classifiers not trained: %s", err)
            summary["confidence"] = {"skipped": str(err)}

    with _step("infer+catalog", timings):
        run = run_pipeline(workdir, cfg)
        summary["dashboard"] = run.get("dashboard")
        summary["catalog"] = str(workdir / "catalog")

    with _step("report", timings):
        summary["report"] = str(write_report(workdir))

    summary["first_query"] = {"sql": FIRST_QUERY, "result": query_catalog(workdir, FIRST_QUERY, fmt="table")}
    summary["seconds"] = timings
    return summary


def _small(d: Any) -> Any:
    """Keep a stage summary printable (drop long lists)."""
    if isinstance(d, dict):
        return {k: _small(v) for k, v in d.items() if not (isinstance(v, list) and len(v) > 20)}
    return d


def format_summary(summary: dict[str, Any]) -> str:
    """The text the demo prints: where things are, timings, the first query."""
    lines = [
        f"xpcat demo: {summary['stars']} synthetic stars (seed {summary['seed']}) in {summary['workdir']}",
        "",
        "step timings [s]: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()),
        f"catalog (HATS):   {summary['catalog']}",
        f"report:           {summary['report']}",
        f"check:            xpcat validate {summary['workdir']}",
        "",
        f"first query:      xpcat query {summary['workdir']} \"{summary['first_query']['sql']}\"",
        summary["first_query"]["result"],
    ]
    return "\n".join(lines)




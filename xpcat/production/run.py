"""A production run: condition -> infer -> catalog over partitions on a Dask cluster.

``run_pipeline`` plans the partitions owed (from ``raw/gaia_source``), removes
those whose outputs are already on disk and valid, and submits one Dask task
per remaining partition and stage. A task reads its input from disk, calls the
stage's per-partition function (``conditioning.condition_partition``,
``fitting.infer_partition``), checks the output (schema, row count = input
rows, checksum via the done marker) and returns a small summary; the client
takes each result as it completes and releases the future, so no partition
data lives in worker memory (``recipes/slurm-single-node.md``). Task
exceptions are retried ``[cluster] retries`` times by Dask, then recorded per
partition with the traceback (``xpcat status`` shows them). The catalog stage
builds the HATS catalog from the fitted partitions (:mod:`.catalog`).

Resume is a rescan: running again on the same run directory does only what is
missing or invalid, and refuses when the config, the input set or the model
changed (:mod:`.run_state`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xpcat.catalog_schema import CATALOG, CONDITIONED, validate
from xpcat.config import RunConfig, write_config
from xpcat.errors import StageError, XpcatError
from xpcat.fileio import write_json_atomic
from xpcat.jobs.memory import peak_rss_mib
from xpcat.progress import progress
from xpcat.production import partitions as P
from xpcat.production import run_state as S
from xpcat.production.capacity import plan_run

logger = logging.getLogger(__name__)

__all__ = ["Stage", "default_stages", "run_pipeline", "run_stages", "run_status", "plan_run", "stage_task"]


@dataclass(frozen=True)
class Stage:
    """One per-partition stage.

    Attributes
    ----------
    name : str
        Stage name (``"condition"``, ``"infer"``).
    out_dir : str
        Output folder in the run directory; the output of partition ``p`` is
        ``<out_dir>/<p>.parquet`` with its done marker.
    func : callable
        ``func(run_dir: Path, part: PartitionPlan, config: RunConfig, ctx: dict) -> dict | None``,
        importable on workers; it must write the output with
        :func:`partitions.atomic_write_parquet`.
    schema : pyarrow.Schema
        Schema the output must have.
    needs : str or None
        ``out_dir`` of the stage whose output this one reads.
    resources : dict or None
        Dask worker resources per task (``{"GPU": 1}`` on GPU profiles).
    """

    name: str
    out_dir: str
    func: Callable[..., Any]
    schema: pa.Schema
    needs: str | None = None
    resources: dict | None = field(default=None)


def _condition_func(run_dir: Path, part: S.PartitionPlan, config: RunConfig, ctx: dict) -> dict | None:
    """Condition one source_id range (``xpcat.production.condition.stage``)."""
    from xpcat.production.condition import stage as conditioning
    raw_files = {k: [Path(f) for f in v] for k, v in ctx["raw_files"].items()}
    return conditioning.condition_partition(
        raw_files, part.pix, S.output_path(run_dir, "conditioned", part.name), config,
        level=part.level, n_expected=part.rows,
    )


def _infer_func(run_dir: Path, part: S.PartitionPlan, config: RunConfig, ctx: dict) -> dict | None:
    """Fit one conditioned partition with the worker's model (``fitting.infer_partition``)."""
    from xpcat.jobs.compile_cache import enable_compilation_cache
    from xpcat.jobs.plugins import worker_model
    from xpcat.production import infer as fitting
    if config.inference.compilation_cache:
        enable_compilation_cache(run_dir)
    model = worker_model(ctx["model_dir"], ctx["model_hash"])
    return fitting.infer_partition(
        S.output_path(run_dir, "conditioned", part.name), S.output_path(run_dir, "fitted", part.name), model, config
    )


def default_stages(gpu: bool = False) -> list[Stage]:
    """condition -> infer (the catalog stage follows in :func:`run_pipeline`)."""
    return [
        Stage("condition", "conditioned", _condition_func, CONDITIONED),
        Stage("infer", "fitted", _infer_func, CATALOG, needs="conditioned", resources={"GPU": 1} if gpu else None),
    ]


def stage_task(stage: Stage, run_dir: str, part: S.PartitionPlan, config: RunConfig, ctx: dict) -> dict:
    """The Dask task of one stage on one partition; returns a small summary.

    Returns early when the output is already done (full sha256 check). After
    the stage function, checks the output's marker, row count (= input rows)
    and schema.

    Raises
    ------
    StageError
        When the output is missing, has the wrong row count or schema.
    """
    run_path = Path(run_dir)
    out = S.output_path(run_path, stage.out_dir, part.name)
    if P.is_done(out, expected_rows=part.rows):
        return {"partition": part.name, "stage": stage.name, "skipped": True, "rows": part.rows}
    if stage.needs is not None:
        src = S.output_path(run_path, stage.needs, part.name)
        if not P.is_done(src, expected_rows=part.rows):
            raise StageError(f"{stage.name} {part.name}: input {src} is missing or invalid")
    t0 = time.perf_counter()
    info = stage.func(run_path, part, config, ctx) or {}
    seconds = time.perf_counter() - t0
    marker = P.read_marker(out)
    if marker is None or not P.is_done(out):
        raise StageError(f"{stage.name} {part.name}: the stage wrote no valid output at {out} (file or done marker missing)")
    try:
        if int(marker["rows"]) != part.rows:
            raise StageError(
                f"{stage.name} {part.name}: output {out} has {marker['rows']} rows, expected {part.rows} "
                f"(one per input source_id in [{part.lo}, {part.hi}))"
            )
        validate(pq.read_schema(out).empty_table(), stage.schema, what=str(out))
    except XpcatError:
        P.marker_path(out).unlink(missing_ok=True)  # a wrong output is not done: redo it next time
        raise
    return {
        "partition": part.name,
        "stage": stage.name,
        "skipped": False,
        "rows": part.rows,
        "bytes": int(marker["bytes"]),
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))} if isinstance(info, dict) else {},
    }


def _format_exception(fut) -> tuple[str, str]:
    try:
        exc = fut.exception()
        tb = fut.traceback()
    except Exception as err:  # noqa: BLE001 - a lost future still gets recorded
        return f"{type(err).__name__}: {err}", ""
    text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else ""
    return f"{type(exc).__name__}: {exc}", text


def _run_stage(client, stage: Stage, run_dir: Path, plan: Sequence[S.PartitionPlan], config: RunConfig,
               ctx: dict, blocked: set[str]) -> dict:
    """Submit the owed partitions of one stage and collect results as they complete."""
    from distributed import as_completed

    todo = [p for p in plan if p.name not in blocked and not S.quick_done(S.output_path(run_dir, stage.out_dir, p.name), p.rows)]
    skipped_blocked = [p.name for p in plan if p.name in blocked]
    logger.info("stage %s: %d partitions owed, %d already done, %d blocked by earlier failures",
                stage.name, len(todo), len(plan) - len(todo) - len(skipped_blocked), len(skipped_blocked))
    if todo:
        (Path(run_dir) / S.STATE_DIR / f"{stage.name}.done").unlink(missing_ok=True)
    t0 = time.perf_counter()
    futures = {}
    for p in todo:
        fut = client.submit(
            stage_task, stage, str(run_dir), p, config, ctx,
            key=f"{stage.name}-{p.name}-{time.time_ns()}", pure=False,
            retries=config.cluster.retries, resources=stage.resources,
        )
        futures[fut.key] = (fut, p)
    done = failed = 0
    rows = 0
    seconds = 0.0
    nbytes = 0
    peak = 0.0
    failed_names: list[str] = []
    for fut in progress(as_completed([f for f, _ in futures.values()]), stage.name, total=len(futures), unit="part"):
        _, p = futures.pop(fut.key)
        if fut.status == "finished":
            summary = fut.result()
            S.clear_failure(run_dir, stage.name, p.name)
            done += 1
            rows += summary["rows"]
            seconds += summary.get("seconds", 0.0)
            nbytes += summary.get("bytes", 0)
            peak = max(peak, summary.get("peak_rss_mib", 0.0))
        else:
            err, tb = _format_exception(fut)
            S.record_failure(run_dir, stage.name, p.name, err, tb, attempts=config.cluster.retries + 1)
            logger.error("stage %s partition %s failed: %s", stage.name, p.name, err)
            failed += 1
            failed_names.append(p.name)
        fut.release()
    still = [p.name for p in plan if p.name not in blocked and not S.quick_done(S.output_path(run_dir, stage.out_dir, p.name), p.rows)]
    if not still:
        S.mark_stage_done(run_dir, stage.name, {"partitions": len(plan), "time": _now()})
    return {"wall_seconds": time.perf_counter() - t0, "submitted": len(todo), "completed": done, "failed": failed, "failed_partitions": failed_names,
            "pending": still, "rows": rows, "task_seconds": seconds, "bytes": nbytes, "peak_rss_mib": peak}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[Path]:
    """Copy ``xpcat`` log records into ``RUN_DIR/logs/run-<time>.log`` while the run lasts."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"run-{_dt.datetime.now():%Y%m%dT%H%M%S}-{os.getpid()}.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("xpcat")
    old_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _model_hash(model_dir: Path) -> str:
    from xpcat.jobs.plugins import load_model

    if not model_dir.exists():
        raise StageError(f"model artifact {model_dir} not found; train one first (`xpcat train RUN_DIR`)")
    return load_model(model_dir).content_hash


def run_stages(run_dir: Path, config: RunConfig, stages: Sequence[Stage], *, model_dir: Path | None = None,
               catalog: bool = True, context: Callable[[Path, RunConfig], dict] | None = None) -> dict:
    """Run ``stages`` (then the catalog) over the planned partitions; the engine of :func:`run_pipeline`.

    Parameters
    ----------
    run_dir : Path
        The run directory (inputs in ``raw/``).
    config : RunConfig
    stages : sequence of Stage
    model_dir : Path, optional
        Model artifact: loaded on every worker by :class:`xpcat.jobs.plugins.ModelPlugin`.
    catalog : bool
        Build the HATS catalog from the last stage's output when every partition is done.
    context : callable, optional
        ``context(run_dir, config) -> dict`` of extras for the stage functions' ``ctx``,
        called after planning (e.g. the raw file lists).

    Returns
    -------
    dict
        Per-stage summaries, the catalog summary, the log file and the dashboard link.

    Raises
    ------
    StageError
        When partitions failed (after the other partitions finished), naming them.
    """
    from xpcat.jobs.clusters import open_cluster
    from xpcat.jobs.plugins import ModelPlugin

    run_dir = Path(run_dir).resolve()
    t_start = time.perf_counter()
    with _run_log(run_dir) as log_path:
        logger.info("xpcat run in %s (log %s)", run_dir, log_path)
        inputs = S.input_fingerprint(run_dir, config)
        model_hash = _model_hash(model_dir) if model_dir is not None else None
        resumed = S.check_resume(run_dir, config, inputs, model_hash)
        write_config(config, run_dir)
        plan = S.plan_partitions(run_dir, config)
        extra_ctx = context(run_dir, config) if context is not None else None
        n_stars = sum(p.rows for p in plan)
        logger.info("%s run: %d stars in %d partitions at level %d", "resuming" if resumed else "new",
                    n_stars, len(plan), config.data.partition_level)
        ctx = {"model_dir": str(model_dir) if model_dir else None, "model_hash": model_hash, **(extra_ctx or {})}
        summary: dict[str, Any] = {"run_dir": str(run_dir), "log": str(log_path), "stars": n_stars,
                                   "partitions": len(plan), "resumed": resumed, "stages": {}}
        with open_cluster(config.cluster, log_dir=run_dir / "logs" / "jobs") as (cluster, client, profile):
            summary["dashboard"] = client.dashboard_link
            logger.info("Dask dashboard: %s", client.dashboard_link)
            if model_dir is not None:
                client.register_plugin(ModelPlugin(model_dir, model_hash))
            blocked: set[str] = set()
            for stage in stages:
                st = _run_stage(client, stage, run_dir, plan, config, ctx, blocked)
                summary["stages"][stage.name] = st
                blocked |= set(st["pending"]) | set(st["failed_partitions"])
            if catalog and stages and not blocked:
                from xpcat.production.catalog import build_catalog

                t0 = time.perf_counter()
                summary["stages"]["catalog"] = build_catalog(run_dir, config, stages[-1].out_dir, client=client)
                summary["stages"]["catalog"]["wall_seconds"] = time.perf_counter() - t0
                summary["workers"] = len(client.scheduler_info().get("workers", {}))
        summary["seconds"] = time.perf_counter() - t_start
        write_json_atomic(run_dir / S.STATE_DIR / "last_run.json", summary)
        failures = S.read_failures(run_dir)
        if blocked:
            failed = [f"{st}/{name}: {doc['error']}" for st, d in failures.items() for name, doc in d.items()]
            shown = "; ".join(failed[:5]) or ", ".join(sorted(blocked)[:5])
            raise StageError(
                f"{len(blocked)} partition(s) not finished ({shown}); see `xpcat status {run_dir}`, "
                "fix the cause and run again (finished partitions are kept)"
            )
        logger.info("run complete in %.1f s", summary["seconds"])
        return summary


def run_pipeline(run_dir: Path, config: RunConfig) -> dict:
    """``xpcat run``: condition -> infer -> catalog over the run directory's partitions.

    Parameters
    ----------
    run_dir : Path
        Holds ``raw/`` (inputs) and ``model/`` (the trained artifact).
    config : RunConfig

    Returns
    -------
    dict
        Summary (stars, partitions, per-stage counts, catalog path, log file, dashboard link).

    Raises
    ------
    StageError
        Missing model, changed config/inputs on resume, failed partitions.
    InputError
        Missing or duplicated inputs.
    """
    from xpcat.jobs.clusters import load_profile

    profile = load_profile(config.cluster.profile)
    return run_stages(Path(run_dir), config, default_stages(gpu=profile.gpu), model_dir=Path(run_dir) / "model",
                      context=_pipeline_context)


def _pipeline_context(run_dir: Path, config: RunConfig) -> dict:
    """The raw file lists for conditioning (``conditioning.plan_partitions`` also checks the XP table's ids)."""
    from xpcat.production.condition import stage as conditioning
    tasks = conditioning.plan_partitions(run_dir, config)
    files = tasks[0].raw_files if tasks else {}
    return {"raw_files": {k: [str(f) for f in v] for k, v in files.items()}}


def run_status(run_dir: Path) -> str:
    """Done / pending / failed partitions of each stage, and why (text for ``xpcat status``).

    Raises
    ------
    StageError
        When ``run_dir`` holds no planned run.
    """
    run_dir = Path(run_dir)
    plan = S.read_plan(run_dir)
    if not plan:
        raise StageError(f"{run_dir} holds no planned run (no {S.STATE_DIR}/plan.json); start one with `xpcat run`")
    failures = S.read_failures(run_dir)
    lines = [f"run {run_dir}: {sum(p.rows for p in plan)} stars in {len(plan)} partitions"]
    for stage, out_dir in (("condition", "conditioned"), ("infer", "fitted")):
        done = [p.name for p in plan if S.quick_done(S.output_path(run_dir, out_dir, p.name), p.rows)]
        failed = {n: d for n, d in failures.get(stage, {}).items() if n not in done}
        pending = [p.name for p in plan if p.name not in done and p.name not in failed]
        lines.append(f"{stage:<10} done {len(done)}  pending {len(pending)}  failed {len(failed)}")
        for name, doc in sorted(failed.items()):
            last = (doc.get("traceback") or "").strip().splitlines()[-3:]
            lines.append(f"  FAILED {name}: {doc['error']} (after {doc.get('attempts')} attempt(s), {doc.get('time')})")
            lines += [f"    {x}" for x in last if x.strip() and x.strip() not in doc["error"]]
        if pending and len(pending) <= 10:
            lines.append("  pending: " + ", ".join(pending))
        elif pending:
            lines.append("  pending: " + ", ".join(pending[:10]) + f", ... ({len(pending) - 10} more)")
    cat = S.stage_done(run_dir, "catalog")
    if cat:
        lines.append(f"catalog    done: {cat.get('rows')} rows in {cat.get('pixels')} HATS pixels at {run_dir / 'catalog'}")
    else:
        lines.append("catalog    not built")
    last = run_dir / S.STATE_DIR / "last_run.json"
    if last.exists():
        doc = json.loads(last.read_text())
        lines.append(f"last run log: {doc.get('log')}")
    return "\n".join(lines)

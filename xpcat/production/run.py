"""The engine: plan -> one task per partition -> verified commit -> rescan, for every stage.

Every stage command (``xpcat condition``, ``infer``, ``catalog`` and ``run``)
goes through :func:`run_stages`:

1. **plan once**: :func:`xpcat.production.run_state.plan_partitions` scans the
   raw source_ids (duplicates refused) and writes ``state/plan.json``;
2. **context**: a typed :class:`StageContext` per stage, built once on the
   client: the run's paths, its config, the model hash and the *done key*,
   the hash of everything the stage's output depends on (the config sections
   that change its results, the raw input set, the model);
3. **tasks**: one Dask task per partition whose output is not done
   (:func:`stage_task`); a task reads from disk, calls the stage function,
   which writes its output with :func:`xpcat.production.partitions.atomic_write_parquet`,
   then checks it (schema, one row per input source_id, checksum) and stamps
   the done key into its marker. Tasks return a small summary, never data;
4. **rescan**: after the tasks, the same done test decides what is left; a
   task that still failed after ``[cluster] retries`` is recorded per
   partition with its traceback (``xpcat status``) and the run says so.

The done test (:func:`partition_done`) is the one test of the whole engine:
the output exists, its size, row count and checksum match its marker, and the
marker's done key equals the stage's current key combined with the checksum
of the partition's input. A corrupt or truncated file, a changed config
section, a new model or a redone input therefore all mean "redo", whichever
command runs.

``xpcat run`` additionally refuses to resume across a change of config,
inputs or model (:func:`xpcat.production.run_state.check_resume`); the
single-stage commands redo what the done key says is outdated.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from xpcat.catalog_schema import validate
from xpcat.config import RunConfig, config_to_dict, write_config
from xpcat.errors import StageError, XpcatError
from xpcat.fileio import write_json_atomic
from xpcat.jobs.futures import run_tasks
from xpcat.jobs.memory import peak_rss_mib
from xpcat.production import partitions as P
from xpcat.production import run_state as S
from xpcat.production.capacity import plan_run
from xpcat.production.run_dir import RunPaths
from xpcat.production.run_lock import run_lock
from xpcat.production.stages import (
    Stage,
    StageContext,
    condition_stage,
    default_stages,
    infer_stage,
)

logger = logging.getLogger(__name__)

__all__ = ["stage_context", "not_done_reason", "partition_done", "run_pipeline", "run_stages", "run_condition",
           "run_infer", "run_catalog", "plan_run", "stage_task"]


# ---------------------------------------------------------------- the done test
def _done_key(stage: Stage, config: RunConfig, inputs: dict, model_hash: str | None) -> str:
    """Hash of the config sections, raw inputs (the stage tables' content) and model a stage's output depends on."""
    d = config_to_dict(config)
    tables = {t: sorted(str(v["sha256"]) for k, v in inputs.items() if f"/{t}/" in f"/{k}") for t in S.STAGE_TABLES}
    doc = {
        "stage": stage.name,
        "config": {s: {k: v for k, v in d[s].items() if k not in S.OPERATIONAL_FIELDS.get(s, ())}
                   for s in stage.sections},
        "inputs": tables if stage.needs is None else None,  # by content: a moved or renamed file is the same input
        "model": model_hash if stage.uses_model else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def stage_context(stage: Stage, paths: RunPaths, config: RunConfig, raw_files: dict[str, tuple[str, ...]],
                  inputs: dict, model_dir: Path | None, model_hash: str | None) -> StageContext:
    """The :class:`StageContext` of ``stage`` in one run (its done key from config, inputs and model)."""
    return StageContext(stage.name, paths, config, raw_files, str(model_dir) if model_dir else None, model_hash,
                        _done_key(stage, config, inputs, model_hash))


def _partition_key(ctx: StageContext, stage: Stage, part: S.PartitionPlan) -> str | None:
    """The done key of one partition: the stage's key and, for a stage with an input, the input's checksum."""
    if stage.needs is None:
        return ctx.done_key
    marker = P.read_marker(ctx.paths.output(stage.needs, part.name))
    if marker is None:
        return None
    return hashlib.sha256(f"{ctx.done_key}:{marker.get('sha256')}".encode()).hexdigest()[:24]


def not_done_reason(ctx: StageContext, stage: Stage, part: S.PartitionPlan, *, full: bool = False) -> str | None:
    """Why ``part``'s output of ``stage`` must be (re)done, or None when it is done and current.

    ``full=False`` (the client's rescan) checks size and row count against
    the marker; ``full=True`` (inside the task) also re-hashes the file.
    Both require the marker's done key to match the stage's current one.
    """
    out = ctx.paths.output(stage.out_dir, part.name)
    if not out.exists():
        return "missing"
    ok = P.is_done(out, expected_rows=part.rows) if full else S.quick_done(out, part.rows)
    if not ok:
        return "no done marker, or size, rows or checksum differ from it (partial, truncated or corrupt)"
    key = _partition_key(ctx, stage, part)
    marker = P.read_marker(out) or {}
    if key is None or (marker.get("info") or {}).get("done_key") != key:
        return "made from other inputs, config or model"
    return None


def partition_done(ctx: StageContext, stage: Stage, part: S.PartitionPlan, *, full: bool = False) -> bool:
    """Whether ``part``'s output of ``stage`` is done and current (:func:`not_done_reason` is None)."""
    return not_done_reason(ctx, stage, part, full=full) is None


def stage_task(stage: Stage, ctx: StageContext, part: S.PartitionPlan) -> dict:
    """The Dask task of one stage on one partition; returns a small summary.

    Returns early when the output is already done and current. After the
    stage function, checks the output's marker, row count (= input rows) and
    schema, then stamps the done key into the marker.

    Raises
    ------
    StageError
        When the input is not done, or the output is missing, has the wrong
        row count or schema.
    """
    out = ctx.paths.output(stage.out_dir, part.name)
    if partition_done(ctx, stage, part, full=True):
        return {"partition": part.name, "stage": stage.name, "skipped": True, "rows": part.rows}
    if stage.needs is not None:
        src = ctx.paths.output(stage.needs, part.name)
        if not P.is_done(src, expected_rows=part.rows):
            raise StageError(f"{stage.name} {part.name}: input {src} is missing or invalid")
    key = _partition_key(ctx, stage, part)
    t0 = time.perf_counter()
    info = stage.func(ctx, part) or {}
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
    P.stamp_marker(out, done_key=key)
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


# ---------------------------------------------------------------- one stage over the plan
def _run_stage(client: Any, stage: Stage, ctx: StageContext, plan: Sequence[S.PartitionPlan], blocked: set[str]) -> dict:
    """Submit the owed partitions of one stage, collect results as they complete, rescan."""
    run_dir = ctx.run_dir
    config = ctx.config
    todo = []
    for p in plan:
        reason = None if p.name in blocked else not_done_reason(ctx, stage, p)
        if reason is not None:
            todo.append(p)
            if reason != "missing":
                logger.warning("%s: redoing %s: %s", stage.name, ctx.paths.output(stage.out_dir, p.name), reason)
    n_blocked = sum(p.name in blocked for p in plan)
    logger.info("stage %s: %d partitions owed, %d already done, %d blocked by earlier failures",
                stage.name, len(todo), len(plan) - len(todo) - n_blocked, n_blocked)
    if todo:
        ctx.paths.stage_marker(stage.name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = failed = rows = nbytes = 0
    seconds = peak = 0.0
    failed_names: list[str] = []
    calls = [(p, (stage, ctx, p)) for p in todo]
    for outcome in run_tasks(client, stage_task, calls, stage.name, retries=config.cluster.retries,
                             resources=stage.resources, unit="part"):
        p = outcome.tag
        if outcome.ok:
            summary = outcome.result
            S.clear_failure(run_dir, stage.name, p.name)
            done += 1
            rows += summary["rows"]
            seconds += summary.get("seconds", 0.0)
            nbytes += summary.get("bytes", 0)
            peak = max(peak, summary.get("peak_rss_mib", 0.0))
        else:
            S.record_failure(run_dir, stage.name, p.name, outcome.error, outcome.traceback,
                             attempts=config.cluster.retries + 1)
            logger.error("stage %s partition %s failed: %s", stage.name, p.name, outcome.error)
            failed += 1
            failed_names.append(p.name)
    still = [p.name for p in plan if p.name not in blocked and not partition_done(ctx, stage, p)]
    if not still:
        S.mark_stage_done(run_dir, stage.name, {"partitions": len(plan), "time": _now(), "model_hash": ctx.model_hash})
    return {"wall_seconds": time.perf_counter() - t0, "submitted": len(todo), "completed": done, "failed": failed,
            "failed_partitions": failed_names, "pending": still, "rows": rows, "task_seconds": seconds,
            "bytes": nbytes, "peak_rss_mib": peak}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _run_log(paths: RunPaths) -> Iterator[Path]:
    """Copy ``xpcat`` log records into ``RUN_DIR/logs/run-<time>.log`` while the run lasts."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    path = paths.logs / f"run-{_dt.datetime.now():%Y%m%dT%H%M%S}-{os.getpid()}.log"
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


# ---------------------------------------------------------------- the engine
def run_stages(run_dir: Path, config: RunConfig, stages: Sequence[Stage], *, model_dir: Path | None = None,
               catalog: bool = True, strict_resume: bool = True, on_dashboard: Callable[[str], None] | None = None,
               command: str = "run") -> dict:
    """Run ``stages`` (then the catalog) over the planned partitions.

    Parameters
    ----------
    run_dir : Path
        The run directory (inputs in ``raw/``).
    config : RunConfig
    stages : sequence of Stage
        May be empty (``catalog=True``: build the catalog from done fitted partitions).
    model_dir : Path, optional
        Model artifact: loaded on every worker by :class:`xpcat.jobs.plugins.ModelPlugin`.
    catalog : bool
        Build the HATS catalog from the fitted partitions when every partition is done.
    strict_resume : bool
        Refuse to resume across a change of config, inputs or model (``xpcat run``).
        Otherwise the done key redoes what changed (single-stage commands).
    on_dashboard : callable, optional
        Called with the Dask dashboard address once the cluster is up.
    command : str
        The command running (named to a second process refused by the run lock).

    Returns
    -------
    dict
        Per-stage summaries, the catalog summary, the log file and the dashboard link.

    Raises
    ------
    StageError
        When partitions failed (after the other partitions finished), naming them.
    RunLockedError
        When another live process works in the run directory.
    """
    from xpcat.jobs.clusters import open_cluster
    from xpcat.jobs.plugins import ModelPlugin

    paths = RunPaths.of(run_dir, config)
    run_dir = paths.root
    config = paths.portable(config)  # config.toml and the resume record name inputs inside RUN_DIR relatively
    t_start = time.perf_counter()
    with run_lock(paths.state, command), _run_log(paths) as log_path:
        logger.info("xpcat run in %s (log %s)", run_dir, log_path)
        inputs = S.input_fingerprint(run_dir, config)
        model_hash = _model_hash(model_dir) if model_dir is not None else None
        resumed = S.check_resume(run_dir, config, inputs, model_hash if strict_resume else None, strict=strict_resume)
        write_config(config, run_dir)
        plan, raw_files = S.plan_partitions(run_dir, config)
        n_stars = sum(p.rows for p in plan)
        logger.info("%s run: %d stars in %d partitions at level %d", "resuming" if resumed else "new",
                    n_stars, len(plan), config.data.partition_level)
        contexts = {st.name: stage_context(st, paths, config, raw_files, inputs, model_dir, model_hash) for st in stages}
        summary: dict[str, Any] = {"run_dir": str(run_dir), "log": str(log_path), "stars": n_stars,
                                   "partitions": len(plan), "resumed": resumed, "stages": {}}
        blocked: set[str] = set()
        with open_cluster(config.cluster, log_dir=paths.job_logs) as (cluster, client, profile):
            summary["dashboard"] = client.dashboard_link
            logger.info("Dask dashboard: %s", client.dashboard_link)
            if on_dashboard is not None:
                on_dashboard(client.dashboard_link)
            if model_dir is not None:
                client.register_plugin(ModelPlugin(model_dir, model_hash))
            for stage in stages:
                st = _run_stage(client, stage, contexts[stage.name], plan, blocked)
                summary["stages"][stage.name] = st
                blocked |= set(st["pending"]) | set(st["failed_partitions"])
            if catalog and not blocked:
                from xpcat.production.catalog import build_catalog

                t0 = time.perf_counter()
                summary["stages"]["catalog"] = build_catalog(run_dir, config, RunPaths.FITTED, client=client)
                summary["stages"]["catalog"]["wall_seconds"] = time.perf_counter() - t0
            summary["workers"] = len(client.scheduler_info().get("workers", {}))
        summary["seconds"] = time.perf_counter() - t_start
        write_json_atomic(paths.state / "last_run.json", summary)
        if blocked:
            failures = S.read_failures(run_dir)
            failed = [f"{st}/{name}: {doc['error']}" for st, d in failures.items() for name, doc in d.items()]
            shown = "; ".join(failed[:5]) or ", ".join(sorted(blocked)[:5])
            raise StageError(
                f"{len(blocked)} partition(s) not finished ({shown}); see `xpcat status {run_dir}`, "
                "fix the cause and run again (finished partitions are kept)"
            )
        logger.info("run complete in %.1f s", summary["seconds"])
        return summary


def run_pipeline(run_dir: Path, config: RunConfig, **kwargs: Any) -> dict:
    """``xpcat run``: condition -> infer -> catalog over the run directory's partitions.

    Parameters
    ----------
    run_dir : Path
        Holds ``raw/`` (inputs) and ``model/`` (the trained artifact).
    config : RunConfig
    **kwargs
        Passed to :func:`run_stages` (``on_dashboard``).

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
    paths = RunPaths.of(run_dir, config)
    return run_stages(paths.root, config, default_stages(gpu=profile.gpu), model_dir=paths.model, **kwargs)


def run_condition(run_dir: Path, config: RunConfig) -> dict:
    """``xpcat condition``: raw -> conditioned through the engine (no catalog)."""
    return run_stages(run_dir, config, [condition_stage()], catalog=False, strict_resume=False, command="condition")


def run_infer(run_dir: Path, config: RunConfig, model_dir: Path | None = None) -> dict:
    """``xpcat infer``: conditioned -> fitted through the engine.

    The condition stage runs first and redoes only conditioned partitions that
    are missing, corrupt or outdated (a no-op on a conditioned run); partitions
    fitted with another model or other inference settings are refitted.
    """
    from xpcat.jobs.clusters import load_profile

    paths = RunPaths.of(run_dir, config)
    return run_stages(paths.root, config, [condition_stage(), infer_stage(load_profile(config.cluster.profile).gpu)],
                      model_dir=Path(model_dir) if model_dir is not None else paths.model,
                      catalog=False, strict_resume=False, command="infer")


def run_catalog(run_dir: Path, config: RunConfig) -> dict:
    """``xpcat catalog``: the HATS catalog from the fitted partitions, through the engine."""
    return run_stages(run_dir, config, [], catalog=True, strict_resume=False, command="catalog")

"""``xpcat run --dry-run``: the plan of a run and what of it is done, without starting a cluster.

The same plan (:func:`xpcat.production.run_state.plan_partitions`, which
writes ``state/plan.json``) and the same done test
(:func:`xpcat.production.run.partition_done` on each stage's
:func:`xpcat.production.run.stage_context`) as the run itself, so what it
says will run is what the run would submit. Nothing else is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xpcat.config import RunConfig
from xpcat.production import run_state as S
from xpcat.production.run import default_stages, partition_done, stage_context
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = ["dry_run", "model_content_hash"]

#: Partition names listed per stage before "... (n more)".
_SHOWN = 8


def model_content_hash(model_dir: Path) -> str | None:
    """The content hash in a model artifact's manifest (None when there is no artifact)."""
    from xpcat.model.artifact import MANIFEST

    try:
        return json.loads((Path(model_dir) / MANIFEST).read_text())["content_hash"]
    except (OSError, ValueError, KeyError):
        return None


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def dry_run(run_dir: Path, config: RunConfig) -> str:
    """What ``xpcat run`` would do in ``run_dir``: partitions, stars, what is done, what will run.

    Parameters
    ----------
    run_dir : Path
        The run directory (inputs in ``raw/``).
    config : RunConfig
        The run's configuration.

    Returns
    -------
    str
        A few lines of text.

    Raises
    ------
    InputError
        Missing or duplicated inputs (as the run would).
    """
    from xpcat.jobs.clusters import load_profile

    paths = RunPaths.of(run_dir, config)
    config = paths.portable(config)  # as the engine sees it (inputs inside RUN_DIR relative)
    profile = load_profile(config.cluster.profile)
    plan, raw_files = S.plan_partitions(paths.root, config)
    inputs = S.input_fingerprint(paths.root, config)
    model_hash = model_content_hash(paths.model)
    stars = sum(p.rows for p in plan)
    lines = [
        f"dry run of {paths.root}: nothing started; the plan is in {paths.state / 'plan.json'}",
        (f"{stars:,} stars in {len(plan)} partitions at HEALPix level {config.data.partition_level}; cluster profile "
         f"{profile.name!r} ({config.cluster.n_workers} workers x {config.cluster.threads_per_worker} threads)"),
        f"model      {paths.model} (content hash {model_hash})" if model_hash else
        f"model      none at {paths.model}: the run would stop; train one first (`xpcat train {paths.root}`)",
    ]
    will_run = False
    for stage in default_stages(gpu=profile.gpu):
        ctx = stage_context(stage, paths, config, raw_files, inputs, paths.model, model_hash)
        todo = [p.name for p in plan if not partition_done(ctx, stage, p)]
        will_run = will_run or bool(todo)
        stars_todo = sum(p.rows for p in plan if p.name in set(todo))
        line = f"{stage.name:<10} done {len(plan) - len(todo)}  will run {len(todo)} ({stars_todo:,} stars)"
        lines.append(line + (f": {_names(todo)}" if todo else ""))
    built = S.stage_done(paths.root, "catalog")
    if built and not will_run:
        rows = int(built.get("rows") or 0)
        lines.append(f"catalog    built ({rows:,} rows at {paths.catalog}); checked against the fitted partitions, "
                     "rebuilt if they changed")
    else:
        lines.append(f"catalog    will be built at {paths.catalog} once every partition is fitted")
    return "\n".join(lines)

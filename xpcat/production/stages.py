"""The stages the engine runs: what each reads, writes and depends on, and the context its tasks receive.

A :class:`Stage` names its output folder, its per-partition function, the
schema its output must have, the stage whose output it reads, and what its
results depend on (config sections, the model): the engine
(:mod:`xpcat.production.run`) turns that into its done key. Every task of a
stage receives one typed :class:`StageContext`, built once per run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from xpcat.catalog_schema import CATALOG, CONDITIONED
from xpcat.config import RunConfig
from xpcat.production import run_state as S
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = ["Stage", "StageContext", "condition_stage", "infer_stage", "default_stages"]


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
        ``func(ctx: StageContext, part: PartitionPlan) -> dict | None``,
        importable on workers; it must write the output with
        :func:`partitions.atomic_write_parquet`.
    schema : pyarrow.Schema
        Schema the output must have.
    needs : str or None
        ``out_dir`` of the stage whose output this one reads.
    sections : tuple of str
        Config sections that change this stage's results (part of the done key).
    uses_model : bool
        The output depends on the model artifact (its hash is part of the done key).
    resources : dict or None
        Dask worker resources per task (``{"GPU": 1}`` on GPU profiles).
    """

    name: str
    out_dir: str
    func: Callable[..., Any]
    schema: pa.Schema
    needs: str | None = None
    sections: tuple[str, ...] = ()
    uses_model: bool = False
    resources: dict | None = field(default=None)


@dataclass(frozen=True)
class StageContext:
    """What every task of one stage receives (built once per run on the client).

    Attributes
    ----------
    stage : str
    paths : RunPaths
        The run directory's layout.
    config : RunConfig
        The run's frozen, typed configuration.
    raw_files : dict of str -> tuple of str
        The raw Parquet files per table (the plan's input set).
    model_dir, model_hash : str or None
        The model artifact the workers load, and its content hash.
    done_key : str
        Hash of what the stage's output depends on, before its per-partition input.
    """

    stage: str
    paths: RunPaths
    config: RunConfig
    raw_files: dict[str, tuple[str, ...]]
    model_dir: str | None
    model_hash: str | None
    done_key: str

    @property
    def run_dir(self) -> Path:
        return self.paths.root


# ---------------------------------------------------------------- the stages
def _condition(ctx: StageContext, part: S.PartitionPlan) -> dict | None:
    """Condition one source_id range (:func:`xpcat.production.condition.stage.condition_partition`)."""
    from xpcat.production.condition.stage import condition_partition

    raw_files = {k: [Path(f) for f in v] for k, v in ctx.raw_files.items()}
    return condition_partition(raw_files, part.pix, ctx.paths.output(RunPaths.CONDITIONED, part.name), ctx.config,
                               level=part.level, n_expected=part.rows)


def _infer(ctx: StageContext, part: S.PartitionPlan) -> dict | None:
    """Fit one conditioned partition with the worker's model (:func:`xpcat.production.infer.infer_partition`)."""
    from xpcat.jobs.compile_cache import enable_compilation_cache
    from xpcat.jobs.plugins import worker_model
    from xpcat.production.infer import infer_partition

    if ctx.config.inference.compilation_cache:
        enable_compilation_cache(ctx.paths.jax_cache)
    model = worker_model(ctx.model_dir, ctx.model_hash)
    return infer_partition(ctx.paths.output(RunPaths.CONDITIONED, part.name), ctx.paths.output(RunPaths.FITTED, part.name),
                           model, ctx.config)


def condition_stage() -> Stage:
    """raw -> conditioned."""
    return Stage("condition", RunPaths.CONDITIONED, _condition, CONDITIONED, sections=("data", "conditioning"))


def infer_stage(gpu: bool = False) -> Stage:
    """conditioned -> fitted, with the run's model."""
    return Stage("infer", RunPaths.FITTED, _infer, CATALOG, needs=RunPaths.CONDITIONED, sections=("inference",),
                 uses_model=True, resources={"GPU": 1} if gpu else None)


def default_stages(gpu: bool = False) -> list[Stage]:
    """condition -> infer (the catalog follows in :func:`run_stages`)."""
    return [condition_stage(), infer_stage(gpu)]

"""``xpcat status``: done / pending / failed partitions of each stage, by the engine's own done test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xpcat.config import read_run_config
from xpcat.errors import StageError
from xpcat.production import run_state as S
from xpcat.production.run import partition_done, stage_context
from xpcat.production.run_dir import RunPaths
from xpcat.production.stages import StageContext, condition_stage, infer_stage

logger = logging.getLogger(__name__)

__all__ = ["run_status"]


def _model_hash(paths: RunPaths) -> str | None:
    """The content hash in ``RUN_DIR/model``'s manifest (None when there is none)."""
    from xpcat.model.artifact import MANIFEST

    try:
        return json.loads((paths.model / MANIFEST).read_text())["content_hash"]
    except (OSError, ValueError, KeyError):
        return None


def run_status(run_dir: Path) -> str:
    """Done / pending / failed partitions of each stage, and why (text for ``xpcat status``).

    Raises
    ------
    StageError
        When ``run_dir`` holds no planned run.
    """
    plan = S.read_plan(run_dir)
    if not plan:
        raise StageError(f"{run_dir} holds no planned run (no {RunPaths.of(run_dir).plan}); start one with `xpcat run`")
    config = read_run_config(run_dir)
    paths = RunPaths.of(run_dir, config)
    raw_files = {t: tuple(str(f) for f in paths.raw_files(t)) for t in S.STAGE_TABLES}
    inputs = S.input_fingerprint(paths.root, config)
    model_hash = _model_hash(paths)
    failures = S.read_failures(paths.root)
    lines = [f"run {paths.root}: {sum(p.rows for p in plan)} stars in {len(plan)} partitions"]
    for stage in (condition_stage(), infer_stage()):
        ctx: StageContext = stage_context(stage, paths, config, raw_files, inputs, paths.model, model_hash)
        done = [p.name for p in plan if partition_done(ctx, stage, p)]
        failed = {n: d for n, d in failures.get(stage.name, {}).items() if n not in done}
        pending = [p.name for p in plan if p.name not in done and p.name not in failed]
        lines.append(f"{stage.name:<10} done {len(done)}  pending {len(pending)}  failed {len(failed)}")
        for name, doc in sorted(failed.items()):
            last = (doc.get("traceback") or "").strip().splitlines()[-3:]
            lines.append(f"  FAILED {name}: {doc['error']} (after {doc.get('attempts')} attempt(s), {doc.get('time')})")
            lines += [f"    {x}" for x in last if x.strip() and x.strip() not in doc["error"]]
        if pending and len(pending) <= 10:
            lines.append("  pending: " + ", ".join(pending))
        elif pending:
            lines.append("  pending: " + ", ".join(pending[:10]) + f", ... ({len(pending) - 10} more)")
    cat = S.stage_done(paths.root, "catalog")
    if cat:
        lines.append(f"catalog    done: {cat.get('rows')} rows in {cat.get('pixels')} HATS pixels at {paths.catalog}")
    else:
        lines.append("catalog    not built")
    last = paths.state / "last_run.json"
    if last.exists():
        doc = json.loads(last.read_text())
        lines.append(f"last run log: {doc.get('log')}")
    return "\n".join(lines)

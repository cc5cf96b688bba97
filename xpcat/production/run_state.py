"""Run bookkeeping on disk: the plan, the resume check and per-partition failures.

The files are the state (``recipes/hats-catalog.md``, STYLE §4):

- ``state/run.json``: what the run was started with (the config sections that
  change results, the input file set, the model hash). A re-run compares
  itself with it and refuses to resume when something changed, listing what.
- ``state/plan.json``: the partitions owed and their expected row counts
  (rows of ``raw/gaia_source`` in each source_id range).
- ``state/failed/<stage>/<partition>.json``: the error and traceback of a
  partition whose task failed after its retries; removed when it succeeds.
- ``state/<stage>.done``: written only after a rescan finds nothing left.

Done-ness of one partition output is the done marker of
:func:`xpcat.production.partitions.atomic_write_parquet`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xpcat.config import RunConfig, config_to_dict
from xpcat.errors import InputError, StageError
from xpcat.fileio import file_sha256, write_json_atomic
from xpcat.production import partitions as P
from xpcat.production.run_dir import RunPaths

logger = logging.getLogger(__name__)

__all__ = [
    "RESULT_SECTIONS",
    "PartitionPlan",
    "input_fingerprint",
    "check_resume",
    "plan_partitions",
    "read_plan",
    "quick_done",
    "record_failure",
    "clear_failure",
    "read_failures",
    "mark_stage_done",
    "stage_done",
]

#: Config sections whose change alters results: a run refuses to resume across them.
#: ``[cluster]`` (where it runs) may change between attempts.
RESULT_SECTIONS = ("run", "data", "conditioning", "inference", "catalog")
#: Fields of those sections that change how a run runs, not its results (they may change between attempts).
OPERATIONAL_FIELDS = {"inference": ("compilation_cache",)}


@dataclass(frozen=True)
class PartitionPlan:
    """One working partition: a HEALPix-aligned source_id range.

    Attributes
    ----------
    name : str
        ``partition_name(pix, level)``, e.g. ``"L05-001234"``.
    level, pix : int
    lo, hi : int
        source_id range ``[lo, hi)``.
    rows : int
        Number of input source_ids in the range (rows every stage's output must have).
    """

    name: str
    level: int
    pix: int
    lo: int
    hi: int
    rows: int


def _content_id(path: Path) -> str:
    """sha256 of a file: from its done marker when it has a valid-looking one (raw partitions), else hashed."""
    marker = P.read_marker(path)
    try:
        if marker is not None and int(marker["bytes"]) == path.stat().st_size:
            return str(marker["sha256"])
    except (KeyError, TypeError, ValueError, OSError):
        pass
    return file_sha256(path)


def input_fingerprint(run_dir: Path, config: RunConfig) -> dict[str, dict]:
    """The input file set, identified by content: every raw Parquet file and side table.

    Returns
    -------
    dict
        ``{path relative to the run directory (or absolute): {"bytes": size, "sha256": digest}}``;
        a missing side table has ``bytes = -1``. Raw partitions written by
        fetch or ingest carry their digest in their done marker; other files are hashed.
    """
    paths = RunPaths.of(run_dir, config)
    out: dict[str, dict] = {}
    raw = paths.raw
    files = sorted(raw.glob("*/*.parquet")) if raw.is_dir() else []
    extra = [paths.user_file(x) for x in (config.data.tmass, config.data.unwise, config.data.labels,
                                          config.data.reddening)]
    files += [f for f in extra if f is not None]
    for f in files:
        key = paths.relative(f)
        out[key] = ({"bytes": f.stat().st_size, "sha256": _content_id(f)} if f.exists()
                    else {"bytes": -1, "sha256": None})
    return out


def _input_changes(old: dict, new: dict) -> list[str]:
    """What changed in the input set, by content: a renamed or moved file with the same content is no change."""
    if any(isinstance(v, int) for v in old.values()):  # a resume record written before inputs had digests
        new = {k: v["bytes"] for k, v in new.items()}
        return ([f"input added: {f}" for f in sorted(set(new) - set(old))]
                + [f"input removed: {f}" for f in sorted(set(old) - set(new))]
                + [f"input changed: {f} ({old[f]} -> {new[f]} bytes)" for f in sorted(set(old) & set(new))
                   if old[f] != new[f]])
    by_sha_old = {v["sha256"]: k for k, v in old.items()}
    by_sha_new = {v["sha256"]: k for k, v in new.items()}
    changes = []
    for f in sorted(set(old) | set(new)):
        a, b = old.get(f), new.get(f)
        if a == b:
            continue
        if a is None and b["sha256"] in by_sha_old:
            continue  # the same content under another name
        if b is None and a["sha256"] in by_sha_new:
            continue
        if a is None:
            changes.append(f"input added: {f}")
        elif b is None:
            changes.append(f"input removed: {f}")
        else:
            changes.append(f"input changed: {f} ({a['bytes']} -> {b['bytes']} bytes, content differs)")
    return changes


def _result_config(config: RunConfig) -> dict:
    d = config_to_dict(config)
    return {k: {f: v for f, v in d[k].items() if f not in OPERATIONAL_FIELDS.get(k, ())} for k in RESULT_SECTIONS}


def check_resume(run_dir: Path, config: RunConfig, inputs: dict[str, int], model_hash: str | None, *,
                 strict: bool = True) -> bool:
    """Record a new run, or check that a re-run matches the recorded one.

    Parameters
    ----------
    run_dir : Path
    config : RunConfig
    inputs : dict
        From :func:`input_fingerprint` (content, not paths: a moved run directory resumes).
    model_hash : str or None
        Content hash of the model artifact.
    strict : bool
        Compare with the recorded run and refuse on a change (``xpcat run``).
        ``False`` (single-stage commands) only records a new run: their done
        test redoes what changed.

    Returns
    -------
    bool
        True when resuming an earlier run, False for a new run.

    Raises
    ------
    StageError
        When the config's result sections, the input set or the model changed;
        the message lists every difference.
    """
    path = RunPaths.of(run_dir).run_record
    now = {"config": _result_config(config), "inputs": inputs, "model_hash": model_hash}
    if not path.exists():
        write_json_atomic(path, {**now, "started": _dt.datetime.now(_dt.timezone.utc).isoformat()})
        return False
    if not strict:
        return True
    old = json.loads(path.read_text())
    changes: list[str] = []
    for sec, values in now["config"].items():
        for key, value in values.items():
            before = old["config"].get(sec, {}).get(key)
            if before != value:
                changes.append(f"config [{sec}] {key}: {before!r} -> {value!r}")
    changes += _input_changes(old["inputs"], inputs)
    # a run may condition before the model exists (no hash yet); once a model was used, it may not change
    if model_hash is not None and old.get("model_hash") not in (None, model_hash):
        changes.append(f"model artifact: {old.get('model_hash')!r} -> {model_hash!r}")
    if changes:
        shown = "; ".join(changes[:10]) + (f"; ... {len(changes) - 10} more" if len(changes) > 10 else "")
        raise StageError(
            f"{run_dir} holds a run started with different settings; refusing to resume. Changed: {shown}. "
            "Use a new run directory (or restore the original config and inputs)."
        )
    if model_hash is not None and old.get("model_hash") is None:
        write_json_atomic(path, {**old, "model_hash": model_hash})
    return True


#: Raw tables the stages read, in the plan's input set (optional ones may be absent).
STAGE_TABLES = ("gaia_source", "xp_continuous_mean_spectrum", "xp_sampled_spectrum", "tmass", "unwise")


def _duplicates(con: Any, files: tuple[str, ...]) -> str:
    """The first duplicated source_ids of ``files`` with the files holding them ("" when there are none)."""
    rows = con.execute(
        f"SELECT source_id, count(*) AS n, list(DISTINCT filename) FROM read_parquet({list(files)!r}, filename=true) "
        "GROUP BY source_id HAVING n > 1 ORDER BY source_id LIMIT 5"
    ).fetchall()
    return "; ".join(f"{sid} ({n}x, in {', '.join(sorted(Path(f).name for f in names))})" for sid, n, names in rows)


def plan_partitions(run_dir: Path, config: RunConfig) -> tuple[list[PartitionPlan], dict[str, tuple[str, ...]]]:
    """The partitions owed (one per source_id range of ``raw/gaia_source`` holding stars) and the raw files.

    The one scan of a run's source_ids: refuses duplicated source_ids in the
    gaia_source and the XP tables, counts the stars per partition and writes
    ``state/plan.json``.

    Returns
    -------
    plan : list of PartitionPlan
    raw_files : dict of str -> tuple of str
        The Parquet files of each raw table present (:data:`STAGE_TABLES`).

    Raises
    ------
    InputError
        No raw gaia_source files, or duplicated source_ids (the first few named).
    """
    import duckdb

    paths = RunPaths.of(run_dir, config)
    raw_files = {t: tuple(str(f) for f in paths.raw_files(t)) for t in STAGE_TABLES}
    raw_files = {t: fs for t, fs in raw_files.items() if fs}
    src = paths.raw_table("gaia_source")
    if "gaia_source" not in raw_files:
        raise InputError(f"no raw gaia_source Parquet files in {src}; fetch, ingest or simulate inputs first")
    level = config.data.partition_level
    shift = P.partition_shift(level)
    con = duckdb.connect()
    try:
        for table in ("gaia_source", "xp_continuous_mean_spectrum", "xp_sampled_spectrum"):
            if table not in raw_files:
                continue
            dups = _duplicates(con, raw_files[table])
            if dups:
                raise InputError(f"input {paths.raw_table(table)} has duplicated source_id(s): {dups}; "
                                 "each star must appear once")
        rows = con.execute(
            f"SELECT source_id >> {shift} AS pix, count(*) FROM read_parquet({list(raw_files['gaia_source'])!r}) "
            "GROUP BY pix ORDER BY pix"
        ).fetchall()
    except duckdb.Error as err:
        raise InputError(f"cannot read source_ids from {paths.raw}: {err}") from err
    finally:
        con.close()
    plan = []
    for pix, n in rows:
        lo, hi = P.source_id_range(int(pix), level)
        plan.append(PartitionPlan(P.partition_name(int(pix), level), level, int(pix), lo, hi, int(n)))
    write_json_atomic(paths.plan, {"level": level, "partitions": [asdict(p) for p in plan]})
    return plan, raw_files


def read_plan(run_dir: Path) -> list[PartitionPlan]:
    """The plan written by :func:`plan_partitions` ([] when none)."""
    p = RunPaths.of(run_dir).plan
    if not p.exists():
        return []
    return [PartitionPlan(**d) for d in json.loads(p.read_text())["partitions"]]


def quick_done(path: Path, rows: int) -> bool:
    """Cheap done check used by the client's plan: marker present, size and row count agree.

    The task itself re-checks with the full sha256 (:func:`partitions.is_done`).
    """
    m = P.read_marker(path)
    if m is None or not path.is_file():
        return False
    try:
        return path.stat().st_size == int(m["bytes"]) and int(m["rows"]) == int(rows)
    except (KeyError, TypeError, ValueError, OSError):
        return False


def _failure_path(run_dir: Path, stage: str, name: str) -> Path:
    return RunPaths.of(run_dir).failure(stage, name)


def record_failure(run_dir: Path, stage: str, name: str, error: str, traceback_text: str, attempts: int) -> None:
    """Write ``state/failed/<stage>/<name>.json`` with the error and its traceback."""
    write_json_atomic(
        _failure_path(run_dir, stage, name),
        {
            "stage": stage,
            "partition": name,
            "error": error,
            "traceback": traceback_text,
            "attempts": attempts,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        },
    )


def clear_failure(run_dir: Path, stage: str, name: str) -> None:
    """Forget an earlier failure of a partition (it succeeded now)."""
    _failure_path(run_dir, stage, name).unlink(missing_ok=True)


def read_failures(run_dir: Path) -> dict[str, dict[str, dict]]:
    """``{stage: {partition: failure document}}``."""
    out: dict[str, dict[str, dict]] = {}
    root = RunPaths.of(run_dir).state / "failed"
    for f in sorted(root.glob("*/*.json")) if root.is_dir() else []:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out.setdefault(f.parent.name, {})[f.stem] = doc
    return out


def mark_stage_done(run_dir: Path, stage: str, info: dict) -> None:
    """Write ``state/<stage>.done`` (after a rescan found nothing left)."""
    write_json_atomic(RunPaths.of(run_dir).stage_marker(stage), info)


def stage_done(run_dir: Path, stage: str) -> dict | None:
    """The ``state/<stage>.done`` document, or None."""
    p = RunPaths.of(run_dir).stage_marker(stage)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None

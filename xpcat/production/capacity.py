"""``xpcat plan``: measured rates -> partitions, storage and node-hours for a full run.

The rates come from the JSON printed by ``benchmarks/pipeline.py`` (stars/s
per worker for each stage, bytes per star on disk, peak memory per worker, the
machine it ran on). Nothing is assumed that was not measured: without a
benchmark file the plan refuses to guess.

Which file: ``--benchmark FILE``, else ``$XPCAT_BENCHMARK_JSON``, else the
10^6-star run (:data:`MILLION_BENCHMARK`, ``benchmarks/results/pipeline_1e6.json``)
when it is there and valid, else :data:`DEFAULT_BENCHMARK`
(``benchmarks/results/pipeline.json``, 10^5 stars). A 10^6-star file that
cannot be used (unreadable, not the benchmark's JSON, or its stars check
failed) is skipped with a warning, never half-used.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from xpcat.config import RunConfig
from xpcat.errors import InputError, XpcatError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BENCHMARK",
    "MILLION_BENCHMARK",
    "PLAN_MAX_STARS",
    "check_plan_stars",
    "load_benchmark",
    "plan_numbers",
    "plan_run",
]

_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
#: Where ``benchmarks/pipeline.py --out`` saves its result in a source checkout (10^5 stars).
DEFAULT_BENCHMARK = _RESULTS / "pipeline.json"
#: Where ``benchmarks/pipeline.py --million`` saves its 10^6-star result; preferred when present.
MILLION_BENCHMARK = _RESULTS / "pipeline_1e6.json"
_STAGES = ("condition", "infer", "catalog")
#: Most stars a plan takes: well above any Gaia release (DR3: 1,811,709,771 sources, 219,197,643 with XP spectra).
PLAN_MAX_STARS = 5_000_000_000


def check_plan_stars(stars: int, level: int) -> None:
    """Refuse a star count no run can have: fewer than one star per partition, or more than any Gaia release.

    Parameters
    ----------
    stars : int
    level : int
        HEALPix level of the working partitions (``12 * 4**level`` of them).

    Raises
    ------
    InputError
        Naming the value and the accepted range.
    """
    n_part = 12 * 4**level
    if stars > PLAN_MAX_STARS:
        raise InputError(f"--stars {stars:,} is more than any Gaia release holds; a plan takes at most "
                         f"{PLAN_MAX_STARS:,} (Gaia DR3: 219,197,643 sources with XP spectra)")
    if stars < n_part:
        raise InputError(f"--stars {stars:,} is fewer than the {n_part:,} partitions of HEALPix level {level}: a plan "
                         f"needs at least one star per partition; run a small set directly (`xpcat demo`, `xpcat run`)")


def _read_benchmark(path: Path) -> dict:
    """The benchmark JSON of ``path``.

    Raises
    ------
    InputError
        Unreadable, not the JSON of ``benchmarks/pipeline.py``, or a run whose stars check failed.
    """
    try:
        text = Path(path).read_text().strip().splitlines()
        doc = json.loads(text[-1]) if text and text[-1].startswith("{") else json.loads("\n".join(text))
    except (OSError, ValueError, IndexError) as err:
        raise InputError(f"benchmark file {path}: not the JSON of benchmarks/pipeline.py ({err})") from err
    if not isinstance(doc, dict):
        raise InputError(f"benchmark file {path}: not the JSON of benchmarks/pipeline.py (a {type(doc).__name__})")
    for key in ("stages", "bytes_per_star", "machine"):
        if key not in doc:
            raise InputError(f"benchmark file {path}: missing {key!r}; expected the JSON of benchmarks/pipeline.py")
    check = doc.get("stars_check")
    if isinstance(check, dict) and check.get("ok") is False:
        raise InputError(f"benchmark file {path}: its run did not hold every star exactly once (stars_check: "
                         f"{ {k: check.get(k) for k in ('expected', 'fitted', 'catalog')} }); its rates are not used")
    return doc


def load_benchmark(path: Path | None = None) -> tuple[dict, Path]:
    """The measured rates a plan uses, and the file they came from.

    Parameters
    ----------
    path : Path, optional
        An explicit file; otherwise ``$XPCAT_BENCHMARK_JSON``, else :data:`MILLION_BENCHMARK`
        when present and usable, else :data:`DEFAULT_BENCHMARK`.

    Raises
    ------
    XpcatError
        No benchmark file; InputError for a malformed explicit one.
    """
    if path is not None:
        return _read_benchmark(Path(path)), Path(path)
    env = os.environ.get("XPCAT_BENCHMARK_JSON")
    if env:
        return _read_benchmark(Path(env)), Path(env)
    if MILLION_BENCHMARK.is_file():
        try:
            return _read_benchmark(MILLION_BENCHMARK), MILLION_BENCHMARK
        except InputError as err:
            logger.warning("not using the 10^6-star benchmark: %s; falling back to %s", err, DEFAULT_BENCHMARK)
    if not DEFAULT_BENCHMARK.is_file():
        raise XpcatError(
            f"no measured rates: {DEFAULT_BENCHMARK} does not exist. Run `python benchmarks/pipeline.py --out "
            f"{DEFAULT_BENCHMARK}` (or pass --benchmark FILE with its JSON)"
        )
    return _read_benchmark(DEFAULT_BENCHMARK), DEFAULT_BENCHMARK


def plan_numbers(stars: int, profile_name: str, bench: dict, config: RunConfig | None = None) -> dict:
    """The numbers of a plan (see :func:`plan_run`).

    Parameters
    ----------
    stars : int
        Stars to process.
    profile_name : str
        Cluster profile (its ``node`` section gives cores / GPUs per node).
    bench : dict
        The benchmark JSON.
    config : RunConfig, optional
        Partition level and worker threads (defaults otherwise).

    Returns
    -------
    dict
    """
    from xpcat.jobs.clusters import load_profile

    cfg = config or RunConfig()
    check_plan_stars(stars, cfg.data.partition_level)
    profile = load_profile(profile_name)
    gpu = profile.gpu
    machine = bench["machine"]
    if gpu and not machine.get("gpu"):
        raise XpcatError(
            f"profile {profile.name!r} runs inference on GPUs, but the benchmark ran on {machine.get('cpu_model')} "
            "without a GPU; run benchmarks/pipeline.py on a GPU node for this plan"
        )
    level = cfg.data.partition_level
    n_part_max = 12 * 4**level
    node_cores = profile.node.get("cores") or machine.get("cores") or 1
    node_gpus = int(profile.node.get("gpus") or 0)
    threads = int(bench.get("threads_per_worker", 1))
    stage_out = {}
    total_node_h = 0.0
    for st in _STAGES:
        s = bench["stages"].get(st)
        if not s or not s.get("stars_per_s_per_worker"):
            raise InputError(f"benchmark has no stars_per_s_per_worker for stage {st!r}")
        rate = float(s["stars_per_s_per_worker"])
        worker_h = stars / rate / 3600.0
        if gpu and st == "infer":
            node_h = worker_h / max(node_gpus, 1)
            unit = "GPU-hours"
        else:
            node_h = worker_h * threads / node_cores
            unit = "core-hours"
        stage_out[st] = {"stars_per_s_per_worker": rate, "worker_hours": worker_h,
                         "resource_hours": worker_h * (1 if unit == "GPU-hours" else threads), "unit": unit,
                         "node_hours": node_h}
        total_node_h += node_h
    storage = {k: float(v) * stars for k, v in bench["bytes_per_star"].items()}
    return {
        "stars": stars,
        "profile": profile.name,
        "partition_level": level,
        "partitions_max": n_part_max,
        "stars_per_partition_mean": stars / n_part_max,
        "stages": stage_out,
        "node_hours": total_node_h,
        "node": {"cores": node_cores, "gpus": node_gpus},
        "storage_bytes": storage,
        "peak_memory_mib_per_worker": bench.get("peak_memory_mib_per_worker"),
        "measured_on": machine.get("cpu_model"),
        "measured_stars": bench.get("stars"),
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} PB"


def plan_run(stars: int, profile: str, benchmark_json: Path | None) -> str:
    """``xpcat plan``: partitions, storage and node-hours for ``stars`` on ``profile``.

    Parameters
    ----------
    stars : int
        E.g. 219 197 643 (Gaia DR3 sources with XP spectra).
    profile : str
        Cluster profile name or path.
    benchmark_json : Path or None
        JSON printed by ``benchmarks/pipeline.py`` (default: ``$XPCAT_BENCHMARK_JSON``, else
        ``benchmarks/results/pipeline_1e6.json`` when present, else ``benchmarks/results/pipeline.json``).

    Returns
    -------
    str
        A readable plan, ending with the numbers as one JSON line.

    Raises
    ------
    XpcatError
        No benchmark, a malformed one, a GPU profile with a CPU-only benchmark, or a star count
        out of range (:func:`check_plan_stars`).
    """
    check_plan_stars(stars, RunConfig().data.partition_level)
    bench, path = load_benchmark(benchmark_json)
    n = plan_numbers(stars, profile, bench)
    lines = [
        f"plan for {stars:,} stars on profile {n['profile']!r} (rates measured by {path} on "
        f"{n['measured_on']}, {n['measured_stars']} stars)",
        f"partitions: level {n['partition_level']} -> at most {n['partitions_max']:,} source_id ranges, "
        f"{n['stars_per_partition_mean']:,.0f} stars each on average",
    ]
    for st, s in n["stages"].items():
        lines.append(f"{st:<10} {s['stars_per_s_per_worker']:>10.1f} stars/s/worker  "
                     f"{s['resource_hours']:>12,.1f} {s['unit']}  {s['node_hours']:>10,.1f} node-hours")
    lines.append(f"total      {n['node_hours']:,.1f} node-hours (node: {n['node']['cores']} cores, {n['node']['gpus']} GPUs)")
    for k, v in n["storage_bytes"].items():
        lines.append(f"storage    {k:<12} {_human_bytes(v)}")
    if n["peak_memory_mib_per_worker"]:
        lines.append(f"memory     peak {n['peak_memory_mib_per_worker']:,.0f} MiB per worker "
                     f"-> at most {math.floor(64 * 1024 / max(n['peak_memory_mib_per_worker'], 1))} workers per 64 GiB node")
    lines.append(json.dumps(n, default=str))
    return "\n".join(lines)

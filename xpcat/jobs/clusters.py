"""Dask clusters from profiles: ``LocalCluster``, ``SLURMCluster``, ``PBSCluster``.

A profile is a YAML file (``xpcat/jobs/profiles/<name>.yaml`` or a path) with

``kind``
    ``local``, ``slurm`` or ``pbs``.
``gpu``
    Whether workers hold one GPU each; inference tasks then ask for the
    worker resource ``GPU=1``.
``cluster``
    Keyword arguments of the dask-jobqueue class (``walltime``,
    ``job_extra_directives``, ``job_script_prologue``, ``worker_extra_args``,
    ...). ``{cores}`` and ``{memory}`` in ``resource_spec`` are filled in.
``node``
    What one compute node offers (``cores``, ``gpus``), used by ``xpcat plan``.

The run config's ``[cluster]`` section sizes the cluster: ``threads_per_worker``
becomes ``cores``, ``memory_limit`` becomes ``memory``, ``lifetime`` /
``lifetime_stagger`` become the worker's ``--lifetime`` / ``--lifetime-stagger``
and ``options`` override the profile's keyword arguments. Job-queue clusters
run one worker process per job and scale with ``adapt`` between
``min_workers`` and ``n_workers`` jobs, so that workers whose walltime ends are
replaced (``recipes/slurm-single-node.md``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xpcat.config import ClusterConfig
from xpcat.errors import XpcatError

logger = logging.getLogger(__name__)

__all__ = ["ClusterProfileError", "Profile", "PROFILE_DIR", "available_profiles", "load_profile", "accepted_options",
           "check_options", "cluster_kwargs", "open_cluster"]

#: Folder of the shipped profiles.
PROFILE_DIR = Path(__file__).with_name("profiles")
_KINDS = ("local", "slurm", "pbs")
_TOP_KEYS = {"kind", "description", "gpu", "cluster", "node"}


class ClusterProfileError(XpcatError, ValueError):
    """A cluster profile is unknown or malformed, or dask-jobqueue rejects one of its options."""


@dataclass(frozen=True)
class Profile:
    """A parsed cluster profile.

    Attributes
    ----------
    name : str
        Profile name (file stem).
    kind : str
        ``"local"``, ``"slurm"`` or ``"pbs"``.
    gpu : bool
        Workers hold one GPU each (worker resource ``GPU=1``).
    cluster : dict
        Keyword arguments of the cluster class.
    node : dict
        ``cores`` and ``gpus`` of one compute node (planning).
    description : str
    path : Path
    """

    name: str
    kind: str
    gpu: bool
    cluster: dict[str, Any] = field(default_factory=dict)
    node: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None


def available_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Read a profile by name (shipped) or path (``.yaml``).

    Raises
    ------
    ClusterProfileError
        Unknown name, unreadable YAML, an unknown key or kind.
    """
    s = str(name_or_path)
    path = Path(s) if (s.endswith((".yaml", ".yml")) or os.sep in s) else PROFILE_DIR / f"{s}.yaml"
    if not path.is_file():
        raise ClusterProfileError(
            f"unknown cluster profile {s!r}: no file {path}; shipped profiles: {', '.join(available_profiles())}"
        )
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ClusterProfileError(f"cluster profile {path}: not valid YAML: {err}") from err
    if not isinstance(doc, dict):
        raise ClusterProfileError(f"cluster profile {path}: expected a mapping, got {type(doc).__name__}")
    bad = sorted(set(doc) - _TOP_KEYS)
    if bad:
        raise ClusterProfileError(f"cluster profile {path}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(_TOP_KEYS))}")
    kind = doc.get("kind")
    if kind not in _KINDS:
        raise ClusterProfileError(f"cluster profile {path}: kind = {kind!r}; must be one of {', '.join(_KINDS)}")
    for key in ("cluster", "node"):
        if not isinstance(doc.get(key) or {}, dict):
            raise ClusterProfileError(f"cluster profile {path}: {key!r} must be a mapping, got {doc[key]!r}")
    return Profile(
        name=path.stem,
        kind=kind,
        gpu=bool(doc.get("gpu", False)),
        cluster=dict(doc.get("cluster") or {}),
        node=dict(doc.get("node") or {}),
        description=str(doc.get("description", "")),
        path=path,
    )


def _lifetime_args(cfg: ClusterConfig) -> list[str]:
    args: list[str] = []
    if cfg.lifetime:
        args += ["--lifetime", cfg.lifetime]
        if cfg.lifetime_stagger:
            args += ["--lifetime-stagger", cfg.lifetime_stagger]
    elif cfg.lifetime_stagger:
        raise ClusterProfileError(f"[cluster] lifetime_stagger = {cfg.lifetime_stagger!r} needs a lifetime")
    return args


def cluster_kwargs(profile: Profile, cfg: ClusterConfig, *, log_dir: Path | None = None) -> dict[str, Any]:
    """Keyword arguments for the profile's cluster class, with the run config applied.

    Parameters
    ----------
    profile : Profile
    cfg : ClusterConfig
        The run's ``[cluster]`` section.
    log_dir : Path, optional
        Where job-queue workers write their job logs.

    Returns
    -------
    dict
    """
    from dask.utils import parse_bytes

    try:
        mem_bytes = parse_bytes(cfg.memory_limit)
    except (ValueError, TypeError) as err:
        raise ClusterProfileError(f"[cluster] memory_limit = {cfg.memory_limit!r} is not a size like '4GiB'") from err
    if profile.kind == "local":
        kw: dict[str, Any] = {
            "n_workers": cfg.n_workers,
            "threads_per_worker": cfg.threads_per_worker,
            "memory_limit": mem_bytes,
            "processes": True,
            "dashboard_address": ":0",
        }
        if cfg.lifetime:
            kw["lifetime"] = cfg.lifetime
            if cfg.lifetime_stagger:
                kw["lifetime_stagger"] = cfg.lifetime_stagger
        if profile.gpu:
            kw["resources"] = {"GPU": 1}
        kw.update(profile.cluster)
        kw.update(cfg.options)
        if not kw.get("processes", True):
            # in-process workers measure the whole process's memory (the client's, every thread's): a per-worker
            # limit would pause them as soon as the process holds more than it, with tasks left waiting forever
            kw["memory_limit"] = 0
        return kw
    kw = {"cores": cfg.threads_per_worker, "memory": cfg.memory_limit, "processes": 1}
    kw.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in profile.cluster.items()})
    options = dict(cfg.options)
    # the profile's and the run's own worker arguments, then the lifetime ones (options must not drop those)
    extra = (list(kw.get("worker_extra_args") or []) + list(options.pop("worker_extra_args", None) or [])
             + _lifetime_args(cfg))
    if "--preload" not in extra:  # heavy imports before the worker registers (see xpcat.jobs.preload)
        extra += ["--preload", "xpcat.jobs.preload"]
    kw["worker_extra_args"] = extra
    if log_dir is not None:
        kw.setdefault("log_directory", str(log_dir))
    kw.setdefault("scheduler_options", {"dashboard_address": ":0"})
    kw.update(options)
    if isinstance(kw.get("resource_spec"), str):
        from dask_jobqueue.pbs import pbs_format_bytes_ceil

        kw["resource_spec"] = kw["resource_spec"].format(
            cores=kw["cores"], memory=pbs_format_bytes_ceil(parse_bytes(kw["memory"]))
        )
    if int(kw.get("processes", 1)) != 1:
        raise ClusterProfileError(
            f"profile {profile.name!r}: processes = {kw['processes']!r}; job-queue profiles run one worker process per "
            "job (more loops adapt between starting and stopping jobs)"
        )
    return kw


def _cluster_class(kind: str):
    if kind == "local":
        from distributed import LocalCluster

        return LocalCluster
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster

        return SLURMCluster
    from dask_jobqueue import PBSCluster

    return PBSCluster


def _parameters(*callables: Any) -> set[str]:
    """Names of the named parameters of ``callables`` (not ``self``, ``*args`` or ``**kwargs``)."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for c in callables for p in inspect.signature(c).parameters.values()
            if p.kind in named and p.name != "self"}


def accepted_options(kind: str) -> set[str]:
    """The keyword arguments the cluster class of a profile kind takes.

    ``LocalCluster`` passes the keywords it does not know to its workers
    (``Nanny``, then ``Worker`` and its ``Server``), which fail to start on one
    they do not know either; a dask-jobqueue class passes them to its job class
    (e.g. ``SLURMJob``, then ``Job``). The accepted set is the union of those
    signatures.

    Parameters
    ----------
    kind : str
        ``"local"``, ``"slurm"`` or ``"pbs"``.

    Returns
    -------
    set of str
    """
    cls = _cluster_class(kind)
    if kind == "local":
        from distributed import Nanny, Worker
        from distributed.core import Server

        return _parameters(cls.__init__, Nanny.__init__, Worker.__init__, Server.__init__)
    from dask_jobqueue.core import Job

    return _parameters(cls.__init__, cls.job_cls.__init__, Job.__init__)


def check_options(profile: Profile, options: dict[str, Any], *, source: str = "") -> None:
    """Refuse keyword arguments that the profile's cluster class cannot take.

    Parameters
    ----------
    profile : Profile
    options : dict
        ``[cluster] options`` (or the profile's own ``cluster`` mapping).
    source : str
        Where ``options`` come from, for the message (default: the run config).

    Raises
    ------
    ClusterProfileError
        Naming each rejected key and its value, the class and the profile.
    """
    if not options:
        return
    known = accepted_options(profile.kind)
    bad = sorted(k for k in options if k not in known)
    if not bad:
        return
    cls = _cluster_class(profile.kind)
    shown = ", ".join(f"{k} = {options[k]!r}" for k in bad)
    hint = ("; job-queue options such as queue or account need a slurm or pbs profile" if profile.kind == "local"
            else "")
    what = "is not a keyword argument" if len(bad) == 1 else "are not keyword arguments"
    raise ClusterProfileError(f"{shown}{' in ' + source if source else ''} {what} of {cls.__name__}, "
                              f"the cluster class of profile {profile.name!r}{hint}")


def _quiet_distributed() -> None:
    """Silence distributed's warnings in this process (workers and the client at shutdown)."""
    logging.getLogger("distributed").setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet_shutdown(client: Any) -> Iterator[None]:
    """Close without the workers' and nannies' shutdown warnings (unless logging at DEBUG).

    A worker still busy when its nanny stops it, or one whose scheduler went
    first, warns on the way out; at the end of a run that is noise.
    """
    log = logging.getLogger("distributed")
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    old = log.level
    with contextlib.suppress(OSError, TimeoutError):  # the scheduler or a worker already gone: nothing to quiet there
        client.run(_quiet_distributed, on_error="ignore")
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


@contextlib.contextmanager
def open_cluster(cfg: ClusterConfig, *, log_dir: Path | None = None) -> Iterator[tuple[Any, Any, Profile]]:
    """Start the cluster of ``cfg.profile`` and a client; close both on exit.

    Parameters
    ----------
    cfg : ClusterConfig
        The run's ``[cluster]`` section.
    log_dir : Path, optional
        Folder for job-queue job logs.

    Yields
    ------
    (cluster, client, profile)

    Raises
    ------
    ClusterProfileError
        Unknown profile, or an option the cluster class rejects (named).
    """
    from distributed import Client

    profile = load_profile(cfg.profile)
    check_options(profile, profile.cluster, source=f"profile {profile.path}")
    check_options(profile, cfg.options, source="[cluster] options")
    kw = cluster_kwargs(profile, cfg, log_dir=log_dir)
    cls = _cluster_class(profile.kind)
    if profile.kind != "local":
        submit = "sbatch" if profile.kind == "slurm" else "qsub"
        import shutil

        if shutil.which(submit) is None:
            raise ClusterProfileError(f"profile {profile.name!r} submits jobs with {submit!r}, which is not on PATH")
    try:
        cluster = cls(**kw)
    except (TypeError, ValueError) as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(kw.items()) if k in cfg.options) or "none"
        raise ClusterProfileError(
            f"profile {profile.name!r}: {cls.__name__} rejected the options ({err}); [cluster] options given: {shown}"
        ) from err
    try:
        if profile.kind != "local":
            cluster.adapt(minimum_jobs=cfg.min_workers, maximum_jobs=cfg.n_workers)
            logger.info("%s adapting between %d and %d jobs", cls.__name__, cfg.min_workers, cfg.n_workers)
            logger.debug("job script:\n%s", cluster.job_script())
        client = Client(cluster)
        try:
            yield cluster, client, profile
        finally:
            with _quiet_shutdown(client):
                client.close()
                cluster.close()
    finally:
        cluster.close()  # idempotent; here for a cluster whose client never started

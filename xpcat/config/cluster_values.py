"""The checks of ``[cluster]`` values that Dask would otherwise reject only when the workers start.

A bad ``lifetime`` or an option that the profile's cluster class cannot take
reached ``LocalCluster`` unchecked and ended in ~150 lines of tracebacks
("Nanny failed to start"). :func:`check_cluster_values` runs when the section
is made (so when the config is read) and raises one :class:`ConfigError`
naming the field and its value.
"""

from __future__ import annotations

import logging
from typing import Any

from xpcat.config.fields import ConfigError

__all__ = ["check_cluster_values", "parse_duration_s"]

logger = logging.getLogger(__name__)


def parse_duration_s(value: str) -> float:
    """A Dask time string (``'30m'``, ``'1h'``, ``'90 seconds'``) in seconds.

    Raises
    ------
    ValueError
        When Dask cannot read it.
    """
    from dask.utils import parse_timedelta

    try:
        seconds = parse_timedelta(value)
    except (ValueError, KeyError, IndexError, TypeError) as err:  # parse_timedelta raises all four
        raise ValueError(str(err)) from err
    if seconds is None:
        raise ValueError("no duration")
    return float(seconds)


def _check_duration(name: str, value: str) -> None:
    try:
        seconds = parse_duration_s(value)
    except ValueError as err:
        raise ConfigError(f"[cluster] {name} = {value!r}: not a duration; use a Dask time string like '30m', "
                          "'2h' or '90s'") from err
    if seconds <= 0:
        raise ConfigError(f"[cluster] {name} = {value!r}: must be a positive duration like '30m'")


def _check_memory(value: str) -> None:
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"[cluster] memory_limit = {value!r}: not a size; use one like '4GiB' or '16GB'") from err
    if n <= 0:
        raise ConfigError(f"[cluster] memory_limit = {value!r}: must be a positive size like '4GiB'")


def check_cluster_values(cfg: Any) -> None:
    """Check ``lifetime``, ``lifetime_stagger``, ``memory_limit`` and ``options`` of a ``[cluster]`` section.

    ``options`` are checked against the keyword arguments of the profile's
    cluster class (:func:`xpcat.jobs.clusters.check_options`) when the profile
    can be read; an unknown profile is reported when the cluster opens.

    Parameters
    ----------
    cfg : ClusterConfig

    Raises
    ------
    ConfigError
        Naming the field and its value.
    """
    if cfg.lifetime:
        _check_duration("lifetime", cfg.lifetime)
    if cfg.lifetime_stagger:
        if not cfg.lifetime:
            raise ConfigError(f"[cluster] lifetime_stagger = {cfg.lifetime_stagger!r} needs a lifetime (e.g. "
                              "lifetime = '30m')")
        _check_duration("lifetime_stagger", cfg.lifetime_stagger)
    _check_memory(cfg.memory_limit)
    if cfg.options:
        from xpcat.jobs.clusters import ClusterProfileError, check_options, load_profile

        try:
            profile = load_profile(cfg.profile)
        except ClusterProfileError as err:
            logger.debug("[cluster] options not checked: %s", err)
            return
        try:
            check_options(profile, cfg.options)
        except ClusterProfileError as err:
            raise ConfigError(f"[cluster] options: {err}") from err

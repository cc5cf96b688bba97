"""What ``xpcat demo`` checks before it touches anything: the universe's size and the work directory.

A demo that cannot train (too few stars for one training batch) is refused at
once with the smallest size that can, and a work directory made with other
parameters is refused before anything in it is simulated again or fetched:
re-running the demo there resumes only when the parameters match.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from xpcat.config import RunConfig, config_to_dict, read_run_config
from xpcat.errors import InputError, StageError
from xpcat.production.run_dir import RunPaths
from xpcat.production.run_state import OPERATIONAL_FIELDS

logger = logging.getLogger(__name__)

__all__ = ["TRAINING_YIELD", "check_demo_size", "check_demo_workdir", "minimum_demo_stars", "universe_config"]

#: Fraction of the labelled stars outside the validation split that pass the HQ cut (Eq. 15) and
#: self-cleaning, each of which must leave one training batch. Measured on the demo (seed 42):
#: 6000 stars, 3000 labelled: 916 HQ, 837 kept -> 837 / (3000 x 0.8) = 0.349;
#: 4000 stars, 2000 labelled: 572 HQ, 575 kept -> 572 / (2000 x 0.8) = 0.358.
TRAINING_YIELD = 0.35
#: Expected stars per training batch that a demo size must reach (the 4000-star demo had 1.12).
_MARGIN = 1.1
#: ``[data]`` fields holding file paths (relative to the run directory unless absolute).
_PATH_FIELDS = ("raw_dir", "unwise", "labels", "reddening")


def minimum_demo_stars(config: RunConfig) -> int:
    """The smallest universe whose training set fills one batch after the cuts and self-cleaning.

    ``ceil(1.1 B / (f_label (1 - f_val) TRAINING_YIELD))`` rounded up to a
    hundred, with ``B`` = ``[training] batch_size``, ``f_label`` =
    ``[simulate] label_fraction`` and ``f_val`` = ``[training] validation_fraction``
    (4100 stars with the defaults).

    Returns
    -------
    int
        Stars; 0 when no size suffices (no labelled stars).
    """
    per_star = config.simulate.label_fraction * (1.0 - config.training.validation_fraction) * TRAINING_YIELD
    if per_star <= 0:
        return 0
    return int(math.ceil(_MARGIN * config.training.batch_size / per_star / 100.0) * 100)


def check_demo_size(config: RunConfig) -> None:
    """Refuse a demo universe too small to train the model on.

    Raises
    ------
    InputError
        Naming the requested size, the smallest that works and the setting that decides it.
    """
    n = config.simulate.n_stars
    low = minimum_demo_stars(config)
    if low == 0:
        raise InputError(f"[simulate] label_fraction = {config.simulate.label_fraction}: the demo trains on "
                         "labelled stars and needs some")
    if n < low:
        raise InputError(
            f"--stars {n} is too few to train on: the smallest demo is --stars {low} (one training batch of "
            f"[training] batch_size = {config.training.batch_size} stars after the training-set cuts and "
            "self-cleaning); a smaller batch_size in --config lowers it"
        )


def universe_config(universe: Path) -> dict | None:
    """The ``[simulate]`` values a universe was made with (its ``universe.json``), or None when it has none."""
    info = Path(universe) / "universe.json"
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text()).get("config")
    except (OSError, ValueError) as err:
        logger.warning("demo: %s unreadable (%s); the universe will be simulated again", info, err)
        return None


def _comparable(config: RunConfig, paths: RunPaths) -> dict[str, dict]:
    """The config sections that change a demo's results, with ``[data]`` paths resolved in the work directory."""
    d = config_to_dict(config)
    d.pop("cluster")  # where it runs, not what it makes
    for section, names in OPERATIONAL_FIELDS.items():
        for name in names:
            d[section].pop(name, None)
    for name in _PATH_FIELDS:
        value = d["data"].get(name)
        if value:
            d["data"][name] = str(paths.user_file(value).resolve())
    return d


def check_demo_workdir(workdir: Path, config: RunConfig) -> None:
    """Refuse a work directory that holds a demo made with other parameters.

    Compares the universe (``universe/universe.json``) with ``[simulate]`` and
    the run's frozen ``config.toml`` with ``config`` (every section but
    ``[cluster]``), before anything is simulated, fetched or trained.

    Raises
    ------
    StageError
        Listing the differences and how to resume or start afresh.
    """
    workdir = Path(workdir)
    paths = RunPaths.of(workdir, config)
    want = config_to_dict(config)["simulate"]
    have = universe_config(workdir / "universe")
    changes: list[str] = []
    if have is not None:
        changes += [f"[simulate] {k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
    if paths.config_file.is_file():
        old, new = _comparable(read_run_config(workdir), paths), _comparable(config, paths)
        changes += [f"[{s}] {k}: {old[s].get(k)!r} -> {v!r}" for s in new for k, v in new[s].items()
                    if old[s].get(k) != v and not (s == "simulate" and have is not None)]
    if not changes:
        return
    universe_differs = any(c.startswith("[simulate]") for c in changes)
    made = f"--stars {have['n_stars']} --seed {have['seed']}" if have and universe_differs else "other settings"
    raise StageError(
        f"{workdir} holds a demo made with {made}; refusing to change it ({'; '.join(changes[:6])}"
        f"{'; ...' if len(changes) > 6 else ''}). Re-run with its parameters to resume it, or use another --workdir"
    )

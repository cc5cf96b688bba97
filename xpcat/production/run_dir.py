"""The run directory's layout: the one object that knows where every file of a run lives.

::

    RUN_DIR/config.toml                 resolved configuration (paths in it relative to RUN_DIR)
    RUN_DIR/raw/<table>/*.parquet       raw tables (``[data] raw_dir``, relative unless absolute)
    RUN_DIR/conditioned/<part>.parquet  condition stage output (+ ``.done`` markers)
    RUN_DIR/model/                      trained artifact
    RUN_DIR/fitted/<part>.parquet       infer stage output (+ ``.done`` markers)
    RUN_DIR/catalog/                    the HATS catalog
    RUN_DIR/report/                     index.html, figures, validation.json
    RUN_DIR/truth/                      synthetic truth (demo and simulate only)
    RUN_DIR/logs/                       run logs; ``logs/jobs/`` job-queue logs
    RUN_DIR/state/                      plan, resume record, failures, stage markers, locks
    RUN_DIR/state/jax-cache/            JAX's persistent compilation cache
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["DATA_PATH_FIELDS", "RunPaths"]

#: ``[data]`` fields that name files or folders (stored relative to the run directory when inside it).
DATA_PATH_FIELDS = ("raw_dir", "tmass", "unwise", "labels", "reddening")


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run directory.

    Attributes
    ----------
    root : Path
        The run directory (absolute).
    raw_setting : str
        ``[data] raw_dir``: the raw tables' folder, relative to ``root`` unless absolute.
    """

    root: Path
    raw_setting: str = "raw"

    #: The per-partition stage folders (a stage's ``out_dir``).
    CONDITIONED: ClassVar[str] = "conditioned"
    FITTED: ClassVar[str] = "fitted"

    @classmethod
    def of(cls, run_dir: str | os.PathLike, config: object | None = None) -> "RunPaths":
        """The paths of ``run_dir`` under ``config`` (a :class:`xpcat.config.RunConfig`; defaults when None)."""
        raw = getattr(getattr(config, "data", None), "raw_dir", "raw") or "raw"
        return cls(Path(run_dir).resolve(), str(raw))

    # ---------------------------------------------------------------- inputs
    @property
    def raw(self) -> Path:
        """The raw tables' folder."""
        p = Path(self.raw_setting)
        return p if p.is_absolute() else self.root / p

    def raw_table(self, table: str) -> Path:
        """Folder of one raw table (``raw/<table>``)."""
        return self.raw / table

    def raw_files(self, table: str) -> list[Path]:
        """The Parquet files of one raw table, sorted ([] when there are none)."""
        return sorted(self.raw_table(table).glob("*.parquet"))

    def user_file(self, setting: str) -> Path | None:
        """A user file named in the config (``[data] labels`` ...): relative to the run directory unless absolute."""
        if not setting:
            return None
        p = Path(setting).expanduser()
        return p if p.is_absolute() else self.root / p

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` relative to the run directory when it lies inside it, else absolute (for config.toml)."""
        p = Path(path).expanduser().resolve()
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def portable(self, config: Any) -> Any:
        """``config`` with its ``[data]`` paths inside the run directory made relative to it.

        A run directory that is copied or moved then still names its own
        inputs (``config.toml`` and the resume record hold no absolute path
        into it). Paths outside it stay absolute.
        """
        data = config.data
        changes = {}
        for name in DATA_PATH_FIELDS:
            value = getattr(data, name)
            if value and Path(value).expanduser().is_absolute():
                rel = self.relative(value)
                if rel != value:
                    changes[name] = rel
        return config.replace(data=changes) if changes else config

    # ---------------------------------------------------------------- stage folders
    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def conditioned(self) -> Path:
        return self.root / self.CONDITIONED

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def fitted(self) -> Path:
        return self.root / self.FITTED

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def catalog_partial(self) -> Path:
        """Where the catalog is built before it is swapped in whole."""
        return self.root / "catalog.partial"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def truth(self) -> Path:
        return self.root / "truth"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def job_logs(self) -> Path:
        return self.logs / "jobs"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def jax_cache(self) -> Path:
        return self.state / "jax-cache"

    @property
    def run_record(self) -> Path:
        """``state/run.json``: what the run was started with (the resume check)."""
        return self.state / "run.json"

    @property
    def plan(self) -> Path:
        """``state/plan.json``: the partitions owed."""
        return self.state / "plan.json"

    @property
    def confidence_state(self) -> Path:
        """``state/confidence.json``: what ``xpcat train-confidence`` trained (AUCs, counts, fallbacks)."""
        return self.state / "confidence.json"

    @property
    def confidence_stars(self) -> Path:
        """``state/confidence_stars.npz``: the classifiers' per-star training set (diagnostics)."""
        return self.state / "confidence_stars.npz"

    def output(self, out_dir: str, name: str) -> Path:
        """Partition ``name`` of a stage's output folder: ``RUN_DIR/<out_dir>/<name>.parquet``."""
        return self.root / out_dir / f"{name}.parquet"

    def failure(self, stage: str, name: str) -> Path:
        """The failure record of one partition of one stage."""
        return self.state / "failed" / stage / f"{name}.json"

    def stage_marker(self, stage: str) -> Path:
        """``state/<stage>.done``: written when a rescan finds nothing left of that stage."""
        return self.state / f"{stage}.done"

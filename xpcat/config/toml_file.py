"""The run configuration as a TOML file: read, and written to ``RUN_DIR/config.toml`` (atomically).

The resolved configuration (defaults filled in) is written when a run starts
and compared on resume (:func:`xpcat.config.run_config.diff_configs`).
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import tomli_w

from xpcat.config.fields import ConfigError
from xpcat.config.run_config import RunConfig, config_from_dict, config_to_dict
from xpcat.fileio import write_text_atomic

__all__ = ["CONFIG_FILENAME", "load_config", "write_config", "read_run_config"]

logger = logging.getLogger(__name__)

#: Name of the resolved configuration inside a run directory.
CONFIG_FILENAME = "config.toml"


def load_config(path: str | Path | None) -> RunConfig:
    """Parse a TOML file (``None``: all defaults).

    Raises
    ------
    ConfigError
        When the file is missing, not TOML, or holds a bad value.
    """
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    try:
        with path.open("rb") as fh:
            d = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    try:
        return config_from_dict(d)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def write_config(config: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved configuration to ``RUN_DIR/config.toml`` (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / CONFIG_FILENAME
    write_text_atomic(target, tomli_w.dumps(_drop_none(config_to_dict(config))))
    return target


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration frozen in a run directory (defaults if it has none)."""
    p = Path(run_dir) / CONFIG_FILENAME
    return load_config(p) if p.exists() else RunConfig()

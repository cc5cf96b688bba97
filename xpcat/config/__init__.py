"""Run configuration: one TOML file parsed into frozen, typed dataclasses.

Every section is a frozen dataclass (:mod:`xpcat.config.sections`); every
field carries its documentation (in the field metadata under ``"doc"``) and
its checks (``min``, ``max``, ``choices``; :mod:`xpcat.config.fields`).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the field and the bad value. :class:`RunConfig`, the presets and the
dict conversions are in :mod:`xpcat.config.run_config`; reading and writing
the TOML file in :mod:`xpcat.config.toml_file`.

Example ``xpcat.toml``::

    [data]
    partition_level = 5

    [training]
    preset = "quick"

    [cluster]
    profile = "slurm"

The resolved configuration (defaults filled in) is written to
``RUN_DIR/config.toml`` when a run starts and compared on resume.
"""

from __future__ import annotations

from xpcat.config.fields import ConfigError, field_docs
from xpcat.config.run_config import (
    PRESETS,
    RunConfig,
    config_from_dict,
    config_to_dict,
    diff_configs,
)
from xpcat.config.sections import (
    CatalogConfig,
    ClusterConfig,
    ConditioningConfig,
    ConfidenceConfig,
    DataConfig,
    FetchConfig,
    InferenceConfig,
    ModelConfig,
    RunSection,
    SimulationConfig,
    TrainingConfig,
)
from xpcat.config.toml_file import (
    CONFIG_FILENAME,
    load_config,
    read_run_config,
    write_config,
)

__all__ = [
    "ConfigError",
    "RunSection",
    "DataConfig",
    "SimulationConfig",
    "ConditioningConfig",
    "ModelConfig",
    "TrainingConfig",
    "InferenceConfig",
    "ConfidenceConfig",
    "ClusterConfig",
    "CatalogConfig",
    "FetchConfig",
    "RunConfig",
    "PRESETS",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "write_config",
    "read_run_config",
    "diff_configs",
    "field_docs",
    "CONFIG_FILENAME",
]

"""The whole run configuration: :class:`RunConfig`, its presets, and nested plain dicts in and out.

:func:`config_from_dict` checks every section and key (a ``preset`` fills in
its :data:`PRESETS` values first; explicit values win), :func:`config_to_dict`
gives the plain form that TOML and JSON take, :func:`diff_configs` the
differences a resumed run reports.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from xpcat.config.fields import ConfigError
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

__all__ = ["RunConfig", "PRESETS", "config_from_dict", "config_to_dict", "diff_configs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of a run, one attribute per TOML section."""

    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    simulate: SimulationConfig = field(default_factory=SimulationConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some fields of some sections changed: ``cfg.replace(training={"preset": "quick"})``."""
        d = config_to_dict(self)
        for name, values in sections.items():
            if name not in d:
                raise ConfigError(f"unknown section [{name}]")
            if "preset" in values and values["preset"] != d[name].get("preset"):
                _switch_preset(name, d[name], values["preset"], keep=set(values))
            d[name].update(values)
        return config_from_dict(d)


def _switch_preset(section: str, current: dict[str, Any], preset: str, keep: set[str]) -> None:
    """Change ``current`` (a section's plain values) to another preset, in place.

    A field takes the new preset's value (or the field's default, when the new
    preset leaves it alone) unless it is in ``keep`` or was customised: its
    value differs from what the current preset gives it. So
    ``cfg.replace(training={"preset": "quick"})`` resolves like a TOML file that
    says ``preset = "quick"``, and explicit values still win.
    """
    cls = _section_types()[section]
    defaults = {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    old = {**defaults, **PRESETS.get(section, {}).get(current.get("preset"), {})}
    new = {**defaults, **PRESETS.get(section, {}).get(preset, {})}
    for key in set(old) | set(new):
        if key in keep or key == "preset" or key not in current:
            continue
        if plain(current[key]) == plain(old.get(key)):
            current[key] = plain(new.get(key, current[key]))


#: Values that the 'quick' presets change (explicit values in the TOML still win).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "training": {
        "quick": {
            "epochs": 160,
            "lr_drop_epochs": (100, 140),
            "model_optimizer": "adam",
            "star_optimizer": "gn",
            "model_lr": (1e-3, 3e-4, 1e-4),
            "star_lr": (3e-3, 3e-3, 1e-3),
            "phase3_steps": 20,
            "phase6_steps": 20,
            "phase6_halve_every": 64,
            "temper_start": 1000.0,
            "temper_epochs": 120,
            "min_model_steps": 1600,
        }
    },
    "confidence": {"quick": {"epochs": 200, "patience": 40, "batch_size": 1024}},
}


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(RunConfig)[f.name] for f in fields(RunConfig)}


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts, checking every key and value.

    Raises
    ------
    ConfigError
        On unknown sections or keys, wrong types or values out of range.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"configuration must be a table of sections, got {type(d).__name__}")
    types_ = _section_types()
    unknown = [k for k in d if k not in types_]
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join('[' + k + ']' for k in unknown)}; known: {', '.join(types_)}")
    sections = {}
    for name, cls in types_.items():
        values = d.get(name, {}) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table, got {values!r}")
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        bad = [k for k in values if k not in known]
        if bad:
            raise ConfigError(f"[{name}] unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        preset = values.get("preset")
        merged = dict(PRESETS.get(name, {}).get(preset, {})) if preset else {}
        merged.update(values)
        sections[name] = cls(**merged)
    return RunConfig(**sections)


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dicts (tuples as lists), ready for TOML or JSON."""
    out = {}
    for f in fields(config):
        sec = getattr(config, f.name)
        out[f.name] = {
            k.name: (list(v) if isinstance(v, tuple) else v)
            for k in fields(sec)
            if not k.name.startswith("_")
            for v in [getattr(sec, k.name)]
        }
    return out


def diff_configs(old: RunConfig, new: RunConfig) -> list[str]:
    """Human-readable differences, one ``[section] key: old -> new`` line each."""
    a, b = config_to_dict(old), config_to_dict(new)
    lines = []
    for sec in a:
        for key in a[sec]:
            if a[sec][key] != b[sec][key]:
                lines.append(f"[{sec}] {key}: {a[sec][key]!r} -> {b[sec][key]!r}")
    return lines

"""Run configuration: one TOML file parsed into frozen, typed dataclasses.

Every section is a frozen dataclass; every field carries its documentation
(``FIELD_DOCS``-style, in the field metadata under ``"doc"``) and its checks
(``min``, ``max``, ``choices``). Unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` naming the field and the bad value.

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

import dataclasses
import logging
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import tomli_w

from xpcat.errors import XpcatError

logger = logging.getLogger(__name__)

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
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "write_config",
    "read_run_config",
    "diff_configs",
    "CONFIG_FILENAME",
]

#: Name of the resolved configuration inside a run directory.
CONFIG_FILENAME = "config.toml"


class ConfigError(XpcatError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _f(default: Any, doc: str, *, min: float | None = None, max: float | None = None, choices: tuple | None = None):
    """A dataclass field with its documentation and checks in the metadata."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _check_section(obj: Any) -> None:
    """Validate every field of a section dataclass (called from ``__post_init__``)."""
    section = getattr(obj, "_section", type(obj).__name__)
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if f.name.startswith("_"):
            continue
        value = getattr(obj, f.name)
        where = f"[{section}] {f.name}"
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(hints[f.name])}")
        if isinstance(value, list):
            object.__setattr__(obj, f.name, tuple(value))
            value = tuple(value)
        m = f.metadata
        vals = value if isinstance(value, tuple) else (value,)
        for v in vals:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if m.get("min") is not None and v < m["min"]:
                    raise ConfigError(f"{where} = {value!r}: must be >= {m['min']}")
                if m.get("max") is not None and v > m["max"]:
                    raise ConfigError(f"{where} = {value!r}: must be <= {m['max']}")
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(map(repr, m['choices']))}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Section:
    _section = ""

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True)
class RunSection(_Section):
    """[run]: identity of the run."""

    _section = "run"
    name: str = _f("xpcat", "Name of the run and of the catalog (HATS obs_collection).")
    seed: int = _f(0, "Seed for every random choice of the run (training split, start samples).", min=0)


@dataclass(frozen=True)
class DataConfig(_Section):
    """[data]: where the inputs are and how they are partitioned."""

    _section = "data"
    partition_level: int = _f(
        5,
        "HEALPix level of the working partitions: a partition is the source_id range "
        "[p << (35 + 2 (12 - level)), (p + 1) << (35 + 2 (12 - level))).",
        min=0,
        max=12,
    )
    pixels: tuple[int, ...] = _f(
        (),
        "HEALPix pixels (nested, at partition_level) to fetch from the archive; empty = every "
        "non-empty pixel of the level (found by one census query).",
        min=0,
    )
    raw_dir: str = _f("raw", "Folder of the raw tables, relative to the run directory unless absolute.")
    unwise: str = _f("", "Optional unWISE partner table (Parquet, CSV or FITS) keyed by source_id.")
    labels: str = _f("", "Optional training-label table (LAMOST / Hot Payne) keyed by source_id.")
    reddening: str = _f("", "Optional reddening-prior table (Bayestar-like E) keyed by source_id.")


@dataclass(frozen=True)
class SimulationConfig(_Section):
    """[simulate]: the synthetic Gaia universe."""

    _section = "simulate"
    n_stars: int = _f(2000, "Number of stars in the universe.", min=1)
    seed: int = _f(42, "Seed: the same seed and size give the same universe.", min=0)
    binary_fraction: float = _f(0.05, "Fraction of unresolved near-equal-mass binaries.", min=0.0, max=1.0)
    outlier_fraction: float = _f(0.01, "Fraction of stars with corrupted spectra.", min=0.0, max=1.0)
    missing_bp_fraction: float = _f(0.002, "Fraction of stars with no BP spectrum.", min=0.0, max=1.0)
    missing_rp_fraction: float = _f(0.002, "Fraction of stars with no RP spectrum.", min=0.0, max=1.0)
    missing_tmass_fraction: float = _f(0.05, "Fraction of stars without a 2MASS match.", min=0.0, max=1.0)
    missing_unwise_fraction: float = _f(0.05, "Fraction of stars without an unWISE match.", min=0.0, max=1.0)
    label_fraction: float = _f(0.5, "Fraction of stars with LAMOST-like labels.", min=0.0, max=1.0)
    crowded_fraction: float = _f(0.05, "Fraction of crowded sources (norm_dg > -5, contaminated light).", min=0.0, max=1.0)
    r_v_mean: float = _f(3.1, "Mean R_V of the sight lines (G23 law).", min=2.3, max=5.6)
    r_v_scatter: float = _f(0.2, "Scatter of R_V between sight lines (0: every star at r_v_mean).", min=0.0, max=1.0)
    g_limit: float = _f(17.65, "G magnitude limit of the drawn stars (before extinction).", min=5.0, max=21.0)
    n_fields: int = _f(8, "Number of sky fields (discs) the stars fall in.", min=1)
    field_radius_deg: float = _f(1.5, "Radius of each sky field, degrees.", min=0.01, max=90.0)
    hotpayne_teff_min: float = _f(7000.0, "True Teff [K] above which labels come from Hot Payne (match training.teff_switch).", min=0.0)


@dataclass(frozen=True)
class ConditioningConfig(_Section):
    """[conditioning]: XP sampling, Eq. 2 inflation and Eqs. 3-4 conditioning."""

    _section = "conditioning"
    covariance: Literal["correct", "paper"] = _f(
        "correct",
        "Coefficient covariance: 'correct' = diag(e) R diag(e) (matches GaiaXPy's flux_error); "
        "'paper' = the published, unscaled Sigma / s_band^2.",
        choices=("correct", "paper"),
    )
    eigenvalue_floor: float = _f(1e-9, "Clamp of the covariance eigenvalues, in the internal flux unit squared.", min=0.0)
    tmass_norm_dg_max: float = _f(-5.0, "2MASS is disregarded when norm_dg > this (crowding).")
    unwise_norm_dg_max: float = _f(-10.0, "unWISE is disregarded when norm_dg > this (crowding).")
    batch_size: int = _f(20000, "Sources converted per batch (bounds memory).", min=1)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """[model]: the forward model's network."""

    _section = "model"
    hidden_width: int = _f(32, "Units per hidden layer (paper: 32, from its 4484 global parameters).", min=1)
    n_hidden: int = _f(3, "Number of hidden layers.", min=1)
    activation: Literal["tanh", "softplus", "gelu", "silu"] = _f(
        "tanh", "Smooth activation of the hidden layers.", choices=("tanh", "softplus", "gelu", "silu")
    )
    dtype: Literal["float32", "float64"] = _f("float32", "Floating type of the model.", choices=("float32", "float64"))


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """[training]: the six phases of Table 1. Defaults are the paper's."""

    _section = "training"
    preset: Literal["paper", "quick"] = _f(
        "paper", "'paper' = Table 1 as published; 'quick' = short schedule for tests and the demo.", choices=("paper", "quick")
    )
    batch_size: int = _f(512, "Stars per batch.", min=1)
    epochs: int = _f(128, "Epochs of each model phase (1, 2 and 5).", min=1)
    lr_drop_epochs: tuple[int, ...] = _f((32, 64, 96), "Epochs at which the learning rates drop x10.")
    phase3_steps: int = _f(128, "Phase 3: steps per star.", min=1)
    phase6_steps: int = _f(4096, "Phase 6: Adam steps for the final star refinement.", min=1)
    phase6_halve_every: int = _f(512, "Phase 6: the Adam learning rate halves every this many steps.", min=1)
    clean_sigma: float = _f(4.0, "Self-cleaning threshold in sigma.", min=0.0)
    validation_fraction: float = _f(0.2, "Fraction of labelled stars held out (stable hash of source_id).", min=0.0, max=0.9)
    teff_switch: float = _f(7000.0, "Teff [K] above which Hot Payne labels replace LAMOST.", min=0.0)
    gmm_components: int = _f(16, "Components of the Gaussian-mixture type prior.", min=1)
    model_lr: tuple[float, ...] = _f((1e-3, 1e-5, 1e-7), "Initial model learning rates of phases 1, 2 and 5.", min=0.0)
    star_lr: tuple[float, ...] = _f((1e-4, 1e-4, 1e-5), "Initial star learning rates of phases 2, 3 and 5.", min=0.0)
    phase6_lr: float = _f(1e-2, "Phase 6: initial Adam learning rate of the star refinement.", min=0.0)
    model_optimizer: Literal["sgd", "adam"] = _f(
        "sgd", "Model steps: 'sgd' (momentum model_momentum, the paper) or 'adam'.", choices=("sgd", "adam"))
    star_optimizer: Literal["sgd", "adam", "gn"] = _f(
        "sgd", "Star steps of phases 2, 3, 5: 'sgd' without momentum (the paper), per-star 'adam', or 'gn' "
        "(damped Gauss-Newton per star; also used for phase 6).",
        choices=("sgd", "adam", "gn"))
    model_momentum: float = _f(0.5, "SGD momentum of the model steps.", min=0.0, max=1.0)
    grad_clip: float = _f(0.0, "Clip the model gradient to this global norm (0 = off, the paper).", min=0.0)
    max_star_step: float = _f(0.5, "Longest star update (kK, dex, ln plx, ln E units) of one SGD step.", min=0.0)
    init_steps: int = _f(2000, "Full-batch Adam steps of the ln-flux least-squares warm start before phase 1.", min=0)
    temper_start: float = _f(
        1.0, "Phases 2 and 5: the star steps of the first epoch see chi^2_f divided by this temperature T0, which "
        "falls geometrically to 1 over temper_epochs (1 = off, the paper). Lets the joint fit escape the "
        "luminosity-logg-parallax degeneracy; see xpcat.model.training_phases.", min=1.0)
    temper_epochs: int = _f(0, "Epochs over which the star-step temperature falls from temper_start to 1 (0 = off).",
                            min=0)
    anchor_extinction: bool = _f(
        True, "After phase 5, move the E zero point (every star's E and the model's ln f_abs by Delta R together, "
        "no flux changes) so that the trained stars' E agree with their reddening priors on average; Eq. 14's "
        "-2 ln E otherwise lifts the whole E scale by ~<1/E>/<1/s_E^2>. false = the exact optimum of Eqs. 12-14. "
        "See xpcat.model.extinction_zero_point.")


@dataclass(frozen=True)
class InferenceConfig(_Section):
    """[inference]: start grid, optimiser and batching (Sec. 4)."""

    _section = "inference"
    optimizer: Literal["lm", "paper"] = _f(
        "lm", "'lm' = damped Gauss-Newton / Levenberg-Marquardt (default); 'paper' = Adam + SGD rounds.", choices=("lm", "paper")
    )
    start: Literal["screen", "paper"] = _f(
        "screen", "'screen' = diagonal chi^2 screen then full chi^2 on the best few; 'paper' = full chi^2 on the grid.",
        choices=("screen", "paper"),
    )
    batch_size: int = _f(4096, "Stars per vectorised batch (bounds memory).", min=1)
    n_prior_samples: int = _f(512, "GMM samples of Theta in the start grid.", min=1)
    e_min: float = _f(1e-2, "Smallest E of the start grid [mag].", min=0.0)
    e_max: float = _f(10.0, "Largest E of the start grid [mag].", min=0.0)
    e_log10_step: float = _f(0.05, "log10 ratio between neighbouring E of the start grid.", min=0.0)
    n_refine: int = _f(32, "Start candidates kept after the diagonal screen.", min=1)
    max_iterations: int = _f(50, "Iterations of the second-order optimiser.", min=1)
    tolerance: float = _f(1e-6, "Convergence: relative decrease of the loss.", min=0.0)
    compilation_cache: bool = _f(
        True, "Keep JAX's compiled inference kernels in RUN_DIR/state/jax-cache, so workers started later (adapt, "
        "lifetime rotation, a resumed run) load them instead of compiling (xpcat.jobs.compile_cache)."
    )


@dataclass(frozen=True)
class ConfidenceConfig(_Section):
    """[confidence]: the three reliability classifiers (Appendix B)."""

    _section = "confidence"
    preset: Literal["paper", "quick"] = _f("paper", "'quick' shortens training for tests and the demo.", choices=("paper", "quick"))
    hidden_width: int = _f(64, "Units per hidden layer.", min=1)
    n_hidden: int = _f(3, "Hidden layers.", min=1)
    dropout: float = _f(0.1, "Dropout rate.", min=0.0, max=1.0)
    l2: float = _f(1e-3, "L2 weight penalty.", min=0.0)
    learning_rate: float = _f(1e-3, "Adam learning rate.", min=0.0)
    batch_size: int = _f(4096, "Batch size.", min=1)
    epochs: int = _f(1024, "Maximum epochs.", min=1)
    patience: int = _f(256, "Epochs without improvement before the learning rate drops x10.", min=1)
    holdout_fraction: float = _f(0.2, "Fraction held out for the ROC AUC.", min=0.0, max=0.9)
    label_set: Literal["all", "validation"] = _f(
        "all", "Labelled stars the classifiers learn from, each fitted without its label: 'all' (Sec. 4.4: every "
        "LAMOST source, 20 % held out) or 'validation' (only the forward model's validation split; all labelled "
        "stars are added when it has too few good or bad stars).", choices=("all", "validation"))


@dataclass(frozen=True)
class ClusterConfig(_Section):
    """[cluster]: where the run's Dask workers come from."""

    _section = "cluster"
    profile: str = _f("local", "Profile name (xpcat/jobs/profiles/<name>.yaml) or a path to a YAML profile.")
    n_workers: int = _f(2, "LocalCluster workers, or the maximum number of jobs for adapt.", min=1)
    min_workers: int = _f(0, "Minimum number of jobs kept by adapt.", min=0)
    threads_per_worker: int = _f(1, "Threads per worker process.", min=1)
    memory_limit: str = _f("4GiB", "Memory per worker.")
    lifetime: str = _f("", "Worker --lifetime (e.g. '30m'); empty for none.")
    lifetime_stagger: str = _f("", "Worker --lifetime-stagger (e.g. '5m').")
    retries: int = _f(2, "Retries of a task that raised, before it is recorded as failed.", min=0)
    options: dict = _f({}, "Extra keyword arguments for the dask-jobqueue cluster class (queue, account, walltime, ...).")


@dataclass(frozen=True)
class CatalogConfig(_Section):
    """[catalog]: the final HATS catalog."""

    _section = "catalog"
    max_rows_per_partition: int = _f(1_000_000, "Upper bound on rows per HATS pixel.", min=1)
    highest_order: int = _f(7, "Deepest HEALPix order of a HATS pixel.", min=0, max=19)


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
    tmp = target.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(_drop_none(config_to_dict(config))))
    tmp.replace(target)
    return target


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration frozen in a run directory (defaults if it has none)."""
    p = Path(run_dir) / CONFIG_FILENAME
    return load_config(p) if p.exists() else RunConfig()


def diff_configs(old: RunConfig, new: RunConfig) -> list[str]:
    """Human-readable differences, one ``[section] key: old -> new`` line each."""
    a, b = config_to_dict(old), config_to_dict(new)
    lines = []
    for sec in a:
        for key in a[sec]:
            if a[sec][key] != b[sec][key]:
                lines.append(f"[{sec}] {key}: {a[sec][key]!r} -> {b[sec][key]!r}")
    return lines


def field_docs(section: type) -> dict[str, str]:
    """The documentation of each field of a section class."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(section) if not f.name.startswith("_")}

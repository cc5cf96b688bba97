"""The sections of the run configuration, one frozen dataclass per TOML table.

Each field is documented in its metadata (:func:`xpcat.config.fields.config_field`)
and checked when the section is made (:class:`xpcat.config.fields.Section`).
:class:`xpcat.config.run_config.RunConfig` holds one of each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from xpcat.config.cluster_values import check_cluster_values
from xpcat.config.fields import Section, config_field

__all__ = [
    "FetchConfig",
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
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSection(Section):
    """[run]: identity of the run."""

    _section = "run"
    name: str = config_field("xpcat", "Name of the run and of the catalog (HATS obs_collection).")
    seed: int = config_field(0, "Seed for every random choice of the run (training split, start samples).", min=0)


@dataclass(frozen=True)
class DataConfig(Section):
    """[data]: where the inputs are and how they are partitioned."""

    _section = "data"
    partition_level: int = config_field(
        5,
        "HEALPix level of the working partitions: a partition is the source_id range "
        "[p << (35 + 2 (12 - level)), (p + 1) << (35 + 2 (12 - level))).",
        min=0,
        max=12,
    )
    pixels: tuple[int, ...] = config_field(
        (),
        "HEALPix pixels (nested, at partition_level) to fetch from the archive; empty = every "
        "non-empty pixel of the level (found by one census query).",
        min=0,
    )
    raw_dir: str = config_field("raw", "Folder of the raw tables, relative to the run directory unless absolute.")
    tmass: str = config_field("", "Optional 2MASS partner table (Parquet, CSV or FITS) keyed by source_id: j_m, "
                              "j_msigcom, h_m, h_msigcom, ks_m, ks_msigcom, ph_qual (for bulk-ingested stars).")
    unwise: str = config_field("", "Optional unWISE partner table (Parquet, CSV or FITS) keyed by source_id.")
    labels: str = config_field("", "Optional training-label table (LAMOST / Hot Payne) keyed by source_id.")
    reddening: str = config_field("", "Optional reddening-prior table (Bayestar-like E) keyed by source_id.")


@dataclass(frozen=True)
class SimulationConfig(Section):
    """[simulate]: the synthetic Gaia universe."""

    _section = "simulate"
    n_stars: int = config_field(2000, "Number of stars in the universe.", min=1)
    seed: int = config_field(42, "Seed: the same seed and size give the same universe.", min=0)
    binary_fraction: float = config_field(0.05, "Fraction of unresolved near-equal-mass binaries.", min=0.0, max=1.0)
    outlier_fraction: float = config_field(0.01, "Fraction of stars with corrupted spectra.", min=0.0, max=1.0)
    missing_bp_fraction: float = config_field(0.002, "Fraction of stars with no BP spectrum.", min=0.0, max=1.0)
    missing_rp_fraction: float = config_field(0.002, "Fraction of stars with no RP spectrum.", min=0.0, max=1.0)
    missing_tmass_fraction: float = config_field(0.05, "Fraction of stars without a 2MASS match.", min=0.0, max=1.0)
    missing_unwise_fraction: float = config_field(0.05, "Fraction of stars without an unWISE match.", min=0.0, max=1.0)
    label_fraction: float = config_field(0.5, "Fraction of stars with LAMOST-like labels.", min=0.0, max=1.0)
    crowded_fraction: float = config_field(0.05, "Fraction of crowded sources (norm_dg > -5, contaminated light).", min=0.0, max=1.0)
    r_v_mean: float = config_field(3.1, "Mean R_V of the sight lines (G23 law).", min=2.3, max=5.6)
    r_v_scatter: float = config_field(0.2, "Scatter of R_V between sight lines (0: every star at r_v_mean).", min=0.0, max=1.0)
    g_limit: float = config_field(17.65, "G magnitude limit of the drawn stars (realistic: on the reddened G; legacy: before extinction).", min=5.0, max=21.0)
    n_fields: int = config_field(8, "Number of sky fields (discs) the stars fall in.", min=1)
    field_radius_deg: float = config_field(1.5, "Radius of each sky field, degrees.", min=0.01, max=90.0)
    hotpayne_teff_min: float = config_field(7000.0, "True Teff [K] above which labels come from Hot Payne (match training.teff_switch).", min=0.0)
    universe: str = config_field(
        "realistic",
        "'realistic': stars kept by their reddened G from a volume-weighted pool (a Gaia-like mix), DR3-like XP "
        "noise with a calibration floor and a per-star systematic the pipeline does not know; 'legacy': the "
        "universe before issue 16 (types drawn first, noise drawn from exactly the assumed covariance).",
        choices=("realistic", "legacy"),
    )
    population_weights: dict = config_field(
        {}, "Realistic universe: local density weights per population, overriding the defaults "
        "(thin_disk, thick_disk, halo, giant, red_clump, hot).")
    systematic_rms: float = config_field(
        0.005, "Realistic universe: rms of each star's smooth multiplicative XP calibration error (not in the "
        "published covariance).", min=0.0, max=0.2)
    systematic_tail_fraction: float = config_field(
        0.03, "Realistic universe: fraction of stars whose systematic is 6x larger (exercises the chi^2 flag).",
        min=0.0, max=1.0)


@dataclass(frozen=True)
class ConditioningConfig(Section):
    """[conditioning]: XP sampling, Eq. 2 inflation and Eqs. 3-4 conditioning."""

    _section = "conditioning"
    covariance: Literal["correct", "paper"] = config_field(
        "correct",
        "Coefficient covariance: 'correct' = diag(e) R diag(e) (matches GaiaXPy's flux_error); "
        "'paper' = the published, unscaled Sigma / s_band^2.",
        choices=("correct", "paper"),
    )
    eigenvalue_floor: float = config_field(1e-9, "Clamp of the covariance eigenvalues, in the internal flux unit squared.", min=0.0)
    tmass_norm_dg_max: float = config_field(-5.0, "2MASS is disregarded when norm_dg > this (crowding).")
    unwise_norm_dg_max: float = config_field(-10.0, "unWISE is disregarded when norm_dg > this (crowding).")
    batch_size: int = config_field(20000, "Sources converted per batch (bounds memory).", min=1)


@dataclass(frozen=True)
class ModelConfig(Section):
    """[model]: the forward model's network."""

    _section = "model"
    hidden_width: int = config_field(32, "Units per hidden layer (paper: 32, from its 4484 global parameters).", min=1)
    n_hidden: int = config_field(3, "Number of hidden layers.", min=1)
    activation: Literal["tanh", "softplus", "gelu", "silu"] = config_field(
        "tanh", "Smooth activation of the hidden layers.", choices=("tanh", "softplus", "gelu", "silu")
    )
    dtype: Literal["float32", "float64"] = config_field("float32", "Floating type of the model.", choices=("float32", "float64"))


@dataclass(frozen=True)
class TrainingConfig(Section):
    """[training]: the six phases of Table 1. Defaults are the paper's."""

    _section = "training"
    preset: Literal["paper", "quick"] = config_field(
        "paper", "'paper' = Table 1 as published; 'quick' = short schedule for tests and the demo.", choices=("paper", "quick")
    )
    batch_size: int = config_field(512, "Stars per batch.", min=1)
    epochs: int = config_field(128, "Epochs of each model phase (1, 2 and 5).", min=1)
    lr_drop_epochs: tuple[int, ...] = config_field((32, 64, 96), "Epochs at which the learning rates drop x10.")
    phase3_steps: int = config_field(128, "Phase 3: steps per star.", min=1)
    phase6_steps: int = config_field(4096, "Phase 6: Adam steps for the final star refinement.", min=1)
    phase6_halve_every: int = config_field(512, "Phase 6: the Adam learning rate halves every this many steps.", min=1)
    clean_sigma: float = config_field(4.0, "Self-cleaning threshold in sigma.", min=0.0)
    hq_e_error_max: float = config_field(
        0.1, "Eq. 15's HQ cut on the reddening prior: s_E < this [mag, Bayestar19 E units] (the paper's 0.1). "
        "Raise it for priors that are wider for every star, e.g. APOGEE's AK_TARG (s_E ~ 0.23; see "
        "xpcat.production.ingest.apogee), where 0.1 leaves no HQ star and the cut can then only drop the "
        "worst-known E.", min=0.0)
    label_error_floor: tuple[float, ...] = config_field(
        (0.0, 0.0, 0.0), "Teff [K], [Fe/H], logg [dex] floors added in quadrature to the labels' errors for training "
        "only (the label prior of Eqs. 13-14 and the Sec. 2.5 / Eq. 15 error cuts): a label's accuracy on an external "
        "scale, wider than its star-to-star noise. The label table's own errors stay the references' noise that the "
        "model error and the confidence labels are calibrated against. 0 = off (the paper; the synthetic labels' "
        "errors are their noise); APOGEE: 100 K, 0.05, 0.1 (xpcat.production.ingest.apogee.TRAINING_ERROR_FLOOR).",
        min=0.0)
    validation_fraction: float = config_field(0.2, "Fraction of labelled stars held out (stable hash of source_id).", min=0.0, max=0.9)
    excess_cut: Literal["colour", "paper"] = config_field(
        "colour", "Sec. 2.5's BP/RP flux-excess cut: 'colour' = |C*| < 3 sigma_C*(G), C* the excess corrected for "
        "BP - RP (Riello et al. 2021; the raw gaia_source's BP/RP magnitudes; C < 1.3 where a star has none); "
        "'paper' = C < 1.3, which also removes every clean star redder than BP - RP ~ 1.75 (M dwarfs, reddened "
        "giants). See xpcat.production.excess_factor.", choices=("colour", "paper"))
    teff_switch: float = config_field(7000.0, "Teff [K] above which Hot Payne labels replace LAMOST.", min=0.0)
    gmm_components: int = config_field(16, "Components of the Gaussian-mixture type prior.", min=1)
    model_lr: tuple[float, ...] = config_field((1e-3, 1e-5, 1e-7), "Initial model learning rates of phases 1, 2 and 5.", min=0.0)
    star_lr: tuple[float, ...] = config_field((1e-4, 1e-4, 1e-5), "Initial star learning rates of phases 2, 3 and 5.", min=0.0)
    phase6_lr: float = config_field(1e-2, "Phase 6: initial Adam learning rate of the star refinement.", min=0.0)
    model_optimizer: Literal["sgd", "adam"] = config_field(
        "sgd", "Model steps: 'sgd' (momentum model_momentum, the paper) or 'adam'.", choices=("sgd", "adam"))
    star_optimizer: Literal["sgd", "adam", "gn"] = config_field(
        "sgd", "Star steps of phases 2, 3, 5: 'sgd' without momentum (the paper), per-star 'adam', or 'gn' "
        "(damped Gauss-Newton per star; also used for phase 6).",
        choices=("sgd", "adam", "gn"))
    model_momentum: float = config_field(0.5, "SGD momentum of the model steps.", min=0.0, max=1.0)
    grad_clip: float = config_field(0.0, "Clip the model gradient to this global norm (0 = off, the paper).", min=0.0)
    max_star_step: float = config_field(0.5, "Longest star update (kK, dex, ln plx, ln E units) of one SGD step.", min=0.0)
    init_steps: int = config_field(2000, "Full-batch Adam steps of the ln-flux least-squares warm start before phase 1.", min=0)
    temper_start: float = config_field(
        1.0, "Phases 2 and 5: the star steps of the first epoch see chi^2_f divided by this temperature T0, which "
        "falls geometrically to 1 over temper_epochs (1 = off, the paper). Lets the joint fit escape the "
        "luminosity-logg-parallax degeneracy; see xpcat.model.training_phases.", min=1.0)
    temper_epochs: int = config_field(0, "Epochs over which the star-step temperature falls from temper_start to 1 (0 = off).",
                            min=0)
    min_model_steps: int = config_field(
        0, "Fewest model steps of phases 1, 2 and 5: a phase whose epochs x batches fall short (a small training "
        "set) stretches its epochs, learning-rate drops and tempering by one factor to reach it (0 = off, the "
        "paper; the quick preset asks for 1600). See xpcat.model.training_schedule.", min=0)
    anchor_extinction: bool = config_field(
        True, "After phase 5, move the E zero point (every star's E and the model's ln f_abs by Delta R together, "
        "no flux changes) so that the trained stars' E agree with their reddening priors on average; Eq. 14's "
        "-2 ln E otherwise lifts the whole E scale by ~<1/E>/<1/s_E^2>. false = the exact optimum of Eqs. 12-14. "
        "See xpcat.model.extinction_zero_point.")


@dataclass(frozen=True)
class InferenceConfig(Section):
    """[inference]: start grid, optimiser and batching (Sec. 4)."""

    _section = "inference"
    optimizer: Literal["lm", "paper"] = config_field(
        "lm", "'lm' = damped Gauss-Newton / Levenberg-Marquardt (default); 'paper' = Adam + SGD rounds.", choices=("lm", "paper")
    )
    start: Literal["screen", "paper"] = config_field(
        "screen", "'screen' = diagonal chi^2 screen then full chi^2 on the best few; 'paper' = full chi^2 on the grid.",
        choices=("screen", "paper"),
    )
    batch_size: int = config_field(4096, "Stars per vectorised batch (bounds memory).", min=1)
    n_prior_samples: int = config_field(512, "GMM samples of Theta in the start grid.", min=1)
    e_min: float = config_field(1e-2, "Smallest E of the start grid [mag].", min=0.0)
    e_max: float = config_field(10.0, "Largest E of the start grid [mag].", min=0.0)
    e_log10_step: float = config_field(0.05, "log10 ratio between neighbouring E of the start grid.", min=0.0)
    n_refine: int = config_field(32, "Start candidates kept after the diagonal screen.", min=1)
    max_iterations: int = config_field(50, "Iterations of the second-order optimiser.", min=1)
    tolerance: float = config_field(1e-6, "Convergence: relative decrease of the loss.", min=0.0)
    refit: bool = config_field(
        True, "After 'lm', polish the stars that did not converge in float64 with the exact Hessian and, where that "
        "fails, try the paper optimiser, keeping the lower loss (xpcat.model.refit; issue 15 item 4)."
    )
    polish_iterations: int = config_field(100, "Iteration cap of the refit's float64 polish.", min=1)
    uncertainty: Literal["calibrated", "paper"] = config_field(
        "calibrated", "Reported errors: 'calibrated' = Fisher covariance plus the model's own error learned on the "
        "validation split by `xpcat train-confidence` (xpcat.model.model_error; Fisher-only when the model has "
        "none, recorded in the catalog metadata); 'paper' = the Fisher covariance alone (Sec. 4.3).",
        choices=("calibrated", "paper"))
    compilation_cache: bool = config_field(
        True, "Keep JAX's compiled inference kernels in RUN_DIR/state/jax-cache, so workers started later (adapt, "
        "lifetime rotation, a resumed run) load them instead of compiling (xpcat.jobs.compile_cache)."
    )


@dataclass(frozen=True)
class ConfidenceConfig(Section):
    """[confidence]: the three reliability classifiers (Appendix B)."""

    _section = "confidence"
    preset: Literal["paper", "quick"] = config_field("paper", "'quick' shortens training for tests and the demo.", choices=("paper", "quick"))
    hidden_width: int = config_field(64, "Units per hidden layer.", min=1)
    n_hidden: int = config_field(3, "Hidden layers.", min=1)
    dropout: float = config_field(0.1, "Dropout rate.", min=0.0, max=1.0)
    l2: float = config_field(1e-3, "L2 weight penalty.", min=0.0)
    learning_rate: float = config_field(1e-3, "Adam learning rate.", min=0.0)
    batch_size: int = config_field(4096, "Batch size.", min=1)
    epochs: int = config_field(1024, "Maximum epochs.", min=1)
    patience: int = config_field(256, "Epochs without improvement before the learning rate drops x10.", min=1)
    holdout_fraction: float = config_field(0.2, "Fraction held out for the ROC AUC.", min=0.0, max=0.9)
    folds: int = config_field(
        5, "Beyond the paper: k-fold cross-validation for the ROC AUC, every labelled star scored by the fold network "
        "that did not see it (AUC with a bootstrap error), then each classifier trained on all the stars (k + 1 "
        "times the training time); 1 = the paper's single hold-out of holdout_fraction.", min=1, max=20)
    logistic_candidate: bool = config_field(
        True, "Beyond the paper: beside each network also train an L2-regularised logistic classifier (scikit-learn, "
        "its penalty chosen by cross-validation) on the same stars and keep the one with the lower validation loss "
        "(few labelled stars: the 3 x 64 network overfits); false = the paper's network only.")
    label_set: Literal["all", "validation"] = config_field(
        "all", "Labelled stars the classifiers learn from, each fitted without its label: 'all' (Sec. 4.4: every "
        "LAMOST source, 20 % held out) or 'validation' (only the forward model's validation split; all labelled "
        "stars are added when it has too few good or bad stars).", choices=("all", "validation"))
    model_error_unlabelled: int = config_field(
        3000, "Conditioned stars without labels (never trained on) also fitted by train-confidence, spread over the "
        "partitions, so that the model error of E (against the reddening prior) is learned from stars like the "
        "catalog's and not only from the validation split (0 = off; "
        "xpcat.production.train_model_error).", min=0)


@dataclass(frozen=True)
class ClusterConfig(Section):
    """[cluster]: where the run's Dask workers come from."""

    _section = "cluster"
    profile: str = config_field("local", "Profile name (xpcat/jobs/profiles/<name>.yaml) or a path to a YAML profile.")
    n_workers: int = config_field(2, "LocalCluster workers, or the maximum number of jobs for adapt.", min=1)
    min_workers: int = config_field(0, "Minimum number of jobs kept by adapt.", min=0)
    threads_per_worker: int = config_field(1, "Threads per worker process.", min=1)
    memory_limit: str = config_field("4GiB", "Memory per worker.")
    lifetime: str = config_field("", "Worker --lifetime (e.g. '30m'); empty for none.")
    lifetime_stagger: str = config_field("", "Worker --lifetime-stagger (e.g. '5m').")
    retries: int = config_field(2, "Retries of a task that raised, before it is recorded as failed.", min=0)
    options: dict = config_field({}, "Extra keyword arguments of the profile's cluster class (LocalCluster, or the "
                                 "dask-jobqueue class: queue, account, walltime, ...); checked against its signature.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_cluster_values(self)


@dataclass(frozen=True)
class FetchConfig(Section):
    """[fetch]: how ``xpcat fetch`` talks to the Gaia archive."""

    _section = "fetch"
    workers: int = config_field(
        6,
        "Source_id ranges fetched at once, each in its own process with at most one request to the archive in "
        "flight (the Gaia archive is shared; ESA publishes no limit, 6 is the per-host connection count of web "
        "browsers).",
        min=1,
        max=8,
    )
    xp: Literal["continuous", "sampled"] = config_field(
        "continuous",
        "DataLink XP product fetched: 'continuous' (XP_CONTINUOUS coefficients with their correlations, raw "
        "xp_continuous_mean_spectrum) or 'sampled' (XP_SAMPLED, 343 samples 336-1020 nm, diagonal errors only, raw "
        "xp_sampled_spectrum as `xpcat ingest` writes it; conditioned with the XP_SAMPLED flag).",
        choices=("continuous", "sampled"),
    )


@dataclass(frozen=True)
class CatalogConfig(Section):
    """[catalog]: the final HATS catalog."""

    _section = "catalog"
    max_rows_per_partition: int = config_field(1_000_000, "Upper bound on rows per HATS pixel.", min=1)
    highest_order: int = config_field(7, "Deepest HEALPix order of a HATS pixel.", min=0, max=19)

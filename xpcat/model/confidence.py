"""The three reliability ("confidence") classifiers of Sec. 4.4 and Appendix B.

One binary classifier per atmospheric parameter (Teff, [Fe/H], logg) predicts
whether the estimate agrees with a reference (LAMOST, or the truth of a
synthetic universe). Labels come from

    chi^2_eps = dx^2 / (s_opt^2 + s_ref^2 + eps^2)

(good when < 4, bad when > 9, unused in between; eps = 100 K for Teff,
0.1 dex otherwise). Each network is 3 x 64 ReLU with dropout 0.1 before every
hidden layer, an L2 penalty 1e-3 on the hidden-layer weights, one sigmoid
output and the binary cross-entropy, trained with Adam (lr 1e-3, batch 4096);
the learning rate drops x10 after ``patience`` epochs without improvement of
the validation loss; training stops after ``epochs`` epochs or after
``4 * patience`` epochs without improvement (the paper's 1024 = 4 x 256),
and the parameters with the best validation loss are kept.

Features (Appendix B), in the order of :data:`FEATURE_NAMES`: ln_rchi2_opt,
ln_dplx2, ln_prior, the three estimates and their errors, asinh SNRs of the
Gaia parallax and G, BP, RP fluxes, ln phot_bp_rp_excess_factor,
phot_g_mean_mag, ln ruwe, fidelity_v2, norm_dg, ln bp/rp chi_squared, and
asinh((f_pred - f_obs) / s_f) at each of the 66 flux samples.
ln_X = ln(max(X, 1e-7)).

Missing values: a star whose fit-derived features (chi^2, prior, estimates and
their errors) are not all finite gets NaN confidences (and the low-confidence
bits, :func:`confidence_quality_bits`). Other missing Gaia columns (e.g. no
fidelity_v2) are replaced by the training-set median of that feature; a
missing flux sample (NaN flux or infinite error) contributes a residual of 0.

Pure array code: numpy, JAX, optax and scikit-learn only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

logger = logging.getLogger(__name__)

__all__ = [
    "PARAMETERS",
    "EPSILON",
    "GOOD_CHI2",
    "BAD_CHI2",
    "LN_FLOOR",
    "SCALAR_FEATURES",
    "FEATURE_NAMES",
    "N_FEATURES",
    "CORE_FEATURES",
    "ClassifierSettings",
    "ConfidenceClassifiers",
    "TooFewLabelsError",
    "chi2_eps",
    "chi2_eps_labels",
    "confidence_features",
    "init_classifier",
    "classifier_logits",
    "train_classifier",
    "train_confidence_classifiers",
    "predict_confidence",
    "confidence_quality_bits",
    "classifiers_to_arrays",
    "classifiers_from_arrays",
]

JAXArray = jax.Array

#: The three classified parameters, in catalog order.
PARAMETERS = ("teff", "feh", "logg")
#: Uncertainty floor eps of chi^2_eps, in the units of the residuals (Teff in K).
EPSILON = {"teff": 100.0, "feh": 0.1, "logg": 0.1}
#: chi^2_eps below which an estimate is labelled good.
GOOD_CHI2 = 4.0
#: chi^2_eps above which an estimate is labelled bad.
BAD_CHI2 = 9.0
#: Floor of the ln_X features: ln(max(X, LN_FLOOR)).
LN_FLOOR = 1e-7
#: Number of flux samples (61 XP + J H Ks W1 W2).
N_FLUX = 66

#: Scalar features of Appendix B, in order.
SCALAR_FEATURES = (
    "ln_rchi2_opt",
    "ln_dplx2",
    "ln_prior",
    "teff_est",
    "logg_est",
    "feh_est",
    "teff_est_err",
    "logg_est_err",
    "feh_est_err",
    "asinh_plx_snr",
    "asinh_g_snr",
    "asinh_bp_snr",
    "asinh_rp_snr",
    "ln_phot_bp_rp_excess_factor",
    "phot_g_mean_mag",
    "ln_ruwe",
    "fidelity_v2",
    "norm_dg",
    "ln_bp_chi_squared",
    "ln_rp_chi_squared",
)
#: All feature names: the scalars then asinh residuals ``asinh_dflux_00`` .. ``asinh_dflux_65``.
FEATURE_NAMES = SCALAR_FEATURES + tuple(f"asinh_dflux_{i:02d}" for i in range(N_FLUX))
#: Length of a feature vector.
N_FEATURES = len(FEATURE_NAMES)
#: Features that come from the fit: when one is not finite the confidence is NaN.
CORE_FEATURES = ("ln_rchi2_opt", "ln_prior", "teff_est", "logg_est", "feh_est", "teff_est_err", "logg_est_err", "feh_est_err")
_CORE_IDX = np.array([FEATURE_NAMES.index(n) for n in CORE_FEATURES])


class TooFewLabelsError(ValueError):
    """A classifier has too few good or bad training stars."""


# --------------------------------------------------------------------------- labels


def chi2_eps(est: np.ndarray, est_err: np.ndarray, ref: np.ndarray, ref_err: np.ndarray, eps: float) -> np.ndarray:
    """chi^2_eps = (est - ref)^2 / (est_err^2 + ref_err^2 + eps^2) (Sec. 4.4).

    Parameters
    ----------
    est, est_err : (n,) arrays
        Estimate and its uncertainty (same unit as ``ref``; Teff in K).
    ref, ref_err : (n,) arrays
        Reference value (LAMOST or truth) and its uncertainty (0 for truth).
    eps : float
        Uncertainty floor, same unit.

    Returns
    -------
    (n,) float64 array (NaN where any input is not finite).
    """
    est, est_err, ref, ref_err = (np.asarray(a, dtype=np.float64) for a in (est, est_err, ref, ref_err))
    return (est - ref) ** 2 / (est_err**2 + ref_err**2 + eps**2)


def chi2_eps_labels(chi2: np.ndarray, good: float = GOOD_CHI2, bad: float = BAD_CHI2) -> np.ndarray:
    """Training labels from chi^2_eps: 1.0 good (< ``good``), 0.0 bad (> ``bad``), NaN otherwise.

    Parameters
    ----------
    chi2 : (n,) array of chi^2_eps.

    Returns
    -------
    (n,) float64 array with values 1, 0 or NaN (between the thresholds, or chi^2 not finite).
    """
    chi2 = np.asarray(chi2, dtype=np.float64)
    y = np.full(chi2.shape, np.nan)
    y[chi2 < good] = 1.0
    y[chi2 > bad] = 0.0
    return y


# --------------------------------------------------------------------------- features


def _ln(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.log(np.maximum(np.asarray(x, dtype=np.float64), LN_FLOOR))


def _col(conditioned: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    if name not in conditioned:
        raise KeyError(f"confidence_features: conditioned data lack the column {name!r} (have {sorted(conditioned)})")
    a = np.asarray(conditioned[name], dtype=np.float64)
    if a.shape[0] != n:
        raise ValueError(f"confidence_features: column {name!r} has {a.shape[0]} rows, the fit has {n}")
    return a


def confidence_features(fit: Mapping[str, Any], conditioned: Mapping[str, Any]) -> np.ndarray:
    """The Appendix B feature matrix of a batch of fitted stars.

    Parameters
    ----------
    fit : mapping
        Output of inference for ``n`` stars: ``params5`` (n, 5) in catalog
        order and units (Teff kK, [Fe/H] dex, logg dex, E mag, parallax mas),
        ``cov5`` (n, 5, 5) or ``err5`` (n, 5) (same units), ``chi2`` (n,),
        ``ln_prior`` (n,), ``f_pred`` (n, 66) in the internal flux unit.
    conditioned : mapping
        The same stars' conditioned columns (schema ``CONDITIONED``):
        ``flux``, ``flux_error`` (n, 66) internal unit (NaN / inf where missing),
        ``parallax``, ``parallax_error`` [mas], ``phot_g_mean_mag`` [mag],
        ``phot_{g,bp,rp}_mean_flux_over_error``, ``phot_bp_rp_excess_factor``,
        ``ruwe``, ``fidelity_v2``, ``norm_dg``, ``bp_chi_squared``,
        ``rp_chi_squared`` and optionally ``n_valid_flux`` (n,).

    Returns
    -------
    (n, N_FEATURES) float64 array, columns as :data:`FEATURE_NAMES`; NaN where
    an input is missing.

    Notes
    -----
    ln_rchi2_opt = ln(chi2 / max(n_valid_flux - 5, 1)) when ``n_valid_flux``
    is given, else ln(chi2 / 61) (the quality-flag convention). ln_dplx2 =
    ln(((plx_gaia - plx_est) / s_plx_gaia)^2).
    """
    params5 = np.asarray(fit["params5"], dtype=np.float64)
    if params5.ndim != 2 or params5.shape[1] != 5:
        raise ValueError(f"confidence_features: params5 must be (n, 5), got shape {params5.shape}")
    n = params5.shape[0]
    if "err5" in fit:
        err5 = np.asarray(fit["err5"], dtype=np.float64)
    elif "cov5" in fit:
        cov5 = np.asarray(fit["cov5"], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            err5 = np.sqrt(np.einsum("nii->ni", cov5))
    else:
        raise KeyError("confidence_features: the fit needs 'cov5' (n, 5, 5) or 'err5' (n, 5)")
    chi2 = np.asarray(fit["chi2"], dtype=np.float64)
    ln_prior = np.asarray(fit["ln_prior"], dtype=np.float64)
    f_pred = np.asarray(fit["f_pred"], dtype=np.float64)
    if f_pred.shape != (n, N_FLUX):
        raise ValueError(f"confidence_features: f_pred must be ({n}, {N_FLUX}), got {f_pred.shape}")

    flux = _col(conditioned, "flux", n)
    flux_error = _col(conditioned, "flux_error", n)
    plx = _col(conditioned, "parallax", n)
    plx_err = _col(conditioned, "parallax_error", n)
    if "n_valid_flux" in conditioned:
        dof = np.maximum(_col(conditioned, "n_valid_flux", n) - 5.0, 1.0)
    else:
        dof = np.full(n, 61.0)

    with np.errstate(invalid="ignore", divide="ignore"):
        scal = {
            "ln_rchi2_opt": _ln(chi2 / dof),
            "ln_dplx2": _ln(((plx - params5[:, 4]) / plx_err) ** 2),
            "ln_prior": ln_prior,
            "teff_est": params5[:, 0],
            "logg_est": params5[:, 2],
            "feh_est": params5[:, 1],
            "teff_est_err": err5[:, 0],
            "logg_est_err": err5[:, 2],
            "feh_est_err": err5[:, 1],
            "asinh_plx_snr": np.arcsinh(plx / plx_err),
            "asinh_g_snr": np.arcsinh(_col(conditioned, "phot_g_mean_flux_over_error", n)),
            "asinh_bp_snr": np.arcsinh(_col(conditioned, "phot_bp_mean_flux_over_error", n)),
            "asinh_rp_snr": np.arcsinh(_col(conditioned, "phot_rp_mean_flux_over_error", n)),
            "ln_phot_bp_rp_excess_factor": _ln(_col(conditioned, "phot_bp_rp_excess_factor", n)),
            "phot_g_mean_mag": _col(conditioned, "phot_g_mean_mag", n),
            "ln_ruwe": _ln(_col(conditioned, "ruwe", n)),
            "fidelity_v2": _col(conditioned, "fidelity_v2", n),
            "norm_dg": _col(conditioned, "norm_dg", n),
            "ln_bp_chi_squared": _ln(_col(conditioned, "bp_chi_squared", n)),
            "ln_rp_chi_squared": _ln(_col(conditioned, "rp_chi_squared", n)),
        }
        # a missing input in a ln_X feature must stay missing (max(NaN, floor) is NaN already)
        usable = np.isfinite(flux) & np.isfinite(flux_error) & (flux_error > 0)
        dflux = np.where(usable, np.arcsinh((f_pred - flux) / np.where(usable, flux_error, 1.0)), 0.0)
    # a star with no fit at all has NaN residuals, not zeros
    dflux = np.where(np.all(np.isfinite(f_pred), axis=1, keepdims=True), dflux, np.nan)
    out = np.empty((n, N_FEATURES), dtype=np.float64)
    for i, name in enumerate(SCALAR_FEATURES):
        out[:, i] = scal[name]
    out[:, len(SCALAR_FEATURES) :] = dflux
    out[~np.isfinite(out)] = np.nan
    return out


# --------------------------------------------------------------------------- network


@dataclass(frozen=True)
class ClassifierSettings:
    """Hyper-parameters of one classifier (defaults: Appendix B).

    Attributes mirror :class:`xpcat.config.ConfidenceConfig`; build one with
    :meth:`from_config`.
    """

    hidden_width: int = 64
    n_hidden: int = 3
    dropout: float = 0.1
    l2: float = 1e-3
    learning_rate: float = 1e-3
    batch_size: int = 4096
    epochs: int = 1024
    patience: int = 256
    holdout_fraction: float = 0.2
    #: Fraction of the training part used as validation set for the lr schedule.
    validation_fraction: float = 0.15
    #: Minimum number of good and of bad training stars per classifier.
    min_per_class: int = 10

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> ClassifierSettings:
        """From a ``ConfidenceConfig`` (any object with the same attribute names)."""
        names = ("hidden_width", "n_hidden", "dropout", "l2", "learning_rate", "batch_size", "epochs", "patience",
                 "holdout_fraction")
        kw = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
        kw.update(overrides)
        return cls(**kw)


def init_classifier(seed: int, n_in: int, hidden_width: int = 64, n_hidden: int = 3) -> list[dict[str, np.ndarray]]:
    """He-initialised layers ``[{"W": (n_in, width), "b": (width,)}, ..., {"W": (width, 1), "b": (1,)}]`` (float32)."""
    rs = np.random.default_rng(seed)
    sizes = [n_in] + [hidden_width] * n_hidden + [1]
    return [
        {"W": (rs.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32), "b": np.zeros(b, dtype=np.float32)}
        for a, b in zip(sizes[:-1], sizes[1:])
    ]


def classifier_logits(
    layers: list[dict[str, JAXArray]], x: JAXArray, *, dropout: float = 0.0, key: JAXArray | None = None
) -> JAXArray:
    """Logits of standardised features ``x`` (n, F) -> (n,); dropout before each hidden layer when ``key`` is given."""
    h = x
    n_hidden = len(layers) - 1
    keys = jax.random.split(key, n_hidden) if key is not None else [None] * n_hidden
    for layer, k in zip(layers[:-1], keys):
        if k is not None and dropout > 0:
            keep = jax.random.bernoulli(k, 1.0 - dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - dropout), 0.0)
        h = jax.nn.relu(h @ layer["W"] + layer["b"])
    return (h @ layers[-1]["W"] + layers[-1]["b"])[:, 0]


def _loss(layers, x, y, w, l2, dropout, key):
    logits = classifier_logits(layers, x, dropout=dropout, key=key)
    bce = optax.sigmoid_binary_cross_entropy(logits, y)
    data = jnp.sum(bce * w) / jnp.maximum(jnp.sum(w), 1.0)
    penalty = sum(jnp.sum(layer["W"] ** 2) for layer in layers[:-1])
    return data + l2 * penalty


def _mean_bce(layers, x, y, w):
    logits = classifier_logits(layers, x)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y) * w) / jnp.maximum(jnp.sum(w), 1.0)


#: Row counts are padded to multiples of this, so few shapes need compiling.
_PAD_QUANTUM = 256


#: One optimiser object for every classifier (the learning rate lives in its state), so the
#: jitted epoch compiles once per shape.
_OPTIMIZER = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


@partial(jax.jit, static_argnames=("bs", "dropout"))
def _epoch(layers, opt_state, key, x_train, y_train, w_train, x_val, y_val, w_val, l2, *, bs, dropout):
    """One pass over the (padded) training set in shuffled batches; rows of zero weight are padding."""
    n = x_train.shape[0]
    n_batches = n // bs
    k_perm, k_drop = jax.random.split(key)
    idx = jax.random.permutation(k_perm, n).reshape(n_batches, bs)
    drop_keys = jax.random.split(k_drop, n_batches)

    def step(carry, inp):
        layers, opt_state = carry
        ib, kb = inp
        g = jax.grad(_loss)(layers, x_train[ib], y_train[ib], w_train[ib], l2, dropout, kb)
        updates, opt_state = _OPTIMIZER.update(g, opt_state, layers)
        return (optax.apply_updates(layers, updates), opt_state), None

    (layers, opt_state), _ = jax.lax.scan(step, (layers, opt_state), (idx, drop_keys))
    return layers, opt_state, _mean_bce(layers, x_val, y_val, w_val)


def _pad_rows(x: np.ndarray, y: np.ndarray, n_to: int) -> tuple[JAXArray, JAXArray, JAXArray]:
    """Pad features, labels and unit weights with zero-weight rows to ``n_to`` rows (few jit shapes)."""
    n = x.shape[0]
    xp = np.zeros((n_to, x.shape[1]), dtype=np.float32)
    xp[:n] = x
    yp = np.zeros(n_to, dtype=np.float32)
    yp[:n] = y
    wp = np.zeros(n_to, dtype=np.float32)
    wp[:n] = 1.0
    return jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(wp)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def train_classifier(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    settings: ClassifierSettings,
    seed: int = 0,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Train one classifier on standardised, finite features.

    Parameters
    ----------
    x_train : (n, F) float array, y_train : (n,) array of 0/1
        Training set.
    x_val : (m, F) float array, y_val : (m,) array of 0/1
        Validation set driving the learning-rate drops and the choice of the
        best epoch (m may be 0: the training loss is used instead).
    settings : ClassifierSettings
    seed : int
        Seed of the initialisation, the shuffling and the dropout.

    Returns
    -------
    layers : list of {"W", "b"} numpy arrays (the best-validation epoch)
    history : dict with ``epochs_run``, ``best_epoch``, ``best_val_loss``,
        ``final_learning_rate``, ``val_loss`` (list per epoch).
    """
    x_train = np.asarray(x_train, dtype=np.float32)
    n = x_train.shape[0]
    if n == 0:
        raise ValueError("train_classifier: empty training set")
    if x_val.shape[0] == 0:
        x_val, y_val = x_train, y_train
    bs = min(settings.batch_size, _round_up(n, _PAD_QUANTUM))
    xt, yt, wt = _pad_rows(x_train, np.asarray(y_train), _round_up(n, bs))
    xv, yv, wv = _pad_rows(np.asarray(x_val, dtype=np.float32), np.asarray(y_val), _round_up(x_val.shape[0], _PAD_QUANTUM))
    key = jax.random.PRNGKey(seed)
    layers = jax.tree_util.tree_map(jnp.asarray, init_classifier(seed, x_train.shape[1], settings.hidden_width, settings.n_hidden))
    opt_state = _OPTIMIZER.init(layers)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(settings.learning_rate, dtype=jnp.float32)
    l2 = jnp.asarray(settings.l2, dtype=jnp.float32)

    lr = float(settings.learning_rate)
    best_loss, best_epoch, best_layers = np.inf, -1, layers
    since_best = since_drop = 0
    history: list[float] = []
    stop_after = 4 * settings.patience
    for ep in range(settings.epochs):
        key, k = jax.random.split(key)
        layers, opt_state, val_loss = _epoch(
            layers, opt_state, k, xt, yt, wt, xv, yv, wv, l2, bs=bs, dropout=settings.dropout
        )
        val_loss = float(val_loss)
        history.append(val_loss)
        if val_loss < best_loss - 1e-7:
            best_loss, best_epoch, best_layers = val_loss, ep, layers
            since_best = since_drop = 0
        else:
            since_best += 1
            since_drop += 1
        if since_drop >= settings.patience:
            lr /= 10.0
            opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, dtype=jnp.float32)
            since_drop = 0
            logger.debug("confidence classifier: epoch %d, learning rate -> %g", ep, lr)
        if since_best >= stop_after:
            break
    out = [{"W": np.asarray(layer["W"]), "b": np.asarray(layer["b"])} for layer in best_layers]
    info = {
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "final_learning_rate": lr,
        "val_loss": history,
    }
    return out, info


# --------------------------------------------------------------------------- the three classifiers


@dataclass
class ConfidenceClassifiers:
    """The trained classifiers and the feature standardisation they expect.

    Attributes
    ----------
    feature_names : tuple of str
        Names of the F input features (:data:`FEATURE_NAMES`).
    center, scale : (F,) float64 arrays
        Standardisation: ``x = (features - center) / scale``; NaN (imputed)
        features become 0, the training median.
    nets : dict
        ``{"teff" | "feh" | "logg": [{"W", "b"}, ...]}`` numpy layers.
    """

    feature_names: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    nets: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def standardise(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardised features with NaN imputed to 0, and the rows whose confidence is defined.

        Returns
        -------
        x : (n, F) float32 array
        ok : (n,) bool array, False where a core (fit-derived) feature is missing
        """
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.feature_names):
            raise ValueError(
                f"confidence features must be (n, {len(self.feature_names)}), got shape {features.shape}"
            )
        core = [self.feature_names.index(nm) for nm in CORE_FEATURES if nm in self.feature_names]
        ok = np.all(np.isfinite(features[:, core]), axis=1) & np.any(np.isfinite(features), axis=1)
        x = (features - self.center) / self.scale
        x = np.where(np.isfinite(x), x, 0.0)
        return x.astype(np.float32), ok


def _standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = np.nanmedian(features, axis=0)
    q16, q84 = np.nanpercentile(features, [16, 84], axis=0)
    scale = 0.5 * (q84 - q16)
    std = np.nanstd(features, axis=0)
    scale = np.where(scale > 0, scale, np.where(std > 0, std, 1.0))
    center = np.where(np.isfinite(center), center, 0.0)
    scale = np.where(np.isfinite(scale), scale, 1.0)
    return center, scale


def train_confidence_classifiers(
    features: np.ndarray,
    labels: Mapping[str, np.ndarray],
    settings: ClassifierSettings,
    seed: int = 0,
    holdout: np.ndarray | None = None,
) -> tuple[ConfidenceClassifiers, dict[str, Any]]:
    """Train the three classifiers with a held-out set and report their ROC AUC.

    Parameters
    ----------
    features : (n, F) array
        :func:`confidence_features` of the training stars (already restricted
        to the stars passing the basic cut).
    labels : mapping
        ``{"teff": y, "feh": y, "logg": y}``, each (n,) with 1 good, 0 bad,
        NaN unused (:func:`chi2_eps_labels`).
    settings : ClassifierSettings
    seed : int
        Seed of the initialisation, the split and the dropout.
    holdout : (n,) bool array, optional
        Stars held out for the AUC; default a random ``holdout_fraction``.

    Returns
    -------
    classifiers : ConfidenceClassifiers
    report : dict
        Per parameter: ``auc`` (held-out ROC AUC, NaN when the held-out set
        lacks a class), ``n_train_good``, ``n_train_bad``, ``n_holdout_good``,
        ``n_holdout_bad``, ``epochs_run``, ``best_epoch``; plus ``n_stars``.

    Raises
    ------
    TooFewLabelsError
        When a classifier has fewer than ``settings.min_per_class`` good or bad
        training stars (the message names the parameter, the class and the count).
    """
    from sklearn.metrics import roc_auc_score

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != N_FEATURES:
        raise ValueError(f"features must be (n, {N_FEATURES}), got shape {features.shape}")
    n = features.shape[0]
    rs = np.random.default_rng(seed)
    if holdout is None:
        holdout = rs.random(n) < settings.holdout_fraction
    holdout = np.asarray(holdout, dtype=bool)
    if holdout.shape != (n,):
        raise ValueError(f"holdout must be ({n},), got {holdout.shape}")
    center, scale = _standardisation(features[~holdout] if np.any(~holdout) else features)
    clf = ConfidenceClassifiers(tuple(FEATURE_NAMES), center, scale, {})
    x_all, ok = clf.standardise(features)
    inner_val = rs.random(n) < settings.validation_fraction
    report: dict[str, Any] = {"n_stars": int(n)}
    ys, splits = {}, {}
    for name in PARAMETERS:  # check every class before training anything
        if name not in labels:
            raise KeyError(f"labels lack the parameter {name!r} (need {PARAMETERS})")
        y = np.asarray(labels[name], dtype=np.float64)
        if y.shape != (n,):
            raise ValueError(f"labels[{name!r}] must be ({n},), got {y.shape}")
        usable = ok & np.isfinite(y)
        train = usable & ~holdout
        n_good, n_bad = int(np.sum(y[train] == 1)), int(np.sum(y[train] == 0))
        for cls_name, count in (("good", n_good), ("bad", n_bad)):
            if count < settings.min_per_class:
                raise TooFewLabelsError(
                    f"confidence classifier {name!r}: only {count} {cls_name} training stars "
                    f"(chi^2_eps {'< 4' if cls_name == 'good' else '> 9'}), need at least {settings.min_per_class}; "
                    "use more labelled validation stars"
                )
        ys[name], splits[name] = y, (train, usable & holdout, n_good, n_bad)
    for name in PARAMETERS:
        y = ys[name]
        train, test, n_good, n_bad = splits[name]
        fit_idx = train & ~inner_val
        val_idx = train & inner_val
        if len(np.unique(y[fit_idx])) < 2:  # tiny sets: validate on the training part
            fit_idx, val_idx = train, np.zeros(n, dtype=bool)
        layers, info = train_classifier(
            x_all[fit_idx], y[fit_idx], x_all[val_idx], y[val_idx], settings, seed=seed * 7 + PARAMETERS.index(name)
        )
        clf.nets[name] = layers
        auc = float("nan")
        if test.any() and len(np.unique(y[test])) == 2:
            p = _forward_probability(layers, x_all[test])
            auc = float(roc_auc_score(y[test], p))
        report[name] = {
            "auc": auc,
            "n_train_good": n_good,
            "n_train_bad": n_bad,
            "n_holdout_good": int(np.sum(y[test] == 1)),
            "n_holdout_bad": int(np.sum(y[test] == 0)),
            "epochs_run": info["epochs_run"],
            "best_epoch": info["best_epoch"],
            "best_val_loss": info["best_val_loss"],
        }
        logger.info(
            "confidence %s: %d good / %d bad training stars, %d epochs, held-out AUC %.3f",
            name, n_good, n_bad, info["epochs_run"], auc,
        )
    return clf, report


@jax.jit
def _forward_jit(layers, x):
    return jax.nn.sigmoid(classifier_logits(layers, x))


def _forward_probability(layers: list[dict[str, np.ndarray]], x: np.ndarray) -> np.ndarray:
    return np.asarray(_forward_jit([{k: jnp.asarray(v) for k, v in layer.items()} for layer in layers], jnp.asarray(x)))


def predict_confidence(
    classifiers: ConfidenceClassifiers | Mapping[str, np.ndarray], features: np.ndarray
) -> np.ndarray:
    """Confidences of a batch of stars.

    Parameters
    ----------
    classifiers : ConfidenceClassifiers or mapping of arrays
        The trained classifiers, or their flat arrays as stored in the model
        artifact's ``confidence`` component (:func:`classifiers_to_arrays`).
    features : (n, F) array from :func:`confidence_features`

    Returns
    -------
    (n, 3) float32 array: Teff, [Fe/H], logg confidence in [0, 1]; NaN for
    stars whose fit-derived features are missing.
    """
    if not isinstance(classifiers, ConfidenceClassifiers):
        classifiers = classifiers_from_arrays(classifiers)
    x, ok = classifiers.standardise(features)
    out = np.full((x.shape[0], len(PARAMETERS)), np.nan, dtype=np.float32)
    if ok.any():
        for j, name in enumerate(PARAMETERS):
            out[ok, j] = _forward_probability(classifiers.nets[name], x[ok])
    return out


def confidence_quality_bits(confidence: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """quality_flags bits 0-2 (Teff, [Fe/H], logg) from the confidences.

    Parameters
    ----------
    confidence : (n, 3) array (NaN allowed)

    Returns
    -------
    (n,) uint8: bit j set when confidence j < ``threshold`` or is NaN.
    """
    c = np.asarray(confidence, dtype=np.float64)
    low = ~(c >= threshold)  # NaN counts as low confidence
    return (low[:, 0] * 1 + low[:, 1] * 2 + low[:, 2] * 4).astype(np.uint8)


# --------------------------------------------------------------------------- (de)serialisation


def classifiers_to_arrays(classifiers: ConfidenceClassifiers) -> dict[str, np.ndarray]:
    """Flat numpy arrays for the model artifact.

    Keys: ``center`` (F,), ``scale`` (F,), ``feature_names`` (F,) unicode,
    and ``<param>/W<i>``, ``<param>/b<i>`` for each layer i of each classifier.
    """
    out: dict[str, np.ndarray] = {
        "center": np.asarray(classifiers.center, dtype=np.float64),
        "scale": np.asarray(classifiers.scale, dtype=np.float64),
        "feature_names": np.asarray(classifiers.feature_names, dtype=np.str_),
    }
    for name, layers in classifiers.nets.items():
        for i, layer in enumerate(layers):
            out[f"{name}/W{i}"] = np.asarray(layer["W"], dtype=np.float32)
            out[f"{name}/b{i}"] = np.asarray(layer["b"], dtype=np.float32)
    return out


def classifiers_from_arrays(arrays: Mapping[str, np.ndarray]) -> ConfidenceClassifiers:
    """Inverse of :func:`classifiers_to_arrays`.

    Raises
    ------
    ValueError
        When a classifier or the standardisation is missing or inconsistent.
    """
    missing = [k for k in ("center", "scale") if k not in arrays]
    if missing:
        raise ValueError(f"confidence component lacks {missing}; has {sorted(arrays)}")
    names = tuple(str(s) for s in np.asarray(arrays["feature_names"])) if "feature_names" in arrays else FEATURE_NAMES
    center = np.asarray(arrays["center"], dtype=np.float64)
    scale = np.asarray(arrays["scale"], dtype=np.float64)
    if center.shape != (len(names),) or scale.shape != (len(names),):
        raise ValueError(f"confidence component: center/scale shapes {center.shape}/{scale.shape} != ({len(names)},)")
    nets: dict[str, list[dict[str, np.ndarray]]] = {}
    for name in PARAMETERS:
        layers = []
        i = 0
        while f"{name}/W{i}" in arrays:
            layers.append({"W": np.asarray(arrays[f"{name}/W{i}"]), "b": np.asarray(arrays[f"{name}/b{i}"])})
            i += 1
        if not layers:
            raise ValueError(f"confidence component has no {name!r} classifier (keys {sorted(arrays)})")
        if layers[0]["W"].shape[0] != len(names):
            raise ValueError(f"confidence {name!r}: first layer takes {layers[0]['W'].shape[0]} inputs, not {len(names)}")
        nets[name] = layers
    return ConfidenceClassifiers(names, center, scale, nets)

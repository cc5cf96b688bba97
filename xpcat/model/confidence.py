"""The three reliability ("confidence") classifiers of Sec. 4.4 and Appendix B.

One binary classifier per atmospheric parameter (Teff, [Fe/H], logg) predicts
whether the estimate agrees with a reference (LAMOST, or the truth of a
synthetic universe). This module trains the three together
(:func:`train_confidence_classifiers`: a held-out set for the ROC AUC, a shared
feature standardisation), applies them (:func:`predict_confidence`), turns
confidences into quality bits (:func:`confidence_quality_bits`) and stores
them as flat arrays for the model artifact.

Its inputs are built in :mod:`xpcat.model.confidence_features` (the Appendix B
features, the chi^2_eps labels) and one network is defined and trained in
:mod:`xpcat.model.confidence_network`; their public names are re-exported here,
so ``from xpcat.model import confidence as C`` sees the whole interface.

Missing values (the fallback rule): a star whose fit-derived features
(:data:`CORE_FEATURES`: chi^2, prior, estimates and their errors) are not all
finite gets NaN confidences and the low-confidence bits; any other missing
feature is imputed with the training-set median (0 after standardisation).

Pure array code: numpy, JAX, optax and scikit-learn only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xpcat.model.confidence_features import (
    BAD_CHI2,
    CORE_FEATURES,
    EPSILON,
    FEATURE_NAMES,
    GOOD_CHI2,
    LN_FLOOR,
    N_FEATURES,
    N_FLUX,
    PARAMETERS,
    SCALAR_FEATURES,
    chi2_eps,
    chi2_eps_labels,
    confidence_features,
)
from xpcat.model.confidence_network import (
    ClassifierSettings,
    classifier_logits,
    classifier_probability,
    init_classifier,
    train_classifier,
)

logger = logging.getLogger(__name__)

__all__ = [
    # defined here
    "ConfidenceClassifiers",
    "TooFewLabelsError",
    "train_confidence_classifiers",
    "predict_confidence",
    "confidence_quality_bits",
    "trained_parameters",
    "classifiers_to_arrays",
    "classifiers_from_arrays",
    # re-exported from xpcat.model.confidence_features
    "PARAMETERS",
    "EPSILON",
    "GOOD_CHI2",
    "BAD_CHI2",
    "LN_FLOOR",
    "N_FLUX",
    "SCALAR_FEATURES",
    "FEATURE_NAMES",
    "N_FEATURES",
    "CORE_FEATURES",
    "chi2_eps",
    "chi2_eps_labels",
    "confidence_features",
    # re-exported from xpcat.model.confidence_network
    "ClassifierSettings",
    "init_classifier",
    "classifier_logits",
    "train_classifier",
    "classifier_probability",
]


class TooFewLabelsError(ValueError):
    """A classifier has too few good or bad training stars (kept for callers; training now falls back per parameter)."""


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

    def select(self, features: np.ndarray) -> np.ndarray:
        """(n, F) features in :attr:`feature_names` order, from those or from (n, N_FEATURES) (picked by name).

        Raises
        ------
        ValueError
            When the width fits neither, or the classifier needs a feature this version does not compute.
        """
        features = np.asarray(features, dtype=np.float64)
        names = self.feature_names
        if features.ndim == 2 and features.shape[1] == len(names):
            return features
        if features.ndim != 2 or features.shape[1] != N_FEATURES:
            raise ValueError(f"confidence features must be (n, {len(names)}) or (n, {N_FEATURES}), got shape "
                             f"{features.shape}")
        unknown = [nm for nm in names if nm not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"the confidence classifiers need features this version does not compute: {unknown}; "
                             "retrain the confidence component (xpcat train-confidence) with this version")
        return features[:, [FEATURE_NAMES.index(nm) for nm in names]]

    def standardise(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardised features with NaN imputed to 0, and the rows whose confidence is defined.

        Parameters
        ----------
        features : (n, F) in this object's :attr:`feature_names` order, or (n, N_FEATURES) as
            :func:`confidence_features` gives them, whose columns are then picked by name (a
            classifier trained on fewer features keeps working when features are added).

        Returns
        -------
        x : (n, F) float32 array
        ok : (n,) bool array, False where a core (fit-derived) feature is missing

        Raises
        ------
        ValueError
            As :meth:`select`.
        """
        features = self.select(features)
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
        lacks a class), ``fallback`` (bool), ``n_train_good``, ``n_train_bad``,
        ``n_holdout_good``, ``n_holdout_bad``, and ``epochs_run``, ``best_epoch``
        for a trained one or ``reason`` for one that fell back; plus ``n_stars``.

    A classifier with fewer than ``settings.min_per_class`` good or bad
    training stars (one class only, or none) is not trained: it falls back to
    the placeholder rule alone (:func:`confidence_quality_bits`), its
    ``reason`` names the class and the count, and the others still train.
    Stars with a missing core feature (NaN) take no part in the training.
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
    for name in PARAMETERS:  # each classifier trains, or falls back to the placeholder rule, alone
        if name not in labels:
            raise KeyError(f"labels lack the parameter {name!r} (need {PARAMETERS})")
        y = np.asarray(labels[name], dtype=np.float64)
        if y.shape != (n,):
            raise ValueError(f"labels[{name!r}] must be ({n},), got {y.shape}")
        usable = ok & np.isfinite(y)
        train, test = usable & ~holdout, usable & holdout
        n_good, n_bad = int(np.sum(y[train] == 1)), int(np.sum(y[train] == 0))
        counts = {"n_train_good": n_good, "n_train_bad": n_bad, "n_holdout_good": int(np.sum(y[test] == 1)),
                  "n_holdout_bad": int(np.sum(y[test] == 0))}
        short = [(c, k) for c, k in (("good", n_good), ("bad", n_bad)) if k < settings.min_per_class]
        if short:
            cls_name, count = short[0]
            reason = (f"only {count} {cls_name} training stars (chi^2_eps {'< 4' if cls_name == 'good' else '> 9'}), "
                      f"need at least {settings.min_per_class}")
            logger.warning("confidence classifier %r not trained, it falls back to the placeholder rule: %s; "
                           "more labelled stars would train it", name, reason)
            report[name] = {"auc": float("nan"), "fallback": True, "reason": reason, **counts}
            continue
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
            p = classifier_probability(layers, x_all[test])
            auc = float(roc_auc_score(y[test], p))
        report[name] = {
            "auc": auc,
            "fallback": False,
            **counts,
            "epochs_run": info["epochs_run"],
            "best_epoch": info["best_epoch"],
            "best_val_loss": info["best_val_loss"],
        }
        logger.info(
            "confidence %s: %d good / %d bad training stars, %d epochs, held-out AUC %.3f",
            name, n_good, n_bad, info["epochs_run"], auc,
        )
    return clf, report


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
    stars whose fit-derived features are missing, and the whole column of a
    parameter without a classifier (it fell back to the placeholder rule).
    """
    if not isinstance(classifiers, ConfidenceClassifiers):
        classifiers = classifiers_from_arrays(classifiers)
    x, ok = classifiers.standardise(features)
    out = np.full((x.shape[0], len(PARAMETERS)), np.nan, dtype=np.float32)
    if ok.any():
        for j, name in enumerate(PARAMETERS):
            if name in classifiers.nets:
                out[ok, j] = classifier_probability(classifiers.nets[name], x[ok])
    return out


def trained_parameters(classifiers: ConfidenceClassifiers | Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The parameters (of :data:`PARAMETERS`) that have a trained classifier."""
    if isinstance(classifiers, ConfidenceClassifiers):
        return tuple(p for p in PARAMETERS if p in classifiers.nets)
    return tuple(p for p in PARAMETERS if f"{p}/W0" in classifiers)


def confidence_quality_bits(confidence: np.ndarray, threshold: float = 0.5, fit_status: np.ndarray | None = None,
                            trained: tuple[str, ...] = PARAMETERS) -> np.ndarray:
    """quality_flags bits 0-2 (Teff, [Fe/H], logg) from the confidences.

    Parameters
    ----------
    confidence : (n, 3) array (NaN allowed)
    threshold : a confidence below it sets the bit.
    fit_status : (n,) uint8, needed when a parameter has no classifier.
    trained : the parameters with a classifier; the bit of any other follows
        the placeholder rule (:data:`xpcat.model.uncertainty.PLACEHOLDER_CONFIDENCE_RULE`:
        set exactly when ``fit_status != 0``).

    Returns
    -------
    (n,) uint8: bit j set when confidence j < ``threshold`` or is NaN (trained
    parameters), or when the fit failed (the others).
    """
    c = np.asarray(confidence, dtype=np.float64)
    low = ~(c >= threshold)  # NaN counts as low confidence
    missing = [j for j, p in enumerate(PARAMETERS) if p not in trained]
    if missing:
        if fit_status is None:
            raise ValueError(f"confidence_quality_bits: no classifier for {[PARAMETERS[j] for j in missing]}; "
                             "pass fit_status for their placeholder bits")
        failed = np.asarray(fit_status) != 0
        for j in missing:
            low[:, j] = failed
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
        When the standardisation is missing or a classifier is inconsistent (a classifier that is
        absent is a parameter that fell back to the placeholder rule).
    """
    missing = [k for k in ("center", "scale") if k not in arrays]
    if missing:
        raise ValueError(f"confidence component lacks {missing}; has {sorted(arrays)}")
    center = np.asarray(arrays["center"], dtype=np.float64)
    if "feature_names" in arrays:
        names = tuple(str(s) for s in np.asarray(arrays["feature_names"]))
    else:  # an artifact without names: features are only ever appended, so it used the leading ones
        names = FEATURE_NAMES[: center.shape[0]] if center.ndim == 1 else FEATURE_NAMES
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
        if not layers:  # this parameter fell back to the placeholder rule
            continue
        if layers[0]["W"].shape[0] != len(names):
            raise ValueError(f"confidence {name!r}: first layer takes {layers[0]['W'].shape[0]} inputs, not {len(names)}")
        nets[name] = layers
    return ConfidenceClassifiers(names, center, scale, nets)

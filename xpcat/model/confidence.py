"""The three reliability ("confidence") classifiers of Sec. 4.4 and Appendix B.

One binary classifier per atmospheric parameter (Teff, [Fe/H], logg) predicts
whether the estimate agrees with a reference (LAMOST, or the truth of a
synthetic universe). This module trains the three together
(:func:`train_confidence_classifiers`: the ROC AUC on stars the networks did
not see, with its bootstrap error, from the paper's 20 % hold-out or, beyond
the paper, from k-fold cross-validation, after which each classifier learns
from all the stars; a shared feature standardisation), applies them (:func:`predict_confidence`), turns
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
from xpcat.model.confidence_logistic import train_logistic
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
    "auc_with_error",
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


def auc_with_error(y: np.ndarray, p: np.ndarray, n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """ROC AUC and its bootstrap standard error.

    Parameters
    ----------
    y : (n,) array of 1 (good) / 0 (bad)
    p : (n,) array of confidences
    n_boot : number of bootstrap resamples of the stars
    seed : seed of the resampling

    Returns
    -------
    auc, se : float
        NaN when ``y`` lacks a class (the SE also when no resample has both).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.size == 0 or len(np.unique(y)) < 2:
        return float("nan"), float("nan")
    auc = float(roc_auc_score(y, p))
    rs = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rs.integers(0, y.size, y.size)
        if 0 < np.sum(y[i]) < y.size:
            boots.append(roc_auc_score(y[i], p[i]))
    return auc, float(np.std(boots)) if len(boots) > 1 else float("nan")


def _check_split(values: np.ndarray | None, n: int, what: str) -> None:
    if values is not None and np.shape(values) != (n,):
        raise ValueError(f"{what} must be ({n},), got {np.shape(values)}")


def _train_one(x_all: np.ndarray, y: np.ndarray, train: np.ndarray, settings: ClassifierSettings,
               rs: np.random.Generator, seed: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """One classifier on the stars ``train``, a random ``validation_fraction`` of them driving its schedule.

    With ``settings.logistic_candidate`` the logistic classifier trains on the same split too and the one with
    the lower validation loss is returned (``info["architecture"]``; the network when there is no validation set).
    """
    n = y.shape[0]
    inner_val = rs.random(n) < settings.validation_fraction
    fit_idx, val_idx = train & ~inner_val, train & inner_val
    if len(np.unique(y[fit_idx])) < 2:  # tiny sets: validate on the training part
        fit_idx, val_idx = train, np.zeros(n, dtype=bool)
    split = (x_all[fit_idx], y[fit_idx], x_all[val_idx], y[val_idx])
    layers, info = train_classifier(*split, settings, seed=seed)
    info["architecture"] = "network"
    logistic = train_logistic(*split, seed=seed) if settings.logistic_candidate and val_idx.any() else None
    if logistic is not None:
        lin, lin_info = logistic
        losses = {"network": info["best_val_loss"], "logistic": lin_info["best_val_loss"]}
        if losses["logistic"] < losses["network"]:
            layers, info = lin, lin_info | {"architecture": "logistic"}
        info["candidate_val_loss"] = losses
    return layers, info


def train_confidence_classifiers(
    features: np.ndarray,
    labels: Mapping[str, np.ndarray],
    settings: ClassifierSettings,
    seed: int = 0,
    holdout: np.ndarray | None = None,
    folds: np.ndarray | None = None,
) -> tuple[ConfidenceClassifiers, dict[str, Any]]:
    """Train the three classifiers and report their ROC AUC on stars they did not see.

    Parameters
    ----------
    features : (n, F) array
        :func:`confidence_features` of the training stars (already restricted
        to the stars passing the basic cut).
    labels : mapping
        ``{"teff": y, "feh": y, "logg": y}``, each (n,) with 1 good, 0 bad,
        NaN unused (:func:`chi2_eps_labels`).
    settings : ClassifierSettings
        ``folds`` >= 2: k-fold cross-validation (beyond the paper); else the
        paper's single hold-out of ``holdout_fraction``.
    seed : int
        Seed of the initialisation, the splits and the dropout.
    holdout : (n,) bool array, optional
        Stars held out for the AUC (``folds`` < 2); default a random ``holdout_fraction``.
    folds : (n,) int array in [0, settings.folds), optional
        Fold of each star (``folds`` >= 2); default random.

    Returns
    -------
    classifiers : ConfidenceClassifiers
        With k folds, each parameter's classifier is one network trained on
        all its usable stars; the k fold networks (each trained on the other
        k - 1 folds) only score the stars they did not see.
    report : dict
        Per parameter: ``auc`` (ROC AUC on the stars not seen: the hold-out,
        or every usable star scored out-of-fold; NaN when a class is missing
        there), ``auc_se`` (its bootstrap standard error), ``auc_method``,
        ``fallback`` (bool), ``n_train_good``, ``n_train_bad``,
        ``n_holdout_good``, ``n_holdout_bad`` (the stars the AUC scored), and
        ``epochs_run``, ``best_epoch`` (lists over the networks: the fold
        networks, then the final one) for a trained
        one or ``reason`` for one that fell back; plus ``n_stars``, and
        ``oof_confidence`` (n, 3) (NaN where a star was not scored unseen).

    A classifier with fewer than ``settings.min_per_class`` good or bad
    training stars (in the smallest fold's training part) is not trained: it
    falls back to the placeholder rule alone (:func:`confidence_quality_bits`),
    its ``reason`` names the class and the count, and the others still train.
    Stars with a missing core feature (NaN) take no part in the training.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != N_FEATURES:
        raise ValueError(f"features must be (n, {N_FEATURES}), got shape {features.shape}")
    n = features.shape[0]
    rs = np.random.default_rng(seed)
    k = int(settings.folds)
    _check_split(holdout, n, "holdout")
    _check_split(folds, n, "folds")
    if k >= 2:
        fold = rs.integers(0, k, n) if folds is None else np.asarray(folds, dtype=np.int64)
        if fold.size and (fold.min() < 0 or fold.max() >= k):
            raise ValueError(f"folds must lie in [0, {k}), got values {fold.min()}..{fold.max()}")
        parts = [fold == f for f in range(k)]
        method = f"out-of-fold ({k} folds)"
        center, scale = _standardisation(features)  # label-free, so every star may shape it
    else:
        hold = rs.random(n) < settings.holdout_fraction if holdout is None else np.asarray(holdout, dtype=bool)
        parts = [hold]
        method = f"hold-out ({settings.holdout_fraction:.0%})"
        center, scale = _standardisation(features[~hold] if np.any(~hold) else features)
    clf = ConfidenceClassifiers(tuple(FEATURE_NAMES), center, scale, {})
    x_all, ok = clf.standardise(features)
    oof = np.full((n, len(PARAMETERS)), np.nan)
    report: dict[str, Any] = {"n_stars": int(n)}
    for j, name in enumerate(PARAMETERS):  # each classifier trains, or falls back to the placeholder rule, alone
        if name not in labels:
            raise KeyError(f"labels lack the parameter {name!r} (need {PARAMETERS})")
        y = np.asarray(labels[name], dtype=np.float64)
        if y.shape != (n,):
            raise ValueError(f"labels[{name!r}] must be ({n},), got {y.shape}")
        usable = ok & np.isfinite(y)
        trains = [usable & ~part for part in parts]
        scored = usable & np.any(parts, axis=0)
        n_good = min(int(np.sum(y[t] == 1)) for t in trains)
        n_bad = min(int(np.sum(y[t] == 0)) for t in trains)
        counts = {"n_train_good": n_good, "n_train_bad": n_bad, "n_holdout_good": int(np.sum(y[scored] == 1)),
                  "n_holdout_bad": int(np.sum(y[scored] == 0)), "auc_method": method}
        short = [(c, m) for c, m in (("good", n_good), ("bad", n_bad)) if m < settings.min_per_class]
        if short:
            cls_name, count = short[0]
            where = " in the smallest fold's training part" if k >= 2 else ""
            reason = (f"only {count} {cls_name} training stars{where} (chi^2_eps {'< 4' if cls_name == 'good' else '> 9'}), "
                      f"need at least {settings.min_per_class}")
            logger.warning("confidence classifier %r not trained, it falls back to the placeholder rule: %s; "
                           "more labelled stars would train it", name, reason)
            report[name] = {"auc": float("nan"), "auc_se": float("nan"), "fallback": True, "reason": reason, **counts}
            continue
        infos = []
        for f, (train, part) in enumerate(zip(trains, parts)):
            layers, info = _train_one(x_all, y, train, settings, rs, seed * 7 + j + 101 * f)
            infos.append(info)
            test = usable & part
            if test.any():
                oof[test, j] = classifier_probability(layers, x_all[test])
        if k >= 2:  # the fold networks only score the stars they did not see; the classifier learns from all
            layers, info = _train_one(x_all, y, usable, settings, rs, seed * 7 + j + 101 * k)
            infos.append(info)
        clf.nets[name] = layers
        auc, auc_se = auc_with_error(y[scored], oof[scored, j], seed=seed)
        report[name] = {
            "auc": auc,
            "auc_se": auc_se,
            "fallback": False,
            **counts,
            "epochs_run": [i.get("epochs_run") for i in infos],  # None for a kept logistic classifier
            "best_epoch": [i.get("best_epoch") for i in infos],
            "best_val_loss": [i["best_val_loss"] for i in infos],
            "architecture": [i["architecture"] for i in infos],
            "inverse_l2": [i.get("inverse_l2") for i in infos],  # the logistic candidate's C where kept
        }
        logger.info("confidence %s: %d good / %d bad training stars, %d classifier(s) (kept: %s), %s AUC %.3f "
                    "+- %.3f", name, n_good, n_bad, len(infos), infos[-1]["architecture"], method, auc, auc_se)
    report["oof_confidence"] = oof
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

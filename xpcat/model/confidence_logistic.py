"""The logistic candidate of a confidence classifier (beyond the paper): scikit-learn, its L2 strength cross-validated.

Beside the paper's 3 x 64 network (:mod:`xpcat.model.confidence_network`),
``[confidence] logistic_candidate`` trains an L2-regularised logistic
classifier on the same stars and keeps whichever has the lower validation loss
(:func:`xpcat.model.confidence._train_one`). The paper's network was sized for
2.5 million labelled stars; on the 6,000-star demo (~2,250 labelled basic-cut
stars, 64 bad in Teff) it overfits.

The logistic classifier is scikit-learn's :class:`~sklearn.linear_model.LogisticRegression`:
the problem is convex, so lbfgs solves it exactly, and the penalty is chosen
by stratified cross-validation of the log loss within the training part
(:class:`~sklearn.model_selection.GridSearchCV` over :data:`INVERSE_L2_GRID`, on
at most :data:`CV_MAX_STARS` of its stars, which also fit the weights) rather than
set by hand. Its weights are stored as a
network without hidden layer (``[{"W": (F, 1), "b": (1,)}]``), which
:func:`xpcat.model.confidence_network.classifier_probability` evaluates like
any other. Measured on the demo's stored features and folds (out of fold, Teff /
[Fe/H] / logg AUC): the earlier Adam-trained logistic candidate with a fixed
penalty 0.82 / 0.76 / 0.94 (choice per fold), this one alone 0.87 / 0.79 / 0.93.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CV_MAX_STARS", "INVERSE_L2_GRID", "MAX_CV_FOLDS", "train_logistic"]

#: Inverse L2 strengths C that the cross-validation chooses from (scikit-learn's convention: the penalty
#: is |w|^2 / (2 C) against the summed log loss).
INVERSE_L2_GRID = tuple(float(c) for c in np.logspace(-3, 0, 7))
#: At most this many stratified folds choose C (fewer when a class has fewer stars).
MAX_CV_FOLDS = 5
#: The logistic candidate learns from a stratified sample of at most this many training stars (C and the
#: weights): the search costs len(INVERSE_L2_GRID) x MAX_CV_FOLDS fits, which on a 200k-star universe took
#: longer than the slow test's 30 minutes; 86 weights are well determined by 20,000 stars, and on large sets
#: the network wins the choice anyway.
CV_MAX_STARS = 20_000


def train_logistic(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   seed: int = 0) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]] | None:
    """An L2-regularised logistic classifier on standardised features, C chosen by cross-validation.

    Parameters
    ----------
    x_train : (n, F) float array, y_train : (n,) array of 0 (bad) / 1 (good)
    x_val : (m, F) float array, y_val : (m,) array
        The stars whose loss decides between this classifier and the network (m may be 0: the training
        loss is reported instead).
    seed : seed of the folds' shuffling.

    Returns
    -------
    None when a class has fewer than 2 training stars (no fold could hold both); else
    layers : ``[{"W": (F, 1) float32, "b": (1,) float32}]``
    info : ``best_val_loss`` (scikit-learn's log_loss on the validation stars), ``inverse_l2`` (the C
        chosen), ``cv_folds``, ``cv_stars`` (the stars it learnt from: all, or :data:`CV_MAX_STARS`).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.utils import resample

    x_train = np.asarray(x_train, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64)
    counts = np.bincount(y_train.astype(np.int64), minlength=2)
    if counts.min() < 2:
        return None
    folds = int(min(MAX_CV_FOLDS, counts.min()))
    sample = np.arange(y_train.size)
    if y_train.size > CV_MAX_STARS:
        sample = resample(sample, n_samples=CV_MAX_STARS, replace=False, stratify=y_train, random_state=seed)
    search = GridSearchCV(LogisticRegression(max_iter=5000), {"C": list(INVERSE_L2_GRID)}, scoring="neg_log_loss",
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(x_train[sample], y_train[sample])
    clf = search.best_estimator_
    layers = [{"W": clf.coef_.T.astype(np.float32), "b": clf.intercept_.astype(np.float32)}]
    x_val = np.asarray(x_val, dtype=np.float64)
    if x_val.shape[0] == 0:
        x_val, y_val = x_train, y_train
    val_loss = float(log_loss(y_val, clf.predict_proba(x_val)[:, 1], labels=[0.0, 1.0]))
    logger.debug("logistic candidate: C = %g (%d folds), validation loss %.4f", clf.C, folds, val_loss)
    return layers, {"best_val_loss": val_loss, "inverse_l2": float(clf.C), "cv_folds": folds,
                    "cv_stars": int(sample.size)}

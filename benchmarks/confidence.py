"""Cost of the confidence classifiers: training time per epoch and prediction throughput.

    python benchmarks/confidence.py [--n-train 20000] [--n-predict 200000] [--epochs 20]

Synthetic Appendix B feature vectors (86 features) with a learnable good/bad
signal; trains the three 3 x 64 ReLU classifiers (batch 4096, the paper's
settings except the epoch count) and times :func:`predict_confidence`, which
inference runs on every star. Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from xpcat.model import confidence as C  # noqa: E402


def _features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, C.N_FEATURES))
    bad = rng.random(n) < 0.3
    x[bad, 0] += 1.5
    x[bad, 30:50] += 0.8
    return x, np.where(bad, 0.0, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-predict", type=int, default=200000)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x, y = _features(rng, args.n_train)
    settings = C.ClassifierSettings(epochs=args.epochs, patience=args.epochs)
    t0 = time.perf_counter()
    clf, report = C.train_confidence_classifiers(x, {p: y for p in C.PARAMETERS}, settings, seed=0)
    t_train = time.perf_counter() - t0
    xp, _ = _features(rng, args.n_predict)
    C.predict_confidence(clf, xp[:1000])  # compile
    t0 = time.perf_counter()
    C.predict_confidence(clf, xp)
    t_pred = time.perf_counter() - t0
    print(json.dumps({
        "benchmark": "confidence",
        "n_train": args.n_train,
        "epochs": args.epochs,
        "train_seconds_three_classifiers": round(t_train, 2),
        "train_seconds_per_epoch_per_classifier": round(t_train / (3 * args.epochs), 4),
        "heldout_auc": {p: round(report[p]["auc"], 4) for p in C.PARAMETERS},
        "n_predict": args.n_predict,
        "predict_stars_per_second": round(args.n_predict / t_pred, 1),
        "machine": machine_info(),
    }))


if __name__ == "__main__":
    main()

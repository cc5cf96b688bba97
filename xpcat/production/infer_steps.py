"""The fit of a batch of conditioned stars, in pieces that pad little and step by step, each step timed.

:func:`fit_steps` is :meth:`xpcat.model.inference.Inference.fit` (prepare,
start, optimise, summarise: the same calls per star) over the pieces
:func:`fit_pieces` cuts a batch into, each step's seconds added to the step
dict (:func:`xpcat.progress.timed`) that ``benchmarks/pipeline.py``'s profile
of the infer stage (:mod:`xpcat.production.infer`) reads.
"""

from __future__ import annotations

import logging

import numpy as np

from xpcat.model.inference import Inference

__all__ = ["INFER_STEPS", "MIN_PIECE", "fit_pieces", "fit_steps"]

logger = logging.getLogger(__name__)

#: The steps of ``infer_partition`` whose seconds ``times`` collects (``benchmarks/pipeline.py``'s profile).
INFER_STEPS = ("setup", "read", "columns", "fit_prepare", "fit_start", "fit_optimise", "fit_summary", "model_error",
               "confidence", "flags", "table", "write")
#: Smallest padded size of a fit (``xpcat.model.inference`` pads fewer stars to 64).
MIN_PIECE = 64


def fit_pieces(m: int, batch_size: int) -> list[int]:
    """Sizes of the pieces m stars are fitted in, so that padding wastes little.

    The fit pads a piece of fewer than ``batch_size`` stars to the next power
    of two (at least 64): 2200 stars would be fitted as 4096. A piece is split
    off as the largest power of two below the rest while padding the rest
    would waste more than a quarter of it: 2200 -> 2048 + 152 (-> 128 + 24),
    all shapes the fit's optimiser compiles anyway.

    Parameters
    ----------
    m : int
        Stars of the batch.
    batch_size : int
        ``[inference] batch_size``.

    Returns
    -------
    list of int, summing to m.
    """
    pieces = []
    while m > 0:
        if m >= batch_size:
            take = batch_size
        else:
            padded = max(MIN_PIECE, 1 << (m - 1).bit_length())
            take = m if padded == MIN_PIECE or 4 * (padded - m) <= m else padded // 2
        pieces.append(take)
        m -= take
    return pieces


def fit_steps(inference: Inference, flux: np.ndarray, factor: np.ndarray, plx: np.ndarray, plx_err: np.ndarray,
              flux_error: np.ndarray, times: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """:meth:`Inference.fit` over the :func:`fit_pieces` pieces of a batch, each step timed.

    Parameters
    ----------
    inference : Inference
    flux, flux_error : (m, 66) internal flux unit; factor : (m, 2211) packed R;
    plx, plx_err : (m,) [mas].
    times : dict, optional
        Seconds of fit_prepare, fit_start, fit_optimise, fit_summary are added to it.

    Returns
    -------
    dict of (m, ...) arrays, the keys of :meth:`Inference.fit`.
    """
    outs, lo = [], 0
    for size in fit_pieces(flux.shape[0], inference.settings.batch_size) or [0]:  # an empty batch: one empty fit
        sl = slice(lo, lo + size)
        lo += size
        outs.append(inference.fit(flux[sl], factor[sl], plx[sl], plx_err[sl], flux_error[sl], times=times))
    if len(outs) == 1:
        return outs[0]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

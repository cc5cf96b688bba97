"""Second look at the stars the fast LM fit leaves unconverged (issue 15 item 4).

The default optimiser (:func:`xpcat.model.optimise.lm_fit`, Gauss-Newton LM in
the fit's float32) declares a star converged when the Newton decrement says the
loss can drop by less than ``tolerance * |L|``. Two things make that test fail
for stars that are at (or near) their optimum, and one for stars that are not:

* float32 rounding: at ``|L| ~ 1e3-1e6`` the loss itself is only known to
  ~1e-7 |L|, so a decrement of 1e-6 |L| is not measurable;
* large residuals (stars the model fits badly, e.g. hotter than its training
  set): Gauss-Newton drops the ``2 sum_k r_k grad^2 r_k`` term of the Hessian,
  so its steps crawl and its decrement is wrong;
* a genuinely hard start, where another optimiser reaches a lower loss.

:class:`Refit` handles them on the unconverged stars only, gathered into one
padded sub-batch (a power of two >= 64 stars, so jit compiles a few shapes):

1. **polish**: LM with the loss's *exact* Hessian in float64 (the forward model
   cast to float64 under a scoped ``jax.enable_x64``), from the LM result, at
   most ``polish_iterations`` iterations. A star that passes the same Newton
   decrement test there is converged.
2. **paper fallback** (rule: the stars still unconverged after the polish): the
   paper's optimiser (SPEC §4, :func:`~xpcat.model.optimise.paper_fit`, the
   fit's dtype, its schedule) from the star's start point, then the same float64
   polish from its result. A star takes that result when its float64 loss is
   lower than the polished LM result's, with its convergence; otherwise it keeps
   the polished LM estimate (its last and lowest) and stays unconverged.

A forward model that cannot be cast (neither a JAX pytree nor a dataclass of
arrays), or whose float64 trace fails to lower after float32 traces of the same
functions (seen with the synthetic truth model, whose numpy constants JAX's
scoped ``enable_x64`` does not re-type), is polished in the fit's own dtype,
with a warning; the exact Hessian alone converges most such stars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.model.objective import ForwardModelLike, Objective, StarData
from xpcat.model.optimise import LMResult, PaperSchedule, lm_fit, paper_fit

__all__ = ["Refit", "RefitStage", "cast_model"]

logger = logging.getLogger(__name__)

#: Smallest padded sub-batch of the refit (stars).
MIN_REFIT_BATCH = 64


class RefitStage(enum.IntEnum):
    """What produced a star's final estimate (the ``refit`` output of :meth:`xpcat.model.inference.Inference.fit`)."""

    LM = 0  #: the default LM fit, converged there (or not refitted)
    POLISH = 1  #: float64 exact-Hessian polish of the LM result
    PAPER = 2  #: the paper optimiser's result (then polished), lower than the polished LM result


def cast_model(model: ForwardModelLike, dtype: Any) -> ForwardModelLike | None:
    """The forward model with its floating arrays cast to ``dtype``, or None when it cannot be cast.

    Call it under ``jax.enable_x64(True)`` for float64 (outside, JAX truncates to float32).

    Parameters
    ----------
    model : a JAX pytree (e.g. :class:`xpcat.model.forward.ForwardModel`) or a dataclass whose
        array fields are the model's numbers (e.g. the synthetic universe's truth model).
    dtype : target floating type.
    """

    def cast(a: Any) -> Any:
        if isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.asarray(a, dtype=dtype)
        return a

    leaves = jax.tree_util.tree_leaves(model)
    if leaves and not (len(leaves) == 1 and leaves[0] is model):
        return jax.tree_util.tree_map(cast, model)
    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        return dataclasses.replace(model, **{f.name: cast(getattr(model, f.name))
                                             for f in dataclasses.fields(model) if f.init})
    return None


def _padded(n: int) -> int:
    return max(MIN_REFIT_BATCH, 1 << int(np.ceil(np.log2(max(n, 1)))))


class Refit:
    """Polish (and if needed refit with the paper optimiser) the unconverged stars of a batch.

    Parameters
    ----------
    objective : the fit's :class:`~xpcat.model.objective.Objective` (its dtype, usually float32).
    polish_iterations : iteration cap of each float64 polish.
    tolerance : the LM convergence tolerance (same test as the default fit).
    schedule : the paper optimiser's schedule for the fallback (default: the paper's).
    """

    def __init__(self, objective: Objective, polish_iterations: int = 100, tolerance: float = 1e-6,
                 schedule: PaperSchedule | None = None) -> None:
        if polish_iterations < 1:
            raise ValueError(f"polish_iterations must be >= 1, got {polish_iterations!r}")
        self.objective = objective
        self.polish_iterations = int(polish_iterations)
        self.tolerance = float(tolerance)
        self.schedule = schedule or PaperSchedule()
        self._polish_objective: Objective | None = None

    def with_options(self, polish_iterations: int, tolerance: float, schedule: PaperSchedule) -> Refit:
        """A Refit with other options sharing this one's (cast) polish objective."""
        new = Refit(self.objective, polish_iterations, tolerance, schedule)
        new._polish_objective = self._polish_objective
        return new

    # ------------------------------------------------------------------ float64 objective
    @property
    def polish_dtype(self) -> np.dtype:
        """float64, or the fit's dtype when the model cannot be cast."""
        self._objective64()
        return self._polish_objective.dtype

    def _objective64(self) -> Objective:
        if self._polish_objective is None:
            obj = self.objective
            if obj.dtype != np.float64:
                with jax.enable_x64(True):
                    model = cast_model(obj.model, np.float64)
                    if model is not None:
                        obj = Objective(model, obj.gmm, dtype=np.float64)
                if model is None:
                    logger.warning("forward model %s cannot be cast to float64: the refit polishes in %s",
                                   type(obj.model).__name__, obj.dtype)
            self._polish_objective = obj
        return self._polish_objective

    # ------------------------------------------------------------------ stages
    def polish(self, x: np.ndarray, stars: StarData) -> LMResult:
        """Exact-Hessian LM in the polish dtype from x, for k stars (numpy, padded here).

        Parameters
        ----------
        x : (k, 5) internal variables.
        stars : StarData of k rows (numpy arrays).

        Returns
        -------
        LMResult of k rows, numpy arrays in the polish dtype.
        """
        obj = self._objective64()
        if obj is self.objective:
            return self._polish(obj, x, stars)
        try:
            return self._polish(obj, x, stars)
        except (ValueError, TypeError) as err:  # the float64 trace did not lower: polish in the fit's dtype
            logger.warning("float64 polish of forward model %s failed (%s); polishing in %s instead",
                           type(obj.model).__name__, str(err).splitlines()[0][:200], self.objective.dtype)
            self._polish_objective = self.objective
            return self._polish(self.objective, x, stars)

    def _polish(self, obj: Objective, x: np.ndarray, stars: StarData) -> LMResult:
        k = x.shape[0]
        size = _padded(k)
        pad = np.concatenate([np.arange(k), np.zeros(size - k, dtype=int)])
        dt = obj.dtype
        x64 = jax.enable_x64(True) if dt == np.float64 else contextlib.nullcontext()
        with x64, jax.default_matmul_precision("highest"):
            sub = StarData(*(jnp.asarray(np.asarray(a)[pad], dtype=dt) for a in stars))
            res = lm_fit(obj, jnp.asarray(np.asarray(x, dtype=np.float64)[pad], dtype=dt), sub,
                         jnp.asarray(np.arange(size) < k), max_iterations=self.polish_iterations,
                         tolerance=self.tolerance, exact_hessian=True)
            return LMResult(*(np.asarray(a)[:k] for a in (res.x, res.loss, res.converged, res.n_iter)))

    def paper(self, x0: np.ndarray, stars: StarData) -> LMResult:
        """The paper's optimiser (fit dtype) from x0 for k stars, then the polish from its result."""
        k = x0.shape[0]
        size = _padded(k)
        pad = np.concatenate([np.arange(k), np.zeros(size - k, dtype=int)])
        dt = self.objective.dtype
        with jax.default_matmul_precision("highest"):
            sub = StarData(*(jnp.asarray(np.asarray(a)[pad], dtype=dt) for a in stars))
            res = paper_fit(self.objective, jnp.asarray(np.asarray(x0)[pad], dtype=dt), sub,
                            jnp.asarray(np.arange(size) < k), self.schedule)
            x_paper = np.asarray(res.x)[:k]
            steps = np.asarray(res.n_iter)[:k]
        ok = np.all(np.isfinite(x_paper), axis=1)
        x_paper = np.where(ok[:, None], x_paper, np.asarray(x0))
        pol = self.polish(x_paper, stars)
        return LMResult(pol.x, np.where(ok, pol.loss, np.inf), pol.converged & ok, pol.n_iter + steps)

    def __call__(self, x0: np.ndarray, x: np.ndarray, loss: np.ndarray, converged: np.ndarray,
                 n_iter: np.ndarray, stars: StarData, active: np.ndarray) -> dict[str, np.ndarray]:
        """Refit the active, unconverged stars of a batch of m.

        Parameters
        ----------
        x0 : (m, 5) start points; x : (m, 5) LM results; loss : (m,); converged : (m,) bool;
        n_iter : (m,) LM iterations.
        stars : StarData of m rows (numpy).
        active : (m,) bool, the stars that were fitted.

        Returns
        -------
        dict of m rows: ``x`` (fit dtype), ``loss`` (float64), ``converged``, ``n_iter``
        (all iterations and optimiser steps), ``refit`` (uint8 :class:`RefitStage`).
        """
        x = np.array(x, dtype=np.float64)
        loss = np.asarray(loss, dtype=np.float64).copy()
        conv = np.asarray(converged, dtype=bool).copy()
        n_iter = np.asarray(n_iter, dtype=np.int64).copy()
        stage = np.zeros(len(conv), dtype=np.uint8)
        todo = np.flatnonzero(np.asarray(active) & ~conv & np.all(np.isfinite(x), axis=1))
        if todo.size == 0:
            return {"x": x.astype(self.objective.dtype), "loss": loss, "converged": conv, "n_iter": n_iter,
                    "refit": stage}
        sub = StarData(*(np.asarray(a)[todo] for a in stars))
        pol = self.polish(x[todo], sub)
        better = np.isfinite(pol.loss)  # the polish only accepts steps that lower the loss
        x[todo[better]] = pol.x[better]
        loss[todo[better]] = pol.loss[better]
        conv[todo] = pol.converged & better
        n_iter[todo] += pol.n_iter
        stage[todo[better]] = RefitStage.POLISH
        rest = todo[~conv[todo]]
        logger.debug("refit: %d unconverged stars, %d converged by the polish, %d to the paper optimiser",
                     todo.size, todo.size - rest.size, rest.size)
        if rest.size:
            pap = self.paper(np.asarray(x0)[rest], StarData(*(np.asarray(a)[rest] for a in stars)))
            take = pap.loss < loss[rest]
            x[rest[take]] = pap.x[take]
            loss[rest[take]] = pap.loss[take]
            conv[rest[take]] = pap.converged[take]
            n_iter[rest] += pap.n_iter
            stage[rest[take]] = RefitStage.PAPER
        return {"x": x.astype(self.objective.dtype), "loss": loss, "converged": conv, "n_iter": n_iter,
                "refit": stage}

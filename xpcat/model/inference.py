"""Inference (Sec. 4): fit every star of a batch, its uncertainties and flags.

Generic over a forward model (any object with ``ln_flux_abs(theta)``, ``R`` and
``predict_flux(theta, ln_plx, ln_e)``, Theta in K: the trained
:class:`xpcat.model.forward.ForwardModel` or the synthetic universe's truth
model) and a GMM type prior (:class:`xpcat.model.prior.GMMParams`).

Pipeline per batch (:meth:`Inference.fit`):

1. sanitise the inputs (:func:`prepare_stars`): non-finite fluxes or factor
   columns become missing samples (zero columns of R), an unusable parallax drops
   the parallax term; stars with fewer than :data:`MIN_VALID_FLUX` usable fluxes
   get ``fit_status = NO_USABLE_DATA`` and NaN results, never an exception;
2. start (:mod:`.start`): ``screen`` (default) or ``paper``;
3. optimise Eq. 19 (:mod:`.optimise`): ``lm`` (default) or ``paper``;
   after ``lm``, the stars it leaves unconverged get a float64 exact-Hessian
   polish and, if still unconverged, the paper optimiser (:mod:`.refit`;
   ``refit = False`` turns this off);
4. Fisher uncertainties (:mod:`.uncertainty`).

Stars are processed in padded chunks of fixed shapes, so memory is bounded by
``batch_size`` and jit compiles once per shape; the same code runs on CPU and
GPU, with float32 matrix products at full precision (``highest``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.catalog_schema.conditioned import N_FLUX
from xpcat.catalog_schema.flags import FitStatus
from xpcat.catalog_schema.triangle import n_triu, unpack_triu
from xpcat.model.objective import N_VAR, TEFF_SCALE_K, ForwardModelLike, Objective, StarData
from xpcat.model.optimise import PaperSchedule, lm_fit, paper_fit
from xpcat.model.prior import GMMParams
from xpcat.model.refit import Refit
from xpcat.model.start import StartGrid, build_start_grid, full_band_stars, paper_start, screen_start
from xpcat.model.uncertainty import fisher_covariance, params5_from_x, whitened_jacobian
from xpcat.progress import timed

__all__ = [
    "MIN_VALID_FLUX",
    "InferenceSettings",
    "PreparedStars",
    "prepare_stars",
    "Inference",
    "fit_batch",
]

logger = logging.getLogger(__name__)

#: A star needs at least this many usable fluxes to be fitted (5 variables + 3 dof).
MIN_VALID_FLUX = 8
#: Stars per chunk of the start screen (its scan carries (chunk x n_prior_samples) arrays).
_SCREEN_CHUNK = 256


@dataclass(frozen=True)
class InferenceSettings:
    """Settings of :class:`Inference` (mirrors ``[inference]`` of the run config).

    Attributes
    ----------
    optimizer : 'lm' (default) or 'paper'.
    start : 'screen' (default) or 'paper'.
    batch_size : stars per vectorised chunk (bounds memory).
    n_prior_samples, e_min, e_max, e_log10_step : start grid (paper: 512, 1e-2, 10, 0.05).
    n_refine : start candidates re-scored with the full chi^2 (screen start).
    max_iterations, tolerance : LM stopping rule.
    seed : seed of the GMM samples of the start grid.
    paper_schedule : step counts of the paper optimiser (also that of the refit's fallback).
    refit : after ``lm``, polish the unconverged stars in float64 and fall back to the
        paper optimiser for those still unconverged (:class:`xpcat.model.refit.Refit`).
    polish_iterations : iteration cap of each float64 polish.
    """

    optimizer: str = "lm"
    start: str = "screen"
    batch_size: int = 4096
    n_prior_samples: int = 512
    e_min: float = 1e-2
    e_max: float = 10.0
    e_log10_step: float = 0.05
    n_refine: int = 32
    max_iterations: int = 50
    tolerance: float = 1e-6
    seed: int = 0
    paper_schedule: PaperSchedule = PaperSchedule()
    refit: bool = True
    polish_iterations: int = 100

    def __post_init__(self) -> None:
        if self.optimizer not in ("lm", "paper"):
            raise ValueError(f"inference optimizer must be 'lm' or 'paper', got {self.optimizer!r}")
        if self.start not in ("screen", "paper"):
            raise ValueError(f"inference start must be 'screen' or 'paper', got {self.start!r}")
        if self.batch_size < 1:
            raise ValueError(f"inference batch_size must be >= 1, got {self.batch_size!r}")
        if self.polish_iterations < 1:
            raise ValueError(f"inference polish_iterations must be >= 1, got {self.polish_iterations!r}")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> InferenceSettings:
        """From a :class:`xpcat.config.RunConfig` (its ``inference`` section and ``run.seed``)."""
        inf = config.inference
        kw = {k: getattr(inf, k) for k in ("optimizer", "start", "batch_size", "n_prior_samples", "e_min", "e_max",
                                           "e_log10_step", "n_refine", "max_iterations", "tolerance", "refit",
                                           "polish_iterations")}
        kw["seed"] = config.run.seed
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True)
class PreparedStars:
    """Sanitised inputs of m stars (numpy, the fit's dtype).

    Attributes
    ----------
    flux : (m, 66) observed flux, 0 where missing.
    factor : (m, 66, 66) whitening factor, zero columns / rows where missing.
    weight : (m, 66) diagonal weights for the start screen (0 where missing).
    plx_obs : (m,) parallax [mas], 0 where missing.
    inv_plx_err : (m,) 1/s_plx, 0 where the parallax is missing or its error is not positive.
    n_valid : (m,) usable fluxes.
    usable : (m,) bool, the star can be fitted.
    """

    flux: np.ndarray
    factor: np.ndarray
    weight: np.ndarray
    plx_obs: np.ndarray
    inv_plx_err: np.ndarray
    n_valid: np.ndarray
    usable: np.ndarray


def prepare_stars(flux: np.ndarray, factor: np.ndarray, parallax: np.ndarray | None,
                  parallax_error: np.ndarray | None, flux_error: np.ndarray | None = None,
                  dtype: Any = np.float32) -> PreparedStars:
    """Sanitise a batch's inputs; never raises for bad values (bad stars become unusable).

    Parameters
    ----------
    flux : (m, 66) observed flux, internal unit (NaN where missing).
    factor : (m, 66, 66) upper-triangular R (R^T R = C^-1) or (m, 2211) its packed upper triangle.
    parallax, parallax_error : (m,) [mas]; NaN / None = missing.
    flux_error : (m, 66) flux errors (inf where missing) for the screen weights; when
        None, the weights are the diagonal of R^T R.
    dtype : floating type of the fit.

    Raises
    ------
    ValueError
        If the array shapes are inconsistent (a programming error, not a bad star).
    """
    f = np.array(flux, dtype=np.float64)
    m = f.shape[0]
    if f.shape != (m, N_FLUX):
        raise ValueError(f"flux must be (n, {N_FLUX}), got {f.shape}")
    r = _factor_matrices(factor, m, dtype)  # a fresh (m, 66, 66) array of the fit's dtype
    finite = np.isfinite(r)
    bad_col = ~np.isfinite(f) | ~np.all(finite, axis=1)
    if not finite.all():
        r[~finite] = 0.0
    rows = np.flatnonzero(bad_col.any(axis=1))
    if rows.size:  # zero the columns of missing samples (few stars have any)
        r[rows] *= ~bad_col[rows, None, :]
    f = np.where(bad_col, 0.0, f)
    valid = np.any(r != 0.0, axis=1)
    if flux_error is not None:
        fe = np.asarray(flux_error, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(valid & np.isfinite(fe) & (fe > 0), 1.0 / fe**2, 0.0)
        valid_w = w > 0
        # a sample usable in the factor but without an error: fall back to the precision diagonal
        if np.any(valid & ~valid_w):
            w = np.where(valid & ~valid_w, np.einsum("mij,mij->mj", r, r, dtype=np.float64), w)
    else:
        w = np.einsum("mij,mij->mj", r, r, dtype=np.float64)
    w = np.where(valid, w, 0.0)
    n_valid = valid.sum(axis=1)
    plx = np.full(m, np.nan) if parallax is None else np.asarray(parallax, dtype=np.float64)
    plx_err = np.full(m, np.nan) if parallax_error is None else np.asarray(parallax_error, dtype=np.float64)
    has_plx = np.isfinite(plx) & np.isfinite(plx_err) & (plx_err > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_err = np.where(has_plx, 1.0 / plx_err, 0.0)
    usable = (n_valid >= MIN_VALID_FLUX) & np.isfinite(w).all(axis=1)
    return PreparedStars(
        flux=f.astype(dtype), factor=r, weight=w.astype(dtype),
        plx_obs=np.where(has_plx, plx, 0.0).astype(dtype), inv_plx_err=inv_err.astype(dtype),
        n_valid=n_valid.astype(np.int16), usable=usable,
    )


def _factor_matrices(factor: np.ndarray, m: int, dtype: Any) -> np.ndarray:
    """(m, 66, 66) upper-triangular factors as a new array of ``dtype``, from full or packed ones.

    Raises
    ------
    ValueError
        If the shape is neither (m, 66, 66) nor (m, 2211).
    """
    r = np.asarray(factor)
    if r.shape == (m, n_triu(N_FLUX)):
        return unpack_triu(r, dtype=dtype)
    if r.shape != (m, N_FLUX, N_FLUX):
        raise ValueError(f"factor must be (n, {N_FLUX}, {N_FLUX}) or packed (n, {n_triu(N_FLUX)}); "
                         f"got {np.shape(factor)} for n={m}")
    return np.array(r, dtype=dtype)


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape[0] == n:
        return a
    pad = np.zeros((n - a.shape[0],) + a.shape[1:], dtype=a.dtype)
    return np.concatenate([a, pad])


def _padded_size(m: int, batch_size: int) -> int:
    """Chunk size for m stars: batch_size, or the next power of two >= m (min 64) when smaller."""
    if m >= batch_size:
        return batch_size
    return min(batch_size, max(64, 1 << int(np.ceil(np.log2(max(m, 1))))))


class Inference:
    """Fits batches of stars with one forward model and prior.

    Parameters
    ----------
    model : ForwardModelLike
    gmm : GMMParams
    settings : InferenceSettings
    dtype : floating type of the fit (default: the model's).

    The start grid and the jitted functions are built once per object: reuse it
    for every batch (a Dask worker keeps one per artifact).
    """

    def __init__(self, model: ForwardModelLike, gmm: GMMParams, settings: InferenceSettings | None = None,
                 dtype: Any = None) -> None:
        self.settings = settings or InferenceSettings()
        self.objective = Objective(model, gmm, dtype=dtype)
        self.dtype = self.objective.dtype
        self._grid: StartGrid | None = None
        self._refit: Refit | None = None

    @property
    def grid(self) -> StartGrid:
        """The start grid (built on first use)."""
        if self._grid is None:
            s = self.settings
            with jax.default_matmul_precision("highest"):
                self._grid = build_start_grid(self.objective.model, self.objective.gmm, n_samples=s.n_prior_samples,
                                              e_min=s.e_min, e_max=s.e_max, e_log10_step=s.e_log10_step,
                                              seed=s.seed, dtype=self.dtype)
        return self._grid

    @property
    def refit(self) -> Refit:
        """The refit of unconverged LM stars (built on first use; its float64 model is cast once)."""
        if self._refit is None:
            s = self.settings
            self._refit = Refit(self.objective, s.polish_iterations, s.tolerance, s.paper_schedule)
        return self._refit

    # ------------------------------------------------------------------------------ stages
    def start(self, prep: PreparedStars, mode: str | None = None) -> np.ndarray:
        """(m, 5) start variables (internal) for prepared stars; chunked by :data:`_SCREEN_CHUNK` / batch."""
        mode = mode or self.settings.start
        m = prep.flux.shape[0]
        chunk = _SCREEN_CHUNK if mode == "screen" else min(_SCREEN_CHUNK, _padded_size(m, self.settings.batch_size))
        chunk = min(chunk, _padded_size(m, self.settings.batch_size))
        out = np.empty((m, N_VAR), dtype=self.dtype)
        # stars with the whole parallax-guess band first: their chunks take the cheaper path
        full = full_band_stars(self.grid, prep.flux, prep.weight)
        order = np.argsort(~full, kind="stable")
        with jax.default_matmul_precision("highest"):
            for lo in range(0, m, chunk):
                hi = min(lo + chunk, m)
                sel = order[lo:hi]
                sel = np.concatenate([sel, np.full(chunk - len(sel), sel[0])])  # pad with a real star
                args = [jnp.asarray(a[sel]) for a in (prep.flux, prep.weight, prep.factor)]
                if mode == "screen":
                    x0, _ = screen_start(self.grid, *args, n_refine=self.settings.n_refine)
                elif mode == "paper":
                    x0, _ = paper_start(self.grid, *args)
                else:
                    raise ValueError(f"start mode must be 'screen' or 'paper', got {mode!r}")
                out[order[lo:hi]] = np.asarray(x0)[: hi - lo]
        return out

    def optimise(self, prep: PreparedStars, x0: np.ndarray, optimizer: str | None = None,
                 schedule: PaperSchedule | None = None) -> dict[str, np.ndarray]:
        """Optimise Eq. 19 from x0; returns x, loss, converged, n_iter, refit (numpy, length m).

        ``refit`` is the :class:`~xpcat.model.refit.RefitStage` of each star (0 when not refitted);
        ``n_iter`` counts the iterations and optimiser steps of every stage.
        """
        optimizer = optimizer or self.settings.optimizer
        m = x0.shape[0]
        size = _padded_size(m, self.settings.batch_size)
        res = {k: [] for k in ("x", "loss", "converged", "n_iter", "refit")}
        with jax.default_matmul_precision("highest"):
            for lo in range(0, m, size):
                hi = min(lo + size, m)
                stars = self._stars(prep, lo, hi, size)
                xs = jnp.asarray(_pad_rows(np.asarray(x0[lo:hi], dtype=self.dtype), size))
                active = jnp.asarray(_pad_rows(prep.usable[lo:hi] & np.all(np.isfinite(x0[lo:hi]), axis=1), size))
                xs = jnp.where(active[:, None], xs, 0.0)
                if optimizer == "lm":
                    r = lm_fit(self.objective, xs, stars, active, max_iterations=self.settings.max_iterations,
                               tolerance=self.settings.tolerance)
                elif optimizer == "paper":
                    r = paper_fit(self.objective, xs, stars, active, schedule or self.settings.paper_schedule)
                else:
                    raise ValueError(f"optimizer must be 'lm' or 'paper', got {optimizer!r}")
                part = {k: np.asarray(getattr(r, k))[: hi - lo] for k in ("x", "loss", "converged", "n_iter")}
                part["refit"] = np.zeros(hi - lo, dtype=np.uint8)
                if optimizer == "lm" and self.settings.refit:
                    part = self.refit(np.asarray(xs)[: hi - lo], part["x"], part["loss"], part["converged"],
                                      part["n_iter"], _rows(prep, lo, hi), np.asarray(active)[: hi - lo])
                for k in res:
                    res[k].append(part[k])
        return {k: np.concatenate(v) for k, v in res.items()}

    def _stars(self, prep: PreparedStars, lo: int, hi: int, size: int) -> StarData:  # padded, on device
        return StarData(*(jnp.asarray(_pad_rows(a[lo:hi], size))
                          for a in (prep.flux, prep.factor, prep.plx_obs, prep.inv_plx_err)))

    def summarise(self, prep: PreparedStars, x: np.ndarray, loss: np.ndarray, converged: np.ndarray,
                  n_iter: np.ndarray) -> dict[str, np.ndarray]:
        """Uncertainties and per-star outputs at the optimum (the :func:`fit_batch` dict)."""
        m = x.shape[0]
        size = _padded_size(m, self.settings.batch_size)
        chi2, lnp, fpred, rj = [], [], [], []
        with jax.default_matmul_precision("highest"):
            for lo in range(0, m, size):
                hi = min(lo + size, m)
                stars = self._stars(prep, lo, hi, size)
                xs = jnp.asarray(_pad_rows(np.where(np.isfinite(x[lo:hi]), x[lo:hi], 0.0).astype(self.dtype), size))
                c, lp, fp = _summary_jit(self.objective, xs, stars)
                chi2.append(np.asarray(c)[: hi - lo])
                lnp.append(np.asarray(lp)[: hi - lo])
                fpred.append(np.asarray(fp)[: hi - lo])
                rj.append(whitened_jacobian(self.objective, xs, stars)[: hi - lo])
        chi2_a, lnp_a, fpred_a, rj_a = (np.concatenate(a) for a in (chi2, lnp, fpred, rj))
        icov, cov = fisher_covariance(rj_a, prep.inv_plx_err.astype(np.float64))
        usable = prep.usable
        status = np.where(usable, np.where(converged & np.isfinite(loss), FitStatus.CONVERGED,
                                           FitStatus.NOT_CONVERGED), FitStatus.NO_USABLE_DATA).astype(np.uint8)
        params5 = params5_from_x(x)
        nan_rows = ~usable | ~np.all(np.isfinite(x), axis=1)
        theta = params5[:, :3] * np.array([TEFF_SCALE_K, 1.0, 1.0])
        out = {
            "theta": theta,
            "plx": params5[:, 4],
            "e": params5[:, 3],
            "params5": params5,
            "cov5": cov,
            "icov5": icov,
            "chi2": chi2_a.astype(np.float64),
            "ln_prior": lnp_a.astype(np.float64),
            "loss": np.asarray(loss, dtype=np.float64),
            "f_pred": fpred_a.astype(np.float64),
            "fit_status": status,
            "n_iter": np.asarray(n_iter, dtype=np.int32),
            "n_valid_flux": prep.n_valid,
        }
        for k in ("theta", "plx", "e", "params5", "cov5", "icov5", "chi2", "ln_prior", "loss", "f_pred"):
            out[k] = np.array(out[k], dtype=np.float64)
            out[k][nan_rows] = np.nan
        return out

    def fit(self, flux: np.ndarray, factor: np.ndarray, parallax: np.ndarray | None,
            parallax_error: np.ndarray | None, flux_error: np.ndarray | None = None, *,
            start: str | None = None, optimizer: str | None = None,
            schedule: PaperSchedule | None = None, times: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """Fit m stars: start, optimise, uncertainties. See :func:`fit_batch` for the arrays.

        ``times``, when given, collects the seconds of each step (``fit_prepare``, ``fit_start``,
        ``fit_optimise``, ``fit_summary``; added to what it holds).
        """
        with timed(times, "fit_prepare"):
            prep = prepare_stars(flux, factor, parallax, parallax_error, flux_error, dtype=self.dtype)
        with timed(times, "fit_start"):
            x0 = self.start(prep, start)
        with timed(times, "fit_optimise"):
            opt = self.optimise(prep, x0, optimizer, schedule)
        with timed(times, "fit_summary"):
            out = self.summarise(prep, opt["x"], opt["loss"], opt["converged"], opt["n_iter"])
        out["x0"] = x0
        out["refit"] = opt["refit"]
        return out

    def with_settings(self, **changes: Any) -> Inference:
        """A new object with changed settings (same model and prior; the start grid is rebuilt if needed)."""
        new = Inference.__new__(Inference)
        new.settings = replace(self.settings, **changes)
        new.objective = self.objective
        new.dtype = self.dtype
        grid_keys = {"n_prior_samples", "e_min", "e_max", "e_log10_step", "seed"}
        new._grid = None if grid_keys & set(changes) else self._grid
        new._refit = None
        if self._refit is not None:  # keep its float64 model (cast once)
            s = new.settings
            new._refit = self._refit.with_options(s.polish_iterations, s.tolerance, s.paper_schedule)
        return new


def _rows(prep: PreparedStars, lo: int, hi: int) -> StarData:
    """Rows lo:hi of the prepared stars as a (numpy) StarData."""
    return StarData(*(a[lo:hi] for a in (prep.flux, prep.factor, prep.plx_obs, prep.inv_plx_err)))


def _summary(obj: Objective, xs, stars):
    def one(x, star):
        return obj.chi2(x, star), obj.ln_prior(x), obj.predict(x)

    return jax.vmap(one)(xs, stars)


_summary_jit = jax.jit(_summary, static_argnums=(0,))


def fit_batch(model: ForwardModelLike, gmm: GMMParams, flux: np.ndarray, factor: np.ndarray,
              parallax: np.ndarray | None, parallax_error: np.ndarray | None,
              flux_error: np.ndarray | None = None, settings: InferenceSettings | None = None) -> dict[str, np.ndarray]:
    """Fit a batch of stars (convenience wrapper; reuse an :class:`Inference` for many batches).

    Parameters
    ----------
    model : forward model (Theta in K, internal flux unit).
    gmm : type prior.
    flux : (n, 66) observed flux, internal unit, NaN where missing.
    factor : (n, 66, 66) or (n, 2211) whitening factor R (R^T R = C^-1).
    parallax, parallax_error : (n,) Gaia parallax and error [mas]; NaN = missing.
    flux_error : (n, 66) optional, for the start screen's diagonal weights.
    settings : InferenceSettings

    Returns
    -------
    dict of numpy arrays (n rows): ``theta`` (n, 3) [K, dex, dex], ``plx`` [mas],
    ``e`` [mag], ``params5`` (n, 5) catalog order (Teff kK, [Fe/H], logg, E, plx),
    ``cov5`` / ``icov5`` (n, 5, 5) in the same units, ``chi2``, ``ln_prior``,
    ``loss`` (Eq. 19), ``f_pred`` (n, 66) internal unit, ``fit_status`` (uint8
    :class:`~xpcat.catalog_schema.flags.FitStatus`), ``n_iter``, ``n_valid_flux``,
    ``x0`` (n, 5) the internal start variables and ``refit`` (uint8
    :class:`~xpcat.model.refit.RefitStage`). Rows with no usable data are NaN.
    """
    return Inference(model, gmm, settings).fit(flux, factor, parallax, parallax_error, flux_error)

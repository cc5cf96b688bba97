"""The start grid of the per-star fit (Sec. 4.2).

The paper starts every star from the best of 512 GMM samples of Theta times a
geometric grid of E (1e-2 .. 10, ratio 10^0.05: 61 values): for each pair the
parallax guess comes from the observed / predicted flux ratio over 592-782 nm,
and the pair minimising chi^2 - 2 ln p_gmm(Theta) wins.

The grid's predicted shapes ``g_p = exp(ln f_abs(Theta_k)) * exp(-E_j R)``
(P = 512 x 61 pairs of 66 fluxes) do not depend on the star: they are computed
once per model (:func:`build_start_grid`). Per star, with the parallax guess
``s = plx^2 = sum_band f_obs / sum_band g_p`` (sums over the star's usable
samples in 592-782 nm), the chi^2 of a pair is a quadratic in ``s``:

- ``paper`` start (:func:`paper_start`): the full chi^2 ``|R (s g_p - f)|^2``
  for every pair, ``s^2 |R g_p|^2 - 2 s (R g_p).(R f) + |R f|^2``:
  one (66 x 66) @ (66 x P) product per star, ~3e8 flops.
- ``screen`` start (:func:`screen_start`, default): the same with a diagonal
  weight ``w`` (1 / flux_error^2) on fluxes averaged in bins of
  :data:`SCREEN_BIN` XP samples (26 bins), which for a whole batch is two
  matrix products (n x 26) @ (26 x P) (~3e6 flops per star); for each Theta
  sample the best E is kept, the ``n_refine`` best samples are re-scored with
  the full chi^2 and the best of those is the start. A test checks that this
  reaches the same final optimum as the paper start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..catalog_schema.conditioned import N_FLUX, XP_WAVELENGTHS_NM
from .objective import TEFF_SCALE_K, ForwardModelLike
from .prior import GMMParams, gmm_log_density, sample_gmm

__all__ = [
    "PLX_BAND_NM",
    "SCREEN_BIN",
    "screen_bins",
    "StartGrid",
    "band_mask",
    "e_grid",
    "build_start_grid",
    "screen_start",
    "paper_start",
]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: Wavelength range [nm] whose observed / predicted flux ratio gives the parallax guess.
PLX_BAND_NM = (592.0, 782.0)
#: The diagonal screen works on the mean fluxes of bins of this many consecutive XP samples
#: (the NIR bands stay single), which cuts its cost ~2.5x; the full chi^2 re-scores the candidates.
SCREEN_BIN = 3
#: Smallest plx^2 guess (mas^2): keeps ln plx finite for stars with a non-positive band sum.
_MIN_S = 1e-8


def band_mask() -> np.ndarray:
    """(66,) bool: the XP samples within :data:`PLX_BAND_NM` (592..782 nm, 20 samples)."""
    wl = np.full(N_FLUX, np.nan)
    wl[: len(XP_WAVELENGTHS_NM)] = XP_WAVELENGTHS_NM
    with np.errstate(invalid="ignore"):
        return (wl >= PLX_BAND_NM[0] - 1e-6) & (wl <= PLX_BAND_NM[1] + 1e-6)


def e_grid(e_min: float, e_max: float, log10_step: float) -> np.ndarray:
    """Geometric E grid [mag] from ``e_min`` to ``e_max`` (inclusive, to rounding) with ratio 10^log10_step.

    Raises
    ------
    ValueError
        If the bounds are not 0 < e_min <= e_max or the step is not positive.
    """
    if not (e_min > 0 and e_max >= e_min and log10_step > 0):
        raise ValueError(
            f"E grid needs 0 < e_min <= e_max and log10_step > 0; got e_min={e_min!r}, e_max={e_max!r}, "
            f"log10_step={log10_step!r}"
        )
    n = int(np.floor(np.log10(e_max / e_min) / log10_step + 1e-9)) + 1
    return e_min * 10.0 ** (log10_step * np.arange(n))


@dataclass(frozen=True)
class StartGrid:
    """The star-independent part of the start grid.

    Attributes
    ----------
    theta : (K, 3) GMM samples, Teff [K], [Fe/H], logg.
    ln_prior : (K,) ln p_gmm at the samples.
    e : (J,) E grid [mag].
    g : (K * J, 66) predicted flux at plx = 1 mas of every pair (pair p = k * J + j), internal unit.
    g_screen : (K * J, n_bins) bin means of ``g`` (:func:`screen_bins`) for the screen.
    g_band : (K * J,) sum of ``g`` over the parallax-guess band.
    band : (66,) bool mask of the parallax-guess band.
    """

    theta: JAXArray
    ln_prior: JAXArray
    e: JAXArray
    g: JAXArray
    g_screen: JAXArray
    g_band: JAXArray
    band: np.ndarray

    @property
    def n_theta(self) -> int:
        return int(self.theta.shape[0])

    @property
    def n_e(self) -> int:
        return int(self.e.shape[0])


def build_start_grid(
    model: ForwardModelLike,
    gmm: GMMParams,
    *,
    n_samples: int = 512,
    e_min: float = 1e-2,
    e_max: float = 10.0,
    e_log10_step: float = 0.05,
    seed: int = 0,
    dtype: Any = np.float32,
) -> StartGrid:
    """Draw the GMM samples and evaluate the model on them once.

    Parameters
    ----------
    model : forward model (``ln_flux_abs``, ``R``).
    gmm : the type prior.
    n_samples : number of Theta samples (paper: 512).
    e_min, e_max, e_log10_step : the E grid (paper: 1e-2, 10, 0.05).
    seed : PRNG seed of the samples (the run seed: same samples on every worker).
    dtype : floating type of the grid.

    Returns
    -------
    StartGrid
    """
    gmm_j = GMMParams(*(jnp.asarray(np.asarray(a), dtype=jnp.float32) for a in gmm))
    theta = sample_gmm(gmm_j, jax.random.PRNGKey(seed), n_samples).astype(dtype)
    e = jnp.asarray(e_grid(e_min, e_max, e_log10_step), dtype=dtype)
    ln_f = jax.jit(jax.vmap(model.ln_flux_abs))(theta)  # (K, 66)
    ln_prior = jax.jit(jax.vmap(lambda t: gmm_log_density(gmm_j, t)))(theta.astype(jnp.float32)).astype(dtype)
    ln_g = ln_f[:, None, :] - e[None, :, None] * jnp.asarray(model.R, dtype=dtype)[None, None, :]
    g = jnp.exp(ln_g).reshape(-1, ln_f.shape[-1])
    finite = jnp.all(jnp.isfinite(g), axis=1)
    if not bool(jnp.all(finite)):
        logger.warning("start grid: %d of %d pairs have non-finite model flux; they are never chosen",
                       int((~finite).sum()), g.shape[0])
    g = jnp.where(finite[:, None], g, 0.0)
    bins = screen_bins()
    g_screen = g @ jnp.asarray(bins / bins.sum(axis=0), dtype=g.dtype)
    band = band_mask()
    g_band = g @ jnp.asarray(band, dtype=g.dtype)
    return StartGrid(theta=theta, ln_prior=ln_prior, e=e, g=g, g_screen=g_screen, g_band=g_band, band=band)


def _x_from_pairs(grid: StartGrid, pair: JAXArray, s: JAXArray) -> JAXArray:
    """(m,) pair indices and plx^2 guesses -> (m, 5) internal variables."""
    k = pair // grid.n_e
    j = pair % grid.n_e
    th = grid.theta[k]
    scale = jnp.asarray([1.0 / TEFF_SCALE_K, 1.0, 1.0], dtype=th.dtype)
    return jnp.concatenate([th * scale, 0.5 * jnp.log(s)[:, None], jnp.log(grid.e[j])[:, None]], axis=1)


def _plx2_guess(grid: StartGrid, flux: JAXArray, valid: JAXArray, g: JAXArray) -> JAXArray:
    """plx^2 guess per star and pair: sum of observed / predicted flux over the band's usable samples.

    flux, valid : (m, 66); g : (P, 66) or (m, c, 66). Returns (m, P) or (m, c).
    """
    bmask = jnp.asarray(grid.band) & (valid > 0)
    s_obs = jnp.sum(jnp.where(bmask, flux, 0.0), axis=-1)
    bm = bmask.astype(g.dtype)
    s_pred = bm @ g.T if g.ndim == 2 else jnp.einsum("mi,mci->mc", bm, g)
    s = s_obs[:, None] / s_pred
    return jnp.where(jnp.isfinite(s) & (s > _MIN_S), s, _MIN_S)


def screen_bins() -> np.ndarray:
    """(66, n_bins) 0/1 matrix: consecutive XP samples in bins of :data:`SCREEN_BIN`, each NIR band alone."""
    n_xp = len(XP_WAVELENGTHS_NM)
    starts = list(range(0, n_xp, SCREEN_BIN))
    bins = np.zeros((N_FLUX, len(starts) + N_FLUX - n_xp))
    for b, lo in enumerate(starts):
        bins[lo : min(lo + SCREEN_BIN, n_xp), b] = 1.0
    for i in range(N_FLUX - n_xp):
        bins[n_xp + i, len(starts) + i] = 1.0
    return bins


def _screen_chunk(grid: StartGrid, n_refine: int, full_band: bool, flux, weight, factor):
    """Diagonal screen on binned fluxes, then full chi^2 on the best ``n_refine`` Theta samples."""
    band_idx = np.flatnonzero(grid.band)
    valid = (weight > 0).astype(flux.dtype)
    n_k, n_j = grid.n_theta, grid.n_e
    bins = jnp.asarray(screen_bins(), dtype=flux.dtype)
    g = grid.g_screen  # (P, n_bins), bin means of the model flux
    # plx guess only needs the band columns; a chunk whose stars all have the full band
    # uses the precomputed band sums instead of a (m x 20) @ (20 x P) product
    bmask = valid[:, band_idx]
    s_obs = jnp.sum(flux[:, band_idx] * bmask, axis=1)
    s_pred = grid.g_band[None, :] if full_band else bmask @ grid.g[:, band_idx].T
    s = s_obs[:, None] / s_pred
    s = jnp.where(jnp.isfinite(s) & (s > _MIN_S), s, _MIN_S)
    wb = weight @ bins  # (m, n_bins) summed weights
    wfb = (weight * flux) @ bins
    q2 = wb @ (g * g).T  # (m, P)
    q1 = wfb @ g.T
    m = flux.shape[0]
    score = (s * s * q2 - 2.0 * s * q1).reshape(m, n_k, n_j) - 2.0 * grid.ln_prior[None, :, None]
    score = jnp.where(jnp.isfinite(score), score, jnp.inf)
    best_j = jnp.argmin(score, axis=2)  # (m, K)
    _, top_k = jax.lax.top_k(-jnp.min(score, axis=2), n_refine)  # (m, n_refine)
    pair = top_k * n_j + jnp.take_along_axis(best_j, top_k, axis=1)
    # full chi^2 on the candidates
    gc = grid.g[pair]  # (m, c, 66)
    sc = _plx2_guess(grid, flux, valid, gc)
    rg = jnp.einsum("mij,mcj->mci", factor, gc)
    rf = jnp.einsum("mij,mj->mi", factor, flux)
    res = sc[:, :, None] * rg - rf[:, None, :]  # direct residuals: the expanded quadratic cancels badly in float32
    chi2 = jnp.sum(res * res, -1)
    crit = chi2 - 2.0 * grid.ln_prior[pair // n_j]
    crit = jnp.where(jnp.isfinite(crit), crit, jnp.inf)
    best = jnp.argmin(crit, axis=1)
    pick = jnp.take_along_axis(pair, best[:, None], axis=1)[:, 0]
    s_best = jnp.take_along_axis(sc, best[:, None], axis=1)[:, 0]
    return _x_from_pairs(grid, pick, s_best), jnp.take_along_axis(crit, best[:, None], axis=1)[:, 0]


def _paper_one(grid: StartGrid, flux, valid, factor):
    """Full chi^2 over every pair for one star."""
    band = jnp.asarray(grid.band) & (valid > 0)
    bm = band.astype(flux.dtype)
    s = jnp.sum(flux * bm) / (grid.g @ bm)
    s = jnp.where(jnp.isfinite(s) & (s > _MIN_S), s, _MIN_S)
    rg = factor @ grid.g.T  # (66, P)
    rf = factor @ flux
    res = s[None, :] * rg - rf[:, None]  # direct residuals: the expanded quadratic cancels badly in float32
    chi2 = jnp.sum(res * res, 0)
    crit = chi2 - 2.0 * jnp.repeat(grid.ln_prior, grid.n_e)
    crit = jnp.where(jnp.isfinite(crit), crit, jnp.inf)
    p = jnp.argmin(crit)
    return p, s[p], crit[p]


def screen_start(grid: StartGrid, flux: JAXArray, weight: JAXArray, factor: JAXArray, *,
                 n_refine: int = 8) -> tuple[JAXArray, JAXArray]:
    """Default start for m stars: diagonal-chi^2 screen, full chi^2 on the best ``n_refine`` samples.

    Parameters
    ----------
    grid : StartGrid
    flux : (m, 66) observed flux (0 where missing), internal unit.
    weight : (m, 66) diagonal weights 1 / flux_error^2 (0 where missing).
    factor : (m, 66, 66) whitening factors.
    n_refine : Theta samples re-scored with the full chi^2.

    Returns
    -------
    x0 : (m, 5) internal start variables; crit : (m,) chi^2 - 2 ln p_gmm of the start.
    """
    full = bool(np.all(np.asarray(weight)[:, grid.band] > 0))
    return _screen_jit(grid, min(int(n_refine), grid.n_theta), full, flux, weight, factor)


def paper_start(grid: StartGrid, flux: JAXArray, weight: JAXArray, factor: JAXArray) -> tuple[JAXArray, JAXArray]:
    """The paper's start for m stars: full chi^2 - 2 ln p_gmm on every (Theta, E) pair.

    Same parameters and returns as :func:`screen_start` (``weight`` only marks usable samples).
    """
    return _paper_jit(grid, flux, weight, factor)


def _grid_flatten(grid: StartGrid):
    return (grid.theta, grid.ln_prior, grid.e, grid.g, grid.g_screen, grid.g_band), grid.band.tobytes()


def _grid_unflatten(aux, children):
    theta, ln_prior, e, g, g_screen, g_band = children
    return StartGrid(theta=theta, ln_prior=ln_prior, e=e, g=g, g_screen=g_screen, g_band=g_band,
                     band=np.frombuffer(aux, dtype=bool).copy())


jax.tree_util.register_pytree_node(StartGrid, _grid_flatten, _grid_unflatten)


@jax.jit
def _paper_jit(grid, flux, weight, factor):
    valid = (weight > 0).astype(flux.dtype)
    p, s, crit = jax.lax.map(lambda a: _paper_one(grid, *a), (flux, valid, factor))
    return _x_from_pairs(grid, p, s), crit


_screen_jit = jax.jit(_screen_chunk, static_argnums=(1, 2))

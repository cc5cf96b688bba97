"""The training stars: their arrays (:class:`TrainingData`), checked on construction, and their variables.

:class:`TrainingData` holds what the losses of :mod:`xpcat.model.training` need
per star (conditioned fluxes, the factor of the inverse covariance, labels,
parallax and reddening priors) and refuses unusable rows, naming the first
source_id. The star variables ``(Theta, ln plx, ln E)`` live in a
:data:`StarState`, with Theta in the catalog's units (Teff in kK, [Fe/H] and
logg in dex; :data:`THETA_UNIT` converts to the forward model's K).

A star without a usable parallax (NaN, or s_plx not finite and positive;
SPEC Sec. 1.4) is kept: its parallax term is dropped (``inv_plx_err = 0`` in
:meth:`TrainingData.device_arrays`) and it starts at the reference distance
of :func:`xpcat.model.training_parallax.reference_ln_plx`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.catalog_schema.catalog import TEFF_K_PER_UNIT
from xpcat.catalog_schema.triangle import unpack_triu
from xpcat.errors import InputError
from xpcat.model.forward import N_OUT
from xpcat.model.training_parallax import reference_ln_plx, usable_parallax

__all__ = ["THETA_UNIT", "E_FLOOR", "TrainingData", "TrainingDataError", "StarState", "initial_stars"]

logger = logging.getLogger(__name__)

#: Scale from the star-variable units (kK, dex, dex) to the model's (K, dex, dex).
THETA_UNIT = np.array([TEFF_K_PER_UNIT, 1.0, 1.0])
#: Floor on the starting reddening (E = 0 has no logarithm), mag.
E_FLOOR = 1e-3

_IU = np.triu_indices(N_OUT)  # the packed upper triangle of a (66, 66) factor


class TrainingDataError(InputError):
    """Training arrays of the wrong shape or with unusable values, named in the message."""


@dataclass
class TrainingData:
    """Arrays of the training stars (numpy; moved to the device by the phases).

    Attributes
    ----------
    source_id : (n,) int64
    flux : (n, 66) float32, internal flux unit (missing fluxes: any finite value, they carry no weight)
    flux_error : (n, 66) float32, sqrt of the covariance diagonal (inf where missing)
    factor_triu : (n, 2211) float32, packed upper-triangular U with U^T U = C^-1
    theta_obs, theta_err : (n, 3) float32, Teff [K], [Fe/H], logg and their errors
    plx_obs, plx_err : (n,) float32, Gaia parallax and error [mas]; NaN for a star without a usable
        parallax (its parallax term is dropped)
    e_obs, e_err : (n,) float32, reddening prior and error [mag]
    hq : (n,) bool, the HQ cut of Eq. 15
    """

    source_id: np.ndarray
    flux: np.ndarray
    flux_error: np.ndarray
    factor_triu: np.ndarray
    theta_obs: np.ndarray
    theta_err: np.ndarray
    plx_obs: np.ndarray
    plx_err: np.ndarray
    e_obs: np.ndarray
    e_err: np.ndarray
    hq: np.ndarray

    def __post_init__(self) -> None:
        n = np.shape(self.source_id)[0]
        want = {"flux": (n, N_OUT), "flux_error": (n, N_OUT), "factor_triu": (n, len(_IU[0])),
                "theta_obs": (n, 3), "theta_err": (n, 3)}
        for f in fields(self):
            a = np.asarray(getattr(self, f.name))
            shape = want.get(f.name, (n,))
            if a.shape != shape:
                raise TrainingDataError(f"training array {f.name!r} has shape {a.shape}, expected {shape}")
        self.flux = np.where(np.isfinite(self.flux), self.flux, 0.0).astype(np.float32)
        checks = {"theta_err": self.theta_err, "e_err": self.e_err}
        for name, a in checks.items():
            bad = ~(np.isfinite(a) & (a > 0))
            if bad.any():
                i = int(np.flatnonzero(bad.reshape(n, -1).any(axis=1))[0])
                raise TrainingDataError(f"{int(bad.reshape(n, -1).any(axis=1).sum())} training stars have "
                                        f"non-positive or non-finite {name} (first: source_id "
                                        f"{int(self.source_id[i])}); drop them before training")
        for name in ("theta_obs", "e_obs", "factor_triu"):
            a = np.asarray(getattr(self, name))
            bad = ~np.isfinite(a).reshape(n, -1).all(axis=1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise TrainingDataError(f"{int(bad.sum())} training stars have non-finite {name} "
                                        f"(first: source_id {int(self.source_id[i])})")
        nonpos = self.has_parallax & ~(np.asarray(self.plx_obs) > 0)
        if nonpos.any():
            i = int(np.flatnonzero(nonpos)[0])
            raise TrainingDataError(f"{int(nonpos.sum())} training stars have parallax <= 0 "
                                    f"(first: source_id {int(self.source_id[i])}); the Sec. 2.5 cut "
                                    "parallax_over_error > 3 removes them")

    @property
    def has_parallax(self) -> np.ndarray:
        """(n,) bool: the star's parallax term is used (SPEC Sec. 1.4)."""
        return usable_parallax(self.plx_obs, self.plx_err)

    def start_ln_plx(self) -> np.ndarray:
        """(n,) starting ln plx [ln mas]: ln plx_obs, or the reference distance for a star without a parallax."""
        has = self.has_parallax
        out = np.zeros(self.n)
        out[has] = np.log(np.asarray(self.plx_obs, np.float64)[has])
        if (~has).any():
            out[~has] = reference_ln_plx(self.theta_obs[~has], self.e_obs[~has], self.flux[~has], self.flux_error[~has])
        return out

    @property
    def n(self) -> int:
        """Number of stars."""
        return int(np.shape(self.source_id)[0])

    def subset(self, idx: np.ndarray) -> TrainingData:
        """The stars at integer or boolean index ``idx``."""
        return TrainingData(**{f.name: np.asarray(getattr(self, f.name))[idx] for f in fields(self)})

    def device_arrays(self, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
        """The per-star observables as device arrays (Theta in star units: kK, dex, dex).

        ``factor`` is the dense (n, 66, 66) upper-triangular U (4 n 66^2 bytes in float32).
        ``inv_plx_err`` is 1 / s_plx, 0 for a star without a usable parallax (its ``plx_obs`` 0,
        ``plx_err`` 1: the parallax term vanishes).
        """
        has = self.has_parallax
        unit = THETA_UNIT.astype(np.float64)
        factor = unpack_triu(self.factor_triu, dtype=np.dtype(dtype))  # dense U: a batched mat-vec beats unpacking per step
        return {
            "flux": jnp.asarray(self.flux, dtype),
            "factor": jnp.asarray(factor),
            "th_obs": jnp.asarray(self.theta_obs / unit, dtype),
            "th_err": jnp.asarray(self.theta_err / unit, dtype),
            "plx_obs": jnp.asarray(np.where(has, self.plx_obs, 0.0), dtype),
            "plx_err": jnp.asarray(np.where(has, self.plx_err, 1.0), dtype),
            "inv_plx_err": jnp.asarray(np.where(has, 1.0 / np.where(has, self.plx_err, 1.0), 0.0), dtype),
            "e_obs": jnp.asarray(self.e_obs, dtype),
            "e_err": jnp.asarray(self.e_err, dtype),
        }


# the star state is a dict {"theta": (n, 3) kK/dex/dex, "ln_plx": (n,), "ln_e": (n,)}
StarState = dict[str, jax.Array]


def initial_stars(data: TrainingData, dtype: Any = jnp.float32) -> StarState:
    """Stars at their observed values (E floored at :data:`E_FLOOR`; no parallax: the reference distance)."""
    return {
        "theta": jnp.asarray(data.theta_obs / THETA_UNIT, dtype),
        "ln_plx": jnp.asarray(data.start_ln_plx(), dtype),
        "ln_e": jnp.asarray(np.log(np.maximum(data.e_obs, E_FLOOR)), dtype),
    }

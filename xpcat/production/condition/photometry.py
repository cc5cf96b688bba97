"""2MASS and unWISE magnitudes -> spectral flux densities (Eq. 5, SPEC §1).

``f_lambda = 3631 Jy * c / lambda0^2 * 10^(-0.4 (m + dm))`` with the paper's
effective wavelengths ``lambda0`` and AB-Vega offsets ``dm``. The 3631 Jy
zero point is converted to W m^-2 nm^-1 at each ``lambda0`` with astropy's
``spectral_density`` equivalency. The flux error is the linearised
``sigma_f = f * 0.4 ln(10) sigma_m``.

A band gets zero weight (infinite variance; NaN flux) when its magnitude or
error is missing or non-finite or the error is not positive, and the whole
survey is disregarded for a star when it is crowded (``norm_dg`` above the cut;
SPEC §1: -5 for 2MASS, -10 for unWISE). 2MASS rows are used only when they pass
Appendix A's selection: ``ph_qual`` has an 'A' in at least one band and
``ext_key`` is null. A null ``norm_dg`` (no neighbour within 30 arcsec in
Rybizki et al. 2022) is not crowded. No star is ever dropped.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from xpcat.catalog_schema.conditioned import NIR_BANDS, NIR_WAVELENGTHS_UM
from xpcat.catalog_schema.flags import ConditionFlag

__all__ = [
    "AB_MINUS_VEGA",
    "TMASS_BANDS",
    "UNWISE_BANDS",
    "NirPhotometry",
    "zero_point_w_m2_nm",
    "mag_to_flux",
    "tmass_selected",
    "nir_photometry",
]

logger = logging.getLogger(__name__)

#: AB - Vega offsets dm in mag (J, H, Ks: Blanton et al. 2005; W1, W2: WISE explanatory supplement).
AB_MINUS_VEGA = {"J": 0.91, "H": 1.39, "Ks": 1.85, "W1": 2.699, "W2": 3.339}
#: (band, magnitude column, error column) of the 2MASS table (Gaia archive names).
TMASS_BANDS = (("J", "j_m", "j_msigcom"), ("H", "h_m", "h_msigcom"), ("Ks", "ks_m", "ks_msigcom"))
#: (band, magnitude column, error column) of the unWISE table.
UNWISE_BANDS = (("W1", "w1_mag", "w1_mag_error"), ("W2", "w2_mag", "w2_mag_error"))

_LN10_04 = 0.4 * np.log(10.0)


@functools.lru_cache(maxsize=None)
def zero_point_w_m2_nm(band: str) -> float:
    """3631 Jy as f_lambda at the band's effective wavelength, in W m^-2 nm^-1.

    Parameters
    ----------
    band : {"J", "H", "Ks", "W1", "W2"}
    """
    import astropy.units as u

    lam = NIR_WAVELENGTHS_UM[NIR_BANDS.index(band)] * u.um
    f_nu = 3631.0 * u.Jy
    return float(f_nu.to(u.W / u.m**2 / u.nm, equivalencies=u.spectral_density(lam)).value)


def mag_to_flux(mag: np.ndarray, mag_error: np.ndarray, band: str) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 5: Vega magnitude -> f_lambda and its 1-sigma error.

    Parameters
    ----------
    mag, mag_error : (n,) array, mag
        NaN where missing.
    band : {"J", "H", "Ks", "W1", "W2"}

    Returns
    -------
    flux, flux_error : (n,) float64, W m^-2 nm^-1
        NaN where the input is NaN.
    """
    if band not in AB_MINUS_VEGA:
        raise ValueError(f"unknown NIR band {band!r}; expected one of {', '.join(AB_MINUS_VEGA)}")
    mag = np.asarray(mag, dtype=np.float64)
    flux = zero_point_w_m2_nm(band) * 10.0 ** (-0.4 * (mag + AB_MINUS_VEGA[band]))
    return flux, flux * _LN10_04 * np.asarray(mag_error, dtype=np.float64)


def tmass_selected(ph_qual: np.ndarray, ext_key: np.ndarray) -> np.ndarray:
    """Appendix A's 2MASS row selection: an 'A' in ``ph_qual`` and a null ``ext_key``.

    Parameters
    ----------
    ph_qual : (n,) object array of str or None
    ext_key : (n,) float array, NaN where null

    Returns
    -------
    (n,) bool
    """
    has_a = np.array([isinstance(q, str) and "A" in q[:3] for q in ph_qual], dtype=bool)
    return has_a & ~np.isfinite(np.asarray(ext_key, dtype=np.float64))


@dataclass(frozen=True)
class NirPhotometry:
    """NIR fluxes in flux-vector order J, H, Ks, W1, W2.

    Attributes
    ----------
    flux : (n, 5) float64, W m^-2 nm^-1, NaN where unused
    variance : (n, 5) float64, (W m^-2 nm^-1)^2, inf where unused
    flags : (n,) uint16, ConditionFlag bits (NO_TMASS, TMASS_CROWDED, NO_UNWISE, UNWISE_CROWDED)
    """

    flux: np.ndarray
    variance: np.ndarray
    flags: np.ndarray


def _survey(
    columns: dict[str, np.ndarray] | None,
    bands: tuple,
    n: int,
    usable_rows: np.ndarray,
    crowded: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flux = np.full((n, len(bands)), np.nan)
    var = np.full((n, len(bands)), np.inf)
    if columns is None:
        return flux, var, np.zeros(n, dtype=bool)
    for k, (band, mcol, ecol) in enumerate(bands):
        m = np.asarray(columns[mcol], dtype=np.float64)
        e = np.asarray(columns[ecol], dtype=np.float64)
        f, fe = mag_to_flux(m, e, band)
        good = usable_rows & ~crowded & np.isfinite(f) & np.isfinite(fe) & (fe > 0) & (f > 0)
        flux[good, k] = f[good]
        var[good, k] = fe[good] ** 2
    return flux, var, np.isfinite(var).any(axis=1)


def nir_photometry(
    n: int,
    norm_dg: np.ndarray,
    tmass: dict[str, np.ndarray] | None,
    unwise: dict[str, np.ndarray] | None,
    *,
    tmass_norm_dg_max: float = -5.0,
    unwise_norm_dg_max: float = -10.0,
) -> NirPhotometry:
    """NIR fluxes, variances and flags for ``n`` stars.

    Parameters
    ----------
    n : int
        Number of stars.
    norm_dg : (n,) float array
        Rybizki et al. crowding measure (NaN where null: not crowded).
    tmass : dict of (n,) arrays or None
        Columns ``j_m, j_msigcom, h_m, h_msigcom, ks_m, ks_msigcom`` (float,
        NaN where missing), ``ph_qual`` (object), ``ext_key`` (float, NaN where
        null) and ``matched`` (bool: the star has a 2MASS row), aligned with the
        stars. None when there is no 2MASS table.
    unwise : dict of (n,) arrays or None
        Columns ``w1_mag, w1_mag_error, w2_mag, w2_mag_error`` and ``matched``.
    tmass_norm_dg_max, unwise_norm_dg_max : float
        Crowding cuts: the survey is disregarded when ``norm_dg`` exceeds them.

    Returns
    -------
    NirPhotometry
    """
    norm_dg = np.asarray(norm_dg, dtype=np.float64)
    if norm_dg.shape != (n,):
        raise ValueError(f"norm_dg must have shape ({n},); got {norm_dg.shape}")
    with np.errstate(invalid="ignore"):
        tm_crowded = norm_dg > tmass_norm_dg_max
        wise_crowded = norm_dg > unwise_norm_dg_max
    flags = np.zeros(n, dtype=np.uint16)

    if tmass is not None:
        tm_rows = np.asarray(tmass["matched"], dtype=bool) & tmass_selected(tmass["ph_qual"], tmass["ext_key"])
    else:
        tm_rows = np.zeros(n, dtype=bool)
    f_tm, v_tm, any_tm = _survey(tmass, TMASS_BANDS, n, tm_rows, tm_crowded)
    tm_crowd_flag = tm_rows & tm_crowded
    flags[tm_crowd_flag] |= np.uint16(ConditionFlag.TMASS_CROWDED)
    flags[~any_tm & ~tm_crowd_flag] |= np.uint16(ConditionFlag.NO_TMASS)

    wise_rows = np.asarray(unwise["matched"], dtype=bool) if unwise is not None else np.zeros(n, dtype=bool)
    f_w, v_w, any_w = _survey(unwise, UNWISE_BANDS, n, wise_rows, wise_crowded)
    wise_crowd_flag = wise_rows & wise_crowded
    flags[wise_crowd_flag] |= np.uint16(ConditionFlag.UNWISE_CROWDED)
    flags[~any_w & ~wise_crowd_flag] |= np.uint16(ConditionFlag.NO_UNWISE)

    return NirPhotometry(np.hstack([f_tm, f_w]), np.hstack([v_tm, v_w]), flags)

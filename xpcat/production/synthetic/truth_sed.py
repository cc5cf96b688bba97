"""The synthetic universe's physical truth SED model, its projections and the truth forward model, in pure JAX.

The synthetic Gaia universe (:mod:`xpcat.production.synthetic.universe`) draws every
spectrum from a truth SED, so tests can run inference and check training against
the exact truth. The physical model defined here is the legacy universe's truth
(``universe.json``'s ``truth_sed = "physical"``); the realistic universe's truth
(``"empirical"``, :mod:`~xpcat.production.synthetic.truth_sed_empirical`) blends
real XP shapes of APOGEE stars into it and keeps its absolute scale.
:func:`build_truth_model` builds the forward model of either.

Model
-----
Absolute SED (the flux at parallax 1 mas, i.e. at 1 kpc), for
``theta = (Teff [K], [Fe/H] [dex], logg [dex(cm s^-2)])``::

    f_abs(lambda) = pi B_lambda(Teff) (R / 1 kpc)^2 S(lambda; theta)

- ``R = sqrt(G M / g)``, with the mass a smooth function of (Teff, logg):
  main-sequence ``M = (Teff / 5772 K)^(1/0.6)`` Msun blended (logistic in
  logg around 3.7) into 1.2 Msun for giants. So a solar twin is ~45 internal
  units at 550 nm and giants are ~100 times brighter than dwarfs.
- ``ln S`` adds smooth, parameter-dependent features: metal line blanketing
  in the blue (grows with [Fe/H] and falls with Teff), the Balmer jump and
  Balmer lines H-alpha..H-epsilon (peaking near 9500 K, broader at high
  logg), Ca II H&K, the CH G band, Mg b, Na D, the Ca II triplet (stronger
  in metal-rich giants), TiO band heads below ~4000 K, and a logg-dependent
  near-infrared slope. Every term is a smooth function of theta.

Extinction
----------
E is the reddening unit of the universe, **E = E(B-V) of the extinction
law**: ``A(lambda) = E * R_V * k(lambda; R_V)`` with ``k = A(lambda)/A(V)``
from ``dust_extinction``'s G23 curve (Gordon et al. 2023), which is exactly
``k = a(lambda) + b(lambda) (1/R_V - 1/3.1)``. The universe scatters R_V
around its mean; this model uses the mean R_V, so with zero R_V scatter the
universe and :meth:`TruthModel.predict_flux` agree exactly.

Observables
-----------
The 66 fluxes of SPEC §1, in the internal flux unit
:data:`FLUX_UNIT_W_M2_NM` = 1e-18 W m^-2 nm^-1:

- 0..60: the SED on a fine grid (:data:`FINE_WAVELENGTHS_NM`) projected by
  least squares onto GaiaXPy's BP and RP bases (each over its own range),
  then sampled at 392..992 nm with GaiaXPy's merge weights. The projection
  is a fixed linear map ``M (n_fine, 61)`` so everything is differentiable.
- 61..65: the SED at the 2MASS J, H, Ks and unWISE W1, W2 reference
  wavelengths (monochromatic, as SPEC §1 converts magnitudes).

Building the matrices (:func:`build_truth_model`) uses GaiaXPy's bases and
``dust_extinction`` (imported lazily); evaluating the model is pure JAX.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from astropy import constants

from xpcat.catalog_schema import conditioned as cs_conditioned
from xpcat.catalog_schema.conditioned import FLUX_UNIT_W_M2_NM

__all__ = [
    "FLUX_UNIT_W_M2_NM",
    "FINE_WAVELENGTHS_NM",
    "NIR_WAVELENGTHS_NM",
    "XP_WAVELENGTHS_NM",
    "BP_FIT_RANGE_NM",
    "RP_FIT_RANGE_NM",
    "R_V_REFERENCE",
    "ProjectionArrays",
    "TruthModel",
    "ln_sed_abs",
    "ln_features",
    "stellar_mass",
    "projection_arrays",
    "extinction_coefficients",
    "build_truth_model",
]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: Fine grid on which the SED is evaluated and projected, nm.
FINE_WAVELENGTHS_NM = np.arange(330.0, 1021.0, 1.0)
#: The 61 XP samples, nm.
XP_WAVELENGTHS_NM = np.asarray(cs_conditioned.XP_WAVELENGTHS_NM)
#: Reference wavelengths of J, H, Ks, W1, W2 (SPEC §1), nm.
NIR_WAVELENGTHS_NM = 1000.0 * np.asarray(cs_conditioned.NIR_WAVELENGTHS_UM)
#: Wavelength ranges over which the SED is projected onto the BP / RP bases, nm.
BP_FIT_RANGE_NM = (330.0, 643.0)
RP_FIT_RANGE_NM = (635.0, 1020.0)
#: Ridge of the band projections, relative to the design's largest squared singular value.
RIDGE_RELATIVE = 1e-8
#: R_V at which G23's ``b(lambda)`` term vanishes.
R_V_REFERENCE = 3.1

_H = float(constants.h.si.value)  # J s, 6.62607015e-34 (exact, SI 2019)
_C = float(constants.c.si.value)  # m / s, 2.99792458e8 (exact)
_KB = float(constants.k_B.si.value)  # J / K, 1.380649e-23 (exact, SI 2019)
_G = 6.674e-11  # m^3 kg^-1 s^-2
_MSUN = 1.98892e30  # kg
_KPC = 3.0856775814913673e19  # m
_LN10 = float(np.log(10.0))

_BALMER = np.array([656.28, 486.13, 434.05, 410.17, 397.01])
_BALMER_REL = np.array([1.0, 0.9, 0.8, 0.7, 0.6])
_CAT = np.array([849.8, 854.2, 866.2])
_CAT_REL = np.array([0.7, 1.0, 0.85])
_TIO = np.array([476.0, 496.0, 517.0, 545.0, 616.0, 672.0, 705.0, 759.0, 843.0])
_TIO_REL = np.array([0.3, 0.4, 0.5, 0.6, 0.7, 0.6, 1.0, 0.8, 0.5])


def _gauss(wl: JAXArray, centre: JAXArray, sigma: JAXArray) -> JAXArray:
    return jnp.exp(-0.5 * ((wl[..., None] - centre) / sigma) ** 2)


def stellar_mass(teff: JAXArray, logg: JAXArray) -> JAXArray:
    """Mass implied by the truth model, Msun (smooth in Teff and logg).

    Parameters
    ----------
    teff : array, K
    logg : array, dex(cm s^-2)
    """
    ln_m_dwarf = jnp.log(teff / 5772.0) / 0.6
    w_giant = jax.nn.sigmoid((3.7 - logg) / 0.15)
    return jnp.exp((1.0 - w_giant) * ln_m_dwarf + w_giant * jnp.log(1.2))


def ln_sed_abs(theta: JAXArray, wl_nm: JAXArray) -> JAXArray:
    """ln of the absolute SED at parallax 1 mas, in the internal flux unit.

    Parameters
    ----------
    theta : (3,) array
        Teff [K], [Fe/H] [dex], logg [dex(cm s^-2)].
    wl_nm : (m,) array, nm

    Returns
    -------
    (m,) array: ln(f_lambda / 1e-18 W m^-2 nm^-1).
    """
    teff, feh, logg = theta[0], theta[1], theta[2]
    wl = jnp.asarray(wl_nm)
    lam = wl * 1e-9
    # Planck surface flux pi B_lambda, W m^-2 m^-1 -> per nm
    x = (_H * _C / _KB) / (lam * teff)  # constants folded: (lam k T)^2 underflows float32 in the derivative
    ln_planck = jnp.log(2.0 * np.pi * _H * _C**2) - 5.0 * jnp.log(lam) - jnp.log(jnp.expm1(x)) + jnp.log(1e-9)
    mass = stellar_mass(teff, logg) * _MSUN
    radius2 = _G * mass / (10.0 ** (logg - 2.0))  # m^2
    ln_dilution = jnp.log(radius2) - 2.0 * jnp.log(_KPC)
    ln_s = ln_features(teff, feh, logg, wl)
    return ln_planck + ln_dilution + ln_s - jnp.log(FLUX_UNIT_W_M2_NM)


def ln_features(teff: JAXArray, feh: JAXArray, logg: JAXArray, wl: JAXArray) -> JAXArray:
    """ln S(lambda; theta) of the physical model: smooth continuum modulation and absorption features, (m,).

    Parameters
    ----------
    teff : scalar, K
    feh, logg : scalars, dex
    wl : (m,) nm
    """
    ln_t = jnp.log(teff)
    s_met = jnp.exp(feh)  # 1 at solar, 0.14 at -2
    cool = (5772.0 / teff) ** 3
    dwarfness = jax.nn.sigmoid((logg - 3.5) / 0.4)
    # metal line blanketing in the blue
    ln_s = -0.45 * s_met * cool * jnp.exp(-(wl - 340.0) / 90.0)
    # Balmer lines and jump: strongest near 9500 K, broader (pressure) at high logg
    balmer = 0.5 * jnp.exp(-0.5 * ((ln_t - np.log(9500.0)) / 0.35) ** 2)
    sigma_h = 2.5 + 2.5 * dwarfness
    ln_s = ln_s - balmer * jnp.sum(_BALMER_REL * _gauss(wl, _BALMER, sigma_h), axis=-1)
    jump = 0.9 * balmer * (1.2 - 0.3 * dwarfness)
    ln_s = ln_s - jump * jax.nn.sigmoid((364.6 - wl) / 3.0)
    # metal lines of cool stars
    cool_k = jax.nn.sigmoid((7000.0 - teff) / 600.0)
    ln_s = ln_s - 0.8 * jnp.sqrt(s_met) * cool_k * jnp.sum(_gauss(wl, jnp.array([393.37, 396.85]), 2.5), axis=-1)
    ln_s = ln_s - 0.3 * s_met * jax.nn.sigmoid((6500.0 - teff) / 500.0) * _gauss(wl, jnp.array([430.5]), 3.0)[..., 0]
    mgb = 0.35 * s_met * jax.nn.sigmoid((6000.0 - teff) / 500.0) * (0.8 + 0.4 * dwarfness)
    ln_s = ln_s - mgb * _gauss(wl, jnp.array([517.5]), 3.0)[..., 0]
    nad = 0.25 * s_met * jax.nn.sigmoid((5500.0 - teff) / 500.0) * (0.8 + 0.4 * dwarfness)
    ln_s = ln_s - nad * _gauss(wl, jnp.array([589.3]), 2.5)[..., 0]
    # Ca II triplet: stronger in metal-rich giants
    cat = 0.3 * s_met**0.6 * jax.nn.sigmoid((7500.0 - teff) / 800.0) * (1.3 - 0.5 * dwarfness)
    ln_s = ln_s - cat * jnp.sum(_CAT_REL * _gauss(wl, _CAT, 2.5), axis=-1)
    # TiO bands of M stars: sharp head, degraded to the red
    tio = 1.4 * jax.nn.sigmoid((3900.0 - teff) / 200.0) * (1.0 + 0.2 * feh) * (1.1 - 0.2 * dwarfness)
    d = wl[..., None] - _TIO
    band = jax.nn.sigmoid(d / 1.5) * jnp.exp(-jnp.maximum(d, 0.0) / 25.0)
    ln_s = ln_s - tio * jnp.sum(_TIO_REL * band, axis=-1)
    # near-infrared slope: giants redder, metal-poor stars slightly bluer
    ln_s = ln_s + (0.04 * (4.0 - logg) + 0.02 * feh) * jnp.log(wl / 1000.0)
    return ln_s


@dataclass(frozen=True)
class ProjectionArrays:
    """The fixed linear maps from the fine-grid SED to XP coefficients and samples.

    Attributes
    ----------
    fine_wavelengths : (n_fine,) float64, nm
    to_bp, to_rp : (n_fine, 55) float64
        ``sed_fine @ to_bp`` = BP coefficients (least-squares projection over
        :data:`BP_FIT_RANGE_NM`; zero rows outside), SED in W m^-2 nm^-1.
    to_xp : (n_fine, 61) float64
        ``sed_fine @ to_xp`` = the merged XP samples at 392..992 nm (same unit as the SED).
    to_phot : (n_fine, 3) float64
        ``sed_fine @ to_phot`` = GaiaXPy's Gaia_DR3_Vega synthetic G, BP, RP fluxes
        (SED in W m^-2 nm^-1; magnitudes are ``-2.5 log10(flux) + phot_zero_points``).
    phot_zero_points : (3,) float64
    design_bp, design_rp : (55, 61) float64
        GaiaXPy's sampled bases at 392..992 nm (merge weights not applied).
    weight_bp, weight_rp : (61,) float64
    """

    fine_wavelengths: np.ndarray
    to_bp: np.ndarray
    to_rp: np.ndarray
    to_xp: np.ndarray
    to_phot: np.ndarray
    phot_zero_points: np.ndarray
    design_bp: np.ndarray
    design_rp: np.ndarray
    weight_bp: np.ndarray
    weight_rp: np.ndarray


def _band_projector(design: np.ndarray, wl: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(n_fine, n_bases) ridge least-squares projector of a band's design over [lo, hi] nm.

    The XP design matrices are very ill-conditioned in wavelength space: a plain
    least-squares fit puts huge values in near-null combinations. A small ridge
    (:data:`RIDGE_RELATIVE` times the largest squared singular value) keeps the
    coefficients realistic (c0 dominant, |c_k|/c0 << 1 at high k) while a
    blackbody is still reproduced to ~0.5 % rms over 392..992 nm. Being a
    fixed matrix, the projection is linear and scale-invariant.
    """
    mask = (wl >= lo) & (wl <= hi) & np.all(np.isfinite(design), axis=0)
    a = design[:, mask]
    s_max = np.linalg.norm(a, 2)
    gram = a @ a.T + RIDGE_RELATIVE * s_max**2 * np.eye(a.shape[0])
    out = np.zeros((wl.size, design.shape[0]))
    out[mask] = np.linalg.solve(gram, a).T
    return out


@functools.lru_cache(maxsize=4)
def _projection_cached(wl: tuple[float, ...]) -> ProjectionArrays:
    return _projection(np.asarray(wl))


def projection_arrays(fine_wavelengths_nm: np.ndarray | None = None) -> ProjectionArrays:
    """Build (once per grid, cached) the projection matrices from GaiaXPy's own bases.

    Parameters
    ----------
    fine_wavelengths_nm : (n_fine,) array, nm, optional
        Default :data:`FINE_WAVELENGTHS_NM`.
    """
    wl = FINE_WAVELENGTHS_NM if fine_wavelengths_nm is None else np.asarray(fine_wavelengths_nm, float)
    return _projection_cached(tuple(float(v) for v in wl))


def _projection(wl: np.ndarray) -> ProjectionArrays:
    """Build the projection matrices from GaiaXPy's own bases and photometric system."""
    from gaiaxpy import PhotometricSystem

    from xpcat.production.condition.bases import xp_bases

    fine = xp_bases(wl)
    to_bp = _band_projector(fine.design_bp, wl, *BP_FIT_RANGE_NM)
    to_rp = _band_projector(fine.design_rp, wl, *RP_FIT_RANGE_NM)
    xp = xp_bases(XP_WAVELENGTHS_NM)
    design_bp, design_rp = xp.design_bp, xp.design_rp
    to_xp = to_bp @ (design_bp * xp.weight_bp) + to_rp @ (design_rp * xp.weight_rp)
    system = PhotometricSystem.Gaia_DR3_Vega.value
    sampling = system.load_xpsampling_from_xml()
    _, merge = system.load_xpmerge_from_xml()
    to_phot = to_bp @ (sampling["bp"] * merge["bp"]) + to_rp @ (sampling["rp"] * merge["rp"])
    return ProjectionArrays(
        fine_wavelengths=wl,
        to_bp=to_bp,
        to_rp=to_rp,
        to_xp=to_xp,
        to_phot=to_phot,
        phot_zero_points=np.asarray(system.get_zero_points(), dtype=float),
        design_bp=design_bp,
        design_rp=design_rp,
        weight_bp=xp.weight_bp,
        weight_rp=xp.weight_rp,
    )


def extinction_coefficients(wavelengths_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """G23's ``a`` and ``b``: ``A(lambda)/A(V) = a + b (1/R_V - 1/3.1)``.

    Parameters
    ----------
    wavelengths_nm : (m,) array, nm

    Returns
    -------
    a, b : (m,) float64 arrays.
    """
    import warnings

    import astropy.units as u
    from dust_extinction.parameter_averages import G23

    x = np.asarray(wavelengths_nm, float) * u.nm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = np.asarray(G23(Rv=R_V_REFERENCE)(x), float)
        r2 = 2.5
        b = (np.asarray(G23(Rv=r2)(x), float) - a) / (1.0 / r2 - 1.0 / R_V_REFERENCE)
    return a, b


def a_over_e(a: np.ndarray, b: np.ndarray, r_v: np.ndarray | float) -> np.ndarray:
    """A(lambda)/E in mag per unit E (E = E(B-V) of the law): ``R_V a + b (1 - R_V/3.1)``.

    Parameters
    ----------
    a, b : (m,) arrays from :func:`extinction_coefficients`
    r_v : float or (n,) array

    Returns
    -------
    (m,) or (n, m) array.
    """
    r_v = np.asarray(r_v, float)[..., None]
    return r_v * a + b * (1.0 - r_v / R_V_REFERENCE)


@dataclass(frozen=True)
class TruthModel:
    """The truth forward model at one R_V (the universe's mean), pure JAX.

    Same interface as the learned forward model (:mod:`xpcat.model.forward`) that
    :mod:`xpcat.model.inference` is generic over:
    ``ln_flux_abs(theta) -> (66,)``, ``R (66,)``, ``predict_flux(theta, ln_plx, ln_e) -> (66,)``.
    All fluxes are in the internal unit 1e-18 W m^-2 nm^-1; plx in mas; E in mag (E(B-V) of the law).

    Attributes
    ----------
    r_v : float
        R_V of the model (the universe's mean).
    fine_wavelengths : (n_fine,) jax array, nm
    to_xp : (n_fine, 61) jax array
        Fine SED -> the 61 XP samples (fixed linear map).
    ext_fine : (n_fine,) jax array
        ln-flux extinction per unit E on the fine grid: 0.4 ln 10 A(lambda)/E.
    ext_nir : (5,) jax array
        Same at the NIR reference wavelengths.
    R : (66,) jax array
        The extinction vector per unit E in ln flux (0.4 ln 10 A/E at the 61 XP
        samples and 5 NIR wavelengths): the separable approximation
        ``f(E) ~ f(0) exp(-E R)``. :meth:`predict_flux` is exact instead.
    ln_sed : callable ``(theta (3,), wl (m,) nm) -> (m,)``
        The truth SED: :func:`ln_sed_abs` (the physical model, the legacy universe's) or the
        realistic universe's (:mod:`~xpcat.production.synthetic.truth_sed_empirical`).
    """

    r_v: float
    fine_wavelengths: JAXArray
    to_xp: JAXArray
    ext_fine: JAXArray
    ext_nir: JAXArray
    R: JAXArray
    ln_sed: Callable[[JAXArray, JAXArray], JAXArray] = ln_sed_abs

    def ln_sed_fine(self, theta: JAXArray) -> JAXArray:
        """(n_fine,) ln absolute SED on the fine grid, internal unit."""
        return self.ln_sed(jnp.asarray(theta), self.fine_wavelengths)

    def ln_flux_abs(self, theta: JAXArray) -> JAXArray:
        """ln of the 66 absolute fluxes (plx = 1 mas, E = 0), internal unit.

        Parameters
        ----------
        theta : (3,) array: Teff [K], [Fe/H], logg.

        Returns
        -------
        (66,) array.
        """
        theta = jnp.asarray(theta)
        xp = jnp.exp(self.ln_sed_fine(theta)) @ self.to_xp
        nir = self.ln_sed(theta, jnp.asarray(NIR_WAVELENGTHS_NM))
        return jnp.concatenate([jnp.log(jnp.maximum(xp, 1e-30)), nir])

    def predict_flux(self, theta: JAXArray, ln_plx: JAXArray, ln_e: JAXArray) -> JAXArray:
        """Noiseless 66 fluxes of a single star at this model's R_V, internal unit.

        The extinction is applied to the fine SED before the XP projection,
        exactly as the universe does it.

        Parameters
        ----------
        theta : (3,) array: Teff [K], [Fe/H], logg.
        ln_plx : scalar, ln(parallax / mas).
        ln_e : scalar, ln(E / mag).

        Returns
        -------
        (66,) array.
        """
        theta = jnp.asarray(theta)
        e = jnp.exp(ln_e)
        scale = jnp.exp(2.0 * ln_plx)
        xp = jnp.exp(self.ln_sed_fine(theta) - e * self.ext_fine) @ self.to_xp
        nir = jnp.exp(self.ln_sed(theta, jnp.asarray(NIR_WAVELENGTHS_NM)) - e * self.ext_nir)
        return scale * jnp.concatenate([xp, nir])


@jax.jit
def _batched_ln_sed(theta: JAXArray, wl: JAXArray) -> JAXArray:
    return jax.vmap(ln_sed_abs, in_axes=(0, None))(theta, wl)


def build_truth_model(r_v: float = R_V_REFERENCE, projection: ProjectionArrays | None = None,
                      sed: str = "physical") -> TruthModel:
    """The truth model at ``r_v`` (use the universe's mean R_V, ``universe.json``'s ``r_v_mean``).

    Parameters
    ----------
    r_v : float
        R_V of the extinction law (G23 is valid for 2.3..5.6).
    projection : ProjectionArrays, optional
        Reuse already-built matrices.
    sed : {"physical", "empirical"}
        The truth SED: ``physical`` for the legacy universe, ``empirical`` for the realistic one
        (``universe.json``'s ``truth_sed``; :mod:`~xpcat.production.synthetic.truth_sed_empirical`).
    """
    from xpcat.production.synthetic.truth_sed_empirical import sed_function

    ln_sed = sed_function(sed)
    proj = projection_arrays() if projection is None else projection
    a, b = extinction_coefficients(proj.fine_wavelengths)
    a_n, b_n = extinction_coefficients(NIR_WAVELENGTHS_NM)
    a_x, b_x = extinction_coefficients(XP_WAVELENGTHS_NM)
    ext_fine = 0.4 * _LN10 * a_over_e(a, b, r_v)
    ext_nir = 0.4 * _LN10 * a_over_e(a_n, b_n, r_v)
    ext_xp = 0.4 * _LN10 * a_over_e(a_x, b_x, r_v)
    return TruthModel(
        r_v=float(r_v),
        fine_wavelengths=jnp.asarray(proj.fine_wavelengths),
        to_xp=jnp.asarray(proj.to_xp),
        ext_fine=jnp.asarray(ext_fine),
        ext_nir=jnp.asarray(ext_nir),
        R=jnp.asarray(np.concatenate([ext_xp, ext_nir])),
        ln_sed=ln_sed,
    )


def batched_ln_sed(theta: np.ndarray, wl_nm: np.ndarray) -> np.ndarray:
    """ln absolute SED for many stars, internal unit.

    Parameters
    ----------
    theta : (n, 3) array
    wl_nm : (m,) array, nm

    Returns
    -------
    (n, m) float64 numpy array.
    """
    return np.asarray(_batched_ln_sed(jnp.asarray(theta), jnp.asarray(wl_nm)), dtype=np.float64)

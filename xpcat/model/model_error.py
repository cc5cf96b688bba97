"""The forward model's own error, learned on the validation split (SPEC §5, "Beyond the paper").

The Fisher covariance C_F (:mod:`xpcat.model.uncertainty`) knows only the
measurement noise; the reported errors are then 1.5-3x too small because the
forward model itself is wrong by more than the noise, most of all far from
its training stars. This module learns that error as an additive covariance
S(p) in the reported parameters p = (Teff kK, [Fe/H], logg, E mag, plx mas)
that depends on where the star is, and propagates it to the estimate:

    C = K C_F K + A S A^T,     A = diag(1, 1, 1, 1, 1 - C_F,44 / s_plx^2),  K = diag(k)

**Why in parameter space, and why A.** S is the covariance that an error of
the flux model would give to the parameters if the fluxes alone were fitted (a
per-wavelength variance added to the flux covariance would move the estimates,
chi^2, flags and confidence features; a term on the parameters moves only the
reported covariance). The estimate's linear response to a flux-only error is
``C_F I_flux = 1 - C_F P`` (P = diag(0, 0, 0, 0, 1 / s_plx^2)); xpcat keeps
its diagonal, A (A = 1 without a parallax). Its off-diagonal terms, a
correlation the validation stars cannot pin down (their parallax reference is
the fit's own datum), made the demo's logg pulls 0.74.

**Why K.** The real noise is not SPEC Eq. 2's inflated covariance: one factor
k_j per parameter on C_F (the parallax: on the fluxes' share, :func:`fisher_part`),
learned with S (without it the demo's [Fe/H] pulls ran 0.6 at G < 12 to 1.6).

**Form of S.** ``S = diag(s) rho diag(s)`` with, per parameter j,
``s_j^2 = u_j^2 exp(beta_j . z)``, z = (1, t, t^2, g, ln(E + 0.05), ln w, ln q, h) of
the star's *estimate* (t = (Teff - 5.5 kK) / 1.5 kK, g = logg - 3.5) and its fit
(w, q, h below), clipped to the learning stars' range (no extrapolation);
s_4 = plx * s_ln_plx (a flux-level error is a fractional parallax error).

**Why ln w.** w = C_F,44 / s_plx^2 (in [W_MIN, 1]) is Gaia's share of the
parallax information (demo logg pulls without it 0.36 at G 10-12 to 1.80 at G > 17).

**Why ln q.** q = chi^2 / n_flux (:func:`fit_quality`): a star the model fits
badly has a less trustworthy estimate than its place in (Teff, logg, E) says
(demo: Fisher-only truth pulls 1.7-2x larger in the top fifth of q than in the
bottom one). The type prior's ln p(Theta) made logg's overall pulls 1.08 ->
1.18: not used. Without the fit's chi^2 ln q = 0.

**Why h.** h = min(g, 0) ln max(plx / s_plx, 1): a giant's spectrum pins logg
weakly, so its logg (and E, plx) follows the luminosity, flux times distance^2,
whose error shrinks with the parallax's S/N; a dwarf's follows its spectrum
(h = 0, as where no parallax pins anything). ln w cannot say this (it is near 1
for bright stars and for giants whose fluxes barely know their parallax), and
the validation split has few bright giants, so without h they got the faint
giants' S (6,000-star demo, G 10-12: s_logg 0.12 dex, truth scatter 0.055, k C_F
0.014). Pulls vs truth without -> with h: G 10-12 logg/E/plx 0.48/0.78/0.63 ->
0.96/0.92/0.90, 4000-4500 K logg 0.71 -> 1.01 (below 4000 K, 37 stars: 1.98 ->
2.62); bins out of band 20 -> 15 of 100 (20 paired bootstrap resamples: 28.8 ->
26.2, -2.6 +- 0.7). Artifacts without ln w, ln q or h (N_Z_LEGACY, N_Z_NO_Q,
N_Z_NO_H terms) are read as they were.
rho: the robust correlation of the four referenced parameters' excess residuals.

**Learning** (:func:`learn_model_error`): on stars the forward model did not
train on (the training stage's validation split), fitted without their
labels, the residual r_j = est_j - ref_j has variance
``base_j + (A S A^T)_jj`` with base_j = C_F,jj + s_ref,j^2 (labels for
Teff, [Fe/H], logg; the reddening prior for E). For the parallax the
reference is the Gaia parallax the fit used, so base_4 = s_plx^2 - C_F,44
(the residual of an estimate against its own datum). (ln k_j^2, beta_j)
maximise a Student-t (nu = 5) likelihood of the residuals (robust to catastrophic failures) times a
fixed N(0, 1) prior on each slope (a penalty grown as n / 1000 tightened it as stars were added), then one
factor per parameter, on k_j^2 C_F,jj + s_j^2 together (on s_j^2 alone, k_j at
the nearer bound, where k_j would leave [0.5, 3]), makes the robust sigma
of the pulls against the *truth* 1, the references' noise deconvolved
(:mod:`xpcat.model.pull_deconvolution`); k_j < 1 is allowed (SPEC Eq. 2
inflates the noise on purpose). The prior width of the ML scale's bias
(step 2 there) comes from all parameters' corrections together
(:func:`~xpcat.model.pull_deconvolution.pooled_correction_sd`): on the demo all
five are noise, the width 0, the ML scale kept (bins out of band 24 -> 20 of
100). No gain: Teff hats, ln(1 - w +
d), (ln w) g, g t, g^2, ln Fisher error, an independent per-wavelength flux error
propagated through each star's Jacobian (C_F J^T C^-1 diag(m f)^2 C^-1 J C_F:
53 bins out). Pure array code: numpy and scipy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize

from xpcat.model.pull_deconvolution import ScaleMatch, deconvolved_scale, pooled_correction_sd, scale_match
from xpcat.model.pull_statistics import (
    PARAMS,
    PULL_SIGMA_BAND,
    pull_calibration,
    robust_sigma,
)
from xpcat.model.uncertainty import psd_inverse

__all__ = ["MIN_STARS", "N_Z", "N_Z_LEGACY", "N_Z_NO_H", "N_Z_NO_Q", "PARAMS", "PLX_SNR_RANGE", "PULL_SIGMA_BAND",
           "Q_RANGE", "UNITS", "W_MIN", "ModelError", "calibrated_covariance", "fisher_part", "fisher_scale_per_star",
           "fit_quality", "learn_model_error", "model_error_from_arrays", "model_error_to_arrays", "model_error_z",
           "propagation_matrix", "pull_calibration", "pull_sigmas", "robust_sigma"]

logger = logging.getLogger(__name__)

#: Scale u_j of each parameter's model error (kK, dex, dex, mag, and ln plx for the parallax).
UNITS = np.array([0.1, 0.1, 0.1, 0.03, 0.05])
#: Terms of z: 1, t, t^2, g, ln(E + 0.05), ln w (Gaia's share of the parallax information), ln q (chi^2 / n_flux),
#: h = min(g, 0) ln max(plx / s_plx, 1) (a giant's parallax S/N).
N_Z = 8
#: Terms of z of artifacts made before the h term (their beta is (5, 7)).
N_Z_NO_H = 7
#: Terms of z of artifacts made before the ln w term (their beta is (5, 5); z is cut to it).
N_Z_LEGACY = 5
#: Terms of z of artifacts made before the ln q term (their beta is (5, 6)).
N_Z_NO_Q = 6
#: Range of q = chi^2 / n_flux kept in ln q (a failed fit's 0 or inf stays finite; z is clipped again when used).
Q_RANGE = (1e-2, 1e3)
#: Range of the parallax S/N plx / s_plx kept in h (below 1 the parallax pins nothing: h = 0).
PLX_SNR_RANGE = (1.0, 1e3)
#: Floor of w = C_F,44 / s_plx^2 (stars without a Gaia parallax have w = 0).
W_MIN = 1e-3
#: Fewest stars with a reference that a parameter's model error is learned from.
MIN_STARS = 50
_NU = 5.0
_SLOPE_PRIOR_SD = 1.0  # width of the N(0, sd^2) prior on each non-constant beta (not grown with n)
_BETA0 = (-30.0, 12.0)
_LN_K2 = (np.log(0.25), np.log(9.0))  # 0.5 <= k <= 3


@dataclass(frozen=True)
class ModelError:
    """A learned model error S(p).

    Attributes
    ----------
    beta : (5, nz) float64, coefficients of ln(s_j^2 / u_j^2) on the first nz terms of z (nz = N_Z, or
        N_Z_LEGACY / N_Z_NO_Q / N_Z_NO_H for artifacts made before the ln w / ln q / h term); a row of -inf-like
        (``beta[j, 0] <= -30``) means no model error for parameter j.
    z_lo, z_hi : (nz,) float64, range of z of the learning stars (z is clipped to it).
    rho : (5, 5) float64, correlation of the model errors (positive definite).
    fisher_scale : (5,) float64, k_j: the factor on the Fisher errors (for the parallax on the
        fluxes' share, :func:`fisher_scale_per_star`; ones for artifacts made before it existed).
    """

    beta: np.ndarray
    z_lo: np.ndarray
    z_hi: np.ndarray
    rho: np.ndarray
    fisher_scale: np.ndarray = field(default_factory=lambda: np.ones(5))

    def variance(self, params5: np.ndarray, cov5: np.ndarray, inv_plx_err: np.ndarray,
                 quality: np.ndarray | None = None) -> np.ndarray:
        """(n, 5) s_j^2 in catalog units squared (kK^2, dex^2, dex^2, mag^2, mas^2) at the estimates.

        ``cov5`` (n, 5, 5) Fisher covariances and ``inv_plx_err`` (n,) 1 / s_plx [1/mas] give ln w;
        ``quality`` (n,) q = chi^2 / n_flux of the fits (:func:`fit_quality`) gives ln q (None: ln q = 0).
        """
        p = np.asarray(params5, dtype=np.float64)
        nz = self.beta.shape[1]
        z = np.clip(model_error_z(p, cov5, inv_plx_err, quality)[:, :nz], self.z_lo, self.z_hi)
        with np.errstate(over="ignore", invalid="ignore"):
            s2 = UNITS**2 * np.exp(np.clip(z @ self.beta.T, -60.0, 30.0))
        s2[:, self.beta[:, 0] <= _BETA0[0]] = 0.0
        s2[:, 4] *= p[:, 4] ** 2
        return s2

    def covariance(self, params5: np.ndarray, cov5: np.ndarray, inv_plx_err: np.ndarray,
                   quality: np.ndarray | None = None) -> np.ndarray:
        """(n, 5, 5) S = diag(s) rho diag(s) at the estimates (NaN rows where the estimate is not finite)."""
        s = np.sqrt(self.variance(params5, cov5, inv_plx_err, quality))
        return s[:, :, None] * self.rho[None] * s[:, None, :]


def fit_quality(chi2: np.ndarray, n_valid_flux: np.ndarray) -> np.ndarray:
    """(n,) q = chi^2 / n_flux, the fit's flux chi^2 per valid flux (NaN where no flux was valid)."""
    n = np.asarray(n_valid_flux, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.asarray(chi2, dtype=np.float64) / n, np.nan)


def model_error_z(params5: np.ndarray, cov5: np.ndarray, inv_plx_err: np.ndarray,
                  quality: np.ndarray | None = None) -> np.ndarray:
    """(n, N_Z) features z = (1, t, t^2, g, ln(E + 0.05), ln w, ln q, h) of (n, 5) estimates (catalog units).

    Parameters
    ----------
    params5 : (n, 5) estimates.
    cov5 : (n, 5, 5) their Fisher covariances (catalog units).
    inv_plx_err : (n,) 1 / s_plx of the Gaia parallax the fit used [1/mas], 0 where none.
    quality : (n,) q = chi^2 / n_flux of the fits (:func:`fit_quality`); None or non-finite: ln q = 0.

    Returns
    -------
    (n, N_Z) float64; w = C_F,44 / s_plx^2 (Gaia's share of the estimate's parallax information)
    clipped to [W_MIN, 1], q clipped to Q_RANGE, h = min(g, 0) ln(plx s_plx^-1) with the S/N clipped to
    PLX_SNR_RANGE (h = 0 without a Gaia parallax).
    """
    p = np.asarray(params5, dtype=np.float64)
    t = (p[:, 0] - 5.5) / 1.5
    w = np.asarray(cov5, dtype=np.float64)[:, 4, 4] * np.asarray(inv_plx_err, dtype=np.float64) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        le = np.log(np.maximum(p[:, 3], 0.0) + 0.05)
        lw = np.log(np.clip(w, W_MIN, 1.0))
        q = np.ones(len(p)) if quality is None else np.asarray(quality, dtype=np.float64)
        lq = np.where(np.isfinite(q), np.log(np.clip(q, *Q_RANGE)), 0.0)
        snr = np.nan_to_num(p[:, 4] * np.asarray(inv_plx_err, dtype=np.float64), nan=0.0)
        h = np.minimum(p[:, 2] - 3.5, 0.0) * np.log(np.clip(snr, *PLX_SNR_RANGE))
    return np.column_stack([np.ones(len(p)), t, t * t, p[:, 2] - 3.5, le, lw, lq, h])


def propagation_matrix(cov5: np.ndarray, inv_plx_err: np.ndarray) -> np.ndarray:
    """(n, 5, 5) A = diag(1, 1, 1, 1, 1 - C_F,44 / s_plx^2), the estimate's response to a flux-only error.

    Parameters
    ----------
    cov5 : (n, 5, 5) Fisher covariance (catalog units).
    inv_plx_err : (n,) 1 / s_plx [1/mas], 0 where the parallax was not used.
    """
    cov5 = np.asarray(cov5, dtype=np.float64)
    a = np.broadcast_to(np.eye(5), cov5.shape).copy()
    a[:, 4, 4] -= cov5[:, 4, 4] * np.asarray(inv_plx_err, dtype=np.float64) ** 2
    return a


def calibrated_covariance(cov5: np.ndarray, params5: np.ndarray, inv_plx_err: np.ndarray,
                          model_error: ModelError, quality: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The reported covariance K C_F K + A S A^T and its inverse.

    Parameters
    ----------
    cov5 : (n, 5, 5) Fisher covariance, catalog units (NaN rows stay NaN).
    params5 : (n, 5) estimates, catalog units.
    inv_plx_err : (n,) 1 / s_plx of the Gaia parallax the fit used [1/mas], 0 where none.
    model_error : ModelError
    quality : (n,) q = chi^2 / n_flux of the fits (:func:`fit_quality`); None: ln q = 0.

    Returns
    -------
    cov, icov : (n, 5, 5) float64, symmetric; cov positive semi-definite.
    """
    cov5 = np.asarray(cov5, dtype=np.float64)
    a = propagation_matrix(cov5, inv_plx_err)
    s = model_error.covariance(params5, cov5, inv_plx_err, quality)
    k = fisher_scale_per_star(model_error.fisher_scale, a)
    cov = cov5 * k[:, :, None] * k[:, None, :] + np.einsum("nij,njk,nlk->nil", a, s, a)
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    return cov, psd_inverse(cov)


def _pull_variance(base: np.ndarray, a: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """(n, 5) base + diag(A diag(s2) A^T)."""
    return base + np.einsum("njk,nk->nj", a * a, s2)


def pull_sigmas(resid: np.ndarray, base: np.ndarray, a: np.ndarray | None = None,
                s2: np.ndarray | None = None) -> list[float]:
    """Robust sigma of the pulls r_j / sqrt(base_j + (A S A^T)_jj) per parameter (5 floats, NaN when unknown)."""
    var = base if s2 is None else _pull_variance(base, a, s2)
    with np.errstate(invalid="ignore", divide="ignore"):
        pulls = resid / np.sqrt(var)
    return [robust_sigma(pulls[:, j]) for j in range(resid.shape[1])]


def _fit_beta(r: np.ndarray, base: np.ndarray, fisher: np.ndarray, scale2: np.ndarray,
              z: np.ndarray) -> tuple[float, np.ndarray]:
    """Student-t ML (ln k^2, beta) of one parameter: var = base + k^2 fisher + scale2 exp(z beta).

    ``fisher`` is 0 where the Fisher part is not scaled (the parallax): k^2 then stays 1.
    """
    ridge = 0.5 / _SLOPE_PRIOR_SD**2
    free_k = bool(np.any(fisher > 0))

    def nll(v_: np.ndarray) -> tuple[float, np.ndarray]:
        lnk2, beta = v_[0], v_[1:]
        q = scale2 * np.exp(np.clip(z @ beta, -60.0, 30.0))
        fk = np.exp(lnk2) * fisher
        v = base + fk + q
        val = np.sum(0.5 * np.log(v) + 0.5 * (_NU + 1) * np.log1p(r * r / (_NU * v))) + ridge * np.sum(beta[1:] ** 2)
        dv = 0.5 / v - 0.5 * (_NU + 1) * r * r / (v * (_NU * v + r * r))
        grad = np.concatenate([[np.sum(dv * fk)], z.T @ (dv * q)])
        grad[2:] += 2.0 * ridge * beta[1:]
        return float(val), grad

    bounds = [_LN_K2 if free_k else (0.0, 0.0), _BETA0] + [(-6.0, 6.0)] * (z.shape[1] - 1)
    best = None
    for b0 in (-4.0, 0.0, 2.0):  # a few starts: the constant term can sit at either end
        x0 = np.zeros(z.shape[1] + 1)
        x0[1] = b0
        res = minimize(nll, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 300})
        if best is None or res.fun < best.fun:
            best = res
    return float(best.x[0]), best.x[1:]


def _calibrate(r: np.ndarray, base: np.ndarray, extra: np.ndarray, s2: np.ndarray, truth_extra: np.ndarray,
               correction_sd: float, match: ScaleMatch | None = None) -> float:
    """ln c such that the pulls against the truth have robust sigma 1 under the reported variance
    c (extra + s2) + truth_extra (:func:`xpcat.model.pull_deconvolution.deconvolved_scale`).

    ``base`` is the variance in r that is not the estimate's own scaled error (the reference's noise,
    deconvolved), ``extra`` the scaled Fisher part (k^2 C_F) that the factor multiplies with s2, and
    ``truth_extra`` the Gaussian variance of estimate - truth that r does not show, ``correction_sd`` the
    prior width of the ML scale's bias (:func:`xpcat.model.pull_deconvolution.pooled_correction_sd`).
    """
    return deconvolved_scale(r, base, extra + s2, truth_extra, correction_sd, match)[0]


def fisher_part(cov5: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(n, 5) the part of each estimate's variance that K scales: C_F,jj, and A_44 C_F,44 for the parallax.

    The estimate's parallax weighs the fluxes' parallax (variance C_f) against Gaia's (s_plx^2) with
    the Fisher weight A_44 = C_F,44 / C_f = 1 - C_F,44 / s_plx^2. If the flux noise is k^2 times what
    the fit assumes, the estimate's variance is A_44^2 k^2 C_f + (1 - A_44)^2 s_plx^2
    = C_F,44 (1 + (k^2 - 1) A_44): the Fisher scale acts on A_44 C_F,44 only, never on Gaia's part.
    """
    part = np.einsum("nii->ni", np.asarray(cov5, dtype=np.float64)).copy()
    part[:, 4] *= a[:, 4, 4]
    return part


def fisher_scale_per_star(fisher_scale: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(n, 5) the factor on each star's Fisher errors: k_j, and sqrt(1 + (k_4^2 - 1) A_44) for the parallax
    (see :func:`fisher_part`; k_4 itself where no Gaia parallax was used, A_44 = 1)."""
    k = np.broadcast_to(np.asarray(fisher_scale, dtype=np.float64), (a.shape[0], 5)).copy()
    with np.errstate(invalid="ignore"):
        k[:, 4] = np.sqrt(np.maximum(1.0 + (k[:, 4] ** 2 - 1.0) * a[:, 4, 4], 0.0))
    return k


def learn_model_error(est5: np.ndarray, cov5: np.ndarray, inv_plx_err: np.ndarray, ref5: np.ndarray,
                      ref_var5: np.ndarray, min_stars: int = MIN_STARS,
                      quality: np.ndarray | None = None) -> tuple[ModelError | None, dict[str, Any]]:
    """Learn S from stars fitted without their labels (the validation split).

    Parameters
    ----------
    est5 : (n, 5) estimates, catalog units (Teff kK, [Fe/H], logg, E, plx mas).
    cov5 : (n, 5, 5) their Fisher covariances.
    inv_plx_err : (n,) 1 / s_plx used in the fit [1/mas], 0 where none.
    ref5 : (n, 5) references: labels (Teff kK), the E prior, the Gaia parallax; NaN where none.
    ref_var5 : (n, 5) variances of the references (for the parallax: s_plx^2).
    min_stars : fewest usable stars for a parameter's model error to be learned.
    quality : (n,) q = chi^2 / n_flux of the fits (:func:`fit_quality`); None: ln q = 0 (then S does not
        follow the fit's quality).

    Returns
    -------
    model_error : ModelError, or None when no parameter has ``min_stars`` usable stars
        (then the reported errors stay the Fisher ones).
    report : dict (JSON-able): ``n_stars``, per parameter ``n_used``, ``learned``
        (bool), ``reason`` when not, ``pull_sigma_fisher`` and ``pull_sigma_calibrated``
        (robust sigma of the learning stars' pulls), ``model_error_median`` (median s_j,
        catalog units), ``beta``; ``rho``.
    """
    est5, cov5, ref5, ref_var5 = (np.asarray(a, dtype=np.float64) for a in (est5, cov5, ref5, ref_var5))
    inv_plx_err = np.asarray(inv_plx_err, dtype=np.float64)
    n = est5.shape[0]
    if est5.shape != (n, 5) or cov5.shape != (n, 5, 5) or ref5.shape != (n, 5) or ref_var5.shape != (n, 5):
        raise ValueError(f"learn_model_error: est5 (n, 5), cov5 (n, 5, 5), ref5 and ref_var5 (n, 5) expected; got "
                         f"{est5.shape}, {cov5.shape}, {ref5.shape}, {ref_var5.shape}")
    diag = np.einsum("nii->ni", cov5)
    base = diag + ref_var5
    base[:, 4] = ref_var5[:, 4] - diag[:, 4]  # residual against the fit's own parallax datum
    resid = est5 - ref5
    ok_star = np.all(np.isfinite(est5), axis=1) & np.all(np.isfinite(diag), axis=1) & (diag[:, :4] > 0).all(axis=1)
    usable = ok_star[:, None] & np.isfinite(resid) & np.isfinite(base) & (base > 0)
    usable[:, 4] &= inv_plx_err > 0
    a = propagation_matrix(np.where(ok_star[:, None, None], cov5, 0.0), inv_plx_err)
    z = model_error_z(np.where(ok_star[:, None], est5, 0.0), np.where(ok_star[:, None, None], cov5, 0.0), inv_plx_err,
                      quality)
    zu = z[ok_star] if ok_star.any() else np.zeros((1, z.shape[1]))  # no fitted star (or none at all)
    z_lo, z_hi = zu.min(axis=0), zu.max(axis=0)
    zc = np.clip(z, z_lo, z_hi)
    report: dict[str, Any] = {"n_stars": int(n), "n_fitted": int(ok_star.sum()), "min_stars": int(min_stars)}
    beta = np.full((5, N_Z), 0.0)
    beta[:, 0] = _BETA0[0]
    learned = [int(usable[:, j].sum()) >= min_stars for j in range(5)]
    unit2 = np.broadcast_to(UNITS**2, (n, 5)).copy()
    unit2[:, 4] *= np.where(ok_star, est5[:, 4], 0.0) ** 2

    def s2_of(b: np.ndarray) -> np.ndarray:
        s2 = unit2 * np.exp(np.clip(zc @ b.T, -60.0, 30.0))
        s2[:, b[:, 0] <= _BETA0[0]] = 0.0
        return s2

    k2 = np.ones(5)
    scaled_part = fisher_part(np.where(ok_star[:, None, None], cov5, 0.0), a)
    # A is diagonal: each parameter's variance is its own (ref + k^2 C_F,jj + A_jj^2 s_j^2); learned one by one
    fits, corrections = {}, {}
    for j in range(5):
        if not learned[j]:
            continue
        u = usable[:, j]
        fisher = scaled_part[:, j]
        fixed = base[:, j] - fisher  # the reference's variance (the parallax: A_44^2 s_plx^2, see fisher_part)
        w2 = a[:, j, j] ** 2 * unit2[:, j]
        lnk2, beta[j] = _fit_beta(resid[u, j], fixed[u], fisher[u], w2[u], zc[u])
        s2j = w2 * np.exp(np.clip(zc @ beta[j], -60.0, 30.0))
        fits[j] = (u, fisher, fixed, lnk2, s2j)
        corrections[j] = scale_match(resid[u, j], fixed[u], np.exp(lnk2) * fisher[u] + s2j[u])
    b = pooled_correction_sd([m.correction for m in corrections.values()], [m.se for m in corrections.values()])
    report["scale_correction"] = {"prior_sd": b, **{PARAMS[j]: {"correction": m.correction, "se": m.se}
                                                    for j, m in corrections.items()}}
    for j, (u, fisher, fixed, lnk2, s2j) in fits.items():
        lnc = _calibrate(resid[u, j], fixed[u], np.exp(lnk2) * fisher[u], s2j[u], diag[u, j] - fisher[u], b,
                         corrections[j])  # steps 1-2 as computed above
        if _LN_K2[0] <= lnk2 + lnc <= _LN_K2[1]:
            k2[j] = float(np.exp(lnk2 + lnc))
            beta[j, 0] += lnc
        else:  # K would leave its range: k at the nearer bound, the factor on s^2 alone
            k2[j] = float(np.exp(np.clip(lnk2 + lnc, *_LN_K2)))
            fk = k2[j] * fisher[u]
            beta[j, 0] += _calibrate(resid[u, j], fixed[u] + fk, np.zeros(int(u.sum())), s2j[u],
                                     fk + diag[u, j] - fisher[u], b)
        beta[j, 0] = max(beta[j, 0], _BETA0[0])
    kscale = np.sqrt(k2)
    s2 = s2_of(beta)
    base_k = base + (k2 - 1.0) * scaled_part
    cov_k = np.where(ok_star[:, None, None], cov5, 0.0) * kscale[:, None] * kscale[None, :]
    rho = _excess_correlation(resid, cov_k, base_k, a, s2, usable)
    me = ModelError(beta=beta, z_lo=z_lo, z_hi=z_hi, rho=rho, fisher_scale=kscale)
    before = pull_sigmas(np.where(usable, resid, np.nan), base)
    after = pull_sigmas(np.where(usable, resid, np.nan), base_k, a, s2)
    for j, p in enumerate(PARAMS):
        entry = {"n_used": int(usable[:, j].sum()), "learned": bool(learned[j]),
                 "pull_sigma_fisher": before[j], "pull_sigma_calibrated": after[j],
                 "model_error_median": float(np.nanmedian(np.sqrt(s2[usable[:, j], j]))) if usable[:, j].any()
                 else float("nan"),
                 "beta": [float(b) for b in beta[j]], "fisher_scale": float(kscale[j])}
        if not learned[j]:
            entry["reason"] = (f"only {int(usable[:, j].sum())} stars with a usable reference (need {min_stars}); "
                               "no model error added for this parameter")
        report[p] = entry
    report["rho"] = rho.tolist()
    if not any(learned):
        return None, report
    logger.info("model error: pull sigma before %s, after %s", [round(x, 2) for x in before],
                [round(x, 2) for x in after])
    return me, report


def _excess_correlation(resid: np.ndarray, cov5: np.ndarray, base: np.ndarray, a: np.ndarray, s2: np.ndarray,
                        usable: np.ndarray) -> np.ndarray:
    """Correlation of the model errors of Teff, [Fe/H], logg, E (parallax uncorrelated), PSD, |rho| <= 0.9.

    From the residuals of stars with all four references, clipped at 4 sigma:
    rho_jk = (mean(r_j r_k) - mean(Cov_F,jk)) / sqrt(mean s_j^2 mean s_k^2). The
    label / prior errors are independent between parameters, so they drop out.
    """
    rho = np.eye(5)
    var = _pull_variance(base, a, s2)
    with np.errstate(invalid="ignore", divide="ignore"):
        pulls = resid / np.sqrt(var)
    all4 = usable[:, :4].all(axis=1) & np.all(np.abs(pulls[:, :4]) < 4.0, axis=1)
    if all4.sum() < MIN_STARS:
        return rho
    r = resid[all4, :4]
    for j in range(4):
        for k in range(j + 1, 4):
            denom = np.sqrt(np.mean(s2[all4, j]) * np.mean(s2[all4, k]))
            if denom > 0:
                c = (np.mean((r[:, j] - r[:, j].mean()) * (r[:, k] - r[:, k].mean()))
                     - np.mean(cov5[all4, j, k])) / denom
                rho[j, k] = rho[k, j] = float(np.clip(c, -0.9, 0.9))
    ev, vec = np.linalg.eigh(rho)
    rho = (vec * np.maximum(ev, 1e-3)) @ vec.T
    d = np.sqrt(np.diag(rho))
    return rho / d[:, None] / d[None, :]


def model_error_to_arrays(me: ModelError) -> dict[str, np.ndarray]:
    """Flat arrays for the model artifact's ``model_error`` component."""
    return {"beta": np.asarray(me.beta, np.float64), "z_lo": np.asarray(me.z_lo, np.float64),
            "z_hi": np.asarray(me.z_hi, np.float64), "rho": np.asarray(me.rho, np.float64),
            "fisher_scale": np.asarray(me.fisher_scale, np.float64)}


def model_error_from_arrays(arrays: dict[str, np.ndarray]) -> ModelError:
    """Inverse of :func:`model_error_to_arrays`.

    Raises
    ------
    ValueError
        When an array is missing or has the wrong shape.
    """
    if "beta" not in arrays:
        raise ValueError(f"model_error component lacks 'beta'; has {sorted(arrays)}")
    nz = np.shape(arrays["beta"])[-1] if np.ndim(arrays["beta"]) == 2 else -1
    nz = nz if nz in (N_Z, N_Z_NO_H, N_Z_NO_Q, N_Z_LEGACY) else N_Z  # older artifacts have fewer terms
    shapes = {"beta": (5, nz), "z_lo": (nz,), "z_hi": (nz,), "rho": (5, 5)}
    for k, shape in shapes.items():
        if k not in arrays:
            raise ValueError(f"model_error component lacks {k!r}; has {sorted(arrays)}")
        if np.shape(arrays[k]) != shape:
            raise ValueError(f"model_error component: {k!r} has shape {np.shape(arrays[k])}, expected {shape}")
    me = ModelError(**{k: np.asarray(arrays[k], np.float64) for k in shapes})
    if "fisher_scale" in arrays:  # absent from artifacts made before the Fisher scale existed: k = 1
        k = np.asarray(arrays["fisher_scale"], np.float64)
        if k.shape != (5,) or not np.all(np.isfinite(k) & (k > 0)):
            raise ValueError(f"model_error component: 'fisher_scale' must be 5 positive numbers, got {k!r}")
        me = replace(me, fisher_scale=k)
    return me

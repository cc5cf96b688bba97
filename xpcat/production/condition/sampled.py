"""Sampled XP spectra (raw ``xp_sampled_spectrum``) -> :class:`XpSample`, the input of Eqs. 2-4 (SPEC §1.3).

A sampled spectrum carries fluxes and errors on xpcat's 61-sample grid but no
coefficients, hence no correlations: C_gaia = diag(flux_error^2). Eq. 2 is
then applied as for coefficient input
(:func:`xpcat.production.condition.covariance.condition_arrays`), with the BP /
RP split SPEC §1.3 fixes for the 0.001 terms: 392-632 nm is BP, 642-992 nm RP
(no merge weights are known for samples). C_obs is therefore the diagonal
C_gaia plus Eq. 2's rank-3 terms, and its factor comes from the same
Eqs. 3-4 code as for coefficients.

A sample whose flux is not finite or whose error is not finite and positive
is missing (zero weight); a row whose arrays do not hold 61 values has all
its samples missing. Either way the star is kept and flagged BAD_XP_INPUT
(:func:`sampled_xp`), and the count is logged.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.conditioned import N_XP, XP_WAVELENGTHS_NM
from xpcat.production.condition.bases import DEFAULT_WAVELENGTHS_NM
from xpcat.production.condition.xp_columns import array_column
from xpcat.production.condition.xp_sampling import XpSample

__all__ = ["BP_LAST_NM", "SAMPLED_COLUMNS", "sampled_xp"]

logger = logging.getLogger(__name__)

#: Last sample treated as BP in Eq. 2's 0.001 band terms (SPEC §1.3); later samples are RP.
BP_LAST_NM = 632.0

#: Columns of raw ``xp_sampled_spectrum`` the condition stage reads.
SAMPLED_COLUMNS = ["source_id", "flux", "flux_error", "input_form"]

_IS_BP = np.asarray(XP_WAVELENGTHS_NM) <= BP_LAST_NM


def sampled_xp(table: pa.Table, *, what: str = "xp_sampled_spectrum") -> XpSample:
    """Raw sampled rows -> an :class:`XpSample` with the diagonal covariance C_gaia = diag(flux_error^2).

    Parameters
    ----------
    table : pyarrow.Table
        ``source_id``, ``flux`` and ``flux_error`` (lists of 61 floats,
        W m^-2 nm^-1, on :data:`XP_WAVELENGTHS_NM`).
    what : str
        Names the rows in log messages.

    Returns
    -------
    XpSample
        ``flux`` (n, 61), NaN for missing samples; ``covariance`` (n, 61, 61)
        diagonal in (W m^-2 nm^-1)^2 (NaN on the diagonal of missing
        samples); ``flux_bp`` / ``flux_rp`` the flux on 392-632 / 642-992 nm
        (0 elsewhere and where missing); ``has_bp`` / ``has_rp`` a usable
        sample in that range; ``bad_bp`` / ``bad_rp`` a sample there was
        unusable (non-finite flux, error not finite and positive, or an array
        of another length).
    """
    n = table.num_rows
    ids = np.asarray(table.column("source_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    flux, f_len = array_column(table.column("flux"), n)
    err, e_len = array_column(table.column("flux_error"), n)
    shape_ok = (f_len == N_XP) & (e_len == N_XP)
    flux = _fixed(flux, shape_ok)
    err = _fixed(err, shape_ok)
    with np.errstate(invalid="ignore"):
        good = shape_ok[:, None] & np.isfinite(flux) & np.isfinite(err) & (err > 0)
    bad = ~good
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        logger.warning(
            "%s: %d star(s) have unusable sampled XP values (%d wrong-length row(s), %d sample(s) with NaN flux or "
            "non-positive / NaN error; e.g. source_id %s); those samples get zero weight and the stars are flagged "
            "BAD_XP_INPUT", what, rows.size, int((~shape_ok).sum()), int(bad[shape_ok].sum()),
            ", ".join(str(x) for x in ids[rows[:5]]),
        )
    flux = np.where(good, flux, np.nan)
    var = np.where(good, err, np.nan) ** 2
    cov = np.zeros((n, N_XP, N_XP))
    d = np.arange(N_XP)
    cov[:, d, d] = var
    f0 = np.where(good, flux, 0.0)
    flux_bp = np.where(_IS_BP[None, :], f0, 0.0)
    flux_rp = np.where(_IS_BP[None, :], 0.0, f0)
    return XpSample(
        source_id=ids, wavelengths=DEFAULT_WAVELENGTHS_NM, flux=flux, flux_error=np.sqrt(var), covariance=cov,
        flux_bp=flux_bp, flux_rp=flux_rp, has_bp=good[:, _IS_BP].any(axis=1), has_rp=good[:, ~_IS_BP].any(axis=1),
        bad_bp=bad[:, _IS_BP].any(axis=1), bad_rp=bad[:, ~_IS_BP].any(axis=1),
    )  # fmt: skip


def _fixed(mat: np.ndarray, rows_ok: np.ndarray) -> np.ndarray:
    """(n, 61): ``mat`` cut or NaN-padded to 61 columns, NaN in the rows not ``rows_ok``."""
    out = np.full((mat.shape[0], N_XP), np.nan)
    w = min(N_XP, mat.shape[1])
    out[:, :w] = mat[:, :w]
    out[~rows_ok] = np.nan
    return out

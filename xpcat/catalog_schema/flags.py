"""Bit flags: the catalog's ``quality_flags`` (Table 2), ``fit_status`` and the
conditioning flags of a conditioned partition.

``quality_flags`` (uint8, SPEC §6):

===  =========================================================
bit  meaning
===  =========================================================
0    Teff confidence < 0.5
1    [Fe/H] confidence < 0.5
2    logg confidence < 0.5
3    chi2_opt / 61 > 2
4    ln_prior < -7.43
5    |plx_gaia - plx_est| / s_plx_gaia > 10
6-7  unset
===  =========================================================

Basic reliability cut: ``quality_flags < 8``; strict: ``quality_flags == 0``.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "BASIC_CUT_MAX",
    "FEH_LOW_CONFIDENCE",
    "HIGH_CHI2",
    "LOGG_LOW_CONFIDENCE",
    "LOW_PRIOR",
    "PARALLAX_MISMATCH",
    "TEFF_LOW_CONFIDENCE",
    "ConditionFlag",
    "FitStatus",
    "QualityFlag",
    "passes_basic_cut",
    "passes_strict_cut",
]


class QualityFlag(IntFlag):
    """The bits of the catalog's ``quality_flags`` column (Table 2)."""

    TEFF_LOW_CONFIDENCE = 1 << 0
    FEH_LOW_CONFIDENCE = 1 << 1
    LOGG_LOW_CONFIDENCE = 1 << 2
    HIGH_CHI2 = 1 << 3
    LOW_PRIOR = 1 << 4
    PARALLAX_MISMATCH = 1 << 5


TEFF_LOW_CONFIDENCE = int(QualityFlag.TEFF_LOW_CONFIDENCE)
FEH_LOW_CONFIDENCE = int(QualityFlag.FEH_LOW_CONFIDENCE)
LOGG_LOW_CONFIDENCE = int(QualityFlag.LOGG_LOW_CONFIDENCE)
HIGH_CHI2 = int(QualityFlag.HIGH_CHI2)
LOW_PRIOR = int(QualityFlag.LOW_PRIOR)
PARALLAX_MISMATCH = int(QualityFlag.PARALLAX_MISMATCH)

#: ``quality_flags < BASIC_CUT_MAX`` is the paper's basic reliability cut.
BASIC_CUT_MAX = 8
#: Threshold of bit 3: reduced chi^2 over the 61 XP samples.
HIGH_CHI2_PER_SAMPLE = 2.0
#: Threshold of bit 4 on ln p_gmm(Theta).
LOW_PRIOR_THRESHOLD = -7.43
#: Threshold of bit 5 on |plx_gaia - plx_est| / s_plx_gaia.
PARALLAX_MISMATCH_SIGMA = 10.0
#: Threshold of bits 0-2 on the classifier confidences.
CONFIDENCE_THRESHOLD = 0.5


class FitStatus(IntEnum):
    """The ``fit_status`` extra column (uint8): Table 2's bits have no room for it."""

    CONVERGED = 0
    NOT_CONVERGED = 1
    NO_USABLE_DATA = 2


class ConditionFlag(IntFlag):
    """The ``condition_flags`` column (uint16) of a conditioned partition.

    ``XP_SAMPLED``: the star's XP fluxes came from sampled spectra (raw
    ``xp_sampled_spectrum``; SPEC §1.3: diagonal C_gaia, Eq. 2 inflation), not
    from coefficients. ``XP_SAMPLED_UNUSED``: sampled spectra were given too but
    the star's coefficients were used (coefficients win). Without either bit a
    star with XP data came from coefficients.
    """

    NO_BP = 1 << 0
    NO_RP = 1 << 1
    NO_TMASS = 1 << 2
    TMASS_CROWDED = 1 << 3
    NO_UNWISE = 1 << 4
    UNWISE_CROWDED = 1 << 5
    COVARIANCE_REPAIRED = 1 << 6
    NONPOSITIVE_FLUX = 1 << 7
    NO_PARALLAX = 1 << 8
    BAD_XP_INPUT = 1 << 9
    NO_XP = 1 << 10
    XP_SAMPLED = 1 << 11
    XP_SAMPLED_UNUSED = 1 << 12


def passes_basic_cut(quality_flags):
    """Boolean mask of rows passing the basic cut (``quality_flags < 8``)."""
    return quality_flags < BASIC_CUT_MAX


def passes_strict_cut(quality_flags):
    """Boolean mask of rows passing the strict cut (``quality_flags == 0``)."""
    return quality_flags == 0

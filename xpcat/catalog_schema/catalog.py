"""The catalog schema: Table 2 of the paper (SPEC §6) plus documented extras.

Table 2 columns, in order: gdr3_source_id, ra, dec, stellar_params_est (5),
stellar_params_err (5), chi2_opt, ln_prior, teff_confidence, feh_confidence,
logg_confidence, quality_flags, stellar_params_icov_triu (15),
stellar_params_cov_triu (15). The 5 parameters are, in order,
Teff (kK), [Fe/H] (dex), logg (dex), E (mag), parallax (mas).

Extras (after the Table 2 columns):

- ``fit_status`` (uint8): :class:`~xpcat.catalog_schema.flags.FitStatus`
  (0 converged, 1 not converged, 2 no usable data).
- ``condition_flags`` (uint16): :class:`~xpcat.catalog_schema.flags.ConditionFlag`,
  what conditioning found in the star's inputs, carried from its conditioned
  partition: bit 0 no BP (or its coefficients dropped: NaN, not finite),
  1 no RP, 2 no 2MASS, 3 2MASS crowded, 4 no unWISE, 5 unWISE crowded,
  6 covariance repaired, 7 non-positive flux, 8 no parallax, 9 bad XP input,
  10 no XP at all, 11 XP from sampled spectra, 12 sampled spectra given but
  unused. ``quality_flags`` stays the paper's.
"""

from __future__ import annotations

import pyarrow as pa

from xpcat.catalog_schema._fields import field, flist

__all__ = ["PARAM_NAMES", "PARAM_UNITS", "TEFF_K_PER_UNIT", "TABLE2_COLUMNS", "EXTRA_COLUMNS", "CATALOG"]

#: Order of the 5 stellar parameters in the list columns.
PARAM_NAMES = ("teff", "feh", "logg", "extinction", "parallax")
#: Their units in the catalog (Teff in kK, as the paper's Table 2).
PARAM_UNITS = ("kK", "dex", "dex(cm / s2)", "mag", "mas")
#: Kelvin per catalog Teff unit (kK): labels and the type prior's Theta are in K.
TEFF_K_PER_UNIT = 1000.0

f32 = pa.float32()
_p = "Teff [kK], [Fe/H] [dex], logg [dex], E [mag], parallax [mas]"

_TABLE2 = [
    field("gdr3_source_id", pa.int64(), "", "Gaia DR3 source_id", nullable=False),
    field("ra", pa.float64(), "deg", "right ascension from Gaia DR3", nullable=False),
    field("dec", pa.float64(), "deg", "declination from Gaia DR3", nullable=False),
    field("stellar_params_est", flist(f32, 5), "kK, dex, dex, mag, mas", f"estimates: {_p}"),
    field("stellar_params_err", flist(f32, 5), "kK, dex, dex, mag, mas", "sqrt of the covariance diagonal"),
    field("chi2_opt", f32, "", "chi^2 of the fluxes at the optimum"),
    field("ln_prior", f32, "", "ln p_gmm(Theta) at the optimum"),
    field("teff_confidence", f32, "", "Teff classifier output in [0, 1]"),
    field("feh_confidence", f32, "", "[Fe/H] classifier output in [0, 1]"),
    field("logg_confidence", f32, "", "logg classifier output in [0, 1]"),
    field("quality_flags", pa.uint8(), "", "QualityFlag bits; basic cut < 8, strict == 0", nullable=False),
    field("stellar_params_icov_triu", flist(f32, 15), "", "upper triangle (row-major) of the inverse covariance"),
    field("stellar_params_cov_triu", flist(f32, 15), "", "upper triangle (row-major) of the covariance"),
]

_EXTRAS = [
    field("fit_status", pa.uint8(), "", "FitStatus: 0 converged, 1 not converged, 2 no usable data", nullable=False),
    field("condition_flags", pa.uint16(), "", "ConditionFlag bits of the star's inputs (bit 0 no BP, 1 no RP, "
          "2 no 2MASS, ..., 11 XP from sampled spectra)", nullable=False),
]

#: Names of the Table 2 columns, in order.
TABLE2_COLUMNS = tuple(f.name for f in _TABLE2)
#: Names of the documented extra columns.
EXTRA_COLUMNS = tuple(f.name for f in _EXTRAS)

CATALOG = pa.schema(_TABLE2 + _EXTRAS)

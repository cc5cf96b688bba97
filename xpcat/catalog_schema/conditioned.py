"""Schema of a conditioned partition: what inference and training need per star.

Fluxes are in the internal flux unit :data:`FLUX_UNIT_W_M2_NM` (1e-18 W m^-2 nm^-1,
recorded in the partition metadata), so typical fluxes are of order 1-1000 and
the eigenvalue clamp of Eqs. 3-4 (1e-9) applies in a unit where it does not
erase data (SPEC §1.2).

The 66 x 66 conditioned precision matrix P = U D^-1 U^T (after the clamp) is
stored as its upper-triangular Cholesky factor R (P = R^T R, so
chi^2 = |R df|^2 = |L df|^2 for the paper's L = D^-1/2 U^T), packed row-major
(2211 float32). Missing samples have zero rows and columns.
"""

from __future__ import annotations

import pyarrow as pa

from xpcat.catalog_schema._fields import field, flist
from xpcat.catalog_schema.triangle import n_triu

__all__ = [
    "N_XP",
    "N_FLUX",
    "N_FACTOR",
    "XP_WAVELENGTHS_NM",
    "NIR_BANDS",
    "NIR_WAVELENGTHS_UM",
    "FLUX_UNIT_W_M2_NM",
    "CONDITIONED",
]

#: Number of XP samples, 392..992 nm in steps of 10 nm.
N_XP = 61
#: Number of fluxes: 61 XP + 2MASS J, H, Ks + unWISE W1, W2.
N_FLUX = 66
#: Packed entries of the 66 x 66 upper-triangular factor.
N_FACTOR = n_triu(N_FLUX)
#: XP sample wavelengths in nm.
XP_WAVELENGTHS_NM = tuple(float(w) for w in range(392, 993, 10))
#: Names of the NIR bands, in flux-vector order (indices 61..65).
NIR_BANDS = ("J", "H", "Ks", "W1", "W2")
#: Effective wavelengths of the NIR bands in um (SPEC §1).
NIR_WAVELENGTHS_UM = (1.235, 1.662, 2.159, 3.3526, 4.6028)
#: The internal flux unit, in W m^-2 nm^-1.
FLUX_UNIT_W_M2_NM = 1e-18

f64, f32 = pa.float64(), pa.float32()

CONDITIONED = pa.schema(
    [
        field("source_id", pa.int64(), "", "Gaia DR3 source_id", nullable=False),
        field("ra", f64, "deg", "Gaia DR3 ra", nullable=False),
        field("dec", f64, "deg", "Gaia DR3 dec", nullable=False),
        field("parallax", f32, "mas", "Gaia DR3 parallax (null if missing)"),
        field("parallax_error", f32, "mas", "Gaia DR3 parallax_error"),
        field(
            "flux",
            flist(f32, N_FLUX),
            "1e-18 W m-2 nm-1",
            "61 XP samples then J H Ks W1 W2 (NaN where missing)",
            nullable=False,
        ),
        field(
            "flux_error",
            flist(f32, N_FLUX),
            "1e-18 W m-2 nm-1",
            "sqrt of the diagonal of the inflated covariance (inf where missing)",
            nullable=False,
        ),
        field(
            "flux_factor_triu",
            flist(f32, N_FACTOR),
            "1e18 W-1 m2 nm",
            "upper-triangular R with R^T R = conditioned C^-1, row-major packed",
            nullable=False,
        ),
        field("n_valid_flux", pa.int16(), "", "number of fluxes with non-zero weight", nullable=False),
        field("condition_flags", pa.uint16(), "", "ConditionFlag bits", nullable=False),
        field("phot_g_mean_mag", f32, "mag", ""),
        field("phot_g_mean_flux_over_error", f32, "", ""),
        field("phot_bp_mean_flux_over_error", f32, "", ""),
        field("phot_rp_mean_flux_over_error", f32, "", ""),
        field("phot_bp_rp_excess_factor", f32, "", ""),
        field("ruwe", f32, "", ""),
        field("fidelity_v2", f32, "", ""),
        field("norm_dg", f32, "", ""),
        field("bp_chi_squared", f32, "", ""),
        field("rp_chi_squared", f32, "", ""),
        field("bp_degrees_of_freedom", pa.int16(), "", ""),
        field("rp_degrees_of_freedom", pa.int16(), "", ""),
    ]
)

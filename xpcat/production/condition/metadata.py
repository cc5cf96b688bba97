"""The metadata document of a conditioned partition, and the options key that decides whether a partition is current."""

from __future__ import annotations

import hashlib
import json
import logging

from xpcat.catalog_schema.conditioned import (
    FLUX_UNIT_W_M2_NM,
    NIR_BANDS,
    NIR_WAVELENGTHS_UM,
)
from xpcat.config import RunConfig
from xpcat.fileio import package_version
from xpcat.production.condition.bases import DEFAULT_WAVELENGTHS_NM, INSTRUMENT_MODELS
from xpcat.production.condition.covariance import (
    SIGMA_FRAC_BAND,
    SIGMA_FRAC_DIAG,
    SIGMA_FRAC_TOTAL,
)
from xpcat.production.condition.photometry import AB_MINUS_VEGA

__all__ = ["FLUX_UNIT_LABEL", "conditioning_metadata", "options_key"]

logger = logging.getLogger(__name__)

#: The internal flux unit as the metadata writes it: "1e-18 W m-2 nm-1".
FLUX_UNIT_LABEL = f"{FLUX_UNIT_W_M2_NM:g} W m-2 nm-1"


def conditioning_metadata(config: RunConfig) -> dict:
    """The metadata document every conditioned partition carries (units, options, versions)."""
    cc = config.conditioning
    return {
        "stage": "conditioned",
        "flux_unit": FLUX_UNIT_LABEL,
        "flux_unit_w_m2_nm": FLUX_UNIT_W_M2_NM,
        "wavelengths_nm": [float(w) for w in DEFAULT_WAVELENGTHS_NM],
        "nir_bands": list(NIR_BANDS),
        "nir_wavelengths_um": list(NIR_WAVELENGTHS_UM),
        "nir_ab_minus_vega": dict(AB_MINUS_VEGA),
        "factor": "upper-triangular R, R^T R = U max(D, floor)^-1 U^T, row-major packed; zero rows/cols for missing",
        "options": {
            "covariance": cc.covariance,
            "eigenvalue_floor": cc.eigenvalue_floor,
            "eigenvalue_floor_unit": f"({FLUX_UNIT_LABEL})^2",
            "tmass_norm_dg_max": cc.tmass_norm_dg_max,
            "unwise_norm_dg_max": cc.unwise_norm_dg_max,
            "inflation": {"diag": SIGMA_FRAC_DIAG, "total": SIGMA_FRAC_TOTAL, "band": SIGMA_FRAC_BAND},
        },
        "instrument_models": {b: {str(k): v for k, v in m.items()} for b, m in INSTRUMENT_MODELS.items()},
        "gaiaxpy_version": package_version("gaiaxpy"),
        "xpcat_version": package_version("xpcat"),
    }




def options_key(config: RunConfig) -> str:
    """16 hex digits identifying what changes a conditioned partition's content.

    The hash of the options, flux unit, instrument models and GaiaXPy
    version in :func:`conditioning_metadata`; a partition written with another
    key is outdated and redone.
    """
    doc = conditioning_metadata(config)
    key = {k: doc[k] for k in ("options", "flux_unit", "instrument_models", "gaiaxpy_version")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

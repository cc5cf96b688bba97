"""The metadata document of a conditioned partition, and the options key that decides whether a partition is current."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa

from xpcat.catalog_schema.conditioned import (
    FLUX_UNIT_W_M2_NM,
    NIR_BANDS,
    NIR_WAVELENGTHS_UM,
)
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.config import RunConfig
from xpcat.fileio import package_version
from xpcat.production.condition.bases import DEFAULT_WAVELENGTHS_NM, INSTRUMENT_MODELS
from xpcat.production.condition.covariance import (
    SIGMA_FRAC_BAND,
    SIGMA_FRAC_DIAG,
    SIGMA_FRAC_TOTAL,
)
from xpcat.production.condition.photometry import AB_MINUS_VEGA

__all__ = ["FLUX_UNIT_LABEL", "conditioning_metadata", "input_forms", "options_key"]

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


def input_forms(conditioned: pa.Table, sampled: pa.Table) -> dict[str, int]:
    """Stars of a conditioned partition per XP input form (the ``xp_input_forms`` metadata entry).

    Parameters
    ----------
    conditioned : pyarrow.Table
        The conditioned partition (``source_id``, ``condition_flags``).
    sampled : pyarrow.Table
        The partition's raw xp_sampled_spectrum rows (``source_id``, ``input_form``).

    Returns
    -------
    dict
        ``{"coefficients": n, "<input_form>": n, ..., "none": n}``: stars
        conditioned from coefficients, from each form of sampled spectra
        (:data:`xpcat.catalog_schema.raw.XP_INPUT_FORMS`), and without XP
        data; ``"sampled_unused"`` counts stars whose samples were ignored
        because they have coefficients. Forms with no star are left out.
    """
    flags = conditioned.column("condition_flags").to_numpy()
    is_sampled = (flags & int(ConditionFlag.XP_SAMPLED)) != 0
    no_xp = (flags & int(ConditionFlag.NO_XP)) != 0
    out = {"coefficients": int(np.count_nonzero(~is_sampled & ~no_xp))}
    ids = conditioned.column("source_id").to_numpy()[is_sampled]
    s_ids = sampled.column("source_id").to_numpy()
    form = np.asarray(sampled.column("input_form").to_pylist(), dtype=object)
    used = form[np.isin(s_ids, ids)]
    for name, count in zip(*np.unique(used.astype(str), return_counts=True)):
        out[str(name)] = int(count)
    out["sampled_unused"] = int(np.count_nonzero(flags & int(ConditionFlag.XP_SAMPLED_UNUSED)))
    out["none"] = int(np.count_nonzero(no_xp))
    return {k: v for k, v in out.items() if v}


def options_key(config: RunConfig) -> str:
    """16 hex digits identifying what changes a conditioned partition's content.

    The hash of the options, flux unit, instrument models and GaiaXPy
    version in :func:`conditioning_metadata`; a partition written with another
    key is outdated and redone.
    """
    doc = conditioning_metadata(config)
    key = {k: doc[k] for k in ("options", "flux_unit", "instrument_models", "gaiaxpy_version")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

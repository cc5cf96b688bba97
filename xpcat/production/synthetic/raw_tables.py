"""Arrow tables of the synthetic universe, in the raw schemas of :mod:`xpcat.catalog_schema.raw`.

:func:`chunk_tables` turns the columns of one chunk
(:func:`xpcat.production.synthetic.observe.chunk_observables`) into one table
per raw table (XP coefficient arrays as ``list<double>``, null rows for a
missing band); :func:`truth_table` holds the universe's truth.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from xpcat import catalog_schema
from xpcat.catalog_schema import raw as raw_schema
from xpcat.production.synthetic.observe import BANDS

__all__ = ["SOLUTION_ID", "column_array", "list_array", "columns_table", "xp_table", "chunk_tables", "truth_table"]

logger = logging.getLogger(__name__)

#: The archive's solution_id of the XP rows.
SOLUTION_ID = 4545469030156206080


def column_array(values: Any, mask: np.ndarray | None = None) -> pa.Array:
    """One Arrow column from (n,) values (strings from lists or numpy str arrays); ``mask`` True = null."""
    if isinstance(values, list) or (isinstance(values, np.ndarray) and values.dtype.kind in "US"):
        return pa.array(list(values), type=pa.string(), mask=mask)
    return pa.array(values, mask=mask)


def list_array(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    """A list<double> column from (n, k) values; rows in ``missing`` ((n,) bool) are null."""
    present = ~missing
    counts = np.where(present, values.shape[1], 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = np.ascontiguousarray(values[present]).ravel()
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float64()), mask=pa.array(missing))


def columns_table(cols: dict[str, Any], masks: dict[str, np.ndarray], schema: pa.Schema, what: str) -> pa.Table:
    """A table conforming to ``schema`` from column arrays and null masks (``what`` names it in errors)."""
    arrays = {k: column_array(v, masks.get(k)) for k, v in cols.items()}
    return catalog_schema.conform(pa.table(arrays), schema, what=what)


def xp_table(chunk: dict[str, Any]) -> pa.Table:
    """The xp_continuous_mean_spectrum rows of a chunk (a missing band's columns are null)."""
    cols: dict[str, pa.Array] = {}
    n = chunk["gaia"][0]["source_id"].size
    cols["source_id"] = pa.array(chunk["gaia"][0]["source_id"])
    cols["solution_id"] = pa.array(np.full(n, SOLUTION_ID, dtype=np.int64))
    for b in BANDS:
        miss = chunk["missing"][b]
        for name in raw_schema.XP_BAND_COLUMNS:
            v = chunk["xp"][b][name]
            if v.ndim == 2:
                cols[f"{b}_{name}"] = list_array(v, miss)
            else:
                cols[f"{b}_{name}"] = pa.array(v, mask=miss)
    return catalog_schema.conform(pa.table(cols), raw_schema.XP_CONTINUOUS, what="xp_continuous_mean_spectrum")


def chunk_tables(chunk: dict[str, Any]) -> dict[str, pa.Table]:
    """One table per name of :data:`xpcat.catalog_schema.raw.RAW_TABLES` from a chunk's columns."""
    return {
        "gaia_source": columns_table(*chunk["gaia"], raw_schema.GAIA_SOURCE, "gaia_source"),
        "xp_continuous_mean_spectrum": xp_table(chunk),
        "tmass": columns_table(*chunk["tmass"], raw_schema.TMASS, "tmass"),
        "unwise": columns_table(*chunk["unwise"], raw_schema.UNWISE, "unwise"),
        "labels": columns_table(*chunk["labels"], raw_schema.LABELS, "labels"),
        "reddening": columns_table(*chunk["reddening"], raw_schema.REDDENING, "reddening"),
    }


def truth_table(u: dict[str, np.ndarray]) -> pa.Table:
    """The truth rows (schema ``TRUTH``) of the whole universe ``u`` (column name -> (n,) array)."""
    cols = {
        "source_id": u["source_id"],
        "teff": u["teff"],
        "feh": u["feh"],
        "logg": u["logg"],
        "e": u["e"],
        "r_v": u["r_v"],
        "parallax": u["parallax_true"],
        "distance": u["distance"],
        "population": list(u["population"]),
        "is_binary": u["is_binary"],
        "mass_ratio": u["mass_ratio"],
        "is_outlier": u["is_outlier"],
    }
    return catalog_schema.conform(pa.table({k: column_array(v) for k, v in cols.items()}), raw_schema.TRUTH, what="truth")

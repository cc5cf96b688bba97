"""pyarrow schemas for every table xpcat reads or writes, and their checks.

- :mod:`.raw`: raw input tables with the Gaia archive's column names.
- :mod:`.conditioned`: conditioned partitions (flux + covariance factor).
- :mod:`.catalog`: the catalog, Table 2 of the paper plus documented extras.
- :mod:`.flags`: quality_flags bits, fit_status, condition flags.
- :mod:`.triangle`: upper-triangle pack/unpack.
"""

from __future__ import annotations

import json

import pyarrow as pa

from xpcat.catalog_schema import catalog, conditioned, flags, raw, triangle
from xpcat.catalog_schema.catalog import CATALOG, PARAM_NAMES, TABLE2_COLUMNS
from xpcat.catalog_schema.conditioned import CONDITIONED, FLUX_UNIT_W_M2_NM, N_FACTOR, N_FLUX, N_XP, XP_WAVELENGTHS_NM
from xpcat.catalog_schema.flags import ConditionFlag, FitStatus, QualityFlag
from xpcat.catalog_schema.raw import RAW_TABLES
from xpcat.catalog_schema.triangle import pack_triu, unpack_triu, unpack_triu_symmetric
from xpcat.catalog_schema.validation import SchemaError, conform, validate

__all__ = [
    "SCHEMA_VERSION",
    "METADATA_KEY",
    "CATALOG",
    "CONDITIONED",
    "RAW_TABLES",
    "PARAM_NAMES",
    "TABLE2_COLUMNS",
    "FLUX_UNIT_W_M2_NM",
    "N_FACTOR",
    "N_FLUX",
    "N_XP",
    "XP_WAVELENGTHS_NM",
    "ConditionFlag",
    "FitStatus",
    "QualityFlag",
    "SchemaError",
    "conform",
    "validate",
    "pack_triu",
    "unpack_triu",
    "unpack_triu_symmetric",
    "with_metadata",
    "read_metadata",
    "catalog",
    "conditioned",
    "flags",
    "raw",
    "triangle",
]

#: Version of every schema in this package; bump on any incompatible change.
SCHEMA_VERSION = "1.0.0"

#: Key of the JSON document xpcat stores in the Parquet / Arrow schema metadata.
METADATA_KEY = b"xpcat"


def with_metadata(table: pa.Table, info: dict) -> pa.Table:
    """Attach xpcat's metadata (JSON under :data:`METADATA_KEY`) to a table.

    ``schema_version`` is always added. Existing non-xpcat metadata is kept.
    """
    doc = {"schema_version": SCHEMA_VERSION, **info}
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(doc, sort_keys=True, default=str).encode()
    return table.replace_schema_metadata(meta)


def read_metadata(schema: pa.Schema) -> dict:
    """The xpcat metadata document of a schema ({} when absent)."""
    raw_doc = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw_doc) if raw_doc else {}

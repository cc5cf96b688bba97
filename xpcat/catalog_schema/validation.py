"""Check a table against one of xpcat's schemas, naming the column and the fault."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from xpcat.errors import XpcatError

__all__ = ["SchemaError", "validate", "conform"]


class SchemaError(XpcatError, ValueError):
    """A table does not match the schema it claims; the message names the column."""


def _id_column(schema: pa.Schema) -> str | None:
    for name in ("source_id", "gdr3_source_id"):
        if name in schema.names:
            return name
    return None


def validate(table: pa.Table, schema: pa.Schema, *, what: str = "table", unique_ids: bool = True) -> None:
    """Raise :class:`SchemaError` unless ``table`` matches ``schema``.

    Checks, in order: every schema column is present, has the schema's type
    (fixed-size lists included), holds no nulls where the field is not
    nullable, and (when ``unique_ids``) the source_id column has no duplicates.
    Extra columns are allowed only if the schema has them.

    Parameters
    ----------
    table : pyarrow.Table
    schema : pyarrow.Schema
        One of the schemas of :mod:`xpcat.catalog_schema`.
    what : str
        Name of the table or file, used in messages.
    unique_ids : bool
        Check that source_ids are unique.

    Raises
    ------
    SchemaError
        With the column name and what is wrong.
    """
    names = set(table.schema.names)
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise SchemaError(f"{what}: missing column(s) {', '.join(missing)}")
    extra = [n for n in table.schema.names if n not in schema.names]
    if extra:
        raise SchemaError(f"{what}: unexpected column(s) {', '.join(extra)}")
    for f in schema:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            raise SchemaError(f"{what}: column {f.name!r} has type {col.type}, expected {f.type}")
        if not f.nullable and col.null_count:
            raise SchemaError(f"{what}: column {f.name!r} has {col.null_count} null value(s); nulls are not allowed")
    if unique_ids:
        id_col = _id_column(schema)
        if id_col is not None and table.num_rows:
            ids = table.column(id_col).to_numpy()
            uniq, counts = np.unique(ids, return_counts=True)
            dup = uniq[counts > 1]
            if dup.size:
                shown = ", ".join(str(x) for x in dup[:5])
                raise SchemaError(
                    f"{what}: column {id_col!r} has {dup.size} duplicated value(s), e.g. {shown}"
                )


def conform(table: pa.Table, schema: pa.Schema, *, what: str = "table") -> pa.Table:
    """Select and cast ``table``'s columns to ``schema`` (missing nullable columns become null).

    Raises
    ------
    SchemaError
        When a non-nullable column is missing or a cast fails; names the column.
    """
    arrays = []
    for f in schema:
        if f.name in table.schema.names:
            col = table.column(f.name)
            try:
                arrays.append(col.cast(f.type) if not col.type.equals(f.type) else col)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise SchemaError(f"{what}: column {f.name!r} of type {col.type} cannot be cast to {f.type}: {err}") from err
        elif f.nullable:
            arrays.append(pa.nulls(table.num_rows, f.type))
        else:
            raise SchemaError(f"{what}: missing required column {f.name!r}")
    return pa.Table.from_arrays(arrays, schema=schema)


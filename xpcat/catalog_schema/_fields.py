"""Small helpers to declare pyarrow fields with units and descriptions."""

from __future__ import annotations

import pyarrow as pa

__all__ = ["field", "flist", "unit_of", "description_of"]


def field(
    name: str,
    type_: pa.DataType,
    unit: str = "",
    description: str = "",
    nullable: bool = True,
) -> pa.Field:
    """A pyarrow field carrying ``unit`` and ``description`` in its metadata.

    Parameters
    ----------
    name : str
        Column name.
    type_ : pyarrow.DataType
        Arrow type.
    unit : str
        Unit as an astropy-parsable string ("" for dimensionless).
    description : str
        One line describing the column.
    nullable : bool
        Whether nulls are allowed (checked by :func:`xpcat.catalog_schema.validate`).
    """
    meta = {b"unit": unit.encode(), b"description": description.encode()}
    return pa.field(name, type_, nullable=nullable, metadata=meta)


def flist(value_type: pa.DataType, size: int | None = None) -> pa.DataType:
    """A list type: fixed-size when ``size`` is given, variable otherwise."""
    if size is None:
        return pa.list_(value_type)
    return pa.list_(value_type, size)


def unit_of(f: pa.Field) -> str:
    """The unit stored in a field's metadata ("" when none)."""
    return (f.metadata or {}).get(b"unit", b"").decode()


def description_of(f: pa.Field) -> str:
    """The description stored in a field's metadata ("" when none)."""
    return (f.metadata or {}).get(b"description", b"").decode()

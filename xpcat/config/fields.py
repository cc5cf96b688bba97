"""The fields of the run configuration: documentation and checks in the metadata, and the checks themselves.

Every field of a section is made by :func:`config_field`, which stores its
documentation (``"doc"``) and its checks (``min``, ``max``, ``choices``) in the
dataclass field's metadata; :class:`Section`'s ``__post_init__`` checks every
field's type and range and raises :class:`ConfigError` naming the field and
the bad value. The sections are in :mod:`xpcat.config.sections`.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import field, fields
from typing import Any, Literal

from xpcat.errors import XpcatError

__all__ = ["ConfigError", "config_field", "check_section", "Section", "field_docs"]

logger = logging.getLogger(__name__)


class ConfigError(XpcatError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def config_field(default: Any, doc: str, *, min: float | None = None, max: float | None = None, choices: tuple | None = None):
    """A dataclass field with its documentation and checks in the metadata."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def check_section(obj: Any) -> None:
    """Validate every field of a section dataclass (called from ``__post_init__``)."""
    section = getattr(obj, "_section", type(obj).__name__)
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if f.name.startswith("_"):
            continue
        value = getattr(obj, f.name)
        where = f"[{section}] {f.name}"
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(hints[f.name])}")
        if isinstance(value, list):
            object.__setattr__(obj, f.name, tuple(value))
            value = tuple(value)
        m = f.metadata
        vals = value if isinstance(value, tuple) else (value,)
        for v in vals:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if m.get("min") is not None and v < m["min"]:
                    raise ConfigError(f"{where} = {value!r}: must be >= {m['min']}")
                if m.get("max") is not None and v > m["max"]:
                    raise ConfigError(f"{where} = {value!r}: must be <= {m['max']}")
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(map(repr, m['choices']))}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class Section:
    """Base of the section dataclasses: ``__post_init__`` checks every field (:func:`check_section`).

    A subclass sets ``_section`` to its TOML table name (used in the error messages).
    """

    _section = ""

    def __post_init__(self) -> None:
        check_section(self)


def field_docs(section: type) -> dict[str, str]:
    """The documentation of each field of a section class."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(section) if not f.name.startswith("_")}

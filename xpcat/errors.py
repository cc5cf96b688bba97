"""Exception classes for user-facing errors.

The CLI prints an :class:`XpcatError` as one line and exits non-zero (``--debug``
shows the traceback); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

__all__ = ["XpcatError", "InputError", "StageError"]


class XpcatError(Exception):
    """Base class of errors caused by the user's input, configuration or environment."""


class InputError(XpcatError, ValueError):
    """Bad input data (a file, a table, a value), named in the message."""


class StageError(XpcatError, RuntimeError):
    """A stage cannot run (a missing earlier stage, failed partitions), named in the message."""

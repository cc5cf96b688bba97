"""xpcat: stellar parameters from Gaia DR3 XP spectra (Zhang, Green & Rix 2023).

Kept light on purpose: ``import xpcat`` imports nothing heavy. Public helpers
are loaded on first use:

- :func:`xpcat.sample_xp`: XP continuous rows -> flux, flux_error and
  covariance on 392..992 nm, identical to ``gaiaxpy.calibrate``, batched.
"""

from __future__ import annotations

from typing import Any

__all__ = ["sample_xp"]

_LAZY = {"sample_xp": ("xpcat.production.condition.xp_sampling", "sample_xp")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xpcat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))

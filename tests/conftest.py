"""Shared fixtures. Tests never touch the network; small synthetic data only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("XPCAT_PROGRESS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

#: Reference data the tests need, kept in the repository (each folder has a PROVENANCE.md).
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator."""
    return np.random.default_rng(20231)


@pytest.fixture(scope="session")
def gaiaxpy_reference() -> Path:
    """``tests/data/gaiaxpy_reference``: real DR3 XP spectra and GaiaXPy's outputs for them."""
    return DATA / "gaiaxpy_reference"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``XPCAT_REQUIRE_SLURM=1`` (set by ``.ci/run``), a skipped ``slurm`` test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("XPCAT_REQUIRE_SLURM") == "1"
        and item.get_closest_marker("slurm") is not None
    ):
        report.outcome = "failed"
        report.longrepr = f"slurm test skipped although XPCAT_REQUIRE_SLURM=1: {report.longrepr}"

"""Shared fixtures. Tests never touch the network; small synthetic data only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("XPCAT_PROGRESS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

#: The shared reference data (../shared beside the repository).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator."""
    return np.random.default_rng(20231)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``; tests that need it skip with a reason when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"reference data folder {SHARED} not found")
    return SHARED


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

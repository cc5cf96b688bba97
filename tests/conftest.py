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

"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest

from _training_data import teacher_model  # tests/model is on sys.path (pytest prepend mode)


@pytest.fixture(scope="module")
def teacher():
    """A random smooth 'teacher' network with a known extinction curve R (``_training_data.teacher_model``)."""
    return teacher_model()

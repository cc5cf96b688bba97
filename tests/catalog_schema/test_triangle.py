"""Upper-triangle packing helpers."""

from __future__ import annotations

import numpy as np
import pytest

from xpcat.catalog_schema import pack_triu, unpack_triu, unpack_triu_symmetric
from xpcat.catalog_schema.triangle import n_triu


def test_row_major_order():
    m = np.arange(25.0).reshape(5, 5)
    assert pack_triu(m).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 12, 13, 14, 18, 19, 24]
    assert n_triu(5) == 15 and n_triu(66) == 2211


def test_roundtrip_batched(rng):
    a = rng.normal(size=(7, 5, 5))
    sym = a + np.swapaxes(a, -1, -2)
    np.testing.assert_array_equal(unpack_triu_symmetric(pack_triu(sym)), sym)
    up = np.triu(a)
    np.testing.assert_array_equal(unpack_triu(pack_triu(up)), up)


def test_unpack_to_another_dtype_matches_numpy_triangle(rng):
    up = np.triu(rng.normal(size=(3, 66, 66)))
    out = unpack_triu(pack_triu(up), dtype=np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, up.astype(np.float32))


def test_bad_shapes():
    with pytest.raises(ValueError, match="got 14"):
        unpack_triu(np.zeros(14))
    with pytest.raises(ValueError, match="shape"):
        pack_triu(np.zeros((3, 4)))

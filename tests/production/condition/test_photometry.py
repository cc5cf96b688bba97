"""NIR photometry: Eq. 5 fluxes, Appendix A 2MASS selection, crowding cuts, zero weights (SPEC §1)."""

from __future__ import annotations

import numpy as np
import pytest

from xpcat.catalog_schema.flags import ConditionFlag


def test_eq5_zero_points_and_errors():
    from xpcat.production.condition.photometry import mag_to_flux, zero_point_w_m2_nm

    c = 299792458.0
    for band, lam_um in (("J", 1.235), ("W2", 4.6028)):
        expect = 3631e-26 * c / (lam_um * 1e-6) ** 2 * 1e-9
        assert zero_point_w_m2_nm(band) == pytest.approx(expect, rel=1e-12)
    f, fe = mag_to_flux(np.array([10.0, np.nan]), np.array([0.02, 0.02]), "H")
    assert f[0] == pytest.approx(zero_point_w_m2_nm("H") * 10 ** (-0.4 * (10 + 1.39)), rel=1e-12)
    assert fe[0] == pytest.approx(f[0] * 0.4 * np.log(10) * 0.02, rel=1e-12)
    assert np.isnan(f[1])
    with pytest.raises(ValueError, match="'K'"):
        mag_to_flux(np.ones(1), np.ones(1), "K")


def test_nir_selection_crowding_and_missing():
    from xpcat.production.condition.photometry import nir_photometry

    n = 6
    norm_dg = np.array([-20, -7, -3, np.nan, -20, -20], float)
    tm = {
        "matched": np.array([1, 1, 1, 1, 1, 0], bool),
        "j_m": np.array([10, 10, 10, 10, np.nan, 10], float),
        "j_msigcom": np.array([0.02, 0.02, 0.02, 0.02, 0.02, 0.02]),
        "h_m": np.full(n, 9.5),
        "h_msigcom": np.array([0.02, np.nan, 0.02, 0.02, 0.02, 0.02]),
        "ks_m": np.full(n, 9.0),
        "ks_msigcom": np.full(n, 0.02),
        "ph_qual": np.array(["AAA", "AAB", "AAA", "AAA", "UUU", "AAA"], dtype=object),
        "ext_key": np.array([np.nan, np.nan, np.nan, np.nan, np.nan, np.nan]),
    }
    wise = {
        "matched": np.ones(n, bool),
        "w1_mag": np.full(n, 8.0),
        "w1_mag_error": np.array([0.01, 0.01, 0.01, 0.01, 0.0, 0.01]),
        "w2_mag": np.full(n, 8.0),
        "w2_mag_error": np.full(n, 0.01),
    }
    out = nir_photometry(n, norm_dg, tm, wise)
    F = ConditionFlag
    assert np.all(np.isfinite(out.variance[0]))
    # star 1: H error missing -> H zero weight; unWISE crowded (norm_dg -7 > -10)
    assert np.isinf(out.variance[1, 1]) and np.isfinite(out.variance[1, 0])
    assert out.flags[1] & F.UNWISE_CROWDED and not out.flags[1] & F.TMASS_CROWDED
    assert np.all(np.isinf(out.variance[1, 3:]))
    # star 2: crowded for both
    assert out.flags[2] & F.TMASS_CROWDED and out.flags[2] & F.UNWISE_CROWDED and np.all(np.isinf(out.variance[2]))
    # star 3: null norm_dg = isolated
    assert out.flags[3] == 0
    # star 4: ph_qual without 'A' -> 2MASS row rejected; W1 error 0 -> W1 zero weight
    assert out.flags[4] & F.NO_TMASS and np.all(np.isinf(out.variance[4, :3]))
    assert np.isinf(out.variance[4, 3]) and np.isfinite(out.variance[4, 4])
    # star 5: no 2MASS match
    assert out.flags[5] & F.NO_TMASS
    ext = dict(tm, ext_key=np.array([5.0, np.nan, np.nan, np.nan, np.nan, np.nan]))
    assert nir_photometry(n, norm_dg, ext, None).flags[0] & F.NO_TMASS
    assert np.all(nir_photometry(n, norm_dg, None, None).flags & F.NO_UNWISE)



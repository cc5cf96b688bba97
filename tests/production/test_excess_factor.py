"""The colour-corrected BP/RP flux-excess cut of the training set (Riello et al. 2021)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpcat.production.excess_factor import (
    corrected_excess_sigma,
    excess_colour_term,
    excess_ok,
    read_photometry,
)


def test_colour_term_is_riellos_relation():
    """Table 2 of Riello et al. 2021: continuous at its break points, 1.30 near BP - RP = 1.75."""
    assert excess_colour_term(np.array([1.0]))[0] == pytest.approx(1.162004 + 0.011464 + 0.049255 - 0.005879)
    for x in (0.5, 4.0):
        lo, hi = excess_colour_term(np.array([x - 1e-9, x + 1e-9]))
        assert lo == pytest.approx(hi, abs=2e-3)
    assert excess_colour_term(np.array([1.75]))[0] == pytest.approx(1.30, abs=0.005)
    assert corrected_excess_sigma(np.array([10.0, 15.0, 18.0])) == pytest.approx(
        0.0059898 + 8.817481e-12 * np.array([10.0, 15.0, 18.0]) ** 7.618399)


def test_clean_red_stars_pass_the_colour_cut_not_the_papers():
    x = np.array([1.0, 2.3, 2.3, 2.3, np.nan])
    g = np.full(5, 15.0)
    c = excess_colour_term(np.nan_to_num(x, nan=1.0))
    c[2] += 0.2  # a blended red star: C* = 0.2, far beyond 3 sigma
    c[3] = np.nan  # no excess factor: cut
    c[4] = 1.25  # no colour: the paper's cut, passes
    assert excess_ok(c, x, g, "colour").tolist() == [True, True, False, False, True]
    assert excess_ok(c, x, g, "paper").tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError, match="colour"):
        excess_ok(c, x, g, "riello")


def test_photometry_read_from_the_raw_table(tmp_path):
    t = pa.table({"source_id": np.array([5, 3, 9], np.int64), "phot_g_mean_mag": [14.5, 13.5, 12.0],
                  "phot_bp_mean_mag": [15.0, None, 12.5], "phot_rp_mean_mag": [14.0, 13.0, 11.0]})
    pq.write_table(t, tmp_path / "part-0.parquet")
    bp_rp, g = read_photometry(tmp_path, np.array([9, 4, 5, 3]))
    assert bp_rp[0] == pytest.approx(1.5) and np.isnan(bp_rp[1]) and bp_rp[2] == pytest.approx(1.0)
    assert np.isnan(bp_rp[3]) and g[3] == pytest.approx(13.5) and np.isnan(g[1])
    assert np.isnan(read_photometry(tmp_path / "absent", np.array([5]))[0]).all()
    pq.write_table(pa.table({"source_id": np.array([5], np.int64)}), tmp_path / "part-1.parquet")  # no mags
    assert read_photometry(tmp_path, np.array([5]))[0][0] == pytest.approx(1.0)

"""Per-bin pull sigmas carry their bootstrap standard error; the bins' verdict separates noise from miscalibration."""

from __future__ import annotations

import numpy as np
import pytest

from xpcat.model.pull_statistics import (
    BIN_MIN_STARS,
    band_excess,
    pull_calibration,
    robust_sigma,
    robust_sigma_se,
)


@pytest.mark.parametrize("n", [84, 500])
def test_standard_error_matches_the_scatter_of_the_robust_sigma(n):
    rs = np.random.default_rng(n)
    draws = rs.standard_normal((400, n))
    spread = np.std([robust_sigma(d) for d in draws])
    se = np.median([robust_sigma_se(d) for d in draws[:40]])
    assert se == pytest.approx(spread, rel=0.25)
    assert robust_sigma_se(draws[0]) == robust_sigma_se(draws[0])  # seeded: the same data, the same error


def test_standard_error_of_too_few_values_is_nan():
    assert np.isnan(robust_sigma_se(np.array([1.0, np.nan, 2.0])))


def test_band_excess_measures_the_distance_to_the_nearer_edge_in_standard_errors():
    assert band_excess(1.0, 0.05) is None and band_excess(0.85, 0.05) is None and band_excess(float("nan"), 0.1) is None
    low = band_excess(0.75, 0.04)
    assert low["distance"] == pytest.approx(0.10) and low["standard_errors_out"] == pytest.approx(2.5)
    assert low["significant"]
    high = band_excess(1.3, 0.1)
    assert high["standard_errors_out"] == pytest.approx(1.0) and not high["significant"]
    unknown = band_excess(1.5, float("nan"))
    assert unknown["distance"] == pytest.approx(0.3) and unknown["standard_errors_out"] is None
    assert not unknown["significant"]


def _calibration(resid: np.ndarray, g: np.ndarray):
    return pull_calibration(resid, np.ones_like(resid), None, bins={"G": (g, [8.0, 10.0, 12.0, 14.0, 18.0])})


def test_a_small_bin_outside_the_band_by_chance_is_not_significant_but_a_miscalibrated_one_is():
    rs = np.random.default_rng(5)
    g = np.concatenate([np.full(30, 9.0), rs.uniform(10, 18, 6000)])
    resid = rs.standard_normal((g.size, 5))
    resid[:30, 0] *= 1.35 / robust_sigma(resid[:30, 0])  # 30 stars at 1.35: outside, within ~1 standard error
    big = (g >= 14)
    resid[big, 1] *= 1.5 / robust_sigma(resid[big, 1])  # 3000 stars at 1.5: many standard errors out
    out = _calibration(resid, g)
    row = out["bins"]["G"][0]
    assert row["n"] == 30 and row["pull_sigma_se"]["teff"] > 0.1
    v = out["bins_verdict"]
    assert v["checked"] == 4 * 5
    assert {(e["bin"], e["lo"], e["parameter"]) for e in v["outside"]} >= {("G", 8.0, "teff"), ("G", 14.0, "feh")}
    assert [(e["lo"], e["parameter"]) for e in v["significantly_outside"]] == [(14.0, "feh")]
    assert v["significantly_outside"][0]["standard_errors_out"] > 5
    assert "1 by more than 2 standard errors: feh 1.50" in out["bins_statement"]


def test_bins_below_the_minimum_are_not_judged():
    rs = np.random.default_rng(6)
    g = np.full(BIN_MIN_STARS - 1, 9.0)
    resid = rs.standard_normal((g.size, 5)) * 3.0
    out = _calibration(resid, g)
    assert out["bins"]["G"][0]["n"] == BIN_MIN_STARS - 1
    assert out["bins_verdict"]["checked"] == 0 and out["bins_verdict"]["outside"] == []
    assert out["bins_statement"].startswith("No bin holds")


def test_calibrated_bins_say_so():
    rs = np.random.default_rng(7)
    g = rs.uniform(8, 18, 8000)
    out = _calibration(rs.standard_normal((g.size, 5)), g)
    assert out["bins_verdict"]["significantly_outside"] == []
    assert out["bins_statement"].startswith("Of 20 bin pull sigmas")

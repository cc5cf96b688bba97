"""Conditioning: GaiaXPy-identical XP sampling, Eq. 2, Eqs. 3-4, partitions (SPEC §1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import xpcat
from xpcat import catalog_schema as cs
from xpcat.catalog_schema.flags import ConditionFlag
from xpcat.catalog_schema.raw import GAIA_SOURCE, TMASS, UNWISE, XP_CONTINUOUS
from xpcat.config import config_from_dict
from xpcat.errors import InputError, XpcatError
from xpcat.production import partitions as P
from xpcat.production.condition import block_factor
from xpcat.production.condition import covariance as CM
from xpcat.production.condition import stage as C
from xpcat.production.run import run_condition

REF_FILES = ["XP_CONTINUOUS_RAW_with_missing_BP.csv", "XP_CONTINUOUS_RAW_colour_eq_dr3int6.csv"]
ARRAY_COLS = [f"{b}_{k}" for b in ("bp", "rp") for k in ("coefficients", "coefficient_errors", "coefficient_correlations")]


@pytest.fixture(scope="module")
def ref_dir(gaiaxpy_reference) -> Path:
    return gaiaxpy_reference


@pytest.fixture(scope="module")
def ref(ref_dir):
    return np.load(ref_dir / "calibrate_reference.npz")


@pytest.fixture(scope="module")
def ref_df(ref_dir) -> pd.DataFrame:
    frames = [pd.read_csv(ref_dir / f) for f in REF_FILES]
    return pd.concat(frames, ignore_index=True).drop_duplicates("source_id", keep="first").reset_index(drop=True)


def _to_arrow(df: pd.DataFrame) -> pa.Table:
    """Archive CSV rows -> the raw XP Parquet schema (list<double> array columns)."""
    data = {}
    for name in XP_CONTINUOUS.names:
        col = df[name]
        if name in ARRAY_COLS:
            data[name] = pa.array(
                [None if not isinstance(v, str) else [float(x) for x in v.strip("()[] ").split(",")] for v in col],
                pa.list_(pa.float64()),
            )
        else:
            data[name] = pa.array(col.to_numpy(), from_pandas=True)
    return cs.conform(pa.table(data), XP_CONTINUOUS, what="xp")


# ---------------------------------------------------------------------------
# sample_xp == gaiaxpy.calibrate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["csv_strings", "arrow_lists", "numpy_cells"])
def test_sample_xp_matches_gaiaxpy_calibrate(ref, ref_df, form):
    if form == "csv_strings":
        table = ref_df
    elif form == "arrow_lists":
        table = _to_arrow(ref_df)
    else:
        table = ref_df.copy()
        for c in ARRAY_COLS:
            table[c] = [np.array([float(x) for x in v.strip("()").split(",")]) if isinstance(v, str) else np.nan for v in table[c]]
    s = xpcat.sample_xp(table)
    np.testing.assert_array_equal(s.source_id, ref["source_id"])
    ok = np.isfinite(ref["flux"])
    np.testing.assert_array_equal(np.isfinite(s.flux), ok)
    assert np.max(np.abs(s.flux[ok] / ref["flux"][ok] - 1)) < 1e-10
    assert np.max(np.abs(s.flux_error[ok] / ref["flux_error"][ok] - 1)) < 1e-10
    for i in range(len(s)):
        m = ok[i]
        a, b = s.covariance[i][np.ix_(m, m)], ref["covariance_propagated"][i][np.ix_(m, m)]
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-10
        np.testing.assert_array_equal(np.isnan(s.covariance[i]), np.isnan(ref["covariance_propagated"][i]))


def test_concurrent_first_samplings_leave_stdout_alone(ref_df):
    """Two partitions sampled at once by one process's threads (the `threads` profile), bases not yet built."""
    import sys
    import threading

    from xpcat.production.condition import bases

    serial = xpcat.sample_xp(ref_df).flux
    bases._design_cached.cache_clear()
    stdout = sys.stdout
    out, errors = [], []

    def work():
        try:
            for _ in range(3):
                out.append(xpcat.sample_xp(ref_df).flux)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sys.stdout is stdout  # was left a StringIO of GaiaXPy's "Reading input file..." before the lock
    assert not errors and len(out) == 12
    for flux in out:
        np.testing.assert_array_equal(flux, serial)


def test_missing_bp_source_has_bp_samples_missing(ref, ref_df):
    s = xpcat.sample_xp(ref_df)
    i = int(np.flatnonzero(~ref["has_bp"])[0])
    assert not s.has_bp[i] and s.has_rp[i] and not s.bad_bp[i]
    wl = s.wavelengths
    assert np.all(np.isnan(s.flux[i, wl <= 635])) and np.all(np.isfinite(s.flux[i, wl > 635]))
    assert np.all(s.flux_bp[i] == 0)
    both = np.flatnonzero(ref["has_bp"])
    np.testing.assert_allclose((s.flux_bp + s.flux_rp)[both], s.flux[both], rtol=1e-13)


def test_paper_covariance_is_unscaled_by_standard_deviation(ref_df):
    s_ok = xpcat.sample_xp(ref_df)
    s_pp = xpcat.sample_xp(ref_df, covariance="paper")
    i = 0  # both bands; BP-only samples scale by 1 / s_bp^2
    s_bp = float(ref_df.loc[i, "bp_standard_deviation"])
    np.testing.assert_allclose(s_pp.covariance[i, :20, :20], s_ok.covariance[i, :20, :20] / s_bp**2, rtol=1e-12)
    np.testing.assert_array_equal(s_pp.flux, s_ok.flux)


def test_bad_xp_inputs_are_flagged_not_dropped(ref_df):
    df = ref_df.copy()
    # row 0: NaN inside BP coefficients; row 2: RP correlations of the wrong length
    df.loc[0, "bp_coefficients"] = df.loc[0, "bp_coefficients"].replace("(", "(nan, ", 1).replace(", ", ", ", 1)
    coeffs = df.loc[0, "bp_coefficients"].strip("()").split(",")
    df.loc[0, "bp_coefficients"] = "(" + ",".join(["nan"] + coeffs[2:]) + ")"
    corr = df.loc[2, "rp_coefficient_correlations"].strip("()").split(",")
    df.loc[2, "rp_coefficient_correlations"] = "(" + ",".join(corr[:-3]) + ")"
    s = xpcat.sample_xp(df)
    assert len(s) == len(df)
    assert s.bad_bp[0] and not s.has_bp[0] and s.has_rp[0]
    assert s.bad_rp[2] and not s.has_rp[2] and s.has_bp[2]
    assert np.all(np.isnan(s.flux[0, s.wavelengths < 643 - 8]))
    assert np.all(np.isfinite(s.flux[2, s.wavelengths < 643])) and np.all(np.isnan(s.flux[2, s.wavelengths > 643]))


def test_unknown_basis_function_id_raises(ref_df):
    df = ref_df.copy()
    df["rp_basis_function_id"] = 99
    with pytest.raises(KeyError, match="rp_basis_function_id=99"):
        xpcat.sample_xp(df)


def test_sample_xp_rejects_other_types():
    with pytest.raises(TypeError, match="DataFrame"):
        xpcat.sample_xp({"source_id": [1]})


# ---------------------------------------------------------------------------
# Eq. 2 and Eqs. 3-4
# ---------------------------------------------------------------------------


def test_inflation_matches_eq2(rng):
    n, m = 3, 61
    f = rng.uniform(1, 100, size=(n, m))
    w_rp = np.clip((np.arange(392, 993, 10) - 635) / 8, 0, 1)
    fb, fr = f * (1 - w_rp), f * w_rp
    cov = np.zeros((n, m, m))
    out = CM.inflate_covariance(cov, f, fb, fr)
    i = 1
    expect = (
        np.diag((0.005 * f[i]) ** 2) + 0.005**2 * np.outer(f[i], f[i]) + 0.001**2 * (np.outer(fb[i], fb[i]) + np.outer(fr[i], fr[i]))
    )
    np.testing.assert_allclose(out[i], expect, rtol=1e-14)


def _random_spd(rng, n, N, cond=1e3):
    Q, _ = np.linalg.qr(rng.normal(size=(n, N, N)))
    ev = np.exp(rng.uniform(0, np.log(cond), size=(n, N)))
    return (Q * ev[:, None, :]) @ np.swapaxes(Q, 1, 2)


def test_factor_reproduces_chi2_well_conditioned(rng):
    n, N = 20, 66
    cov = _random_spd(rng, n, N)
    valid = np.ones((n, N), bool)
    R, repaired = CM.precision_factor(cov, valid, 1e-9)
    assert not repaired.any()
    assert np.all(np.tril(R, -1) == 0)
    df = rng.normal(size=(n, N))
    chi_ref = np.einsum("ni,ni->n", df, np.linalg.solve(cov, df[:, :, None])[..., 0])
    chi = np.sum((R @ df[:, :, None])[..., 0] ** 2, axis=1)
    np.testing.assert_allclose(chi, chi_ref, rtol=1e-10)
    # the stored float32 packed factor
    R32 = cs.unpack_triu(cs.pack_triu(R).astype(np.float32)).astype(np.float64)
    chi32 = np.sum((R32 @ df[:, :, None])[..., 0] ** 2, axis=1)
    np.testing.assert_allclose(chi32, chi_ref, rtol=1e-6)


def test_clamp_matches_eigen_definition_and_flags(rng):
    n, N = 6, 66
    cov = _random_spd(rng, n, N)
    # make two matrices (nearly) singular and one indefinite
    Q, _ = np.linalg.qr(rng.normal(size=(N, N)))
    ev = np.exp(rng.uniform(-2, 2, size=N))
    ev[:3] = [1e-14, 1e-12, -1e-3]
    cov[1] = (Q * ev) @ Q.T
    ev2 = ev.copy()
    ev2[2] = 1e-11
    cov[4] = (Q * ev2) @ Q.T
    valid = np.ones((n, N), bool)
    valid[4, [3, 64]] = False
    floor = 1e-9
    R, repaired = CM.precision_factor(cov, valid, floor)
    np.testing.assert_array_equal(repaired, [False, True, False, False, True, False])
    for i in range(n):
        v = valid[i]
        D, U = np.linalg.eigh(cov[i][np.ix_(v, v)])
        P_ref = (U / np.maximum(D, floor)) @ U.T
        P = R[i].T @ R[i]
        np.testing.assert_allclose(P[np.ix_(v, v)], P_ref, rtol=1e-7, atol=1e-7 * np.abs(P_ref).max())
        assert np.all(R[i][~v] == 0) and np.all(R[i][:, ~v] == 0)


def test_real_spectra_conditioning_chi2(ref_df):
    s = xpcat.sample_xp(ref_df)
    n = len(s)
    nir_f = np.full((n, 5), np.nan)
    nir_v = np.full((n, 5), np.inf)
    nir_f[:, 0], nir_v[:, 0] = 1e-16, (1e-18) ** 2
    ca = CM.condition_arrays(s, nir_f, nir_v)
    # faint real sources have blue fluxes <= 0: kept, with the NONPOSITIVE_FLUX flag
    nonpos = np.any(np.nan_to_num(s.flux, nan=1.0) <= 0, axis=1)
    assert nonpos.any()
    np.testing.assert_array_equal((ca.flags & ConditionFlag.NONPOSITIVE_FLUX) > 0, nonpos)
    unit = cs.FLUX_UNIT_W_M2_NM
    cov = CM.inflate_covariance(s.covariance / unit**2, s.flux / unit, s.flux_bp / unit, s.flux_rp / unit)
    rng = np.random.default_rng(3)
    for i in range(n):
        v = np.isfinite(s.flux[i])
        assert ca.n_valid[i] == v.sum() + 1
        Cv = cov[i][np.ix_(v, v)]
        df = rng.multivariate_normal(np.zeros(v.sum()), Cv)
        chi_ref = df @ np.linalg.solve(Cv, df)
        R = cs.unpack_triu(ca.factor[i].astype(np.float64))
        full = np.zeros(66)
        full[:61][v] = df
        chi = np.sum((R @ full) ** 2)
        # float32 storage of the factor of a real (ill-conditioned) XP covariance
        assert abs(chi / chi_ref - 1) < 1e-2, (i, chi, chi_ref)
        assert np.all(np.isinf(ca.flux_error[i][:61][~v]))
        np.testing.assert_allclose(ca.flux[i][:61][v], s.flux[i][v] / unit, rtol=1e-6)


# ---------------------------------------------------------------------------
# Partitions end to end
# ---------------------------------------------------------------------------


def make_raw_run(run_dir: Path, ref_df: pd.DataFrame, copies: int = 20, seed: int = 0, split_files: bool = True) -> dict:
    """A small raw run from the real spectra: each copy perturbs coefficients within errors.

    Two extra gaia_source stars have no XP row. Returns the ids by role.
    """
    rng = np.random.default_rng(seed)
    xp = _to_arrow(ref_df).to_pandas()
    rows = []
    for k in range(copies):
        for _, r in xp.iterrows():
            r = r.copy()
            r["source_id"] = int(r["source_id"]) + k
            for b in ("bp", "rp"):
                c = r[f"{b}_coefficients"]
                if c is not None:
                    r[f"{b}_coefficients"] = np.asarray(c) + rng.normal(size=len(c)) * np.asarray(r[f"{b}_coefficient_errors"])
            rows.append(r)
    xdf = pd.DataFrame(rows)
    xtab = cs.conform(pa.Table.from_pandas(xdf, preserve_index=False), XP_CONTINUOUS)
    ids = xdf["source_id"].to_numpy(np.int64)
    no_xp = np.array([ids[0] + 10_000, ids[-1] + 10_000], np.int64)
    all_ids = np.concatenate([ids, no_xp])
    n = all_ids.size
    gaia = pa.table(
        {
            "source_id": all_ids,
            "ra": rng.uniform(0, 360, n),
            "dec": rng.uniform(-90, 90, n),
            "parallax": np.where(np.arange(n) == 3, np.nan, rng.uniform(0.1, 5, n)),
            "parallax_error": np.full(n, 0.05),
            "phot_g_mean_mag": rng.uniform(10, 17, n),
            "phot_g_mean_flux": np.full(n, 1e4),
            "phot_g_mean_flux_error": np.full(n, 10.0),
            "norm_dg": np.where(np.arange(n) % 7 == 0, -6.0, -20.0),
        }
    )
    gaia = cs.conform(gaia, GAIA_SOURCE)
    tm_ids = all_ids[::2]
    m = tm_ids.size
    tmass = cs.conform(
        pa.table(
            {
                "source_id": tm_ids,
                "j_m": rng.uniform(8, 14, m).astype(np.float32),
                "j_msigcom": np.full(m, 0.03, np.float32),
                "h_m": rng.uniform(8, 14, m).astype(np.float32),
                "h_msigcom": np.full(m, 0.03, np.float32),
                "ks_m": rng.uniform(8, 14, m).astype(np.float32),
                "ks_msigcom": np.full(m, 0.03, np.float32),
                "ph_qual": pa.array(["AAA"] * m),
            }
        ),
        TMASS,
    )
    uw = cs.conform(
        pa.table({"source_id": all_ids, "w1_mag": np.full(n, 9.0, np.float32), "w1_mag_error": np.full(n, 0.02, np.float32)}),
        UNWISE,
    )
    raw = run_dir / "raw"
    for name, t in (("gaia_source", gaia), ("xp_continuous_mean_spectrum", xtab), ("tmass", tmass), ("unwise", uw)):
        (raw / name).mkdir(parents=True, exist_ok=True)
        if split_files:
            h = t.num_rows // 2
            pq.write_table(t.slice(0, h), raw / name / "part-0.parquet")
            pq.write_table(t.slice(h), raw / name / "part-1.parquet")
        else:
            pq.write_table(t, raw / name / "part-0.parquet")
    return {"xp": ids, "no_xp": no_xp, "all": all_ids}


#: In-process cluster (the ``threads`` profile): the engine's path with a fast start.
THREADS = {"profile": "threads", "n_workers": 1, "threads_per_worker": 2, "retries": 0}
CFG = config_from_dict({"data": {"partition_level": 5}, "conditioning": {"batch_size": 16}, "cluster": THREADS})


def _read_all(run_dir: Path) -> pa.Table:
    files = sorted((run_dir / "conditioned").glob("*.parquet"))
    return pa.concat_tables([P.read_table(f) for f in files]).sort_by("source_id")


def test_condition_command_writes_every_star(tmp_path, ref_df, ref):
    ids = make_raw_run(tmp_path, ref_df, copies=5)
    summary = run_condition(tmp_path, CFG)
    files = sorted((tmp_path / "conditioned").glob("*.parquet"))
    expect_pix = np.unique(P.partition_of(ids["all"], 5))
    assert [P.parse_partition_name(f)[1] for f in files] == list(expect_pix)
    assert summary["stages"]["condition"]["completed"] == len(files) and summary["stars"] == ids["all"].size
    out = _read_all(tmp_path)
    cs.validate(out, cs.CONDITIONED)
    np.testing.assert_array_equal(out.column("source_id").to_numpy(), np.sort(ids["all"]))
    flags = out.column("condition_flags").to_numpy()
    sid = out.column("source_id").to_numpy()
    no_xp = np.isin(sid, ids["no_xp"])
    assert np.all(flags[no_xp] & ConditionFlag.NO_XP) and not np.any(flags[~no_xp] & ConditionFlag.NO_XP)
    flux = np.stack(out.column("flux").to_numpy(zero_copy_only=False))
    assert np.all(np.isnan(flux[no_xp, :61]))
    fac = np.stack(out.column("flux_factor_triu").to_numpy(zero_copy_only=False))
    assert fac.shape[1] == cs.N_FACTOR and fac.dtype == np.float32
    # the copy-0 rows have the real coefficients perturbed; the missing-BP star stays BP-less
    nobp = np.isin(sid, ref["source_id"][~ref["has_bp"]][0] + np.arange(5))
    assert np.all(flags[nobp] & ConditionFlag.NO_BP) and np.all(np.isnan(flux[nobp, :25]))
    # NIR: tmass on every other star, crowding (-6) kills unWISE only
    crowded = out.column("norm_dg").to_numpy() > -10
    assert np.all(flags[crowded] & ConditionFlag.UNWISE_CROWDED) and np.all(np.isnan(flux[crowded, 64]))
    assert np.all(np.isnan(flux[:, 65]))  # no W2 in the unWISE table
    meta = cs.read_metadata(pq.read_schema(files[0]))
    assert meta["flux_unit"] == "1e-18 W m-2 nm-1" and meta["options"]["covariance"] == "correct"
    assert meta["gaiaxpy_version"] and meta["xpcat_version"] and meta["partition"]["level"] == 5
    # stored data per star (column chunks; the per-file footer is amortised over real partitions)
    data_bytes = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            data_bytes += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
    assert data_bytes / ids["all"].size <= 10_000


def test_rerun_skips_and_redoes_corrupt(tmp_path, ref_df):
    make_raw_run(tmp_path, ref_df, copies=2)
    first = run_condition(tmp_path, CFG)
    files = sorted((tmp_path / "conditioned").glob("*.parquet"))
    again = run_condition(tmp_path, CFG)["stages"]["condition"]
    assert again["submitted"] == 0 and again["completed"] == 0
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    P.marker_path(files[1]).unlink()
    third = run_condition(tmp_path, CFG)["stages"]["condition"]
    assert third["submitted"] == 2 and third["completed"] == 2
    assert P.is_done(files[0]) and P.is_done(files[1])
    # changed options redo everything
    paper = CFG.replace(conditioning={"covariance": "paper", "batch_size": 20000})
    fourth = run_condition(tmp_path, paper)
    assert fourth["stages"]["condition"]["completed"] == len(files)
    assert first["stars"] == fourth["stars"]


def test_condition_partition_reads_its_range(tmp_path, ref_df):
    from xpcat.production import run_state as S

    ids = make_raw_run(tmp_path, ref_df, copies=2)
    plan, raw_files = S.plan_partitions(tmp_path, CFG)
    t = plan[0]
    files = {k: [Path(f) for f in v] for k, v in raw_files.items()}
    out = tmp_path / "conditioned" / f"{t.name}.parquet"
    res = C.condition_partition(files, t.pix, out, CFG, n_expected=t.rows)
    assert res["status"] == "written" and res["stars"] == t.rows
    assert set(res) >= {"partition", "stars", "flags", "bytes", "seconds"}
    json.dumps(res)
    lo, hi = P.source_id_range(t.pix, 5)
    assert res["stars"] == int(np.sum((ids["all"] >= lo) & (ids["all"] < hi)))
    sha = P.read_marker(out)["sha256"]
    assert C.condition_partition(files, t.pix, out, CFG, n_expected=t.rows)["status"] == "redone"
    assert P.read_marker(out)["sha256"] == sha  # deterministic


def test_duplicate_source_ids_are_named(tmp_path, ref_df):
    ids = make_raw_run(tmp_path, ref_df, copies=2)
    gdir = tmp_path / "raw" / "gaia_source"
    t = pq.read_table(gdir / "part-0.parquet")
    pq.write_table(t.slice(0, 1), gdir / "part-2.parquet")
    dup = t.column("source_id")[0].as_py()
    with pytest.raises(InputError, match=str(dup)) as err:
        run_condition(tmp_path, CFG)
    assert "part-2.parquet" in str(err.value) and "part-0.parquet" in str(err.value)
    (gdir / "part-2.parquet").unlink()
    xdir = tmp_path / "raw" / "xp_continuous_mean_spectrum"
    x = pq.read_table(xdir / "part-1.parquet")
    pq.write_table(pa.concat_tables([x, x.slice(0, 1)]), xdir / "part-1.parquet")
    with pytest.raises(InputError, match=str(x.column("source_id")[0].as_py())):
        run_condition(tmp_path, CFG)
    assert ids["all"].size


def test_truncated_raw_file_and_orphan_xp_rows(tmp_path, ref_df):
    make_raw_run(tmp_path, ref_df, copies=2)
    f = tmp_path / "raw" / "xp_continuous_mean_spectrum" / "part-1.parquet"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 3])
    with pytest.raises(InputError, match="part-1.parquet"):
        run_condition(tmp_path, CFG)
    f.write_bytes(good)
    gdir = tmp_path / "raw" / "gaia_source"
    g = pq.read_table(gdir / "part-1.parquet")
    pq.write_table(g.slice(1), gdir / "part-1.parquet")
    with pytest.raises(XpcatError, match="no gaia_source row"):  # the partition's task fails; recorded and named
        run_condition(tmp_path, CFG)


def test_missing_required_table(tmp_path, ref_df):
    with pytest.raises(InputError, match="no raw gaia_source"):
        run_condition(tmp_path, CFG)
    make_raw_run(tmp_path, ref_df, copies=1, split_files=False)
    import shutil

    shutil.rmtree(tmp_path / "raw" / "xp_continuous_mean_spectrum")
    with pytest.raises(XpcatError, match="no raw xp_continuous_mean_spectrum files"):
        run_condition(tmp_path, CFG)


def test_cli_condition(tmp_path, ref_df):
    from click.testing import CliRunner

    from xpcat.cli import cli

    make_raw_run(tmp_path, ref_df, copies=1, split_files=False)
    (tmp_path / "config.toml").write_text('[cluster]\nprofile = "threads"\n')
    res = CliRunner().invoke(cli, ["condition", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "condition " in res.output and "last_run.json" in res.output  # a short summary; the JSON stays on disk
    assert json.loads((tmp_path / "state" / "last_run.json").read_text())["stars"] == len(ref_df) + 2


def test_simulate_then_condition_end_to_end(tmp_path):
    """`xpcat simulate` -> `xpcat condition`: every simulated star is conditioned, flags match the raw data."""
    from click.testing import CliRunner

    from xpcat.cli import cli

    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(cli, ["simulate", str(run), "--stars", "300", "--seed", "7"])
    assert res.exit_code == 0, res.output
    (run / "config.toml").write_text('[cluster]\nprofile = "threads"\n')
    res = runner.invoke(cli, ["condition", str(run)])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "state" / "last_run.json").read_text())
    gaia = pa.concat_tables([pq.read_table(f) for f in sorted((run / "raw" / "gaia_source").glob("*.parquet"))])
    xp = pa.concat_tables([pq.read_table(f) for f in sorted((run / "raw" / "xp_continuous_mean_spectrum").glob("*.parquet"))])
    assert summary["stars"] == gaia.num_rows
    out = _read_all(run)
    cs.validate(out, cs.CONDITIONED)
    sid = out.column("source_id").to_numpy()
    np.testing.assert_array_equal(sid, np.sort(gaia.column("source_id").to_numpy()))
    flags = out.column("condition_flags").to_numpy()
    x = xp.to_pandas().set_index("source_id").reindex(sid)
    no_bp = x["bp_coefficients"].isna().to_numpy()
    flagged = (flags & ConditionFlag.NO_BP) > 0
    assert np.all(flagged[no_bp])
    assert np.all((flags[flagged & ~no_bp] & ConditionFlag.BAD_XP_INPUT) > 0)  # present but unusable
    flux = np.stack(out.column("flux").to_numpy(zero_copy_only=False))
    nv = out.column("n_valid_flux").to_numpy()
    np.testing.assert_array_equal(nv, np.isfinite(flux).sum(axis=1))
    good = (flags & (ConditionFlag.NO_BP | ConditionFlag.NO_RP | ConditionFlag.NO_XP)) == 0
    assert good.mean() > 0.9
    # typical XP fluxes are O(1-1000) in the internal unit
    med = np.nanmedian(flux[good, :61])
    assert 1e-2 < med < 1e4
    again = runner.invoke(cli, ["condition", str(run)])
    assert again.exit_code == 0, again.output
    redo = json.loads((run / "state" / "last_run.json").read_text())["stages"]["condition"]
    assert redo["submitted"] == 0 and summary["stages"]["condition"]["completed"] == summary["partitions"]


@pytest.mark.parametrize("floor", [1e-9, 30.0])
def test_fast_block_conditioning_equals_reference_path(ref_df, floor):
    """condition_xp_table (in-place reversed LAPACK factor) == condition_arrays (sample_xp + precision_factor).

    The floor of 30 (internal unit squared) clamps eigenvalues of some stars, so
    both the LAPACK route and the eigen-decomposition route are compared.
    """
    df = pd.concat([ref_df] * 3, ignore_index=True)
    df["source_id"] = np.arange(len(df), dtype=np.int64) + 1
    corr = df.loc[2, "rp_coefficient_correlations"].strip("()").split(",")
    df.loc[2, "rp_coefficient_correlations"] = "(" + ",".join(corr[:-3]) + ")"  # bad RP: samples missing
    df.loc[4, "rp_coefficient_correlations"] = df.loc[2, "rp_coefficient_correlations"]
    df.loc[4, "bp_coefficients"] = None  # and no BP either: NIR only
    n = len(df)
    rng = np.random.default_rng(5)
    nir_f = rng.uniform(1e-17, 1e-16, (n, 5))
    nir_v = (0.03 * nir_f) ** 2
    nir_f[::3, 1] = np.nan
    nir_v[::3, 1] = np.inf
    nir_v[1::4, 4] = (1e-23) ** 2  # below the floor of 30 (1e-18 units)^2: clamped
    ref = CM.condition_arrays(xpcat.sample_xp(df), nir_f, nir_v, floor=floor)
    buf = np.full((n + 3, 61, 61), np.nan)  # a dirty, larger work buffer
    fast, smp = block_factor.condition_xp_table(df, nir_f, nir_v, floor=floor, buf=buf, threads=2)
    np.testing.assert_array_equal(fast.n_valid, ref.n_valid)
    np.testing.assert_array_equal(fast.flags, ref.flags)
    np.testing.assert_array_equal(np.isnan(fast.flux), np.isnan(ref.flux))
    np.testing.assert_allclose(fast.flux, ref.flux, rtol=1e-6)
    np.testing.assert_allclose(fast.flux_error, ref.flux_error, rtol=1e-6)
    assert not smp.has_rp[2] and smp.bad_rp[2]
    assert not smp.has_bp[4] and not smp.has_rp[4] and fast.n_valid[4] == np.isfinite(nir_f[4]).sum()
    if floor > 1:
        assert (fast.flags & ConditionFlag.COVARIANCE_REPAIRED).any()
    for i in range(n):
        Rf = cs.unpack_triu(fast.factor[i].astype(np.float64))
        Rr = cs.unpack_triu(ref.factor[i].astype(np.float64))
        v = np.isfinite(fast.flux[i])
        assert np.all(Rf[~v] == 0) and np.all(Rf[:, ~v] == 0)
        # the same precision matrix (R itself is unique: upper triangular, positive diagonal)
        Pf, Pr = Rf.T @ Rf, Rr.T @ Rr
        np.testing.assert_allclose(Pf, Pr, rtol=0, atol=1e-4 * np.abs(Pr).max())


def test_rows_outside_bounds_equal_and_ragged_lengths():
    from xpcat.production.condition.xp_sampling import _rows_outside

    mat = np.array([[0.5, -1.0, 1.0], [0.2, 1.5, 0.0], [0.1, np.nan, 0.3], [0.1, 0.2, np.nan]])
    full = np.array([3, 3, 3, 3])
    np.testing.assert_array_equal(_rows_outside(mat, full, -1.0, 1.0), [False, True, True, True])
    np.testing.assert_array_equal(_rows_outside(mat, full, -1.0, 1.0, lo_open=True), [True, True, True, True])
    # ragged: row 3's NaN is padding (length 2), row 1's 1.5 is inside its length
    ragged = np.array([3, 2, 3, 2])
    np.testing.assert_array_equal(_rows_outside(mat, ragged, -1.0, 1.0), [False, True, True, False])
    np.testing.assert_array_equal(_rows_outside(mat[:, :2], np.array([2, 1, 1, 2]), 0.0, np.inf, lo_open=True), [True, False, False, False])


def test_sample_xp_threads_agree_and_survive_fork(ref_df):
    """Chunks on threads give the same result as one thread, also in a forked child."""
    import multiprocessing as mp

    from xpcat.production.condition import xp_sampling as X
    df = pd.concat([ref_df] * 100, ignore_index=True)  # > one chunk of stars
    one = xpcat.sample_xp(df, threads=1)
    two = xpcat.sample_xp(df, threads=2)
    np.testing.assert_array_equal(one.covariance, two.covariance)
    np.testing.assert_array_equal(one.flux_error, two.flux_error)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:  # the parent's pool exists; the child must start its own
        job = pool.apply_async(X.sample_xp, (df.iloc[: 2 * X._CHUNK + 7].reset_index(drop=True),), {"threads": 2})
        child = job.get(timeout=120)  # without the at-fork reset the child waits forever on dead threads
    np.testing.assert_array_equal(child.covariance, one.covariance[: 2 * X._CHUNK + 7])


def test_prefetched_keeps_order_reraises_and_stops_early():
    import threading

    assert list(C._prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise InputError("raw file /x.parquet is truncated")

    with pytest.raises(InputError, match="truncated"):
        list(C._prefetched(failing()))
    produced = []

    def endless():
        k = 0
        while True:
            produced.append(k)
            yield k
            k += 1

    it = C._prefetched(endless())
    assert next(it) == 0
    it.close()  # the consumer stops: the producer thread ends too
    assert not any(t.name == "xpcat-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 4


def test_flux_error_without_covariance_equals_full_path(ref_df):
    full = xpcat.sample_xp(ref_df)
    light = xpcat.sample_xp(ref_df, with_covariance=False)
    assert light.covariance is None
    np.testing.assert_array_equal(np.isnan(light.flux_error), np.isnan(full.flux_error))
    ok = np.isfinite(full.flux_error)
    np.testing.assert_allclose(light.flux_error[ok], full.flux_error[ok], rtol=1e-12)
    np.testing.assert_array_equal(light.flux, full.flux)

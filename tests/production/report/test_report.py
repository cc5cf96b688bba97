"""Tests of xpcat.production.report (write_report and its parts) on a small fabricated run directory."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpcat.catalog_schema import CATALOG, XP_WAVELENGTHS_NM
from xpcat.catalog_schema.raw import GAIA_SOURCE, LABELS, REDDENING, TRUTH
from xpcat.errors import StageError
from xpcat.production.report import page as R
from xpcat.production.report.binned_residuals import SELECTIONS
from xpcat.production.report.evaluation import truth_extinction_curve
from xpcat.production.report.statistics import format_number

N = 600
NIR_NM = np.array([1235.0, 1662.0, 2159.0, 3352.6, 4602.8])
WL = np.concatenate([np.asarray(XP_WAVELENGTHS_NM), NIR_NM])
R_FILES = Path(R.__file__).parent


def _conform(d: dict, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: d[f.name] for f in schema if f.name in d},
                                schema=pa.schema([f for f in schema if f.name in d]))


def _fabricate(run: Path, rng: np.random.Generator) -> dict:
    sid = np.unique(rng.integers(1, 10**12, 3 * N))[:N].astype(np.int64) << 20
    assert sid.size == N
    truth = {
        "source_id": sid,
        "teff": rng.uniform(4000, 7500, N), "feh": rng.normal(-0.3, 0.4, N), "logg": rng.uniform(1.5, 4.8, N),
        "e": rng.uniform(0.01, 1.0, N), "r_v": np.full(N, 3.1), "parallax": rng.uniform(0.3, 3.0, N),
    }
    err = np.column_stack([np.full(N, 0.08), np.full(N, 0.1), np.full(N, 0.12), np.full(N, 0.02), np.full(N, 0.05)])
    tv = np.column_stack([truth["teff"] / 1000, truth["feh"], truth["logg"], truth["e"], truth["parallax"]])
    est = tv + err * rng.standard_normal((N, 5)) * rng.choice([1.0, 5.0], (N, 1), p=[0.9, 0.1])
    est[:, 3:] = np.abs(est[:, 3:]) + 1e-3
    qf = rng.choice([0, 1, 3, 8, 16, 33], N, p=[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]).astype(np.uint8)
    status = np.where(rng.random(N) < 0.03, 1, 0).astype(np.uint8)
    conf = rng.random((N, 3)).astype(np.float32)
    chi2 = (rng.chisquare(61, N) * rng.choice([1.0, 8.0], N, p=[0.9, 0.1])).astype(np.float32)
    cat = {
        "gdr3_source_id": sid, "ra": rng.uniform(0, 360, N), "dec": np.degrees(np.arcsin(rng.uniform(-1, 1, N))),
        "stellar_params_est": list(est.astype(np.float32)), "stellar_params_err": list(err.astype(np.float32)),
        "chi2_opt": chi2, "ln_prior": rng.normal(-3, 1, N).astype(np.float32),
        "teff_confidence": conf[:, 0], "feh_confidence": conf[:, 1], "logg_confidence": conf[:, 2],
        "quality_flags": qf, "stellar_params_icov_triu": [np.ones(15, np.float32)] * N,
        "stellar_params_cov_triu": [np.ones(15, np.float32)] * N, "fit_status": status,
        "condition_flags": np.zeros(N, np.uint16),
    }
    table = pa.Table.from_pydict(cat, schema=CATALOG)
    (run / "fitted").mkdir(parents=True)
    half = N // 2
    pq.write_table(table.slice(0, half), run / "fitted" / "L05-000001.parquet")
    pq.write_table(table.slice(half), run / "fitted" / "L05-000002.parquet")
    (run / "truth").mkdir()
    tr = dict(truth, distance=1000 / truth["parallax"], population=["thin_disk"] * N, is_binary=[False] * N,
              mass_ratio=np.full(N, np.nan), is_outlier=[False] * N)
    pq.write_table(_conform(tr, TRUTH), run / "truth" / "truth.parquet")

    # model artifact whose R is the truth law with a known distortion
    from xpcat.model.artifact import save_artifact
    from xpcat.model.forward import init_params, make_scaler
    from xpcat.model.prior import fit_gmm

    r_true = truth_extinction_curve(WL, 3.1)
    r_learned = r_true * (1 + 0.05 * np.linspace(0, 1, 66))
    theta = np.column_stack([truth["teff"], truth["feh"], truth["logg"]])
    params = init_params(jax.random.PRNGKey(0), ln_r=np.log(r_learned))
    params = jax.tree_util.tree_map(np.asarray, params)
    save_artifact(run / "model", params=params, scaler=make_scaler(theta), activation="tanh",
                  gmm=fit_gmm(theta, n_components=2), wavelengths=WL, flux_unit=1e-18)
    # conditioned partition: observed flux = model prediction x (1 + noise)
    from xpcat.model.artifact import load_artifact

    model = load_artifact(run / "model").forward_model()
    pred = np.asarray(jax.vmap(model.predict_flux)(
        est[:, :3].astype(np.float32), np.log(est[:, 4]).astype(np.float32), np.log(est[:, 3]).astype(np.float32)
    ), dtype=np.float64)
    ferr = 0.02 * np.abs(pred) + 1e-6
    flux = pred + ferr * rng.standard_normal(pred.shape)
    (run / "conditioned").mkdir()
    pq.write_table(pa.table({"source_id": sid, "flux": list(flux.astype(np.float32)),
                             "flux_error": list(ferr.astype(np.float32))}), run / "conditioned" / "L05-000001.parquet")
    (run / "state").mkdir()
    (run / "state" / "last_run.json").write_text(json.dumps({"seconds": 12.5, "stages": {"infer": {"seconds": 7.0}}}))
    (run / "state" / "confidence.json").write_text(json.dumps({"auc_teff": 0.91, "auc_feh": 0.88, "auc_logg": 0.87}))
    ref3 = np.column_stack([truth["teff"], truth["feh"], truth["logg"]])
    est3 = ref3 + np.array([50.0, 0.1, 0.1]) * rng.standard_normal((N, 3)) * np.where(conf > 0.5, 1.0, 4.0)
    np.savez(run / "state" / "confidence_stars.npz", est=est3, ref=ref3, used=qf < 8, holdout=rng.random(N) < 0.3,
             confidence=conf)
    return {"sid": sid, "truth": truth, "est": est, "err": err, "qf": qf, "status": status, "conf": conf, "chi2": chi2,
            "r_true": r_true, "r_learned": r_learned, "gaia_plx": truth["parallax"] + 0.05 * rng.standard_normal(N)}


def _rsig(x):
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def _expected(f: dict, ref: dict, ref_err: dict) -> dict:
    scale = np.array([1000.0, 1, 1, 1, 1])
    used_base = (f["qf"] < 8) & (f["status"] == 0)
    out = {}
    for j, p in enumerate(("teff", "feh", "logg", "extinction", "parallax")):
        res = f["est"][:, j].astype(np.float32).astype(np.float64) * scale[j] - ref[p]
        e = f["err"][:, j].astype(np.float32).astype(np.float64) * scale[j]
        pull = res / np.sqrt(e**2 + ref_err[p] ** 2)
        u = used_base & np.isfinite(res)
        out[p] = {"robust_sigma": _rsig(res[u]), "bias": np.median(res[u]), "pull_robust_sigma": _rsig(pull[u]),
                  "pull_median": np.median(pull[u]), "n": int(u.sum())}
    return out


def _page_stats(page: str) -> dict[str, list[str]]:
    table = re.search(r'<table id="residual-stats">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    return {re.findall(r"<td>(.*?)</td>", r)[0]: re.findall(r"<td>(.*?)</td>", r)[1:] for r in rows}


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    f = _fabricate(run, np.random.default_rng(5))
    page = R.write_report(run)
    return run, f, page


def test_report_has_every_figure(fabricated):
    run, f, page = fabricated
    assert page == run / "report" / "index.html"
    text = page.read_text()
    v = json.loads((run / "report" / "validation.json").read_text())
    names = ["kiel.png", "residuals.png", "residuals_normalised.png", "pulls.png", "flux_residuals.png",
             "extinction_curve.png", "sky_median_e.png", "confidence.png", "residuals_fig7.png", "residuals_fig16.png"]
    assert sorted(v["figures"].values()) == sorted(names)
    for name in names:
        png = run / "report" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"src='{name}'" in text
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing fetched from elsewhere


def test_numbers_equal_those_from_the_catalog(fabricated):
    run, f, page = fabricated
    v = json.loads((run / "report" / "validation.json").read_text())
    t = f["truth"]
    ref = {"teff": t["teff"], "feh": t["feh"], "logg": t["logg"], "extinction": t["e"], "parallax": t["parallax"]}
    ref = {k: np.asarray(x, np.float32).astype(np.float64) for k, x in ref.items()}
    exp = _expected(f, ref, {k: 0.0 for k in ref})
    stats = _page_stats(page.read_text())
    assert v["reference"] == "truth" and v["n_stars"] == N
    for p, e in exp.items():
        for k in ("robust_sigma", "bias", "pull_robust_sigma", "pull_median"):
            assert v[p][k] == pytest.approx(e[k], rel=1e-5, abs=1e-9), (p, k)
        assert v[p]["n"] == e["n"]
        assert stats[p] == [format_number(v[p][k]) for k in ("robust_sigma", "bias", "pull_robust_sigma", "pull_median")] + [
            str(e["n"])]
    assert v["basic_cut_fraction"] == pytest.approx(np.mean(f["qf"] < 8))
    assert v["strict_cut_fraction"] == pytest.approx(np.mean(f["qf"] == 0))
    rl, rt = f["r_learned"] / f["r_learned"][0], f["r_true"] / f["r_true"][0]
    # over the XP samples (392..992 nm) only, as issue 5's criterion
    assert v["extinction_curve_max_rel_dev"] == pytest.approx(np.max(np.abs(rl - rt)[:61] / rt[:61]), rel=1e-4)
    assert v["extinction_curve_max_rel_dev"] < np.max(np.abs(rl - rt) / rt)
    # against the XP curve of XP-Extinction-Toolkit and CCM89 R_V = 3.1, normalised the same way
    import astropy.units as u
    from dust_extinction.parameter_averages import CCM89

    ccm = np.asarray(CCM89(Rv=3.1)(WL[:61] * u.nm), float)
    rc = ccm / ccm[0]
    assert v["extinction_curve_max_rel_dev_ccm89_rv31"] == pytest.approx(np.max(np.abs(rl[:61] - rc) / rc), rel=1e-4)
    xp = np.genfromtxt(R_FILES / "data" / "xp_extinction_curve.csv", delimiter=",", names=True, dtype=None,
                       encoding="utf-8")["a_over_a550"][:61]
    rx = xp / xp[0]
    assert v["extinction_curve_max_rel_dev_xp_toolkit"] == pytest.approx(np.max(np.abs(rl[:61] - rx) / rx), rel=1e-4)
    comp = v["extinction_curve_comparison"]
    assert comp["truth"]["max_rel_dev"] == v["extinction_curve_max_rel_dev"]
    assert comp["xp_extinction_toolkit"]["max_rel_dev"] == v["extinction_curve_max_rel_dev_xp_toolkit"]
    assert comp["range_nm"] == [392.0, 992.0]
    # Fig. 7 against the truth: every converged star with chi2/61 <= 5 (the truth's parallax has no error)
    used7 = (f["status"] == 0) & (f["chi2"].astype(np.float64) / 61 <= 5)
    assert v["binned_residuals"]["reference"] == "truth"
    assert v["binned_residuals"]["fig7"]["teff"]["n_total"] == int(used7.sum())
    assert v["auc_teff"] == 0.91 and v["auc_feh"] == 0.88 and v["auc_logg"] == 0.87
    # Table 3
    b = f["qf"] < 8
    c = f["conf"] > 0.5
    cuts = v["cuts"]
    assert cuts["Basic cut"]["stars"] == int(b.sum())
    assert cuts["Basic cut + Confident in Teff"]["stars"] == int((b & c[:, 0]).sum())
    assert cuts["Basic cut + Confident in (Teff, [Fe/H], logg)"]["stars"] == int((b & c.all(axis=1)).sum())
    text = page.read_text()
    assert f"<td>Basic cut</td><td>{int(b.sum())}</td>" in text
    assert "12.5 s" in text and "7.0 s" in text  # timings from the run state
    assert v["model_hash"] and v["model_hash"] in text
    # Fig. 10: held-out confident vs not-confident scatter
    d = np.load(run / "state" / "confidence_stars.npz")
    sel = d["used"] & d["holdout"]
    for j, p in enumerate(("teff", "feh", "logg")):
        res = d["est"][:, j] - d["ref"][:, j]
        good = sel & (d["confidence"][:, j] > 0.5)
        assert v["confidence_scatter"][p]["confident"] == pytest.approx(_rsig(res[good]))
        assert v["confidence_scatter"][p]["n_not_confident"] == int((sel & ~(d["confidence"][:, j] > 0.5)).sum())


def test_hats_catalog_and_labels_reference(fabricated, tmp_path):
    run0, f, _ = fabricated
    run = tmp_path / "run"
    shutil.copytree(run0, run, ignore=shutil.ignore_patterns("report"))
    # the final HATS layout instead of fitted/
    ds = run / "catalog" / "dataset" / "Norder=0" / "Dir=0"
    ds.mkdir(parents=True)
    for i, p in enumerate(sorted((run / "fitted").glob("*.parquet"))):
        shutil.move(p, ds / f"Npix={i}.parquet")
    shutil.rmtree(run / "fitted")
    shutil.rmtree(run / "truth")
    rng = np.random.default_rng(9)
    t = f["truth"]
    lab = {"source_id": f["sid"], "teff": t["teff"] + 50 * rng.standard_normal(N), "teff_error": np.full(N, 50.0),
           "feh": t["feh"], "feh_error": np.full(N, 0.05), "logg": t["logg"], "logg_error": np.full(N, 0.07),
           "label_source": ["lamost"] * N}
    for name, d, schema in (("labels", lab, LABELS),
                            ("reddening", {"source_id": f["sid"], "e": t["e"], "e_error": np.full(N, 0.03)}, REDDENING),
                            ("gaia_source", {"source_id": f["sid"], "ra": np.zeros(N), "dec": np.zeros(N),
                                             "parallax": f["gaia_plx"], "parallax_error": np.full(N, 0.05)},
                             GAIA_SOURCE)):
        (run / "raw" / name).mkdir(parents=True)
        pq.write_table(_conform(d, schema), run / "raw" / name / "part-0.parquet")
    page = R.write_report(run)
    v = json.loads((run / "report" / "validation.json").read_text())
    assert v["reference"] == "labels" and v["n_stars"] == N
    assert v["extinction_curve_max_rel_dev"] is None  # no truth law to compare with
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731
    ref = {"teff": f32(lab["teff"]), "feh": f32(lab["feh"]), "logg": f32(lab["logg"]), "extinction": f32(t["e"]),
           "parallax": f32(f["gaia_plx"])}
    ref_err = {"teff": 50.0, "feh": f32(0.05), "logg": f32(0.07), "extinction": f32(0.03), "parallax": f32(0.05)}
    exp = _expected(f, ref, ref_err)
    for p, e in exp.items():
        assert v[p]["pull_robust_sigma"] == pytest.approx(e["pull_robust_sigma"], rel=1e-5), p
        assert v[p]["robust_sigma"] == pytest.approx(e["robust_sigma"], rel=1e-5), p
    assert "catalog (2 files)" in page.read_text()


def test_no_catalog_names_the_missing_stage(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(StageError, match=r"no catalog.*infer"):
        R.write_report(tmp_path)


def test_report_does_not_need_latex_after_gaiaxpy_import():
    """GaiaXPy's plotter switches matplotlib to LaTeX at import; figures must still render without it."""
    import matplotlib

    matplotlib.rcParams["text.usetex"] = True  # what `import gaiaxpy` does
    from xpcat.production.report.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.set_xlabel(r"$T_{\rm eff}$ [K]")
    import io

    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def test_page_escapes_values():
    """Values reach the page HTML-escaped (the template autoescapes)."""
    validation = {p: {"robust_sigma": 1.0, "bias": float("nan"), "pull_robust_sigma": 1.0, "pull_median": 0.0, "n": 3}
                  for p in ("teff", "feh", "logg", "extinction", "parallax")}
    validation.update(reference="<truth>", **{k: None for k in R.SUMMARY_KEYS})
    empty = {"bin_edges": [0.0, 1.0], "n": [0], "median": [None], "robust_sigma": [None]}
    validation["binned_residuals"] = {"selections": SELECTIONS, "min_bin_stars": 5,
                                      "fig7": {p: empty for p in ("teff", "feh", "logg", "extinction", "parallax")}}
    validation["extinction_curve_comparison"] = {k: {"curve": f"<{k}>", "max_rel_dev": None}
                                                 for k in ("xp_extinction_toolkit", "ccm89_rv3.1", "truth")}
    validation["error_calibration"] = {
        "statement": "<b>not calibrated</b>", "uncertainty_statement": "paper & Fisher", "band": [0.85, 1.2],
        "selection": "basic", "stars": 3, "reference": "truth", "parameters": ["teff"],
        "teff": {"pull_sigma": 2.0, "calibrated": False, "n": 3}, "bins": {}, "bin_values": {},
        "bins_statement": "<bins> & more"}
    validation["catastrophic_failures"] = {"definition": "|Teff| > 500 K", "reference": "truth", "selection": "all",
                                           "statements": ["<i>x</i>"], "thresholds": {"teff": 500, "logg": 0.5,
                                                                                      "feh": 0.5}, "cuts": {}}
    validation["confidence_status"] = {"any_fallback": True, "all_fallback": True, "all_trained": False, "statements": ["<why>"]}
    validation["confidence_scatter"] = {}
    figures = {k: f"{k}.png" for k in ("kiel", "residuals", "residuals_normalised", "pulls", "flux_residuals",
                                       "extinction_curve", "sky", "confidence", "residuals_fig7", "residuals_fig16")}
    text = R.render_page(validation, [("a & b", 1, 0.5)], [("run directory", "/runs/<x>")], figures)
    assert "Validation against &lt;truth&gt;" in text
    assert "<td>a &amp; b</td><td>1</td><td>0.5</td>" in text
    assert "<td>/runs/&lt;x&gt;</td>" in text
    assert "<td>teff</td><td>1</td><td>n/a</td>" in text
    assert "<td>&lt;ccm89_rv3.1&gt;</td><td>n/a</td>" in text
    assert "&lt;b&gt;not calibrated&lt;/b&gt;" in text and "paper &amp; Fisher" in text
    assert "&lt;bins&gt; &amp; more" in text
    assert "<li>&lt;i&gt;x&lt;/i&gt;</li>" in text and "<li>&lt;why&gt;</li>" in text

"""``xpcat report RUN_DIR``: the validation page an astronomer would otherwise make by hand.

Writes ``RUN_DIR/report/index.html`` (self-contained: inline CSS, PNG figures
beside it) and ``RUN_DIR/report/validation.json``:

- Kiel diagram coloured by count;
- residuals against the truth table (synthetic universes) or the labels
  (LAMOST-like labels, the reddening table, Gaia parallaxes), raw and
  normalised (as the paper's Figs. 7-8), with the robust sigma and bias;
- normalised flux residuals against wavelength (Fig. 9);
- the learned extinction curve R(lambda) against CCM89 for R_V = 2.8, 3.1, 3.4
  (and the truth law when known);
- the sky map of the median E;
- Table 3: stars passing each cut;
- pull distributions;
- run facts: stars, partitions, model hash, timings.

Statistics: ``robust_sigma`` = 1.4826 x the median absolute deviation from the
median, ``bias`` = the median residual (estimate - reference; Teff in K);
pulls are residual / sqrt(err_est^2 + err_ref^2) (err_ref = 0 for a truth).
They use the stars that pass the basic cut (quality_flags < 8), converged, and
have finite estimates, errors and reference values.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xpcat.catalog_schema import CATALOG, PARAM_NAMES, read_metadata
from xpcat.catalog_schema.conditioned import N_XP
from xpcat.catalog_schema.flags import BASIC_CUT_MAX, CONFIDENCE_THRESHOLD
from xpcat.config import read_run_config
from xpcat.errors import InputError, StageError

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_DIR",
    "VALIDATION_FILE",
    "ReportData",
    "robust_sigma",
    "load_catalog",
    "load_reference",
    "validation_numbers",
    "cut_counts",
    "write_report",
]

REPORT_DIR = "report"
VALIDATION_FILE = "validation.json"
#: Teff is reported in K in the report (the catalog stores kK).
_SCALE = {"teff": 1000.0, "feh": 1.0, "logg": 1.0, "extinction": 1.0, "parallax": 1.0}
_LABEL = {"teff": "Teff [K]", "feh": "[Fe/H] [dex]", "logg": "logg [dex]", "extinction": "E [mag]",
          "parallax": "parallax [mas]"}
_CAT_COLUMNS = ["gdr3_source_id", "ra", "dec", "stellar_params_est", "stellar_params_err", "chi2_opt", "ln_prior",
                "teff_confidence", "feh_confidence", "logg_confidence", "quality_flags", "fit_status"]
#: Most stars drawn for the per-star flux residual figure.
_MAX_FLUX_STARS = 20000


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 x median(|x - median(x)|) of the finite values (NaN when there are none)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def _median(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


# --------------------------------------------------------------------------- inputs


def _catalog_files(run_dir: Path) -> tuple[list[Path], str]:
    fitted = sorted((run_dir / "fitted").glob("*.parquet"))
    if fitted:
        return fitted, "fitted"
    cat = run_dir / "catalog"
    files = sorted(p for p in cat.glob("**/*.parquet") if not p.name.startswith("_") and "Norder=" in str(p))
    if not files:
        files = sorted(p for p in (cat / "dataset").glob("**/*.parquet") if not p.name.startswith("_"))
    return files, "catalog"


def load_catalog(run_dir: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The run's catalog rows (``fitted/*.parquet``, else the HATS catalog in ``catalog/``).

    Returns
    -------
    table : pyarrow Table with the catalog columns the report uses, sorted by source_id.
    info : ``{"source": "fitted" | "catalog", "files": n, "model_hash": str | None}``.

    Raises
    ------
    StageError
        When the run directory holds no catalog (names the stage to run).
    InputError
        When a catalog file cannot be read or lacks a column.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StageError(f"run directory {run_dir} does not exist")
    files, source = _catalog_files(run_dir)
    if not files:
        raise StageError(
            f"no catalog in {run_dir}: neither fitted/*.parquet nor a catalog/ exists; "
            f"run the inference stage first (`xpcat infer {run_dir}` or `xpcat run {run_dir}`)"
        )
    tables, hashes = [], set()
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            meta = read_metadata(pf.schema_arrow)
            t = pf.read(columns=_CAT_COLUMNS)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"catalog file {f} cannot be read ({err})") from err
        except KeyError as err:
            raise InputError(f"catalog file {f} lacks column {err}") from err
        if meta.get("model_hash"):
            hashes.add(str(meta["model_hash"]))
        tables.append(t.select(_CAT_COLUMNS).cast(pa.schema([CATALOG.field(c) for c in _CAT_COLUMNS])))
    table = pa.concat_tables(tables).sort_by("gdr3_source_id")
    return table, {"source": source, "files": len(files), "model_hashes": sorted(hashes)}


def _read_dir(path: Path, columns: list[str]) -> pa.Table | None:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else ([path] if path.is_file() else [])
    if not files:
        return None
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=columns))
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"{f} cannot be read ({err})") from err
        except KeyError as err:
            raise InputError(f"{f} lacks column {err}") from err
    return pa.concat_tables(tables, promote_options="permissive")


def _align(sid: np.ndarray, table: pa.Table | None, key: str, cols: dict[str, str]) -> dict[str, np.ndarray]:
    """Columns of ``table`` aligned to ``sid`` (NaN where the star is absent)."""
    out = {name: np.full(sid.shape, np.nan) for name in cols}
    if table is None or table.num_rows == 0:
        return out
    tsid = table.column(key).to_numpy()
    order = np.argsort(tsid, kind="stable")
    tsid = tsid[order]
    pos = np.clip(np.searchsorted(tsid, sid), 0, max(tsid.size - 1, 0))
    hit = tsid[pos] == sid
    for name, col in cols.items():
        v = np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=np.float64)[order]
        out[name][hit] = v[pos[hit]]
    return out


def load_reference(run_dir: Path, sid: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    """Reference values and errors for the catalog stars, in catalog units except Teff in K.

    The truth table when the run has one (errors 0), else the labels (Teff,
    [Fe/H], logg), the reddening table (E) and the Gaia parallaxes.

    Returns
    -------
    ref : dict ``<param>`` and ``<param>_error`` (n,) for the 5 parameters
        (NaN where unknown), plus ``r_v`` (truth only).
    kind : ``"truth"`` or ``"labels"``.
    """
    run_dir = Path(run_dir)
    truth_path = run_dir / "truth" / "truth.parquet"
    if truth_path.is_file():
        t = _read_dir(truth_path, ["source_id", "teff", "feh", "logg", "e", "parallax", "r_v"])
        ref = _align(sid, t, "source_id", {"teff": "teff", "feh": "feh", "logg": "logg", "extinction": "e",
                                           "parallax": "parallax", "r_v": "r_v"})
        for p in PARAM_NAMES:
            ref[f"{p}_error"] = np.where(np.isfinite(ref[p]), 0.0, np.nan)
        return ref, "truth"
    cfg = read_run_config(run_dir)
    raw = Path(cfg.data.raw_dir)
    raw = raw if raw.is_absolute() else run_dir / raw
    lab_path = Path(cfg.data.labels) if cfg.data.labels else raw / "labels"
    red_path = Path(cfg.data.reddening) if cfg.data.reddening else raw / "reddening"
    lab_path = lab_path if lab_path.is_absolute() else run_dir / lab_path
    red_path = red_path if red_path.is_absolute() else run_dir / red_path
    ref = _align(sid, _read_dir(lab_path, ["source_id", "teff", "teff_error", "feh", "feh_error", "logg",
                                           "logg_error"]), "source_id",
                 {"teff": "teff", "teff_error": "teff_error", "feh": "feh", "feh_error": "feh_error",
                  "logg": "logg", "logg_error": "logg_error"})
    ref.update(_align(sid, _read_dir(red_path, ["source_id", "e", "e_error"]), "source_id",
                      {"extinction": "e", "extinction_error": "e_error"}))
    ref.update(_align(sid, _read_dir(raw / "gaia_source", ["source_id", "parallax", "parallax_error"]), "source_id",
                      {"parallax": "parallax", "parallax_error": "parallax_error"}))
    return ref, "labels"


@dataclass
class ReportData:
    """Everything the report computes from, as numpy arrays (n catalog rows).

    est, err : (n, 5) in report units (Teff K, [Fe/H], logg, E mag, plx mas).
    """

    source_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    est: np.ndarray
    err: np.ndarray
    chi2: np.ndarray
    ln_prior: np.ndarray
    confidence: np.ndarray
    quality_flags: np.ndarray
    fit_status: np.ndarray
    ref: dict[str, np.ndarray]
    ref_kind: str

    @classmethod
    def from_table(cls, table: pa.Table, ref: dict[str, np.ndarray], ref_kind: str) -> ReportData:
        """Numpy views of a catalog table (Teff converted to K)."""
        n = table.num_rows
        scale = np.array([_SCALE[p] for p in PARAM_NAMES])

        def lst(name: str) -> np.ndarray:
            col = table.column(name).combine_chunks()
            vals = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).reshape(n, 5)
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            return np.where(valid[:, None], vals, np.nan)

        def num(name: str) -> np.ndarray:
            return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

        return cls(
            source_id=table.column("gdr3_source_id").to_numpy(),
            ra=num("ra"), dec=num("dec"), est=lst("stellar_params_est") * scale, err=lst("stellar_params_err") * scale,
            chi2=num("chi2_opt"), ln_prior=num("ln_prior"),
            confidence=np.column_stack([num("teff_confidence"), num("feh_confidence"), num("logg_confidence")]),
            quality_flags=table.column("quality_flags").to_numpy().astype(np.uint8),
            fit_status=table.column("fit_status").to_numpy().astype(np.uint8),
            ref=ref, ref_kind=ref_kind,
        )

    @property
    def basic(self) -> np.ndarray:
        """(n,) bool: passes the basic cut."""
        return self.quality_flags < BASIC_CUT_MAX

    def residuals(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(residual, pull, used) of parameter j for every row; ``used`` = rows entering the statistics."""
        p = PARAM_NAMES[j]
        res = self.est[:, j] - self.ref[p]
        with np.errstate(invalid="ignore", divide="ignore"):
            pull = res / np.sqrt(self.err[:, j] ** 2 + self.ref[f"{p}_error"] ** 2)
        used = self.basic & (self.fit_status == 0) & np.isfinite(res) & np.isfinite(pull)
        return res, pull, used


def validation_numbers(data: ReportData) -> dict[str, Any]:
    """The per-parameter statistics of validation.json (without AUCs and run facts)."""
    out: dict[str, Any] = {"reference": data.ref_kind, "n_stars": int(data.source_id.size)}
    for j, p in enumerate(PARAM_NAMES):
        res, pull, used = data.residuals(j)
        out[p] = {
            "robust_sigma": robust_sigma(res[used]),
            "bias": _median(res[used]),
            "pull_robust_sigma": robust_sigma(pull[used]),
            "pull_median": _median(pull[used]),
            "n": int(used.sum()),
        }
    n = max(int(data.source_id.size), 1)
    out["basic_cut_fraction"] = float(np.sum(data.basic)) / n
    out["strict_cut_fraction"] = float(np.sum(data.quality_flags == 0)) / n
    return out


def cut_counts(data: ReportData) -> list[tuple[str, int, float]]:
    """Table 3: (cut, count, fraction) rows."""
    n = int(data.source_id.size)
    conf = data.confidence > CONFIDENCE_THRESHOLD
    b = data.basic
    rows = [
        ("all stars", n),
        ("Basic cut", int(b.sum())),
        ("Basic cut + Confident in Teff", int((b & conf[:, 0]).sum())),
        ("Basic cut + Confident in logg", int((b & conf[:, 2]).sum())),
        ("Basic cut + Confident in [Fe/H]", int((b & conf[:, 1]).sum())),
        ("Basic cut + Confident in (Teff, [Fe/H], logg)", int((b & conf.all(axis=1)).sum())),
        ("quality_flags == 0 (strict)", int((data.quality_flags == 0).sum())),
    ]
    return [(name, c, c / max(n, 1)) for name, c in rows]


# --------------------------------------------------------------------------- model-dependent parts


def _load_model(run_dir: Path) -> Any | None:
    from xpcat.model.artifact import artifact_exists, load_artifact

    mdir = run_dir / "model"
    if not artifact_exists(mdir):
        return None
    return load_artifact(mdir)


def _truth_R(wavelengths_nm: np.ndarray, r_v: float) -> np.ndarray:
    """The truth law's R per unit E at the model's wavelengths (ln-flux units, as the learned R)."""
    from xpcat.production.synthetic.truth_sed import a_over_e, extinction_coefficients

    a, b = extinction_coefficients(wavelengths_nm)
    return 0.4 * np.log(10.0) * a_over_e(a, b, r_v)


def extinction_curve_deviation(learned: np.ndarray, truth: np.ndarray) -> float:
    """Largest relative deviation of the learned extinction curve from the truth law over 392-992 nm.

    Parameters
    ----------
    learned, truth : (66,) or (61,) arrays
        R per unit E (ln-flux units) at the model's samples; only the first
        ``N_XP`` = 61 (the XP samples, 392..992 nm in 10 nm steps) are compared,
        as issue 5's criterion: the 2MASS/unWISE bands carry little of the
        extinction signal and their R is a small number whose relative error is
        not a statement about the curve's shape.

    Returns
    -------
    float
        max |r_l - r_t| / r_t with r = R / R(392 nm) (sample 0).
    """
    rl = np.asarray(learned, float)[:N_XP] / float(learned[0])
    rt = np.asarray(truth, float)[:N_XP] / float(truth[0])
    return float(np.max(np.abs(rl - rt) / np.abs(rt)))


def _flux_residuals(run_dir: Path, artifact: Any, data: ReportData) -> np.ndarray | None:
    """(m, 66) normalised flux residuals (f_pred - f_obs) / s_f of basic-cut stars (None without inputs)."""
    import jax
    import jax.numpy as jnp

    files = sorted((run_dir / "conditioned").glob("*.parquet"))
    if artifact is None or not files:
        return None
    ok = data.basic & np.all(np.isfinite(data.est), axis=1) & (data.est[:, 3] > 0) & (data.est[:, 4] > 0)
    idx = np.flatnonzero(ok)
    if idx.size > _MAX_FLUX_STARS:
        idx = np.sort(np.random.default_rng(0).choice(idx, _MAX_FLUX_STARS, replace=False))
    want = data.source_id[idx]
    cond_sid, flux, ferr = [], [], []
    for f in files:
        t = pq.read_table(f, columns=["source_id", "flux", "flux_error"])
        sid = t.column("source_id").to_numpy()
        m = np.isin(sid, want)
        if not m.any():
            continue
        t = t.filter(pa.array(m))
        n = t.num_rows
        cond_sid.append(sid[m])
        for acc, c in ((flux, "flux"), (ferr, "flux_error")):
            acc.append(np.asarray(t.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                  dtype=np.float64).reshape(n, -1))
    if not cond_sid:
        return None
    csid = np.concatenate(cond_sid)
    order = np.argsort(csid)
    csid, fl, fe = csid[order], np.concatenate(flux)[order], np.concatenate(ferr)[order]
    pos = np.searchsorted(want, csid)
    rows = idx[pos]
    model = artifact.forward_model(np.float32)
    theta = jnp.asarray(data.est[rows, :3], dtype=jnp.float32)
    ln_plx = jnp.asarray(np.log(data.est[rows, 4]), dtype=jnp.float32)
    ln_e = jnp.asarray(np.log(data.est[rows, 3]), dtype=jnp.float32)
    pred = np.asarray(jax.jit(jax.vmap(model.predict_flux))(theta, ln_plx, ln_e), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (pred - fl) / fe
    z[~(np.isfinite(fe) & (fe > 0) & np.isfinite(fl))] = np.nan
    return z


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # GaiaXPy's plotter sets text.usetex = True at import; the report must not need LaTeX
    plt.rcParams["text.usetex"] = False
    return plt


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path.name


def _fig_kiel(data: ReportData, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ok = data.basic & np.isfinite(data.est[:, 0]) & np.isfinite(data.est[:, 2])
    if ok.any():
        from matplotlib.colors import LogNorm

        h = ax.hist2d(data.est[ok, 0], data.est[ok, 2], bins=60, cmap="viridis", norm=LogNorm(), cmin=1)
        fig.colorbar(h[3], ax=ax, label="stars per pixel")
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel("Teff [K]")
    ax.set_ylabel("logg [dex]")
    ax.set_title(f"Kiel diagram ({int(ok.sum())} stars, basic cut)")
    return _save(fig, out / "kiel.png")


def _percentile_lines(ax: Any, x: np.ndarray, y: np.ndarray, bins: np.ndarray) -> None:
    centers, lines = [], []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (x >= lo) & (x < hi)
        if m.sum() >= 5:
            centers.append(0.5 * (lo + hi))
            lines.append(np.percentile(y[m], [15, 50, 84]))
    if centers:
        lines_a = np.array(lines)
        for k, style in enumerate(("--", "-", "--")):
            ax.plot(centers, lines_a[:, k], style, color="gold", lw=1.2)


def _fig_residuals(data: ReportData, stats: dict, out: Path, normalised: bool) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for j, (p, ax) in enumerate(zip(PARAM_NAMES, axes)):
        res, pull, used = data.residuals(j)
        y = pull if normalised else res
        x = data.ref[p]
        if used.sum() > 1:
            lo, hi = np.percentile(y[used], [1, 99])
            span = max(hi - lo, 1e-9)
            ax.hist2d(x[used], np.clip(y[used], lo - 0.2 * span, hi + 0.2 * span), bins=40, cmap="Blues", cmin=1)
            _percentile_lines(ax, x[used], y[used], np.linspace(np.min(x[used]), np.max(x[used]) + 1e-12, 12))
        ax.axhline(0, color="k", lw=0.6)
        s = stats[p]
        sig, bias = (s["pull_robust_sigma"], s["pull_median"]) if normalised else (s["robust_sigma"], s["bias"])
        ax.set_title(f"{p}: sigma={_fmt(sig)} bias={_fmt(bias)}", fontsize=9)
        ax.set_xlabel(f"reference {_LABEL[p]}")
        ax.set_ylabel("pull" if normalised else f"estimate - reference")
    fig.suptitle(("normalised " if normalised else "") + f"residuals vs {data.ref_kind} (basic cut)")
    return _save(fig, out / ("residuals_normalised.png" if normalised else "residuals.png"))


def _fig_pulls(data: ReportData, stats: dict, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    grid = np.linspace(-5, 5, 201)
    for j, (p, ax) in enumerate(zip(PARAM_NAMES, axes)):
        _, pull, used = data.residuals(j)
        if used.any():
            ax.hist(np.clip(pull[used], -5, 5), bins=50, range=(-5, 5), density=True, color="C0", alpha=0.7)
        ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "k-", lw=1, label="N(0, 1)")
        ax.set_title(f"{p}: median={_fmt(stats[p]['pull_median'])} sigma={_fmt(stats[p]['pull_robust_sigma'])}",
                     fontsize=9)
        ax.set_xlabel("pull")
    axes[0].legend(fontsize=8)
    return _save(fig, out / "pulls.png")


def _fig_flux_residuals(z: np.ndarray | None, wavelengths: np.ndarray | None, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    if z is not None and wavelengths is not None and np.isfinite(z).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanpercentile(z, [15, 50, 84], axis=0)
        idx = np.arange(z.shape[1])
        ax.fill_between(idx, q[0], q[2], color="C0", alpha=0.3, label="15-84 %")
        ax.plot(idx, q[1], "C0-", label="median")
        ticks = idx[::6].tolist() + [61, 62, 63, 64, 65]
        labels = [f"{wavelengths[i]:.0f}" for i in idx[::6]] + ["J", "H", "Ks", "W1", "W2"]
        ax.set_xticks(sorted(set(ticks)))
        ax.set_xticklabels([labels[ticks.index(t)] for t in sorted(set(ticks))], rotation=60, fontsize=7)
        ax.legend(fontsize=8)
        ax.set_title(f"normalised flux residuals (f_pred - f_obs) / s_f, {z.shape[0]} stars (basic cut)")
    else:
        ax.text(0.5, 0.5, "no conditioned partitions or model artifact: flux residuals unavailable",
                ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("wavelength [nm] / band")
    ax.set_ylabel("Delta f / sigma")
    return _save(fig, out / "flux_residuals.png")


def _fig_extinction(R: np.ndarray | None, wavelengths: np.ndarray | None, R_truth: np.ndarray | None, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if R is not None and wavelengths is not None:
        import astropy.units as u
        from dust_extinction.parameter_averages import CCM89

        wl = np.asarray(wavelengths, float)
        iv = int(np.argmin(np.abs(wl - 550.0)))  # normalise near V
        ax.plot(wl / 1000, R / R[iv], "ko-", ms=3, label=f"learned R / R({wl[iv]:.0f} nm)")
        ok = (1000.0 / wl >= CCM89.x_range[0]) & (1000.0 / wl <= CCM89.x_range[1])
        for rv in (2.8, 3.1, 3.4):
            law = np.asarray(CCM89(Rv=rv)(wl[ok] * u.nm), float)
            ax.plot(wl[ok] / 1000, law / np.asarray(CCM89(Rv=rv)(wl[iv] * u.nm), float), "-", lw=1,
                    label=f"CCM89 R_V = {rv}")
        if R_truth is not None:
            ax.plot(wl / 1000, R_truth / R_truth[iv], "r--", lw=1, label="truth law")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no model artifact", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("wavelength [um]")
    ax.set_ylabel("A(lambda) / A(550 nm)")
    ax.set_title("extinction curve")
    return _save(fig, out / "extinction_curve.png")


def _fig_sky(data: ReportData, out: Path) -> str:
    plt = _plt()
    from astropy.coordinates import SkyCoord
    import astropy.units as u
    from scipy.stats import binned_statistic_2d

    ok = data.basic & np.isfinite(data.est[:, 3])
    fig = plt.figure(figsize=(9, 4.8))
    ax = fig.add_subplot(111, projection="mollweide")
    if ok.any():
        g = SkyCoord(ra=data.ra[ok] * u.deg, dec=data.dec[ok] * u.deg, frame="icrs").galactic
        lon = -np.radians(((g.l.deg + 180.0) % 360.0) - 180.0)  # astronomical convention: l grows to the left
        lat = np.radians(g.b.deg)
        nb = int(np.clip(np.sqrt(ok.sum() / 4), 8, 180))
        xe = np.linspace(-np.pi, np.pi, 2 * nb + 1)
        ye = np.linspace(-np.pi / 2, np.pi / 2, nb + 1)
        stat, _, _, _ = binned_statistic_2d(lon, lat, data.est[ok, 3], statistic="median", bins=[xe, ye])
        mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(stat.T), cmap="magma_r", shading="flat")
        fig.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, label="median E [mag]")
    ax.grid(True, alpha=0.3)
    ax.set_title("median E (Galactic coordinates, basic cut)")
    return _save(fig, out / "sky_median_e.png")


def _fig_confidence(run_dir: Path, out: Path) -> tuple[str, dict[str, Any]]:
    """Fig. 10: held-out residuals (estimate - label) of stars labelled confident vs not confident.

    Reads ``state/confidence_stars.npz`` written by ``xpcat train-confidence``.
    Returns the figure name and, per parameter, the robust sigma of each group.
    """
    plt = _plt()
    path = run_dir / "state" / "confidence_stars.npz"
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    scatter: dict[str, Any] = {}
    if path.is_file():
        d = np.load(path)
        sel = d["used"] & d["holdout"]
        for j, (p, ax) in enumerate(zip(("teff", "feh", "logg"), axes)):
            res = d["est"][:, j] - d["ref"][:, j]
            conf = d["confidence"][:, j] > CONFIDENCE_THRESHOLD
            good, bad = sel & conf & np.isfinite(res), sel & ~conf & np.isfinite(res)
            scatter[p] = {"confident": robust_sigma(res[good]), "not_confident": robust_sigma(res[bad]),
                          "n_confident": int(good.sum()), "n_not_confident": int(bad.sum())}
            ax.plot(d["ref"][good, j], res[good], ".", ms=3, color="C0", label=f"confident ({int(good.sum())})")
            ax.plot(d["ref"][bad, j], res[bad], ".", ms=3, color="C3", label=f"not confident ({int(bad.sum())})")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel(f"label {_LABEL[p]}")
            ax.set_ylabel("estimate - label")
            ax.set_title(f"{p}: sigma {_fmt(scatter[p]['confident'])} vs {_fmt(scatter[p]['not_confident'])}",
                         fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("held-out classifier stars (basic cut): confident vs not confident (as Fig. 10)")
    else:
        axes[1].text(0.5, 0.5, "no confidence training set (run `xpcat train-confidence`)", ha="center",
                     va="center", transform=axes[1].transAxes)
    return _save(fig, out / "confidence.png"), scatter


# --------------------------------------------------------------------------- page


def _fmt(x: Any) -> str:
    """The one number format of the page (and of the test that checks it)."""
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    return "n/a" if not np.isfinite(x) else f"{x:.4g}"


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _run_facts(run_dir: Path, cat_info: dict, artifact: Any, data: ReportData) -> list[tuple[str, str]]:
    facts = [
        ("run directory", str(run_dir.resolve())),
        ("stars in catalog", _fmt(int(data.source_id.size))),
        ("catalog read from", f"{cat_info['source']} ({cat_info['files']} files)"),
        ("partitions (conditioned)", _fmt(len(list((run_dir / "conditioned").glob("*.parquet"))))),
        ("partitions (fitted)", _fmt(len(list((run_dir / "fitted").glob("*.parquet"))))),
        ("model hash", artifact.content_hash if artifact is not None else "no model artifact"),
        ("reference", data.ref_kind),
    ]
    if cat_info.get("model_hashes"):
        facts.append(("model hash recorded in catalog", ", ".join(h[:16] for h in cat_info["model_hashes"])))
    state = run_dir / "state"
    for f in sorted(state.glob("*")) if state.is_dir() else []:
        if not f.is_file() or f.suffix not in (".json", ".done"):
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            for k in ("seconds", "wall_s", "elapsed_s"):
                if isinstance(doc.get(k), (int, float)):
                    facts.append((f"time: {f.name}", f"{float(doc[k]):.1f} s"))
            for st, sd in (doc.get("stages") or {}).items() if isinstance(doc.get("stages"), dict) else []:
                if isinstance(sd, dict) and isinstance(sd.get("seconds"), (int, float)):
                    facts.append((f"time: stage {st}", f"{float(sd['seconds']):.1f} s"))
    logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    if logs:
        facts.append(("logs", ", ".join(p.name for p in logs[-3:])))
    facts.append(("report written", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))
    return facts


_CSS = """body{font-family:sans-serif;max-width:1400px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
h2{border-bottom:1px solid #ccc;margin-top:1.5em}.note{color:#666;font-size:90%}"""


def _table(header: list[str], rows: list[list[str]], id_: str) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{id_}"><tr>{h}</tr>{body}</table>'


def _page(validation: dict, counts: list, facts: list, figs: dict[str, str]) -> str:
    stat_rows = [
        [p, _fmt(validation[p]["robust_sigma"]), _fmt(validation[p]["bias"]), _fmt(validation[p]["pull_robust_sigma"]),
         _fmt(validation[p]["pull_median"]), _fmt(validation[p]["n"])]
        for p in PARAM_NAMES
    ]
    more = [[k, _fmt(validation[k])] for k in ("n_stars", "basic_cut_fraction", "strict_cut_fraction",
                                                "extinction_curve_max_rel_dev", "auc_teff", "auc_feh", "auc_logg")]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>xpcat validation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>xpcat validation report</h1>",
        "<h2>Run facts</h2>", _table(["fact", "value"], [[a, b] for a, b in facts], "facts"),
        f"<h2>Validation against {html.escape(validation['reference'])}</h2>",
        "<p class='note'>Residual = estimate - reference (Teff in K). robust sigma = 1.4826 MAD, bias = median; "
        "pull = residual / sqrt(err_est^2 + err_ref^2). Stars passing the basic cut with a converged fit.</p>",
        _table(["parameter", "robust sigma", "bias", "pull robust sigma", "pull median", "stars"], stat_rows,
               "residual-stats"),
        _table(["quantity", "value"], more, "summary"),
        "<h2>Table 3: stars passing each cut</h2>",
        _table(["cut", "stars", "fraction"], [[c, _fmt(k), _fmt(f)] for c, k, f in counts], "cuts"),
    ]
    titles = {
        "kiel": "Kiel diagram", "residuals": "Residuals (as Fig. 7)",
        "residuals_normalised": "Normalised residuals (as Fig. 8)", "pulls": "Pull distributions",
        "flux_residuals": "Flux residuals vs wavelength (as Fig. 9)",
        "extinction_curve": "Learned R(lambda) vs CCM89 (R_V = 2.8, 3.1, 3.4)", "sky": "Sky map of median E",
        "confidence": "Confidence classifiers on held-out stars (as Fig. 10)",
    }
    for key, title in titles.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(figs[key])}' alt='{html.escape(title)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/report/index.html``, its PNG figures and ``validation.json``.

    Parameters
    ----------
    run_dir : Path
        A run directory with a catalog (``fitted/`` or ``catalog/``).

    Returns
    -------
    Path of ``index.html``.

    Raises
    ------
    StageError
        When the run has no catalog yet (names the stage to run).
    """
    run_dir = Path(run_dir)
    table, cat_info = load_catalog(run_dir)
    sid = table.column("gdr3_source_id").to_numpy()
    ref, kind = load_reference(run_dir, sid)
    data = ReportData.from_table(table, ref, kind)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    validation = validation_numbers(data)
    artifact = _load_model(run_dir)
    R = wl = R_truth = None
    if artifact is not None:
        from xpcat.model.forward import extinction_vector

        R = np.asarray(extinction_vector(artifact.params), dtype=np.float64)
        wl = np.asarray(artifact.wavelengths, dtype=np.float64)
        if kind == "truth" and np.isfinite(ref["r_v"]).any():
            R_truth = _truth_R(wl, float(np.nanmedian(ref["r_v"])))
    validation["extinction_curve_max_rel_dev"] = (
        extinction_curve_deviation(R, R_truth) if R is not None and R_truth is not None else None
    )
    conf_state = run_dir / "state" / "confidence.json"
    conf_doc: dict = {}
    if conf_state.is_file():
        conf_doc = json.loads(conf_state.read_text())
    elif artifact is not None:
        conf_doc = artifact.component_meta.get("confidence", {})
    for p in ("teff", "feh", "logg"):
        validation[f"auc_{p}"] = conf_doc.get(f"auc_{p}")
    counts = cut_counts(data)
    validation["cuts"] = {name: {"stars": c, "fraction": f} for name, c, f in counts}
    validation["model_hash"] = artifact.content_hash if artifact is not None else None

    figs = {
        "kiel": _fig_kiel(data, out),
        "residuals": _fig_residuals(data, validation, out, normalised=False),
        "residuals_normalised": _fig_residuals(data, validation, out, normalised=True),
        "pulls": _fig_pulls(data, validation, out),
        "flux_residuals": _fig_flux_residuals(_flux_residuals(run_dir, artifact, data), wl, out),
        "extinction_curve": _fig_extinction(R, wl, R_truth, out),
        "sky": _fig_sky(data, out),
    }
    figs["confidence"], validation["confidence_scatter"] = _fig_confidence(run_dir, out)
    validation["figures"] = figs
    facts = _run_facts(run_dir, cat_info, artifact, data)
    clean = _json_clean(validation)
    tmp = out / (VALIDATION_FILE + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1, sort_keys=True))
    os.replace(tmp, out / VALIDATION_FILE)
    page = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(_page(validation, counts, facts, figs))
    os.replace(tmp, page)
    logger.info("report written to %s", page)
    return page

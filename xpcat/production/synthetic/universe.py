"""The synthetic Gaia universe: raw tables as the archive and its partners serve them, plus truth.

``simulate_universe(out_dir, config)`` writes

- ``OUT/raw/<table>/part-0000.parquet`` for every table of
  :data:`xpcat.catalog_schema.raw.RAW_TABLES` (Gaia column names, units and
  array formats; XP correlations packed as the archive packs them);
- ``OUT/truth/truth.parquet`` (schema ``TRUTH``);
- ``OUT/universe.json``: seed, size, fractions, mean R_V, code version.

Pipeline (all vectorised, chunked over stars, one seeded generator per chunk):

1. :func:`~xpcat.production.synthetic.population.draw_population` draws
   parameters, sight lines, distances and E (dust integrated along the sight
   line); this module adds source_ids, binaries, outliers, missing bands and
   crowding (:func:`draw_universe`).
2. The truth SED on a fine grid (the physical model of
   :mod:`xpcat.production.synthetic.truth_sed` in the legacy universe, real XP
   shapes blended into it, :mod:`~xpcat.production.synthetic.truth_sed_empirical`,
   in the realistic one; ``universe.json``'s ``truth_sed``),
   plus the secondary for unresolved near-equal-mass binaries, is reddened with
   G23 at the star's R_V and scaled by parallax^2
   (:mod:`~xpcat.production.synthetic.observed_sed`).
3. The observation model (:mod:`~xpcat.production.synthetic.observe`):
   crowding light, the projection onto GaiaXPy's BP/RP bases (a fixed linear
   map), coefficient errors and correlations per star with noise drawn from
   exactly that covariance (:mod:`~xpcat.production.synthetic.noise`),
   corrupted spectra for outliers; G/BP/RP from GaiaXPy's Gaia_DR3_Vega
   synthetic photometry of the noiseless coefficients; parallaxes and
   astrometric quality; 2MASS, unWISE, labels and reddening
   (:mod:`~xpcat.production.synthetic.observe_partners`) from the SED at the
   SPEC §1 reference wavelengths.
4. Arrow tables in the raw schemas (:mod:`~xpcat.production.synthetic.raw_tables`),
   written chunk by chunk.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from xpcat import catalog_schema
from xpcat.catalog_schema import raw as raw_schema
from xpcat.config import SimulationConfig
from xpcat.errors import InputError
from xpcat.fileio import package_version, write_json_atomic
from xpcat.production.synthetic import truth_sed as truth_model
from xpcat.production.synthetic.observe import chunk_observables
from xpcat.production.synthetic.observed_sed import (
    abs_g_at_1kpc,
    extinction_terms,
    g_and_extinction_table,
    noiseless_fluxes,
)
from xpcat.production.synthetic.population import POPULATION_FRACTIONS, draw_population
from xpcat.production.synthetic.raw_tables import chunk_tables, truth_table
from xpcat.production.synthetic.selection import (
    density_weights,
    draw_selected_population,
)
from xpcat.production.synthetic.truth_sed_empirical import sed_for_universe

__all__ = [
    "CHUNK_SIZE",
    "companion_teff_logg",
    "draw_universe",
    "noiseless_fluxes",
    "simulate_universe",
    "source_ids",
]

logger = logging.getLogger(__name__)

#: Stars per chunk (fixed: the universe of a seed does not depend on memory).
CHUNK_SIZE = 5000


def source_ids(rng: np.random.Generator, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Gaia-like source_ids: HEALPix level-12 nested index << 35 plus a unique running number.

    Parameters
    ----------
    ra, dec : (n,) deg

    Returns
    -------
    (n,) int64, unique.
    """
    from hats.pixel_math.healpix_shim import radec2pix

    pix = np.asarray(radec2pix(12, ra, dec), dtype=np.int64)
    order = np.lexsort((rng.uniform(size=pix.size), pix))
    run = np.empty(pix.size, dtype=np.int64)
    sp = pix[order]
    first = np.r_[True, sp[1:] != sp[:-1]]
    grp_start = np.maximum.accumulate(np.where(first, np.arange(sp.size), 0))
    rank = np.arange(sp.size) - grp_start
    gaps = rng.integers(1, 2**20, sp.size)
    # increasing per pixel: cumulative gaps within the group, well below 2^35
    cum = np.cumsum(gaps)
    cum_start = cum[grp_start] - gaps[grp_start]
    run[order] = (cum - cum_start) + rank
    # Gaia's source_id layout (level-12 pixel above bit 35) is built here, where the ids are made;
    # readers get the pixel back with xpcat.production.partitions.partition_of.
    return (pix << 35) + run


def companion_teff_logg(teff: np.ndarray, logg: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teff [K] and logg [dex] of a main-sequence companion of mass ratio ``q`` (<= 1) to a primary (teff, logg).

    T ~ M^0.6 (floored at 3100 K) and g ~ M / R^2 with R ~ M^0.85 on the lower main sequence:
    logg2 = logg - 0.7 log10 q. Arrays broadcast; q = 1 returns the primary.
    """
    return np.maximum(teff * q**0.6, 3100.0), logg - 0.7 * np.log10(q)


def _exact_subset(rng: np.random.Generator, eligible: np.ndarray, fraction: float, n_total: int) -> np.ndarray:
    """Boolean mask choosing round(fraction * n_total) stars among ``eligible`` (fewer if not enough)."""
    idx = np.flatnonzero(eligible)
    k = min(idx.size, int(round(fraction * n_total)))
    mask = np.zeros(eligible.size, dtype=bool)
    if k:
        mask[rng.choice(idx, size=k, replace=False)] = True
    return mask


def draw_universe(config: SimulationConfig, proj: truth_model.ProjectionArrays) -> dict[str, np.ndarray]:
    """Everything that is drawn once for the whole universe: column name -> per-star array, sorted by source_id.

    The population's columns (:class:`~xpcat.production.synthetic.population.Population`)
    plus ``source_id``, ``theta`` (n, 3) Teff [K], [Fe/H], logg, ``parallax_true`` [mas],
    the binaries (``is_binary``, ``mass_ratio``, companion ``teff2`` [K], ``logg2``) and
    the flags ``is_outlier``, ``outlier_kind``, ``missing_bp``, ``missing_rp``,
    ``crowded``, ``no_tmass``, ``no_unwise``, each an exact fraction of ``config``.
    """
    seq = np.random.SeedSequence(config.seed)
    rng = np.random.default_rng(seq.spawn(1)[0])
    n = config.n_stars
    if config.universe == "legacy":
        pop = draw_population(
            rng,
            n,
            abs_g=abs_g_at_1kpc(proj),
            n_fields=config.n_fields,
            field_radius_deg=config.field_radius_deg,
            g_limit=config.g_limit,
            r_v_mean=config.r_v_mean,
            r_v_scatter=config.r_v_scatter,
        )
    else:
        pop = draw_selected_population(
            rng,
            n,
            g_and_extinction=g_and_extinction_table(proj, extinction_terms(proj), config.r_v_mean,
                                                    sed_for_universe(config.universe)),
            n_fields=config.n_fields,
            field_radius_deg=config.field_radius_deg,
            g_limit=config.g_limit,
            r_v_mean=config.r_v_mean,
            r_v_scatter=config.r_v_scatter,
            weights=config.population_weights,
        )
    sid = source_ids(rng, pop.ra, pop.dec)
    order = np.argsort(sid, kind="stable")
    u: dict[str, np.ndarray] = {k: np.asarray(v)[order] for k, v in asdict(pop).items()}
    u["source_id"] = sid[order]
    theta = np.stack([u["teff"], u["feh"], u["logg"]], axis=1)
    # unresolved near-equal-mass binaries: main-sequence primaries
    dwarf = (u["logg"] > 3.9) & (u["teff"] < 7000.0)
    u["is_binary"] = _exact_subset(rng, dwarf, config.binary_fraction, n)
    q = np.where(u["is_binary"], rng.uniform(0.7, 1.0, n), np.nan)
    u["mass_ratio"] = q
    q1 = np.where(u["is_binary"], q, 1.0)
    u["teff2"], u["logg2"] = companion_teff_logg(u["teff"], u["logg"], q1)
    # outliers (not binaries), missing bands (disjoint), crowding
    u["is_outlier"] = _exact_subset(rng, ~u["is_binary"], config.outlier_fraction, n)
    u["outlier_kind"] = rng.integers(0, 3, n)
    u["missing_bp"] = _exact_subset(rng, np.ones(n, bool), config.missing_bp_fraction, n)
    u["missing_rp"] = _exact_subset(rng, ~u["missing_bp"], config.missing_rp_fraction, n)
    u["crowded"] = _exact_subset(rng, np.ones(n, bool), config.crowded_fraction, n)
    u["no_tmass"] = _exact_subset(rng, np.ones(n, bool), config.missing_tmass_fraction, n)
    u["no_unwise"] = _exact_subset(rng, np.ones(n, bool), config.missing_unwise_fraction, n)
    u["parallax_true"] = 1000.0 / u["distance"]
    u["theta"] = theta
    return u


def simulate_universe(out_dir: Path, config: SimulationConfig) -> dict:
    """Write a synthetic Gaia universe under ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Created if absent. Gets ``raw/<table>/part-0000.parquet``,
        ``truth/truth.parquet`` and ``universe.json``.
    config : SimulationConfig
        Size, seed and the fractions of binaries, outliers, missing data, labels.

    Returns
    -------
    dict
        Summary: output paths, row counts per table, seed, size.

    Raises
    ------
    InputError
        When ``out_dir`` exists and is not a directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {out_dir} exists and is not a directory")
    logger.info("simulating %d stars, seed %d (%s universe)", config.n_stars, config.seed, config.universe)
    if config.universe != "legacy":
        density_weights(config.population_weights)  # unknown names: InputError before anything is drawn
    proj = truth_model.projection_arrays()
    ext = extinction_terms(proj)
    u = draw_universe(config, proj)  # zero or too few visible stars: InputError before any file is written
    n = config.n_stars
    seeds = np.random.SeedSequence([config.seed, 1]).spawn((n + CHUNK_SIZE - 1) // CHUNK_SIZE)
    paths = {name: out_dir / "raw" / name / "part-0000.parquet" for name in raw_schema.RAW_TABLES}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    rows = {name: 0 for name in paths}
    try:
        for ci, lo in enumerate(range(0, n, CHUNK_SIZE)):
            sl = slice(lo, min(n, lo + CHUNK_SIZE))
            stars = {k: v[sl] for k, v in u.items()}
            tables = chunk_tables(chunk_observables(np.random.default_rng(seeds[ci]), stars, proj, ext, config))
            for name, t in tables.items():
                if name not in writers:
                    writers[name] = pq.ParquetWriter(paths[name], raw_schema.RAW_TABLES[name])
                writers[name].write_table(t)
                rows[name] += t.num_rows
    finally:
        for w in writers.values():
            w.close()
    truth_path = out_dir / "truth" / "truth.parquet"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(truth_table(u), truth_path)
    info = {
        "seed": config.seed,
        "n_stars": n,
        "config": asdict(config),
        "universe": config.universe,
        "truth_sed": sed_for_universe(config.universe),
        "population_fractions": POPULATION_FRACTIONS if config.universe == "legacy"
        else {k: float(np.mean(u["population"] == k)) for k in POPULATION_FRACTIONS},
        "population_weights": density_weights(config.population_weights) if config.universe != "legacy" else None,
        "population_counts": {k: int(np.count_nonzero(u["population"] == k)) for k in POPULATION_FRACTIONS},
        "binary_fraction": float(np.mean(u["is_binary"])),
        "outlier_fraction": float(np.mean(u["is_outlier"])),
        "missing_bp_fraction": float(np.mean(u["missing_bp"])),
        "missing_rp_fraction": float(np.mean(u["missing_rp"])),
        "crowded_fraction": float(np.mean(u["crowded"])),
        "r_v_mean": config.r_v_mean,
        "r_v_scatter": config.r_v_scatter,
        "e_unit": "E(B-V) of the G23 law: A(lambda) = E R_V k(lambda; R_V)",
        "flux_unit_w_m2_nm": truth_model.FLUX_UNIT_W_M2_NM,
        "code_version": package_version("xpcat"),
        "schema_version": catalog_schema.SCHEMA_VERSION,
        "rows": rows,
    }
    write_json_atomic(out_dir / "universe.json", info, indent=2)
    logger.info("universe written to %s (%s)", out_dir, rows)
    return {"out_dir": str(out_dir), "n_stars": n, "seed": config.seed, "rows": rows,
            "truth": str(truth_path), "universe": str(out_dir / "universe.json")}

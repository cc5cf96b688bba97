"""A tiny universe for archive tests: real DR3 XP spectra, made-up gaia_source / 2MASS rows.

The XP rows are the real spectra of ``tests/data/gaiaxpy_reference`` and
astroquery's DataLink fixture, given new source_ids in a few HEALPix pixels
and scaled (exactly, by powers of two) so no two stars are alike.
"""

from __future__ import annotations

import glob
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from xpcat.catalog_schema.raw import GAIA_SOURCE, TMASS, XP_CONTINUOUS
from xpcat.production.ingest.formats import conform_rows
from xpcat.production.partitions import partition_shift

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "gaiaxpy_reference"
REFERENCE_CSVS = ("XP_CONTINUOUS_RAW_with_missing_BP.csv", "XP_CONTINUOUS_RAW_colour_eq_dr3int6.csv")
FIXTURE_ZIP_NAME = "gaia_dr3_source_id_5937083312263887616_dl_products_csv.zip"


def fixture_zip() -> Path:
    """astroquery's real DataLink products zip (shipped in the wheel)."""
    import astroquery

    hits = glob.glob(str(Path(astroquery.__file__).parent / "gaia" / "tests" / "data" / FIXTURE_ZIP_NAME))
    if not hits:
        raise FileNotFoundError(f"{FIXTURE_ZIP_NAME} not found in the installed astroquery")
    return Path(hits[0])


def read_text_csv(data: bytes | Path) -> pa.Table:
    """An archive CSV with every column read as text."""
    src = pa.BufferReader(data) if isinstance(data, bytes) else str(data)
    return pcsv.read_csv(src, convert_options=pcsv.ConvertOptions(
        column_types={n: pa.string() for n in XP_CONTINUOUS.names}, strings_can_be_null=True))


def fixture_xp_csv() -> bytes:
    with zipfile.ZipFile(fixture_zip()) as zf:
        name = next(n for n in zf.namelist() if n.startswith("XP_CONTINUOUS"))
        return zf.read(name)


def real_xp_rows() -> pa.Table:
    """The 7 distinct real XP rows (one of them RP-only), raw schema."""
    parts = [conform_rows(read_text_csv(REFERENCE / n), XP_CONTINUOUS)[0] for n in REFERENCE_CSVS]
    parts.append(conform_rows(read_text_csv(fixture_xp_csv()), XP_CONTINUOUS)[0])
    rows = pa.concat_tables(parts)
    _, first = np.unique(rows.column("source_id").to_numpy(), return_index=True)
    return rows.take(pa.array(np.sort(first)))


def make_universe(out_dir: Path, n_stars: int = 60, pixels: tuple[int, ...] = (5, 17, 100), level: int = 2,
                  seed: int = 0) -> dict[str, pa.Table]:
    """Write ``out_dir/raw/{gaia_source,tmass,xp_continuous_mean_spectrum}/part-0.parquet``.

    About 10% of the stars have ``has_xp_continuous`` False (no XP row), one
    star with XP flag True has no XP row, about 80% have a 2MASS row, some of
    which fail the Appendix A cuts.

    Returns
    -------
    dict of the three tables as written.
    """
    rng = np.random.default_rng(seed)
    shift = partition_shift(level)
    pix = rng.choice(np.asarray(pixels, dtype=np.int64), size=n_stars)
    offsets = rng.integers(0, 1 << shift, size=n_stars, dtype=np.int64)
    sid = np.unique((pix << shift) + offsets)
    n = len(sid)
    has_xp = rng.random(n) > 0.1
    has_xp[0] = True
    cols: dict[str, pa.Array] = {}
    for f in GAIA_SOURCE:
        t = f.type
        if pa.types.is_floating(t):
            vals = rng.normal(10.0, 3.0, n)
            mask = rng.random(n) < 0.1 if f.nullable and f.name not in ("ra", "dec") else None
            cols[f.name] = pa.array(vals.astype(t.to_pandas_dtype()), type=t, mask=mask)
        elif pa.types.is_integer(t):
            info = np.iinfo(t.to_pandas_dtype())
            vals = rng.integers(0, min(info.max, 10**9), n).astype(t.to_pandas_dtype())
            mask = rng.random(n) < 0.05 if f.nullable and f.name != "random_index" else None
            cols[f.name] = pa.array(vals, type=t, mask=mask)
        elif pa.types.is_boolean(t):
            cols[f.name] = pa.array(has_xp)
    cols["source_id"] = pa.array(sid)
    cols["ra"] = pa.array(rng.uniform(0, 360, n))
    cols["dec"] = pa.array(rng.uniform(-90, 90, n))
    gaia = pa.Table.from_arrays([cols[f.name] for f in GAIA_SOURCE], schema=GAIA_SOURCE)

    real = real_xp_rows()
    xp_sid = sid[has_xp][1:]  # the first XP star has no XP row: DataLink never returns it
    take = np.arange(len(xp_sid)) % real.num_rows
    xp = real.take(pa.array(take))
    scale = 2.0 ** rng.integers(-3, 4, len(xp_sid))
    arrays = []
    for f in XP_CONTINUOUS:
        col = xp.column(f.name).combine_chunks()
        if f.name == "source_id":
            col = pa.array(xp_sid)
        elif f.name.endswith("_coefficients") or f.name.endswith("_coefficient_errors"):
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
            factor = pa.array(np.repeat(scale, lengths))
            col = pa.ListArray.from_arrays(col.offsets, pc.multiply(col.values, factor), mask=col.is_null())
        arrays.append(col)
    xp = pa.Table.from_arrays(arrays, schema=XP_CONTINUOUS)

    tm_idx = np.flatnonzero(rng.random(n) < 0.8)
    m = len(tm_idx)
    quals = np.array(["AAA", "ABC", "BBA", "BBB", "CUU", "AUU", "UAU"])
    tcols: dict[str, pa.Array] = {
        "random_index": gaia.column("random_index").take(pa.array(tm_idx)).combine_chunks(),
        "source_id": pa.array(sid[tm_idx]),
        "ra": gaia.column("ra").take(pa.array(tm_idx)).combine_chunks(),
        "dec": gaia.column("dec").take(pa.array(tm_idx)).combine_chunks(),
        "designation": pa.array([f"{i:08d}+{j:07d}" for i, j in zip(rng.integers(0, 10**8, m), range(m))]),
        "tm_ra": pa.array(rng.uniform(0, 360, m)),
        "tm_dec": pa.array(rng.uniform(-90, 90, m)),
        "ph_qual": pa.array(quals[rng.integers(0, len(quals), m)]),
        "ext_key": pa.array(rng.integers(1, 1000, m).astype(np.int32), mask=rng.random(m) > 0.15),
        "gaia_tmass_angular_distance": pa.array(rng.uniform(0, 1, m).astype(np.float32)),
    }
    for band in ("j", "h", "ks"):
        tcols[f"{band}_m"] = pa.array(rng.normal(12, 1, m).astype(np.float32), mask=rng.random(m) < 0.05)
        tcols[f"{band}_msigcom"] = pa.array(rng.uniform(0.01, 0.1, m).astype(np.float32))
    tmass = pa.Table.from_arrays([tcols[f.name] for f in TMASS], schema=TMASS)

    tables = {"gaia_source": gaia, "tmass": tmass, "xp_continuous_mean_spectrum": xp}
    for name, table in tables.items():
        d = Path(out_dir) / "raw" / name
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, d / "part-0.parquet")
    return tables


def expected_fetch(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """What the Appendix A queries and DataLink must return from a universe."""
    gaia = tables["gaia_source"]
    xp_ids = gaia.filter(pc.field("has_xp_continuous")).column("source_id")
    g = gaia.filter(pc.field("has_xp_continuous")).sort_by("source_id")
    tm = tables["tmass"]
    q = tm.column("ph_qual")
    has_a = pc.or_(pc.or_(pc.match_like(q, "A__"), pc.match_like(q, "_A_")), pc.match_like(q, "__A"))
    tm = tm.filter(pc.and_(pc.and_(has_a, pc.is_null(tm.column("ext_key"))),
                           pc.is_in(tm.column("source_id"), xp_ids))).sort_by("source_id")
    xp = tables["xp_continuous_mean_spectrum"]
    xp = xp.filter(pc.is_in(xp.column("source_id"), xp_ids)).sort_by("source_id")
    return {"gaia_source": g, "tmass": tm, "xp_continuous_mean_spectrum": xp}


def read_fetched(raw_root: Path, table: str) -> pa.Table:
    """All partitions of a fetched raw table, concatenated and sorted by source_id."""
    files = sorted((raw_root / table).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("source_id")


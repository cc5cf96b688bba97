"""Catalog schema: Table 2 layout, validation messages, and a pandas/pyarrow/DuckDB round trip."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xpcat import catalog_schema as cs
from xpcat.catalog_schema import CATALOG, SchemaError, flags, validate


def _catalog_table(rng: np.random.Generator, n: int = 50) -> pa.Table:
    """n rows in the catalog schema with random but valid values."""
    cov = np.einsum("nij,nkj->nik", a := rng.normal(size=(n, 5, 5)), a) + np.eye(5)
    icov = np.linalg.inv(cov)
    cols = {
        "gdr3_source_id": pa.array(rng.choice(2**58, n, replace=False).astype(np.int64)),
        "ra": pa.array(rng.uniform(0, 360, n)),
        "dec": pa.array(rng.uniform(-90, 90, n)),
        "stellar_params_est": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=5 * n).astype(np.float32)), 5),
        "stellar_params_err": pa.FixedSizeListArray.from_arrays(
            pa.array(np.sqrt(np.einsum("nii->ni", cov)).ravel().astype(np.float32)), 5
        ),
        "chi2_opt": pa.array(rng.chisquare(61, n).astype(np.float32)),
        "ln_prior": pa.array(rng.normal(-3, 2, n).astype(np.float32)),
        "teff_confidence": pa.array(rng.uniform(size=n).astype(np.float32)),
        "feh_confidence": pa.array(rng.uniform(size=n).astype(np.float32)),
        "logg_confidence": pa.array(rng.uniform(size=n).astype(np.float32)),
        "quality_flags": pa.array(rng.integers(0, 64, n).astype(np.uint8)),
        "stellar_params_icov_triu": pa.FixedSizeListArray.from_arrays(
            pa.array(cs.pack_triu(icov).ravel().astype(np.float32)), 15
        ),
        "stellar_params_cov_triu": pa.FixedSizeListArray.from_arrays(
            pa.array(cs.pack_triu(cov).ravel().astype(np.float32)), 15
        ),
        "fit_status": pa.array(rng.integers(0, 3, n).astype(np.uint8)),
        "condition_flags": pa.array(rng.integers(0, 1 << 13, n).astype(np.uint16)),
    }
    return pa.table(cols).cast(CATALOG)


def test_table2_columns_in_order():
    assert cs.TABLE2_COLUMNS == (
        "gdr3_source_id", "ra", "dec", "stellar_params_est", "stellar_params_err", "chi2_opt", "ln_prior",
        "teff_confidence", "feh_confidence", "logg_confidence", "quality_flags",
        "stellar_params_icov_triu", "stellar_params_cov_triu",
    )
    assert CATALOG.field("stellar_params_est").type == pa.list_(pa.float32(), 5)
    assert CATALOG.field("stellar_params_cov_triu").type == pa.list_(pa.float32(), 15)
    assert CATALOG.field("quality_flags").type == pa.uint8()
    assert cs.catalog.EXTRA_COLUMNS == ("fit_status", "condition_flags")  # documented extras after Table 2
    assert cs.catalog.PARAM_UNITS[0] == "kK"
    for f in CATALOG:
        assert b"unit" in f.metadata and b"description" in f.metadata


def test_quality_flag_bits_match_spec():
    assert [int(b) for b in flags.QualityFlag] == [1, 2, 4, 8, 16, 32]
    q = np.array([0, 7, 8, 63], dtype=np.uint8)
    assert flags.passes_basic_cut(q).tolist() == [True, True, False, False]
    assert flags.passes_strict_cut(q).tolist() == [True, False, False, False]


def test_roundtrip_pandas_pyarrow_duckdb(tmp_path, rng):
    table = cs.with_metadata(_catalog_table(rng), {"model_hash": "abc"})
    validate(table, CATALOG)
    path = tmp_path / "cat.parquet"
    pq.write_table(table, path)

    back = pq.read_table(path)
    validate(back, CATALOG)
    assert back.equals(table)
    assert cs.read_metadata(back.schema)["model_hash"] == "abc"
    assert cs.read_metadata(back.schema)["schema_version"] == cs.SCHEMA_VERSION

    df = pd.read_parquet(path)
    con = duckdb.connect()
    dd = con.execute(f"SELECT * FROM read_parquet('{path}') ORDER BY gdr3_source_id").df()
    df = df.sort_values("gdr3_source_id").reset_index(drop=True)
    assert list(df.columns) == list(dd.columns) == list(CATALOG.names)
    for name in CATALOG.names:
        a, b = df[name].to_numpy(), dd[name].to_numpy()
        if CATALOG.field(name).type.num_fields or pa.types.is_fixed_size_list(CATALOG.field(name).type):
            a, b = np.stack(a), np.stack(b)
        np.testing.assert_array_equal(a, b, err_msg=name)
    # DuckDB sees the fixed-size lists as arrays and can index them (1-based).
    teff = con.execute(f"SELECT stellar_params_est[1] AS t FROM read_parquet('{path}') ORDER BY gdr3_source_id").df()
    np.testing.assert_array_equal(teff["t"].to_numpy(), np.stack(df["stellar_params_est"])[:, 0])


def test_validate_names_the_column(rng):
    table = _catalog_table(rng, 5)
    with pytest.raises(SchemaError, match="missing column.*chi2_opt"):
        validate(table.drop_columns(["chi2_opt"]), CATALOG)
    bad = table.set_column(table.schema.get_field_index("chi2_opt"), "chi2_opt", table["chi2_opt"].cast(pa.float64()))
    with pytest.raises(SchemaError, match="'chi2_opt' has type double, expected float"):
        validate(bad, CATALOG)
    wrong_len = table.set_column(
        3, "stellar_params_est", pa.array([[1.0, 2.0, 3.0]] * 5, pa.list_(pa.float32(), 3))
    )
    with pytest.raises(SchemaError, match="stellar_params_est"):
        validate(wrong_len, CATALOG)
    nulls = table.set_column(0, CATALOG.field(0), pa.array([1, None, 3, 4, 5], pa.int64()))
    with pytest.raises(SchemaError, match="'gdr3_source_id' has 1 null"):
        validate(nulls, CATALOG)
    dup = table.set_column(0, CATALOG.field(0), pa.array([1, 1, 3, 4, 4], pa.int64()))
    with pytest.raises(SchemaError, match="2 duplicated value.*1, 4"):
        validate(dup, CATALOG)
    with pytest.raises(SchemaError, match="unexpected column.*extra"):
        validate(table.append_column("extra", pa.array(range(5))), CATALOG)


def test_conform_casts_and_fills(rng):
    table = _catalog_table(rng, 4)
    loose = table.set_column(
        table.schema.get_field_index("chi2_opt"), "chi2_opt", table["chi2_opt"].cast(pa.float64())
    ).drop_columns(["teff_confidence"])
    out = cs.conform(loose, CATALOG)
    validate(out, CATALOG)
    assert out["teff_confidence"].null_count == 4
    with pytest.raises(SchemaError, match="missing required column 'quality_flags'"):
        cs.conform(table.drop_columns(["quality_flags"]), CATALOG)


def test_raw_and_conditioned_schemas():
    xp = cs.raw.XP_CONTINUOUS
    assert len(xp) == 26
    assert xp.names[:2] == ["source_id", "solution_id"]
    assert cs.CONDITIONED.field("flux").type == pa.list_(pa.float32(), 66)
    assert cs.CONDITIONED.field("flux_factor_triu").type == pa.list_(pa.float32(), 66 * 67 // 2)
    assert cs.conditioned.XP_WAVELENGTHS_NM[0] == 392 and cs.conditioned.XP_WAVELENGTHS_NM[-1] == 992
    assert set(cs.RAW_TABLES) == {"gaia_source", "xp_continuous_mean_spectrum", "tmass", "unwise", "labels", "reddening"}

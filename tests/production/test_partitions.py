"""HEALPix-aligned partitions and atomic Parquet writes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from xpcat.catalog_schema import SchemaError
from xpcat.errors import InputError
from xpcat.production import partitions as P


def test_shift_and_partition_of_match_gaia_healpix_encoding():
    # Gaia: level-12 nested index = source_id // 2**35.
    sid = np.array([4295806720, 5853498713190525696, 2**35 * 123456 + 7], dtype=np.int64)
    assert P.partition_shift(12) == 35
    assert P.partition_shift(5) == 49
    np.testing.assert_array_equal(P.partition_of(sid, 12), sid // 2**35)
    np.testing.assert_array_equal(P.partition_of(sid, 5), (sid // 2**35) // 4**7)
    assert P.partition_of(int(sid[1]), 0) == int(sid[1]) // 2**59
    assert isinstance(P.partition_of(int(sid[1]), 3), int)


def test_source_id_range_contains_its_ids(rng):
    level = 4
    sid = rng.integers(0, 12 * 4**12 * 2**35, size=1000, dtype=np.int64)
    pix = P.partition_of(sid, level)
    for s, p in zip(sid[:50], pix[:50]):
        lo, hi = P.source_id_range(int(p), level)
        assert lo <= s < hi
        assert hi - lo == 2 ** P.partition_shift(level)
    lo, hi = P.source_id_range(12 * 4**level - 1, level)
    assert hi == 12 * 4**12 * 2**35
    with pytest.raises(ValueError, match="out of range"):
        P.source_id_range(12 * 4**level, level)


def test_bad_level_and_negative_ids_rejected():
    with pytest.raises(ValueError, match="level"):
        P.partition_shift(13)
    with pytest.raises(ValueError, match="level"):
        P.partition_shift(-1)
    with pytest.raises(ValueError, match="-5"):
        P.partition_of(np.array([1, -5]), 3)


def test_partition_name_round_trip():
    assert P.partition_name(1234, 5) == "L05-001234"
    assert P.parse_partition_name("L05-001234") == (5, 1234)
    assert P.parse_partition_name("/x/y/L05-001234.parquet") == (5, 1234)
    assert P.parse_partition_name("L12-201326591") == (12, 12 * 4**12 - 1)
    with pytest.raises(ValueError, match="not a partition name"):
        P.parse_partition_name("part-0001")
    with pytest.raises(ValueError, match="out of range"):
        P.parse_partition_name("L00-000012")


def _table(n=10):
    return pa.table({"source_id": pa.array(np.arange(n), pa.int64()), "x": pa.array(np.ones(n), pa.float32())})


SCHEMA = pa.schema([pa.field("source_id", pa.int64(), nullable=False), pa.field("x", pa.float32())])


def test_atomic_write_writes_marker_and_is_done(tmp_path):
    path = tmp_path / "sub" / "L05-000001.parquet"
    marker = P.atomic_write_parquet(_table(), path, schema=SCHEMA, expected_rows=10, info={"k": 1})
    assert path.is_file()
    on_disk = json.loads(P.marker_path(path).read_text())
    assert on_disk == marker
    assert marker["rows"] == 10 and marker["info"] == {"k": 1} and marker["bytes"] == path.stat().st_size
    assert marker["sha256"] == P.file_sha256(path)
    assert P.is_done(path)
    assert P.is_done(path, expected_rows=10)
    assert not P.is_done(path, expected_rows=11)
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["L05-000001.parquet", "L05-000001.parquet.done"]
    assert P.read_table(path).num_rows == 10


def test_truncated_or_unmarked_file_is_not_done(tmp_path):
    path = tmp_path / "L05-000002.parquet"
    P.atomic_write_parquet(_table(), path, schema=SCHEMA)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not P.is_done(path)
    with pytest.raises(InputError, match="L05-000002.parquet"):
        P.read_table(path, what="conditioned")
    P.atomic_write_parquet(_table(), path, schema=SCHEMA)
    assert P.is_done(path)
    P.marker_path(path).unlink()
    assert not P.is_done(path)
    assert not P.is_done(tmp_path / "missing.parquet")


def test_same_size_corruption_detected_by_hash(tmp_path):
    path = tmp_path / "L05-000003.parquet"
    P.atomic_write_parquet(_table(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not P.is_done(path)


def test_failed_validation_leaves_nothing(tmp_path):
    path = tmp_path / "L05-000004.parquet"
    bad = _table().append_column("extra", pa.array(np.zeros(10)))
    with pytest.raises(SchemaError, match="extra"):
        P.atomic_write_parquet(bad, path, schema=SCHEMA)
    with pytest.raises(InputError, match="expected 11"):
        P.atomic_write_parquet(_table(), path, expected_rows=11)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_over_done_partition_replaces_marker(tmp_path):
    path = tmp_path / "L05-000005.parquet"
    P.atomic_write_parquet(_table(3), path)
    m2 = P.atomic_write_parquet(_table(7), path)
    assert m2["rows"] == 7 and P.is_done(path, expected_rows=7)


def test_read_table_missing_and_columns(tmp_path):
    with pytest.raises(InputError, match="not found"):
        P.read_table(tmp_path / "nope.parquet", what="raw gaia_source")
    path = tmp_path / "t.parquet"
    P.atomic_write_parquet(_table(), path)
    assert P.read_table(path, columns=["x"]).column_names == ["x"]
    with pytest.raises(InputError, match="t.parquet"):
        P.read_table(path, columns=["nope"])


def test_duplicate_ids_and_nulls_refused_on_write(tmp_path):
    path = tmp_path / "L05-000006.parquet"
    dup = pa.table({"source_id": pa.array([1, 2, 2], pa.int64()), "x": pa.array([1.0, 2.0, 3.0], pa.float32())})
    with pytest.raises(SchemaError, match="duplicated"):
        P.atomic_write_parquet(dup, path, schema=SCHEMA)
    nulls = pa.table({"source_id": pa.array([1, None], pa.int64()), "x": pa.array([1.0, 2.0], pa.float32())})
    with pytest.raises(SchemaError, match="null"):
        P.atomic_write_parquet(nulls, path, schema=SCHEMA)
    assert list(tmp_path.iterdir()) == []


def test_many_row_groups_verified(tmp_path):
    path = tmp_path / "L05-000007.parquet"
    marker = P.atomic_write_parquet(_table(50), path, schema=SCHEMA, expected_rows=50, row_group_size=7)
    assert marker["rows"] == 50 and P.is_done(path, expected_rows=50)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).num_row_groups == 8


def test_footer_verify_refuses_the_same_bad_tables(tmp_path):
    path = tmp_path / "L05-000008.parquet"
    opts = {"verify": "footer", "schema": SCHEMA}
    with pytest.raises(SchemaError, match="extra"):
        P.atomic_write_parquet(_table().append_column("extra", pa.array(np.zeros(10))), path, **opts)
    dup = pa.table({"source_id": pa.array([1, 2, 2], pa.int64()), "x": pa.array([1.0, 2.0, 3.0], pa.float32())})
    with pytest.raises(SchemaError, match="duplicated"):
        P.atomic_write_parquet(dup, path, **opts)
    nulls = pa.table({"source_id": pa.array([1, None], pa.int64()), "x": pa.array([1.0, 2.0], pa.float32())})
    with pytest.raises(SchemaError, match="null"):
        P.atomic_write_parquet(nulls, path, **opts)
    with pytest.raises(InputError, match="expected 11"):
        P.atomic_write_parquet(_table(), path, expected_rows=11, **opts)
    with pytest.raises(ValueError, match="verify"):
        P.atomic_write_parquet(_table(), path, verify="none")
    assert list(tmp_path.iterdir()) == []
    wopts = {"compression_level": 1, "use_dictionary": False, "use_byte_stream_split": ["x"]}
    marker = P.atomic_write_parquet(_table(50), path, expected_rows=50, write_options=wopts, **opts)
    assert marker["rows"] == 50 and P.is_done(path, expected_rows=50)
    assert P.read_table(path).equals(_table(50))

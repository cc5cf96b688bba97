"""Partner tables (unWISE, labels, reddening) from Parquet, CSV and FITS user files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from _archive_universe import make_universe, read_fetched

from xpcat.catalog_schema.raw import LABELS, REDDENING, UNWISE
from xpcat.config import RunConfig, config_from_dict, config_to_dict
from xpcat.errors import InputError
from xpcat.production.ingest.archive import FetchOptions, fetch_run
from xpcat.production.synthetic.archive_server import LocalArchive
from xpcat.production.partitions import is_done, partition_of
from xpcat.production.ingest.partner_tables import ingest_partner, ingest_partner_tables, read_partner_file

LEVEL = 2


def _ids(rng, n):
    pix = rng.choice([5, 17, 100], size=n)
    return np.unique((pix.astype(np.int64) << 55) + rng.integers(0, 1 << 55, n))


def _unwise(rng, n=50) -> pa.Table:
    sid = _ids(rng, n)
    m = len(sid)
    return pa.table({
        "source_id": sid,
        "w1_mag": rng.normal(12, 1, m).astype(np.float32),
        "w1_mag_error": rng.uniform(0.01, 0.1, m).astype(np.float32),
        "w2_mag": pa.array(rng.normal(12, 1, m).astype(np.float32), mask=rng.random(m) < 0.1),
        "w2_mag_error": rng.uniform(0.01, 0.1, m).astype(np.float32),
    }, schema=UNWISE)


def _labels(rng, n=30) -> pa.Table:
    sid = _ids(rng, n)
    m = len(sid)
    cols = {"source_id": sid}
    for f in LABELS:
        if f.name != "source_id" and pa.types.is_floating(f.type):
            cols[f.name] = rng.normal(5, 1, m).astype(np.float32)
    cols["label_source"] = np.where(rng.random(m) < 0.5, "lamost", "hotpayne")
    return pa.table(cols, schema=LABELS)


def _config(**data) -> RunConfig:
    d = config_to_dict(RunConfig())
    d["data"]["partition_level"] = LEVEL
    d["data"].update(data)
    return config_from_dict(d)


def test_parquet_csv_and_fits_read_the_same(rng, tmp_path):
    from astropy.table import Table

    t = _unwise(rng)
    pq.write_table(t, tmp_path / "u.parquet")
    pcsv.write_csv(t, tmp_path / "u.csv")
    at = Table({n.upper(): t.column(n).to_numpy(zero_copy_only=False) for n in t.column_names})
    at["W2_MAG"] = np.ma.MaskedArray(at["W2_MAG"], mask=t.column("w2_mag").is_null().to_numpy(zero_copy_only=False))
    at.write(tmp_path / "u.fits")
    for name in ("u.parquet", "u.csv", "u.fits"):
        rows, bad = read_partner_file(tmp_path / name, "unwise")
        assert not bad
        assert rows.equals(t), name


def test_ingest_writes_partitions(rng, tmp_path):
    t = _labels(rng)
    pq.write_table(t, tmp_path / "labels.parquet")
    s = ingest_partner(tmp_path / "run", "labels", tmp_path / "labels.parquet", LEVEL)
    assert s["rows"] == t.num_rows and not s["skipped"]
    files = sorted((tmp_path / "run" / "raw" / "labels").glob("*.parquet"))
    assert [f.stem for f in files] == s["partitions"]
    for f in files:
        assert is_done(f)
        pix = partition_of(pq.read_table(f).column("source_id").to_numpy(), LEVEL)
        assert set(pix.tolist()) == {int(f.stem.split("-")[1])}
    assert read_fetched(tmp_path / "run" / "raw", "labels").equals(t.sort_by("source_id"))
    again = ingest_partner(tmp_path / "run", "labels", tmp_path / "labels.parquet", LEVEL)
    assert again["skipped"]
    # a new version of the file replaces the old partitions, stale ones removed
    small = t.slice(0, 3)
    pq.write_table(small, tmp_path / "labels.parquet")
    ingest_partner(tmp_path / "run", "labels", tmp_path / "labels.parquet", LEVEL)
    assert read_fetched(tmp_path / "run" / "raw", "labels").equals(small.sort_by("source_id"))


def test_bad_rows_reported_duplicates_refused(rng, tmp_path):
    t = _unwise(rng, 20)
    pcsv.write_csv(t, tmp_path / "u.csv")
    lines = (tmp_path / "u.csv").read_text().splitlines()
    parts = lines[4].split(",")
    parts[1] = "bright"
    lines[4] = ",".join(parts)
    (tmp_path / "u.csv").write_text("\n".join(lines) + "\n")
    rows, bad = read_partner_file(tmp_path / "u.csv", "unwise")
    assert len(bad) == 1 and bad[0].column == "w1_mag" and "bright" in bad[0].reason
    assert rows.num_rows == t.num_rows - 1
    dup = pa.concat_tables([t, t.slice(0, 2)])
    pq.write_table(dup, tmp_path / "d.parquet")
    with pytest.raises(InputError, match="duplicated source_id"):
        read_partner_file(tmp_path / "d.parquet", "unwise")
    pq.write_table(t.drop_columns(["source_id"]), tmp_path / "n.parquet")
    with pytest.raises(InputError, match="no source_id"):
        read_partner_file(tmp_path / "n.parquet", "unwise")
    (tmp_path / "x.txt").write_text("source_id\n1\n")
    with pytest.raises(InputError, match="unknown file type"):
        read_partner_file(tmp_path / "x.txt", "unwise")
    with pytest.raises(InputError, match="unknown partner table"):
        read_partner_file(tmp_path / "u.csv", "ebv")


def test_config_paths_and_fetch_brings_partners_along(rng, tmp_path):
    universe = tmp_path / "u"
    make_universe(universe, n_stars=20, seed=1)
    sid = _ids(rng, 10)
    red = pa.table({"source_id": sid, "e": np.full(len(sid), 0.1, np.float32),
                    "e_error": np.full(len(sid), 0.02, np.float32)}, schema=REDDENING)
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(red, run / "bayestar.parquet")
    cfg = _config(reddening="bayestar.parquet")
    assert ingest_partner_tables(run, cfg)["reddening"]["rows"] == red.num_rows
    with pytest.raises(InputError, match="file not found"):
        ingest_partner_tables(run, _config(unwise="nope.parquet"))
    with LocalArchive(universe) as arc:
        with pytest.raises(InputError, match="nope.parquet"):  # before any fetching
            fetch_run(run, _config(unwise="nope.parquet"), archive_url=arc.url, login=False)
        s = fetch_run(run, cfg, archive_url=arc.url, login=False, options=FetchOptions(backoff_s=0.01))
    assert s["partner_tables"]["reddening"]["skipped"]  # already there, same file
    assert read_fetched(run / "raw", "reddening").equals(red.sort_by("source_id"))

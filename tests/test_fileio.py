"""xpcat.fileio: atomic writes honour the umask, leave nothing behind on error; checksums."""

from __future__ import annotations

import hashlib
import os
import stat

import pyarrow as pa
import pytest

from xpcat import fileio
from xpcat.production.partitions import atomic_write_parquet


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    fileio.write_json_atomic(tmp_path / "a.json", {"x": 1})
    fileio.write_text_atomic(tmp_path / "b.txt", "hello")
    atomic_write_parquet(pa.table({"source_id": pa.array([1, 2], pa.int64())}), tmp_path / "c.parquet")
    for name in ("a.json", "b.txt", "c.parquet", "c.parquet.done"):
        assert _mode(tmp_path / name) == want, f"{name}: {oct(_mode(tmp_path / name))} != {oct(want)}"
    assert fileio.current_umask() == umask


def test_atomic_path_removes_the_temporary_file_on_error(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_path(tmp_path / "keep.txt") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert (tmp_path / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_file_sha256(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert fileio.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_package_version():
    assert fileio.package_version("xpcat") != "unknown"
    assert fileio.package_version("no-such-distribution-xyz") == "unknown"

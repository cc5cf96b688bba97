"""Atomic file writes and checksums: the one place every stage writes through.

A file is written to a temporary name in its target folder, flushed, given
the permissions a plain ``open()`` would have given it (``0666`` less the
process umask: ``tempfile.mkstemp`` creates files ``0600``, which would hide a
run's outputs from colleagues), and renamed into place with ``os.replace``.
A reader therefore sees the old file or the new one, never a partial one;
a crash leaves at most a hidden ``.<name>.*.tmp`` beside it.

- :func:`atomic_path`: a context manager yielding the temporary path, for
  writers that take a path (``pyarrow.parquet.write_table``, ``numpy.savez``);
- :func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`write_json_atomic`;
- :func:`file_sha256`: the hex sha256 of a file (``hashlib.file_digest``);
- :func:`package_version`: an installed distribution's version (the one lookup).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, only as a fallback)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Parameters
    ----------
    path : path-like
        The final file. Its folder is created if missing.

    Yields
    ------
    pathlib.Path
        Where to write. After the ``with`` block it is chmod-ed to
        :func:`default_file_mode` and renamed onto ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, doc: Any, *, indent: int | None = 1) -> None:
    """Write ``doc`` as JSON (sorted keys; non-JSON values through ``str``) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(doc, indent=indent, sort_keys=True, default=str))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def package_version(dist: str = "xpcat") -> str:
    """The installed version of distribution ``dist``, or ``"unknown"`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"

"""One process per run directory: a lock file that works on the shared filesystems of HPC sites.

A second ``xpcat run`` (or ``infer``, ``train`` ...) on a run directory that
another process is working in refuses at once, naming the holder (host, pid,
command, start time): two processes doing the same partitions waste the
allocation and race on every output.

The lock is :class:`flufl.lock.Lock` (maintained, made for NFS): it is taken
by ``link(2)``-ing a per-process claim file to ``state/run.lock`` and checking
the link count, which is atomic on NFS v2-v4 and on Lustre and GPFS, unlike
``flock``/``fcntl`` locks (not shared between nodes on Lustre mounted without
``-o flock``, emulated or absent on some NFS setups). The lock has a lifetime
(:data:`LIFETIME`), refreshed by a background thread while the holder lives.

A stale lock is detected: on the same host, a holder whose pid no longer
exists is stale at once; from another host (where pids mean nothing) a
holder is stale when its lifetime ran out without a refresh (a killed job
leaves it at most :data:`LIFETIME` behind). A stale lock is broken, with a
warning naming the old holder.

The lock is re-entrant within one process (the demo runs several stages, each
of which takes it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from xpcat.errors import StageError
from xpcat.fileio import write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["LIFETIME", "RunLockedError", "run_lock"]

#: How long a lock lives without a refresh; the holder refreshes it every third of that.
LIFETIME = _dt.timedelta(minutes=10)

_held: dict[Path, int] = {}
_held_guard = threading.Lock()


class RunLockedError(StageError):
    """Another live process holds the run directory's lock."""


def _holder(info_path: Path) -> dict:
    try:
        return json.loads(info_path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(doc: dict, lock: object) -> str:
    host, pid = doc.get("host"), doc.get("pid")
    if host is None:
        with contextlib.suppress(Exception):
            host, pid, _ = lock.details  # type: ignore[attr-defined]
    return (f"host {host or '?'}, pid {pid or '?'}, `xpcat {doc.get('command', '?')}` started "
            f"{doc.get('started', '?')}")


def _refresher(lock: object, stop: threading.Event) -> None:
    period = LIFETIME.total_seconds() / 3
    while not stop.wait(period):
        try:
            lock.refresh()  # type: ignore[attr-defined]
        except Exception as err:  # noqa: BLE001 - a refresh failure must not kill the run
            logger.warning("could not refresh the run lock: %s", err)


@contextlib.contextmanager
def run_lock(state_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``<state_dir>/run.lock`` for the duration of the block.

    Parameters
    ----------
    state_dir : path-like
        The run directory's ``state/`` folder (created if missing).
    command : str
        What the holder runs (shown to a process that is refused).

    Raises
    ------
    RunLockedError
        When another live process holds the lock; the message names it.
    """
    from flufl.lock import Lock, LockState, TimeOutError

    state = Path(state_dir).resolve()
    with _held_guard:
        if _held.get(state):
            _held[state] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[state] -= 1
        return
    state.mkdir(parents=True, exist_ok=True)
    lockfile = state / "run.lock"
    info = state / "run.lock.json"
    lock = Lock(str(lockfile), lifetime=LIFETIME)
    for attempt in range(2):
        try:
            lock.lock(timeout=_dt.timedelta(seconds=0))
            break
        except TimeOutError:
            if attempt == 0 and lock.state == LockState.stale:
                logger.warning("breaking a stale run lock in %s (holder %s is gone)", state,
                               _describe(_holder(info), lock))
                lockfile.unlink(missing_ok=True)
                continue
            raise RunLockedError(
                f"{state.parent} is in use by another xpcat process ({_describe(_holder(info), lock)}); "
                f"wait for it to finish, or if it is dead on another host, its lock expires "
                f"{int(LIFETIME.total_seconds() // 60)} min after its last refresh ({lockfile})"
            ) from None
    write_json_atomic(info, {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    stop = threading.Event()
    thread = threading.Thread(target=_refresher, args=(lock, stop), name="xpcat-run-lock", daemon=True)
    thread.start()
    with _held_guard:
        _held[state] = 1
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(state, None)
        stop.set()
        thread.join(timeout=5)
        info.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            lock.unlock(unconditionally=True)

"""One process per run directory (issue 19 item 5): the second refuses at once naming the holder; stale locks break."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from xpcat.production.run_lock import RunLockedError, run_lock

HOLD = """
import sys, time
from xpcat.production.run_lock import run_lock
with run_lock(sys.argv[1], "run"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(state):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_refuses_at_once_naming_the_holder(tmp_path):
    state = tmp_path / "run" / "state"
    proc = _holder(state)
    try:
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError, match=rf"in use by another xpcat process \(host \S+, pid {proc.pid}, `xpcat run`"):
            with run_lock(state, "infer"):
                pass
        assert time.perf_counter() - t0 < 5
    finally:
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt: the holder leaves its block and unlocks
        proc.wait()
    assert not (state / "run.lock").exists()
    with run_lock(state, "infer"):
        pass


def test_stale_lock_of_a_killed_process_is_broken(tmp_path, caplog):
    state = tmp_path / "state"
    proc = _holder(state)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (state / "run.lock").exists()  # a SIGKILL leaves the lock behind
    with caplog.at_level("WARNING"), run_lock(state, "run"):
        assert (state / "run.lock").exists()
    assert "stale run lock" in caplog.text and str(proc.pid) in caplog.text
    assert not (state / "run.lock").exists()


def test_reentrant_within_one_process(tmp_path):
    with run_lock(tmp_path, "demo"), run_lock(tmp_path, "run"):
        assert (tmp_path / "run.lock").exists()
    assert not (tmp_path / "run.lock").exists()


def test_two_xpcat_runs_on_one_run_directory(tmp_path):
    """The engine takes the lock: a run while another holds the directory refuses before any work."""
    from xpcat.config import RunConfig
    from xpcat.production.run import run_stages

    proc = _holder(tmp_path / "state")
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            run_stages(tmp_path, RunConfig(), [], catalog=True)
        assert not (tmp_path / "config.toml").exists() and not (tmp_path / "logs").exists()
    finally:
        proc.terminate()
        proc.wait()

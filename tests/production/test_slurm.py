"""Runs on a real SLURM (``.ci/start-slurm.sh``): completes, survives ``scancel``, rotates with ``--lifetime``.

Marker ``slurm``: needs ``sbatch`` on PATH and ``SLURM_CONF`` set (``.ci/run``
starts a single-node SLURM and sets both). Each test ends with every input
source_id exactly once in the catalog (``validate_catalog``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from xpcat.config import RunConfig
from xpcat.production import run_state as S
from xpcat.production.catalog import validate_catalog

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM: sbatch is not on PATH (.ci/start-slurm.sh starts one)"),
    pytest.mark.skipif(not os.environ.get("SLURM_CONF"), reason="no SLURM: SLURM_CONF is not set (source the env.sh written by .ci/start-slurm.sh)"),
]

LEVEL = 3


def slurm_config(tmp: Path, **cluster) -> RunConfig:
    """The slurm profile on the CI's single-node SLURM (workers connect over loopback)."""
    options = {
        "scheduler_options": {"host": "127.0.0.1", "dashboard_address": ":0"},
        "walltime": "00:10:00",
        "local_directory": str(tmp / "dask-scratch"),
        "job_name": f"xpcat-test-{os.getpid()}",
        # the jobs import the test helpers (_fake_stages) from this folder
        "job_script_prologue": [f"export PYTHONPATH={Path(__file__).parent}"],
    }
    return RunConfig().replace(
        data={"partition_level": LEVEL},
        cluster={"profile": "slurm", "n_workers": 2, "min_workers": 0, "memory_limit": "1GiB", "retries": 1,
                 "options": options, **cluster},
        catalog={"highest_order": 3, "max_rows_per_partition": 100},
    )


def _jobs(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _all_jobs(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture
def fake_stages():
    import _fake_stages

    return _fake_stages


def _exactly_once(rd: Path, sid: np.ndarray) -> None:
    assert "exactly once" in validate_catalog(rd)
    ids = pq.read_table(rd / "catalog" / "dataset", columns=["gdr3_source_id"]).column(0).to_numpy()
    assert np.array_equal(np.sort(ids), np.sort(sid))


def test_machinery_completes_on_slurm(tmp_path, fake_stages):
    from xpcat.production.run import run_stages

    sid = fake_stages.write_raw(tmp_path, 400, LEVEL, [10, 200, 300, 450, 600, 700])
    cfg = slurm_config(tmp_path)
    out = run_stages(tmp_path, cfg, fake_stages.FAKE_STAGES)
    assert out["stages"]["infer"]["completed"] == 6
    _exactly_once(tmp_path, sid)
    assert list((tmp_path / "logs" / "jobs").glob("*.err")) or list((tmp_path / "logs" / "jobs").glob("*"))


def test_machinery_survives_scancel_of_one_job(tmp_path, fake_stages):
    from xpcat.production.run import run_stages

    sid = fake_stages.write_raw(tmp_path, 400, LEVEL, list(range(0, 768, 64)))
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "sleep").write_text("1.5")
    cfg = slurm_config(tmp_path, min_workers=2)
    name = cfg.cluster.options["job_name"]
    killed: list[str] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            jobs = _jobs(name)
            if len(jobs) == 2 and list((tmp_path / "conditioned").glob("*.done")):
                subprocess.run(["scancel", jobs[0]], check=True)
                killed.append(jobs[0])
            time.sleep(0.5)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = run_stages(tmp_path, cfg, fake_stages.FAKE_STAGES)
    t.join()
    assert killed, "no job was running to scancel"
    assert out["stages"]["infer"]["failed"] == 0
    _exactly_once(tmp_path, sid)


def test_machinery_lifetime_shorter_than_run(tmp_path, fake_stages):
    from xpcat.production.run import run_stages

    sid = fake_stages.write_raw(tmp_path, 400, LEVEL, list(range(0, 768, 64)))
    (tmp_path / "faults").mkdir()
    # 12 partitions x 2 stages x 6 s on 2 workers = 72 s of work: longer than the 40 s lifetime on any machine
    (tmp_path / "faults" / "sleep").write_text("6")
    cfg = slurm_config(tmp_path, lifetime="40s", lifetime_stagger="5s")
    t0 = time.time()
    out = run_stages(tmp_path, cfg, fake_stages.FAKE_STAGES)
    elapsed = time.time() - t0
    assert elapsed > 45, "the run was not longer than the worker lifetime"
    assert out["stages"]["infer"]["failed"] == 0
    _exactly_once(tmp_path, sid)
    assert len(list((tmp_path / "logs" / "jobs").glob("*.err"))) > 2  # more jobs than n_workers: workers rotated


# ---------------------------------------------------------------- the real `xpcat run`
def _real_run_dir(tmp: Path, n_stars: int, extra_options: dict | None = None,
                  **cluster) -> tuple[Path, Path, np.ndarray]:
    """A synthetic universe, an untrained artifact and a config file for `xpcat run` (``extra_options``: more
    dask-jobqueue keyword arguments)."""
    pytest.importorskip("xpcat.production.infer", reason="the inference stage (xpcat.production.infer) is not there yet")
    from _fake_stages import make_artifact

    from xpcat.config import SimulationConfig, write_config
    from xpcat.production.synthetic.universe import simulate_universe

    rd = tmp / "run"
    simulate_universe(rd, SimulationConfig(n_stars=n_stars, seed=11))
    make_artifact(rd / "model")
    cfg = slurm_config(tmp, memory_limit="3GiB", **cluster)
    cfg = cfg.replace(cluster={"options": {**cfg.cluster.options, **(extra_options or {})}}).replace(  # JAX needs > 1 GiB
        data={"partition_level": 1},
        inference={"n_prior_samples": 16, "e_log10_step": 0.25, "n_refine": 2, "max_iterations": 5, "batch_size": 256},
    )
    cfg_path = write_config(cfg, tmp / "cfg")
    sid = pq.read_table(rd / "raw" / "gaia_source", columns=["source_id"]).column(0).to_numpy()
    return rd, cfg_path, sid


def _xpcat_exe() -> str:
    """The ``xpcat`` script of the interpreter running the tests (not whichever is first on PATH)."""
    beside = Path(sys.executable).with_name("xpcat")
    return str(beside) if beside.exists() else (shutil.which("xpcat") or "xpcat")


def _xpcat(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([_xpcat_exe(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XPCAT_PROGRESS": "0"})


def test_xpcat_run_completes_on_slurm(tmp_path):
    rd, cfg_path, sid = _real_run_dir(tmp_path, 240)
    res = _xpcat("run", str(cfg_path), "--run-dir", str(rd))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Dask dashboard" in res.stderr
    _exactly_once(rd, sid)
    v = _xpcat("validate", str(rd))
    assert v.returncode == 0 and "exactly once" in v.stdout


def test_xpcat_run_survives_scancel_of_one_job(tmp_path):
    rd, cfg_path, sid = _real_run_dir(tmp_path, 240, min_workers=2)
    name = slurm_config(tmp_path).cluster.options["job_name"]
    proc = subprocess.Popen([_xpcat_exe(), "run", str(cfg_path), "--run-dir", str(rd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "XPCAT_PROGRESS": "0"})
    killed = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and killed is None:
        jobs = _jobs(name)
        if len(jobs) == 2 and list((rd / "conditioned").glob("*.done")):
            subprocess.run(["scancel", jobs[0]], check=True)
            killed = jobs[0]
        time.sleep(0.5)
    out, err = proc.communicate(timeout=900)
    assert killed is not None, "no job was running to scancel"
    assert proc.returncode == 0, err[-3000:]
    _exactly_once(rd, sid)


def test_xpcat_run_with_lifetime_shorter_than_run(tmp_path):
    # every infer partition sleeps 8 s first (tests/production/_slow_tasks.py), so the run outlasts the lifetime
    rd, cfg_path, sid = _real_run_dir(tmp_path, 1200, lifetime="30s", lifetime_stagger="5s", extra_options={
        "worker_extra_args": ["--preload", "xpcat.jobs.preload", "--preload", "_slow_tasks"]})
    t0 = time.time()
    res = _xpcat("run", str(cfg_path), "--run-dir", str(rd), timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.time() - t0 > 35, "the run was not longer than the worker lifetime"
    assert len(list((rd / "logs" / "jobs").glob("*.err"))) > 2  # more jobs than n_workers: workers rotated
    _exactly_once(rd, sid)


@pytest.mark.pbs
@pytest.mark.skipif(shutil.which("qsub") is None, reason="no qsub (Debian slurm-wlm-torque gives one on the CI SLURM)")
def test_machinery_completes_with_pbs_profile(tmp_path, fake_stages, monkeypatch):
    """Bonus: the pbs profile (PBSCluster) through the torque wrappers of the same SLURM."""
    from xpcat.production.run import run_stages

    monkeypatch.chdir(tmp_path)  # the torque qsub wrapper writes the job's .o/.e files into the cwd

    sid = fake_stages.write_raw(tmp_path, 200, LEVEL, [10, 300, 600])
    cfg = slurm_config(tmp_path)
    options = {k: v for k, v in cfg.cluster.options.items() if k != "job_name"}
    cfg = cfg.replace(cluster={"profile": "pbs", "options": {**options, "job_name": f"xpcat-pbs-{os.getpid()}"}})
    out = run_stages(tmp_path, cfg, fake_stages.FAKE_STAGES)
    assert out["stages"]["infer"]["completed"] == 3
    _exactly_once(tmp_path, sid)

"""Runs on a real SLURM (``.ci/start-slurm.sh``): completes, survives ``scancel``, rotates with ``--lifetime``.

Marker ``slurm``: needs ``sbatch`` on PATH and ``SLURM_CONF`` set (``.ci/run``
starts a single-node SLURM and sets both). Each test ends with every input
source_id exactly once in the catalog (``validate_catalog``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
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
    (tmp_path / "faults" / "sleep").write_text("3")  # 12 partitions x 2 stages x 3 s on 2 workers: > lifetime
    cfg = slurm_config(tmp_path, lifetime="40s", lifetime_stagger="5s")
    t0 = time.time()
    out = run_stages(tmp_path, cfg, fake_stages.FAKE_STAGES)
    elapsed = time.time() - t0
    assert elapsed > 45, "the run was not longer than the worker lifetime"
    assert out["stages"]["infer"]["failed"] == 0
    _exactly_once(tmp_path, sid)
    assert len(list((tmp_path / "logs" / "jobs").glob("*.err"))) > 2  # more jobs than n_workers: workers rotated

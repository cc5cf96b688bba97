"""The run machinery: planning, done markers, retries, failures, resume, refusal on change.

Stage functions here are simple stand-ins (``_fake_stages``) so that these
tests exercise only the machinery of ``xpcat.production.run`` on a real
``LocalCluster`` (worker processes, so SIGKILL kills a real worker).
"""

from __future__ import annotations

import json
from pathlib import Path

import dask
import distributed  # noqa: F401 - loads distributed.* config defaults before dask.config.set
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _fake_stages import FAKE_STAGES, write_raw

from xpcat.config import RunConfig
from xpcat.errors import InputError, StageError
from xpcat.production import partitions as P
from xpcat.production import run_state as S
from xpcat.production.catalog import query_catalog, validate_catalog
from xpcat.production.run import run_pipeline, run_stages
from xpcat.production.status import run_status

LEVEL = 2
PIXELS = [3, 17, 100, 150]


def _config(**cluster) -> RunConfig:
    return RunConfig().replace(
        data={"partition_level": LEVEL},
        cluster={"n_workers": 1, "memory_limit": "1GiB", "retries": 1, **cluster},
        catalog={"highest_order": 3, "max_rows_per_partition": 60},
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    sid = write_raw(tmp_path, 300, LEVEL, PIXELS)
    return tmp_path, sid


def _catalog_ids(run_dir: Path) -> np.ndarray:
    return pq.read_table(run_dir / "catalog" / "dataset", columns=["gdr3_source_id"]).column(0).to_numpy()


def test_run_completes_every_source_exactly_once(run_dir):
    rd, sid = run_dir
    out = run_stages(rd, _config(), FAKE_STAGES)
    assert out["partitions"] == len(PIXELS) and out["stars"] == sid.size
    assert out["stages"]["condition"]["completed"] == len(PIXELS)
    assert out["stages"]["infer"]["completed"] == len(PIXELS)
    assert out["stages"]["catalog"]["rows"] == sid.size
    ids = _catalog_ids(rd)
    assert ids.size == sid.size and np.array_equal(np.sort(ids), np.sort(sid))
    assert "exactly once" in validate_catalog(rd)
    # log file in RUN_DIR/logs with the dashboard link; config frozen in the run directory
    log = Path(out["log"])
    assert log.parent == rd.resolve() / "logs" and "Dask dashboard: http" in log.read_text()
    assert (rd / "config.toml").is_file()
    for p in S.read_plan(rd):
        assert P.is_done(rd / "fitted" / f"{p.name}.parquet", expected_rows=p.rows)
    status = run_status(rd)
    assert "condition  done 4  pending 0  failed 0" in status and "catalog    done" in status
    n_basic = int(np.sum((sid % 16) < 8))
    assert query_catalog(rd, "SELECT count(*) AS n FROM catalog WHERE quality_flags < 8", fmt="csv") == f"n\n{n_basic}"


def test_rerun_redoes_only_truncated_file_and_deleted_marker(run_dir):
    rd, sid = run_dir
    cfg = _config()
    run_stages(rd, cfg, FAKE_STAGES)
    plan = S.read_plan(rd)
    fitted = rd / "fitted" / f"{plan[0].name}.parquet"
    data = fitted.read_bytes()
    fitted.write_bytes(data[: len(data) // 3])  # truncated output
    P.marker_path(rd / "conditioned" / f"{plan[1].name}.parquet").unlink()  # deleted marker
    again = run_stages(rd, cfg, FAKE_STAGES)
    assert again["resumed"] is True
    assert again["stages"]["condition"]["submitted"] == 1
    assert again["stages"]["infer"]["submitted"] == 1
    # the redone fitted partition is byte-identical, so the catalog is up to date
    assert again["stages"]["catalog"]["skipped"] is True
    assert "exactly once" in validate_catalog(rd)
    third = run_stages(rd, cfg, FAKE_STAGES)
    assert third["stages"]["condition"]["submitted"] == 0 and third["stages"]["infer"]["submitted"] == 0
    assert third["stages"]["catalog"]["skipped"] is True


def test_worker_sigkill_mid_partition_is_recorded_then_recovered(run_dir):
    rd, sid = run_dir
    cfg = _config()
    name = S.plan_partitions(rd, cfg)[0][2].name
    (rd / "faults").mkdir()
    (rd / "faults" / f"infer-{name}").write_text("kill")
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with pytest.raises(StageError, match=name):
            run_stages(rd, cfg, FAKE_STAGES)
    assert not P.is_done(rd / "fitted" / f"{name}.parquet")
    assert (rd / "fitted" / f"{name}.parquet").exists()  # the half-written file is there
    status = run_status(rd)
    assert f"FAILED {name}" in status and "KilledWorker" in status
    assert not (rd / "catalog").exists()  # no catalog while a partition is missing
    # tasks queued on the dying worker may fail with it (allowed-failures=1): all are recorded
    failed_first = set(S.read_failures(rd)["infer"])
    assert name in failed_first
    (rd / "faults" / f"infer-{name}").unlink()
    again = run_stages(rd, cfg, FAKE_STAGES)
    assert again["stages"]["condition"]["submitted"] == 0
    assert again["stages"]["infer"]["submitted"] == len(failed_first)
    assert "failed 0" in run_status(rd).splitlines()[2]
    assert "exactly once" in validate_catalog(rd)


def test_task_exception_retried_then_recorded_with_traceback(run_dir):
    rd, _ = run_dir
    cfg = _config(retries=2)
    name = S.plan_partitions(rd, cfg)[0][0].name
    (rd / "faults").mkdir()
    (rd / "faults" / f"condition-{name}").write_text("raise")
    with pytest.raises(StageError, match=f"injected failure in condition {name}"):
        run_stages(rd, cfg, FAKE_STAGES)
    doc = S.read_failures(rd)["condition"][name]
    assert doc["attempts"] == 3 and "ValueError" in doc["error"]
    assert "_fake_stages.py" in doc["traceback"] and "raise ValueError" in doc["traceback"]
    # the other partitions went through both stages; the failed one blocks only itself
    others = [p for p in S.read_plan(rd) if p.name != name]
    assert all(P.is_done(rd / "fitted" / f"{p.name}.parquet") for p in others)
    assert not (rd / "fitted" / f"{name}.parquet").exists()
    assert "injected failure" in run_status(rd)
    (rd / "faults" / f"condition-{name}").unlink()
    again = run_stages(rd, cfg, FAKE_STAGES)
    assert again["stages"]["condition"]["submitted"] == 1 and again["stages"]["infer"]["submitted"] == 1
    assert S.read_failures(rd) == {}


def test_wrong_output_schema_is_one_clear_failure(run_dir):
    rd, _ = run_dir
    cfg = _config(retries=0)
    name = S.plan_partitions(rd, cfg)[0][1].name
    (rd / "faults").mkdir()
    (rd / "faults" / f"infer-{name}").write_text("badschema")
    with pytest.raises(StageError, match=name):
        run_stages(rd, cfg, FAKE_STAGES)
    err = S.read_failures(rd)["infer"][name]["error"]
    assert "SchemaError" in err and "chi2_opt" in err and "double" in err


def test_refuses_to_resume_on_changed_config_or_inputs(run_dir):
    rd, _ = run_dir
    cfg = _config()
    run_stages(rd, cfg, FAKE_STAGES)
    with pytest.raises(StageError, match=r"\[inference\] max_iterations: 50 -> 7"):
        run_stages(rd, cfg.replace(inference={"max_iterations": 7}), FAKE_STAGES)
    # the cluster section, and operational fields such as the compilation cache, may change between attempts
    out = run_stages(rd, cfg.replace(cluster={"retries": 0}, inference={"compilation_cache": False}), FAKE_STAGES)
    assert out["stages"]["infer"]["submitted"] == 0
    write_raw(rd, 10, LEVEL, PIXELS, seed=9, name="part-001")
    with pytest.raises(StageError, match=r"input added: raw/gaia_source/part-001.parquet"):
        run_stages(rd, cfg, FAKE_STAGES)


def test_duplicate_input_source_ids_rejected(tmp_path):
    sid = write_raw(tmp_path, 50, LEVEL, PIXELS)
    import pyarrow as pa

    pq.write_table(pa.table({"source_id": sid[:2], "ra": [1.0, 2.0], "dec": [3.0, 4.0]}),
                   tmp_path / "raw" / "gaia_source" / "dup.parquet")
    with pytest.raises(InputError, match=f"duplicated source_id.*{min(sid[:2])}"):
        run_stages(tmp_path, _config(), FAKE_STAGES)
    assert not (tmp_path / "conditioned").exists()


def test_missing_model_artifact_is_one_message_before_any_work(run_dir):
    rd, _ = run_dir
    with pytest.raises(StageError, match="model artifact .*model not found"):
        run_pipeline(rd, _config())
    assert not (rd / "conditioned").exists() and not (rd / "state" / "run.json").exists()


def test_unknown_profile_is_one_message(run_dir):
    rd, _ = run_dir
    with pytest.raises(Exception, match="unknown cluster profile 'nosuch'.*local"):
        run_pipeline(rd, _config(profile="nosuch"))


def test_status_without_run_says_so(tmp_path):
    with pytest.raises(StageError, match="no planned run"):
        run_status(tmp_path)


def test_plan_turns_rates_into_node_hours(tmp_path):
    from xpcat.production.run import plan_run

    bench = {
        "stars": 1000, "threads_per_worker": 1,
        "stages": {"condition": {"stars_per_s_per_worker": 500.0}, "infer": {"stars_per_s_per_worker": 20.0},
                   "catalog": {"stars_per_s_per_worker": 5000.0}},
        "bytes_per_star": {"conditioned": 9000.0, "fitted": 250.0, "catalog": 260.0},
        "peak_memory_mib_per_worker": 1500.0,
        "machine": {"cores": 2, "cpu_model": "test cpu", "gpu": None},
    }
    bj = tmp_path / "bench.json"
    bj.write_text("some log line\n" + json.dumps(bench))
    text = plan_run(219_197_643, "slurm", bj)
    doc = json.loads(text.splitlines()[-1])
    node_cores = 64  # slurm.yaml node.cores
    expect = sum(219_197_643 / r / 3600 / node_cores for r in (500.0, 20.0, 5000.0))
    assert doc["node_hours"] == pytest.approx(expect)
    assert doc["storage_bytes"]["conditioned"] == pytest.approx(219_197_643 * 9000.0)
    assert doc["partitions_max"] == 12 * 4**5
    with pytest.raises(Exception, match="GPU"):
        plan_run(10_000_000, "slurm-gpu", bj)


def test_real_conditioning_stage_on_a_synthetic_universe(tmp_path):
    """The condition stage through ``conditioning.condition_partition`` on Dask, then a rerun does nothing."""
    from xpcat.catalog_schema import CONDITIONED
    from xpcat.config import SimulationConfig
    from xpcat.production.stages import condition_stage
    from xpcat.production.synthetic.universe import simulate_universe

    simulate_universe(tmp_path, SimulationConfig(n_stars=150, seed=3))
    cfg = _config().replace(data={"partition_level": 1})
    stages = [condition_stage()]
    out = run_stages(tmp_path, cfg, stages, catalog=False)
    plan = S.read_plan(tmp_path)
    assert out["stars"] == 150 and out["stages"]["condition"]["completed"] == len(plan) > 1
    ids = []
    for p in plan:
        t = P.read_table(tmp_path / "conditioned" / f"{p.name}.parquet")
        assert t.schema.names == CONDITIONED.names and t.num_rows == p.rows
        ids.append(t.column("source_id").to_numpy())
    raw = pq.read_table(tmp_path / "raw" / "gaia_source", columns=["source_id"]).column(0).to_numpy()
    assert np.array_equal(np.sort(np.concatenate(ids)), np.sort(raw))
    again = run_stages(tmp_path, cfg, stages, catalog=False)
    assert again["stages"]["condition"]["submitted"] == 0


def test_model_hash_recorded_when_first_used_then_frozen(tmp_path):
    write_raw(tmp_path, 20, LEVEL, PIXELS)
    cfg = _config()
    assert S.check_resume(tmp_path, cfg, S.input_fingerprint(tmp_path, cfg), None) is False
    # conditioning ran without a model; the first run with one records its hash
    assert S.check_resume(tmp_path, cfg, S.input_fingerprint(tmp_path, cfg), "a" * 64) is True
    assert json.loads((tmp_path / "state" / "run.json").read_text())["model_hash"] == "a" * 64
    with pytest.raises(StageError, match="model artifact: 'a+' -> 'b+'"):
        S.check_resume(tmp_path, cfg, S.input_fingerprint(tmp_path, cfg), "b" * 64)


def test_xpcat_run_real_stages_local(tmp_path):
    """`xpcat run` on a LocalCluster: real conditioning and inference, HATS catalog, validate, status."""
    pytest.importorskip("xpcat.production.infer", reason="the inference stage (xpcat.production.infer) is not there yet")
    from _fake_stages import make_artifact
    from click.testing import CliRunner

    from xpcat.cli import cli
    from xpcat.config import SimulationConfig, write_config
    from xpcat.production.synthetic.universe import simulate_universe

    rd = tmp_path / "run"
    simulate_universe(rd, SimulationConfig(n_stars=120, seed=4))
    h = make_artifact(rd / "model")
    cfg = _config(memory_limit="4GiB").replace(  # JAX's compiled inference needs more than 1 GiB per worker
        data={"partition_level": 1},
        inference={"n_prior_samples": 16, "e_log10_step": 0.25, "n_refine": 2, "max_iterations": 5, "batch_size": 256},
    )
    cfg_path = write_config(cfg, tmp_path / "cfg")
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(cfg_path), "--run-dir", str(rd)])
    assert res.exit_code == 0, res.output
    summary = json.loads((rd / "state" / "last_run.json").read_text())  # the CLI prints a short summary
    assert summary["stars"] == 120 and summary["stages"]["catalog"]["rows"] == 120
    assert json.loads((rd / "state" / "run.json").read_text())["model_hash"] == h
    # the workers kept their compiled inference kernels for later workers
    assert any((rd / "state" / "jax-cache").iterdir())
    # the catalog says how its numbers were made (the fitted partitions' metadata), and marks each star's inputs
    from xpcat.catalog_schema import read_metadata

    pixel = next((rd / "catalog" / "dataset").rglob("*.parquet"))
    meta = read_metadata(pq.read_schema(pixel))
    assert meta["model_hash"] == h and meta["uncertainty"]["used"] in ("calibrated", "paper")
    assert meta["confidence_source"] == "placeholder" and set(meta["confidence_fallback"]) == {"teff", "feh", "logg"}
    assert meta["ln_prior_cut_mass"] == 0.999
    cat = pq.read_table(rd / "catalog" / "dataset", columns=["gdr3_source_id", "condition_flags"])
    cond = pa.concat_tables([pq.read_table(f, columns=["source_id", "condition_flags"])
                             for f in sorted((rd / "conditioned").glob("*.parquet"))])
    flags = dict(zip(cond.column(0).to_pylist(), cond.column(1).to_pylist()))
    assert [flags[i] for i in cat.column(0).to_pylist()] == cat.column(1).to_pylist()
    res = runner.invoke(cli, ["validate", str(rd)])
    assert res.exit_code == 0 and "exactly once" in res.output
    res = runner.invoke(cli, ["status", str(rd)])
    assert res.exit_code == 0 and "infer      done" in res.output and "failed 0" in res.output
    # a changed model refuses to resume, naming the change
    make_artifact(rd / "model", seed=1)
    res = runner.invoke(cli, ["run", str(cfg_path), "--run-dir", str(rd)])
    assert res.exit_code == 1 and "model artifact" in res.output


def test_moved_run_directory_resumes_with_nothing_to_redo(tmp_path):
    """Issue 19 item 6: inputs inside RUN_DIR are stored relative to it and identified by content."""
    import shutil

    from xpcat.config import read_run_config

    rd = tmp_path / "first"
    write_raw(rd, 200, LEVEL, PIXELS)
    labels = rd / "inputs" / "labels.parquet"
    labels.parent.mkdir()
    pq.write_table(pa.table({"source_id": pa.array([1, 2], pa.int64())}), labels)
    cfg = _config().replace(data={"labels": str(labels)})
    run_stages(rd, cfg, FAKE_STAGES)
    assert str(rd) not in (rd / "config.toml").read_text() and str(rd) not in (rd / "state" / "run.json").read_text()
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(rd, moved)
    shutil.rmtree(rd)
    frozen = read_run_config(moved)
    assert frozen.data.labels == "inputs/labels.parquet"
    out = run_stages(moved, frozen, FAKE_STAGES)
    assert out["resumed"] is True
    assert out["stages"]["condition"]["submitted"] == 0 and out["stages"]["infer"]["submitted"] == 0
    assert out["stages"]["catalog"]["skipped"] is True
    # a renamed raw file with the same content is the same input; changed content is not
    raw = sorted((moved / "raw" / "gaia_source").glob("*.parquet"))[0]
    raw.rename(raw.with_name("renamed.parquet"))
    assert run_stages(moved, frozen, FAKE_STAGES)["stages"]["condition"]["submitted"] == 0
    pq.write_table(pa.table({"source_id": pa.array([3], pa.int64())}), moved / "inputs" / "labels.parquet")
    with pytest.raises(StageError, match="input changed: inputs/labels.parquet"):
        run_stages(moved, frozen, FAKE_STAGES)


def test_every_file_a_run_writes_honours_the_umask(run_dir):
    """Issue 19 item 1: raw, conditioned, fitted, catalog and state files are group/world readable at umask 022."""
    import os
    import stat

    rd, _ = run_dir
    old = os.umask(0o022)
    try:
        run_stages(rd, _config(), FAKE_STAGES)
    finally:
        os.umask(old)
    modes = {p.relative_to(rd): stat.S_IMODE(p.stat().st_mode) for p in rd.rglob("*") if p.is_file()}
    assert any(str(p).startswith("catalog/dataset") for p in modes)
    private = {str(p): oct(m) for p, m in modes.items() if m & 0o044 != 0o044}
    assert not private, f"files not readable by group/others: {private}"

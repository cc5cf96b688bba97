"""``xpcat run --dry-run`` and the end-of-run summary (issue 19.13), on runs of the fake stages."""

from __future__ import annotations

from pathlib import Path

import pytest
from _fake_stages import FAKE_STAGES, write_raw
from click.testing import CliRunner

from xpcat.cli import cli
from xpcat.config import RunConfig, write_config
from xpcat.production import run_state as S
from xpcat.production.catalog import query_catalog
from xpcat.production.demo import FIRST_QUERY
from xpcat.production.dry_run import dry_run
from xpcat.production.run import run_stages
from xpcat.production.run_summary import format_run_summary

LEVEL = 2
PIXELS = [3, 17, 100]


def _config() -> RunConfig:
    return RunConfig().replace(
        data={"partition_level": LEVEL},
        cluster={"profile": "threads", "n_workers": 1, "memory_limit": "1GiB", "retries": 0},
        catalog={"highest_order": 3, "max_rows_per_partition": 60},
    )


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_raw(tmp_path, 240, LEVEL, PIXELS)
    return tmp_path


def test_dry_run_plans_writes_only_the_plan_and_sees_what_is_done(run_dir):
    cfg = _config()
    before = _files(run_dir)
    text = dry_run(run_dir, cfg)
    assert _files(run_dir) - before == {"state/plan.json"}
    assert f"240 stars in {len(PIXELS)} partitions at HEALPix level {LEVEL}" in text
    assert f"condition  done 0  will run {len(PIXELS)} (240 stars)" in text
    assert "model      none at" in text and "will be built" in text
    run_stages(run_dir, cfg, FAKE_STAGES)
    text = dry_run(run_dir, cfg)
    assert f"condition  done {len(PIXELS)}  will run 0" in text and f"infer      done {len(PIXELS)}  will run 0" in text
    assert "catalog    built (240 rows" in text
    first = S.read_plan(run_dir)[0]
    (run_dir / "fitted" / f"{first.name}.parquet").unlink()
    text = dry_run(run_dir, cfg)
    assert f"infer      done {len(PIXELS) - 1}  will run 1 ({first.rows} stars): {first.name}" in text


def test_cli_run_dry_run_starts_nothing(run_dir):
    config_file = write_config(_config(), run_dir)
    res = CliRunner().invoke(cli, ["run", str(config_file), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "dry run of" in res.output and "will run" in res.output and "Dask dashboard" not in res.output
    assert not (run_dir / "logs").exists() and not (run_dir / "state" / "run.json").exists()


def test_run_ends_with_a_short_summary_and_keeps_the_json(run_dir):
    out = run_stages(run_dir, _config(), FAKE_STAGES)
    text = format_run_summary(out)
    lines = text.splitlines()
    assert len(lines) <= 8 and "{" not in text
    assert lines[0].startswith(f"new run {run_dir.resolve()}: 240 stars in {len(PIXELS)} partitions")
    assert f"condition  {len(PIXELS)}/{len(PIXELS)} done ({len(PIXELS)} run now, 0 failed)" in text
    assert f"240 rows in {out['stages']['catalog']['pixels']} HATS pixels at {run_dir.resolve() / 'catalog'}" in text
    assert f"details: {run_dir.resolve() / 'state' / 'last_run.json'}" in text
    assert (run_dir / "state" / "last_run.json").is_file()
    # counts in the demo's first query print as integers
    table = query_catalog(run_dir, FIRST_QUERY, fmt="table")
    assert ".0" not in table and "240" in table


def test_summary_counts_partitions_blocked_by_an_earlier_stage():
    summary = {"run_dir": "/r", "stars": 10, "partitions": 3, "resumed": True, "seconds": 1.0, "workers": 1,
               "log": "/r/logs/x.log", "stages": {
                   "condition": {"completed": 2, "failed_partitions": ["a"], "pending": ["a"]},
                   "infer": {"completed": 2, "failed_partitions": [], "pending": []}}}
    text = format_run_summary(summary)
    assert "condition  2/3 done (2 run now, 1 failed)" in text
    assert "infer      2/3 done (2 run now, 0 failed, 1 waiting for an earlier stage)" in text


def test_cli_run_prints_the_dashboard_and_a_short_summary(run_dir, monkeypatch):
    import xpcat.production.run as engine

    def fake_pipeline(rd, cfg, **kwargs):
        return run_stages(rd, cfg, FAKE_STAGES, **kwargs)

    monkeypatch.setattr(engine, "run_pipeline", fake_pipeline)
    config_file = write_config(_config(), run_dir)
    res = CliRunner().invoke(cli, ["run", str(config_file)])
    assert res.exit_code == 0, res.output
    assert "Dask dashboard: http" in res.stdout
    assert "240 stars in 3 partitions" in res.stdout and '"stages"' not in res.stdout
    assert len(res.stdout.strip().splitlines()) <= 9

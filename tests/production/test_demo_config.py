"""The demo's configuration: the quick presets where the base asks for the paper's, the universe's tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xpcat.config import RunConfig, config_from_dict, config_to_dict, write_config
from xpcat.errors import InputError, StageError
from xpcat.production.demo import DEMO_LEVEL, DEMO_STARS, demo_config, run_demo
from xpcat.production.demo_preflight import check_demo_workdir, minimum_demo_stars


def test_paper_presets_become_quick_and_set_values_stay(tmp_path):
    cfg = demo_config(RunConfig(), tmp_path, None, 7)
    quick = config_from_dict({"training": {"preset": "quick"}, "confidence": {"preset": "quick"}})
    assert cfg.training == quick.training and cfg.confidence == quick.confidence
    assert cfg.simulate.n_stars == DEMO_STARS and cfg.simulate.seed == 7 and cfg.data.partition_level == DEMO_LEVEL
    assert Path(cfg.data.labels) == tmp_path / "raw" / "labels" / "part-0000.parquet"
    # a value the user chose in the base configuration is not overwritten by the preset
    mine = demo_config(RunConfig().replace(training={"batch_size": 128}), tmp_path, 500, None)
    assert mine.training.preset == "quick" and mine.training.batch_size == 128 and mine.simulate.n_stars == 500
    assert mine.training.epochs == quick.training.epochs


# ---------------------------------------------------------------- issue 19.7: refuse before touching anything
def _touching_forbidden(monkeypatch):
    """Make simulating or fetching fail loudly: a refused demo must not get that far."""
    from xpcat.production.ingest import archive
    from xpcat.production.synthetic import universe

    def touched(*args, **kwargs):
        raise AssertionError("the demo simulated or fetched before refusing")

    monkeypatch.setattr(universe, "simulate_universe", touched)
    monkeypatch.setattr(archive, "fetch_run", touched)


def test_too_small_a_demo_is_refused_at_once_with_the_minimum(tmp_path, monkeypatch):
    _touching_forbidden(monkeypatch)
    low = minimum_demo_stars(demo_config(RunConfig(), tmp_path, None, None))
    assert 3000 < low <= 4100  # a 4000-star demo trains (measured); 3000 stars do not fill a batch of 512
    with pytest.raises(InputError, match=f"--stars 3000 is too few to train on: the smallest demo is --stars {low}"):
        run_demo(tmp_path / "w", RunConfig(), n_stars=3000)
    assert not (tmp_path / "w" / "universe").exists()
    # a smaller training batch lowers the minimum
    half = minimum_demo_stars(demo_config(RunConfig().replace(training={"batch_size": 256}), tmp_path, None, None))
    assert half <= low // 2 + 100


def test_workdir_of_another_demo_is_refused_before_anything_changes(tmp_path, monkeypatch):
    _touching_forbidden(monkeypatch)
    work = tmp_path / "w"
    made = demo_config(RunConfig(), work / "universe", 6000, 42)
    info = work / "universe" / "universe.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"n_stars": 6000, "config": config_to_dict(made)["simulate"]}))
    before = info.read_text()
    with pytest.raises(StageError, match=r"holds a demo made with --stars 6000 --seed 42.*n_stars: 6000 -> 5000"):
        run_demo(work, RunConfig(), n_stars=5000)
    with pytest.raises(StageError, match=r"seed: 42 -> 7"):
        run_demo(work, RunConfig(), seed=7)
    assert info.read_text() == before and sorted(p.name for p in work.iterdir()) == ["universe"]
    # the run's frozen config counts too (here: another training schedule), paths compared resolved
    write_config(made.replace(data={"labels": "universe/raw/labels/part-0000.parquet"}), work)
    check_demo_workdir(work, made)  # the same run: resumes
    with pytest.raises(StageError, match=r"made with other settings.*\[training\] epochs: 160 -> 7"):
        check_demo_workdir(work, demo_config(RunConfig().replace(training={"epochs": 7}), work / "universe", 6000, 42))


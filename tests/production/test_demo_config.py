"""The demo's configuration: the quick presets where the base asks for the paper's, the universe's tables."""

from __future__ import annotations

from pathlib import Path

from xpcat.config import RunConfig, config_from_dict
from xpcat.production.demo import DEMO_LEVEL, DEMO_STARS, demo_config


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

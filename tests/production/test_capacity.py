"""``xpcat plan``'s benchmark file: the 10^6-star run when present and usable, else the 10^5 one."""

from __future__ import annotations

import json

import pytest

from xpcat.errors import InputError, XpcatError
from xpcat.production import capacity


def _bench(stars: int, infer_rate: float, **extra) -> dict:
    return {
        "stars": stars, "threads_per_worker": 1,
        "stages": {"condition": {"stars_per_s_per_worker": 500.0}, "infer": {"stars_per_s_per_worker": infer_rate},
                   "catalog": {"stars_per_s_per_worker": 5000.0}},
        "bytes_per_star": {"conditioned": 9000.0, "fitted": 250.0, "catalog": 260.0},
        "peak_memory_mib_per_worker": 1500.0,
        "machine": {"cores": 2, "cpu_model": "test cpu", "gpu": None},
        **extra,
    }


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Point the plan's default files into tmp_path; the 10^5 file exists, the 10^6 one not yet."""
    million, default = tmp_path / "pipeline_1e6.json", tmp_path / "pipeline.json"
    monkeypatch.setattr(capacity, "MILLION_BENCHMARK", million)
    monkeypatch.setattr(capacity, "DEFAULT_BENCHMARK", default)
    monkeypatch.delenv("XPCAT_BENCHMARK_JSON", raising=False)
    default.write_text(json.dumps(_bench(100_000, 1000.0)))
    return million, default


def _infer_rate(text: str) -> float:
    return json.loads(text.splitlines()[-1])["stages"]["infer"]["stars_per_s_per_worker"]


def test_plan_uses_the_million_star_run_when_present(results):
    million, default = results
    assert capacity.load_benchmark()[1] == default
    million.write_text(json.dumps(_bench(1_000_000, 1200.0, stars_check={"ok": True})))
    doc, path = capacity.load_benchmark()
    assert path == million and doc["stars"] == 1_000_000
    text = capacity.plan_run(219_197_643, "slurm", None)
    assert "pipeline_1e6.json" in text.splitlines()[0] and _infer_rate(text) == 1200.0


@pytest.mark.parametrize("content", ["{not json", json.dumps({"stars": 1_000_000}),
                                     json.dumps(_bench(1_000_000, 1200.0, stars_check={"ok": False}))])
def test_unusable_million_star_run_falls_back_to_the_default(results, content, caplog):
    million, default = results
    million.write_text(content)
    with caplog.at_level("WARNING"):
        doc, path = capacity.load_benchmark()
    assert path == default and doc["stars"] == 100_000
    assert "not using the 10^6-star benchmark" in caplog.text
    assert _infer_rate(capacity.plan_run(219_197_643, "slurm", None)) == 1000.0


def test_explicit_file_and_environment_win(results, tmp_path, monkeypatch):
    million, _ = results
    million.write_text(json.dumps(_bench(1_000_000, 1200.0)))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_bench(5000, 7.0)))
    assert capacity.load_benchmark(other)[1] == other
    monkeypatch.setenv("XPCAT_BENCHMARK_JSON", str(other))
    assert capacity.load_benchmark()[0]["stars"] == 5000


def test_explicit_bad_file_is_refused_not_replaced(results, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_bench(1000, 5.0, stars_check={"ok": False, "expected": 1000})))
    with pytest.raises(InputError, match="exactly once"):
        capacity.load_benchmark(bad)


def test_no_benchmark_at_all_says_how_to_make_one(results):
    _, default = results
    default.unlink()
    with pytest.raises(XpcatError, match="no measured rates.*benchmarks/pipeline.py"):
        capacity.load_benchmark()

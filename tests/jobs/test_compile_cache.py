"""The run's persistent JAX compilation cache: a second process loads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from xpcat.production.run_dir import RunPaths

# A fresh interpreter (JAX's cache setting is per process): enable the run's cache, compile one
# kernel, and report JAX's own cache-hit events.
_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
from jax._src import monitoring
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
from xpcat.jobs.compile_cache import enable_compilation_cache
from xpcat.production.run_dir import RunPaths
path = enable_compilation_cache(RunPaths.of(sys.argv[1]).jax_cache)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
value = float(f(jnp.arange(12.0).reshape(3, 4)))
print(json.dumps({"path": str(path), "hits": len(hits), "value": value}))
"""


def _child(run_dir: Path, env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", _CHILD, str(run_dir)], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_first_ones_kernels(tmp_path):
    first = _child(tmp_path)
    cache = RunPaths.of(tmp_path).jax_cache
    assert first["path"] == str(cache) and first["hits"] == 0
    assert any(cache.iterdir()), "the first process wrote no cache entry"
    second = _child(tmp_path)
    assert second["hits"] >= 1 and second["value"] == first["value"]


def test_users_own_cache_directory_is_kept(tmp_path):
    own = tmp_path / "mine"
    got = _child(tmp_path / "run", {"JAX_COMPILATION_CACHE_DIR": str(own)})
    assert got["path"] == str(own)
    assert not RunPaths.of(tmp_path / "run").jax_cache.exists()


def test_unwritable_run_directory_compiles_without_cache(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be")
    got = _child(tmp_path)
    assert got["path"] == "None" and got["hits"] == 0

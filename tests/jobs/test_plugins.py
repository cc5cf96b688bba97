"""The model WorkerPlugin: loaded once per worker (also on workers started later), checked by hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from xpcat.errors import InputError
from xpcat.jobs.plugins import PLUGIN_NAME, ModelPlugin, load_model, worker_model


def make_artifact(path: Path, seed: int = 0) -> str:
    """A small untrained model artifact (random network, GMM on random labels); returns its hash."""
    import jax

    from xpcat.catalog_schema import FLUX_UNIT_W_M2_NM
    from xpcat.model.artifact import save_artifact
    from xpcat.model.forward import init_params, make_scaler
    from xpcat.model.prior import fit_gmm

    rng = np.random.default_rng(seed)
    labels = np.column_stack([rng.uniform(4000, 7000, 200), rng.normal(0, 0.3, 200), rng.uniform(1, 5, 200)])
    params = init_params(jax.random.PRNGKey(seed), n_hidden=1, width=8)
    params = jax.tree_util.tree_map(np.asarray, params)
    return save_artifact(path, params=params, scaler=make_scaler(labels), activation="tanh",
                         gmm=fit_gmm(labels, n_components=2, seed=seed),
                         wavelengths=np.linspace(392, 4602.8, 66), flux_unit=FLUX_UNIT_W_M2_NM)


def _model_id(model_dir: str, h: str) -> tuple[str, int]:
    from distributed import get_worker

    return get_worker().address, id(worker_model(model_dir, h))


def test_plugin_loads_once_per_worker_including_later_workers(tmp_path):
    h = make_artifact(tmp_path / "model")
    assert load_model(tmp_path / "model").content_hash == h
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ModelPlugin(tmp_path / "model", h))
        cluster.scale(2)  # a worker started after registration (as adapt does)
        client.wait_for_workers(2)
        loaded = client.run(lambda dask_worker: id(dask_worker.plugins[PLUGIN_NAME].artifact))
        hashes = client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].artifact.content_hash)
        assert len(loaded) == 2 and set(hashes.values()) == {h}
        futs = [client.submit(_model_id, str(tmp_path / "model"), h, pure=False) for _ in range(8)]
        for addr, ident in client.gather(futs):
            assert ident == loaded[addr]  # the task used the worker's one loaded artifact


def test_plugin_refuses_artifact_with_other_hash(tmp_path):
    make_artifact(tmp_path / "model")
    with pytest.raises(InputError, match="content hash"):
        load_model(tmp_path / "model", expected_hash="0" * 64)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        with pytest.raises(InputError, match="content hash"):
            client.register_plugin(ModelPlugin(tmp_path / "model", "0" * 64))


def test_missing_artifact_named(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'nope'} not found.*xpcat train"):
        load_model(tmp_path / "nope")

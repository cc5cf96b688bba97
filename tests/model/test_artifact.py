"""Tests of the model artifact (save / load / verify / components)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xpcat.errors import InputError
from xpcat.model import artifact as art
from xpcat.model import forward as fw
from xpcat.model.prior import fit_gmm


@pytest.fixture
def saved(tmp_path, rng):
    params = fw.init_params(jax.random.PRNGKey(0), width=8, ln_r=np.log(np.linspace(3, 0.1, 66)))
    labels = np.column_stack([rng.normal(5500, 600, 300), rng.normal(-0.2, 0.3, 300), rng.normal(4, 0.5, 300)])
    scaler = fw.make_scaler(labels)
    gmm = fit_gmm(labels, n_components=3)
    wl = np.arange(66, dtype=float) * 10 + 392
    h = art.save_artifact(tmp_path / "model", params=params, scaler=scaler, activation="tanh", gmm=gmm,
                          wavelengths=wl, flux_unit=1e-18, config={"training": {"epochs": 3, "lr": (1, 2)}},
                          data_summary={"n_train": 240})
    return tmp_path / "model", h, params, scaler, gmm


def test_roundtrip(saved):
    path, h, params, scaler, gmm = saved
    a = art.load_artifact(path)
    assert a.content_hash == h and len(h) == 64
    assert a.activation == "tanh" and a.flux_unit == 1e-18
    assert a.config["training"]["lr"] == [1, 2] and a.data_summary["n_train"] == 240
    for la, lb in zip(a.params["layers"], params["layers"]):
        np.testing.assert_array_equal(la["W"], np.asarray(lb["W"]))
        np.testing.assert_array_equal(la["b"], np.asarray(lb["b"]))
    np.testing.assert_array_equal(a.scaler["mean"], scaler["mean"])
    np.testing.assert_array_equal(a.gmm.precision_cholesky, gmm.precision_cholesky)
    np.testing.assert_allclose(a.R, np.linspace(3, 0.1, 66), rtol=1e-6)
    m = a.forward_model()
    theta = jnp.array([5000.0, 0.0, 4.0])
    np.testing.assert_allclose(np.asarray(m.ln_flux_abs(theta)), np.asarray(fw.ln_flux_abs(params, scaler, theta)),
                               rtol=1e-6)
    assert a.code_version


def test_same_model_same_hash(saved, tmp_path):
    path, h, params, scaler, gmm = saved
    h2 = art.save_artifact(tmp_path / "again", params=params, scaler=scaler, activation="tanh", gmm=gmm,
                           wavelengths=np.arange(66, dtype=float) * 10 + 392, flux_unit=1e-18,
                           config={"training": {"epochs": 3, "lr": (1, 2)}}, data_summary={"n_train": 240})
    assert h2 == h


def test_add_component(saved):
    path, h, *_ = saved
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    h2 = art.add_component(path, "confidence", {"teff/W0": w, "feh/b0": np.ones(4)}, {"auc": [0.9, 0.8, 0.85]})
    assert h2 != h
    a = art.load_artifact(path)
    assert a.content_hash == h2
    np.testing.assert_array_equal(a.components["confidence"]["teff/W0"], w)
    assert a.component_meta["confidence"]["auc"] == [0.9, 0.8, 0.85]
    # replacing keeps one component
    art.add_component(path, "confidence", {"x": np.zeros(2)}, {})
    a = art.load_artifact(path)
    assert list(a.components) == ["confidence"] and list(a.components["confidence"]) == ["x"]
    with pytest.raises(art.ArtifactError, match="component name"):
        art.add_component(path, "../evil", {"x": np.zeros(2)}, {})
    with pytest.raises(art.ArtifactError, match="dtype object"):
        art.add_component(path, "bad", {"x": np.array([{}, 1], dtype=object)}, {})


def test_corrupt_array_file_refused(saved):
    path, *_ = saved
    data = bytearray((path / art.MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / art.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch"):
        art.load_artifact(path)


def test_edited_manifest_refused(saved):
    path, *_ = saved
    m = json.loads((path / art.MANIFEST).read_text())
    m["activation"] = "softplus"
    (path / art.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InputError, match="content hash mismatch"):
        art.load_artifact(path)


def test_other_format_version_refused(saved):
    path, *_ = saved
    m = json.loads((path / art.MANIFEST).read_text())
    m["format_version"] = "2.0"
    art._write_manifest(path, m)  # a consistent hash, but a future layout
    with pytest.raises(InputError, match="format version '2.0' is not supported"):
        art.load_artifact(path)


def test_missing_and_truncated(saved, tmp_path):
    path, *_ = saved
    with pytest.raises(InputError, match="manifest.json is missing"):
        art.load_artifact(tmp_path / "nothing")
    assert art.artifact_exists(path) and not art.artifact_exists(tmp_path / "nothing")
    (path / art.MANIFEST).write_text('{"format": "xpcat-mo')
    with pytest.raises(InputError, match="corrupt manifest"):
        art.load_artifact(path)


def test_refuses_nonfinite_and_bad_wavelengths(saved, tmp_path):
    _, _, params, scaler, gmm = saved
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["ln_R"] = bad["ln_R"].at[3].set(jnp.nan)
    with pytest.raises(art.ArtifactError, match="non-finite values in 'ln_R'"):
        art.save_artifact(tmp_path / "m2", params=bad, scaler=scaler, activation="tanh", gmm=gmm,
                          wavelengths=np.arange(66.0), flux_unit=1e-18)
    with pytest.raises(art.ArtifactError, match=r"wavelengths must have shape \(66,\)"):
        art.save_artifact(tmp_path / "m3", params=params, scaler=scaler, activation="tanh", gmm=gmm,
                          wavelengths=np.arange(61.0), flux_unit=1e-18)

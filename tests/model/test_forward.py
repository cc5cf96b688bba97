"""Tests of the forward model (Eq. 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from xpcat.model import forward as fw


def _model(dtype, seed=0, width=32, n_hidden=3):
    params = fw.init_params(jax.random.PRNGKey(seed), n_hidden=n_hidden, width=width, dtype=dtype,
                            out_bias=np.linspace(1.0, 4.0, 66), ln_r=np.log(np.linspace(3.0, 0.1, 66)))
    scaler = fw.make_scaler(np.array([[4000.0, -1.0, 1.0], [7000.0, 0.5, 5.0], [5500.0, 0.0, 4.0]]), dtype=dtype)
    return params, scaler


def test_paper_parameter_count():
    params, _ = _model(jnp.float32)
    # 3*32+32 + 2*(32*32+32) + 32*66+66 + 66 = 4484 (SPEC §2)
    assert fw.n_global_parameters(params) == 4484


def test_predict_flux_equals_eq8():
    plx, e = 2.5, 0.3
    with jax.enable_x64(True):
        params64, scaler = _model(jnp.float64)
        theta = jnp.array([5800.0, -0.2, 4.3])
        f = fw.predict_flux(params64, scaler, theta.astype(jnp.float64), jnp.log(plx), jnp.log(e))
        f_abs = jnp.exp(fw.ln_flux_abs(params64, scaler, theta.astype(jnp.float64)))
        expected = f_abs * plx**2 * jnp.exp(-e * jnp.exp(params64["ln_R"]))
        np.testing.assert_allclose(np.asarray(f), np.asarray(expected), rtol=1e-12)
        # plx = 1 mas, E -> 0 gives the absolute flux
        f1 = fw.predict_flux(params64, scaler, theta.astype(jnp.float64), 0.0, jnp.log(1e-30))
        np.testing.assert_allclose(np.asarray(f1), np.asarray(f_abs), rtol=1e-12)


def test_float32_default_and_batch_matches_single():
    params, scaler = _model(jnp.float32)
    rng = np.random.default_rng(1)
    theta = np.column_stack([rng.uniform(4000, 7000, 7), rng.uniform(-1, 0.4, 7), rng.uniform(1, 5, 7)]).astype(np.float32)
    lp = np.log(rng.uniform(0.2, 5, 7)).astype(np.float32)
    le = np.log(rng.uniform(0.01, 1, 7)).astype(np.float32)
    fb = jax.jit(fw.predict_flux_batch, static_argnames="activation")(params, scaler, theta, lp, le)
    assert fb.dtype == jnp.float32 and fb.shape == (7, 66)
    for i in range(7):
        np.testing.assert_allclose(np.asarray(fb[i]), np.asarray(fw.predict_flux(params, scaler, theta[i], lp[i], le[i])),
                                   rtol=2e-5)


@pytest.mark.parametrize("activation", list(fw.ACTIVATIONS))
def test_gradients_match_finite_differences_float64(activation):
    with jax.enable_x64(True):
        params, scaler = _model(jnp.float64, seed=3, width=8, n_hidden=3)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        scaler = {k: jnp.asarray(v, jnp.float64) for k, v in scaler.items()}
        theta = jnp.array([5200.0, -0.4, 3.9])
        w = jnp.linspace(0.5, 1.5, 66)

        # star variables (what inference and the star steps differentiate)
        def f_star(t, lp, le):
            return jnp.sum(w * fw.predict_flux(params, scaler, t, lp, le, activation))

        check_grads(f_star, (theta, jnp.log(1.7), jnp.log(0.4)), order=2, modes=["rev", "fwd"], eps=1e-4,
                    atol=1e-6, rtol=1e-6)

        # global parameters (what the model steps differentiate)
        def f_glob(p):
            return jnp.sum(w * jnp.log(fw.predict_flux(p, scaler, theta, jnp.log(1.7), jnp.log(0.4), activation)))
        check_grads(f_glob, (params,), order=1, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-6)


def test_extinction_vector_and_weight_l2():
    params, _ = _model(jnp.float32)
    np.testing.assert_allclose(np.asarray(fw.extinction_vector(params)), np.linspace(3.0, 0.1, 66), rtol=1e-5)
    n = sum(layer["W"].size for layer in params["layers"])
    sq = sum(float(np.sum(np.asarray(layer["W"], np.float64) ** 2)) for layer in params["layers"])
    assert float(fw.weight_l2(params)) == pytest.approx(sq / n, rel=1e-5)


def test_forward_model_object_is_a_pytree_usable_under_jit():
    params, scaler = _model(jnp.float32)
    model = fw.ForwardModel(params, scaler, "tanh")
    theta = jnp.array([5000.0, 0.0, 4.5])

    @jax.jit
    def g(m, t):
        return m.predict_flux(t, jnp.log(2.0), jnp.log(0.1))

    np.testing.assert_allclose(np.asarray(g(model, theta)),
                               np.asarray(fw.predict_flux(params, scaler, theta, jnp.log(2.0), jnp.log(0.1))), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.R), np.asarray(fw.extinction_vector(params)))
    assert model.ln_flux_abs(theta).shape == (66,)


def test_bad_inputs_raise_named_errors():
    with pytest.raises(fw.ForwardModelError, match="'relu6'"):
        fw.activation_fn("relu6")
    with pytest.raises(fw.ForwardModelError, match=r"\(n >= 2, 3\)"):
        fw.make_scaler(np.zeros((5, 2)))
    with pytest.raises(fw.ForwardModelError, match="1 rows with non-finite"):
        fw.make_scaler(np.array([[1.0, 2.0, 3.0], [np.nan, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    with pytest.raises(fw.ForwardModelError, match="ln_r must have shape"):
        fw.init_params(jax.random.PRNGKey(0), ln_r=np.zeros(5))

"""The forward model of Eq. 8: f_pred = exp(NN(Theta)) * plx^2 * exp(-E R).

Everything here is a pure function of arrays, written for one star and
``jax.vmap``-ed over stars (batched variants end in ``_batch``).

Units
-----
- ``theta`` : (3,) Teff [K], [Fe/H] [dex], logg [dex].
- ``ln_plx`` : natural log of the parallax in mas (plx = 1 mas is 1 kpc, where the
  predicted flux equals the absolute flux ``exp(ln_flux_abs)``).
- ``ln_e`` : natural log of the reddening E [mag, Bayestar19 units].
- fluxes : the internal flux unit (1e-18 W m^-2 nm^-1,
  :data:`xpcat.catalog_schema.FLUX_UNIT_W_M2_NM`), 61 XP samples then J H Ks W1 W2.

Model parameters are a pytree ``{"layers": [{"W": (n_in, n_out), "b": (n_out,)}, ...],
"ln_R": (66,)}``; the input standardisation ``scaler = {"mean": (3,), "scale": (3,)}``
is kept separate (it is not trained).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xpcat.catalog_schema.conditioned import N_FLUX
from xpcat.errors import InputError

__all__ = [
    "ACTIVATIONS",
    "N_OUT",
    "JAXArray",
    "ForwardModel",
    "ForwardModelError",
    "activation_fn",
    "extinction_vector",
    "init_params",
    "ln_flux_abs",
    "ln_flux_abs_batch",
    "make_scaler",
    "n_global_parameters",
    "predict_flux",
    "predict_flux_batch",
    "weight_l2",
]

logger = logging.getLogger(__name__)

JAXArray = jax.Array

#: Number of model outputs: 61 XP samples + J H Ks W1 W2.
N_OUT = N_FLUX

#: The smooth activations the network may use.
ACTIVATIONS: dict[str, Callable[[JAXArray], JAXArray]] = {
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}

Params = dict[str, Any]
Scaler = dict[str, Any]


class ForwardModelError(InputError):
    """Bad model parameters, scaler, labels or activation (named in the message)."""


def activation_fn(name: str) -> Callable[[JAXArray], JAXArray]:
    """The activation function called ``name``.

    Raises
    ------
    ForwardModelError
        If ``name`` is not one of :data:`ACTIVATIONS`.
    """
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ForwardModelError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


def init_params(
    key: JAXArray,
    *,
    n_hidden: int = 3,
    width: int = 32,
    n_in: int = 3,
    n_out: int = N_OUT,
    out_bias: np.ndarray | None = None,
    ln_r: np.ndarray | None = None,
    dtype: Any = jnp.float32,
) -> Params:
    """Random initial parameters (Glorot-uniform weights, zero hidden biases).

    Parameters
    ----------
    key : PRNG key
    n_hidden, width : int
        Hidden layers and units per hidden layer (paper: 3 x 32).
    n_in, n_out : int
        Input size (3 = Theta) and output size (66 fluxes).
    out_bias : (n_out,) array, optional
        Initial output bias, e.g. the mean ln absolute flux of the training set.
    ln_r : (n_out,) array, optional
        Initial ln R (e.g. ln of a standard extinction curve); default ln 1 = 0.
    dtype : floating dtype (float32 default; float64 for gradient checks).

    Returns
    -------
    params : dict pytree ``{"layers": [...], "ln_R": (n_out,)}``.
    """
    if n_hidden < 1 or width < 1:
        raise ForwardModelError(f"need n_hidden >= 1 and width >= 1, got n_hidden={n_hidden}, width={width}")
    sizes = [n_in] + [width] * n_hidden + [n_out]
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, (a, b) in zip(keys, zip(sizes[:-1], sizes[1:])):
        lim = np.sqrt(6.0 / (a + b))
        w = jax.random.uniform(k, (a, b), dtype=dtype, minval=-lim, maxval=lim)
        layers.append({"W": w, "b": jnp.zeros((b,), dtype=dtype)})
    if out_bias is not None:
        ob = jnp.asarray(out_bias, dtype=dtype)
        if ob.shape != (n_out,):
            raise ForwardModelError(f"out_bias must have shape ({n_out},), got {ob.shape}")
        layers[-1]["b"] = ob
    lr = jnp.zeros((n_out,), dtype=dtype) if ln_r is None else jnp.asarray(ln_r, dtype=dtype)
    if lr.shape != (n_out,):
        raise ForwardModelError(f"ln_r must have shape ({n_out},), got {lr.shape}")
    return {"layers": layers, "ln_R": lr}


def make_scaler(theta: np.ndarray, dtype: Any = np.float32) -> Scaler:
    """Input standardisation from training labels.

    Parameters
    ----------
    theta : (n, 3) array
        Teff [K], [Fe/H], logg of the training stars (finite).

    Returns
    -------
    scaler : ``{"mean": (3,), "scale": (3,)}`` numpy arrays; scale > 0.
    """
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim != 2 or theta.shape[1] != 3 or theta.shape[0] < 2:
        raise ForwardModelError(f"theta must have shape (n >= 2, 3), got {theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ForwardModelError(f"theta has {int((~np.isfinite(theta)).any(axis=1).sum())} rows with non-finite values")
    mean = theta.mean(axis=0)
    scale = theta.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return {"mean": mean.astype(dtype), "scale": scale.astype(dtype)}


def ln_flux_abs(params: Params, scaler: Scaler, theta: JAXArray, activation: str = "tanh") -> JAXArray:
    """ln of the absolute flux (at plx = 1 mas) of one star.

    Parameters
    ----------
    params : model pytree.
    scaler : input standardisation ``{"mean": (3,), "scale": (3,)}``.
    theta : (3,) Teff [K], [Fe/H] [dex], logg [dex].
    activation : name of the hidden-layer activation.

    Returns
    -------
    (66,) ln flux in the internal flux unit.
    """
    act = activation_fn(activation)
    x = (theta - scaler["mean"]) / scaler["scale"]
    layers = params["layers"]
    for layer in layers[:-1]:
        x = act(x @ layer["W"] + layer["b"])
    return x @ layers[-1]["W"] + layers[-1]["b"]


def extinction_vector(params: Params) -> JAXArray:
    """The extinction curve R = exp(ln_R), shape (66,), per unit E."""
    return jnp.exp(params["ln_R"])


def predict_flux(
    params: Params, scaler: Scaler, theta: JAXArray, ln_plx: JAXArray, ln_e: JAXArray, activation: str = "tanh"
) -> JAXArray:
    """Predicted flux of one star, Eq. 8.

    Parameters
    ----------
    theta : (3,) Teff [K], [Fe/H], logg.
    ln_plx : scalar, ln of the parallax in mas.
    ln_e : scalar, ln of the reddening E [mag].

    Returns
    -------
    (66,) flux in the internal flux unit: exp(ln_flux_abs + 2 ln_plx - E R).
    """
    e = jnp.exp(ln_e)
    return jnp.exp(ln_flux_abs(params, scaler, theta, activation) + 2.0 * ln_plx - e * extinction_vector(params))


def ln_flux_abs_batch(params: Params, scaler: Scaler, theta: JAXArray, activation: str = "tanh") -> JAXArray:
    """:func:`ln_flux_abs` over stars: theta (n, 3) -> (n, 66)."""
    return jax.vmap(lambda t: ln_flux_abs(params, scaler, t, activation))(theta)


def predict_flux_batch(
    params: Params, scaler: Scaler, theta: JAXArray, ln_plx: JAXArray, ln_e: JAXArray, activation: str = "tanh"
) -> JAXArray:
    """:func:`predict_flux` over stars: theta (n, 3), ln_plx (n,), ln_e (n,) -> (n, 66)."""
    return jax.vmap(lambda t, p, e: predict_flux(params, scaler, t, p, e, activation))(theta, ln_plx, ln_e)


def weight_l2(params: Params) -> JAXArray:
    """The Gaussian weight prior of Eq. 12: ||W||^2 / n_W over all network weights (not biases, not R)."""
    sq = sum(jnp.sum(layer["W"] ** 2) for layer in params["layers"])
    n = sum(layer["W"].size for layer in params["layers"])
    return sq / n


def n_global_parameters(params: Params) -> int:
    """Number of global parameters (weights, biases and R); 4484 for the paper's 3 x 32 network."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


@jax.tree_util.register_pytree_node_class
class ForwardModel:
    """A trained forward model bound to its parameters, with the interface inference uses.

    Attributes
    ----------
    params : model pytree.
    scaler : input standardisation.
    activation : str, hidden-layer activation (static under ``jit``).

    The object is a JAX pytree (``activation`` is static), so it can be passed
    to jitted functions.
    """

    def __init__(self, params: Params, scaler: Scaler, activation: str = "tanh") -> None:
        activation_fn(activation)
        self.params = params
        self.scaler = scaler
        self.activation = activation

    def tree_flatten(self):
        return (self.params, self.scaler), self.activation

    @classmethod
    def tree_unflatten(cls, activation, children):
        obj = object.__new__(cls)
        obj.params, obj.scaler = children
        obj.activation = activation
        return obj

    @property
    def R(self) -> JAXArray:
        """(66,) extinction curve per unit E."""
        return extinction_vector(self.params)

    def ln_flux_abs(self, theta: JAXArray) -> JAXArray:
        """(3,) Theta -> (66,) ln absolute flux (internal unit, plx = 1 mas)."""
        return ln_flux_abs(self.params, self.scaler, theta, self.activation)

    def predict_flux(self, theta: JAXArray, ln_plx: JAXArray, ln_e: JAXArray) -> JAXArray:
        """(3,) Theta, ln plx [mas], ln E [mag] -> (66,) predicted flux (internal unit)."""
        return predict_flux(self.params, self.scaler, theta, ln_plx, ln_e, self.activation)

    def astype(self, dtype: Any) -> ForwardModel:
        """A copy with every array cast to ``dtype`` (e.g. float64 for checks)."""
        cast = lambda x: jnp.asarray(x, dtype=dtype)  # noqa: E731
        return ForwardModel(jax.tree_util.tree_map(cast, self.params), jax.tree_util.tree_map(cast, self.scaler),
                            self.activation)

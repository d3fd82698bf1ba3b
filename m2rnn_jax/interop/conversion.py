"""Our Flax NNX M2RNN layer <-> the lm-engine PyTorch state dict, and a parity check users can run.

Parameter mapping (Flax path -> lm-engine name, transform; see ``m2rnn_jax.layers.m2rnn``):

    input_projection.kernel (h, P)    -> input_projection.weight (P, h)    transpose
    input_projection.bias (P,)        -> input_projection.bias (P,)
    conv1d.kernel (ks, C)             -> conv1d.weight (C, 1, ks)          kernel.T[:, None, :]
    conv1d.bias (C,)                  -> conv1d.bias (C,)
    decay_gate.A_log / dt_bias (N,)   -> decay_gate.A_log / dt_bias (N,)
    D (N, V)                          -> D (N, V)
    state_weight (Nw, V, V)           -> state_weight (Nw, V, V)
    g_norm.scale (N*V,)               -> g_norm.weight (N*V,)
    output_projection.kernel (N*V, h) -> output_projection.weight (h, N*V) transpose

Decoding states: Flax keeps the conv state as (B, ks - 1, C), lm-engine as (B, C, ks - 1); the recurrent state is
(B, N, K, V) in both.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax.interop.torch_reference import M2RNNTorch, torch
from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNState

__all__ = [
    "to_torch",
    "to_jax",
    "torch_state_dict_from_flax",
    "load_flax_into_torch",
    "flax_params_from_torch_state_dict",
    "torch_layer_from_flax",
    "randomize_layer_params",
    "compare_layer_with_torch",
]


def to_torch(x: jax.Array | np.ndarray) -> torch.Tensor:
    """A JAX/NumPy array as a CPU torch tensor of the same dtype (bfloat16 included)."""
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(x))


def to_jax(x: torch.Tensor) -> jax.Array:
    """A torch tensor as a JAX array of the same dtype (bfloat16 included); float64 needs x64 enabled."""
    if x.dtype == torch.bfloat16:
        return jnp.asarray(_to_numpy(x)).astype(jnp.bfloat16)
    return jnp.asarray(_to_numpy(x))


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """A detached CPU NumPy copy; bfloat16 (unknown to NumPy) comes back as float32, which holds it exactly."""
    x = x.detach().cpu()
    return (x.to(torch.float32) if x.dtype == torch.bfloat16 else x).numpy()


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _conv_kernel_to_weight(kernel: np.ndarray) -> np.ndarray:
    return kernel.T[:, None, :]


def _conv_weight_to_kernel(weight: np.ndarray) -> np.ndarray:
    if weight.ndim != 3 or weight.shape[1] != 1:
        raise ValueError(f"conv1d.weight: expected shape (C, 1, kernel_size), got {weight.shape}")
    return weight[:, 0, :].T


def _identity(x: np.ndarray) -> np.ndarray:
    return x


# Flax path -> (lm-engine name, Flax -> torch layout, torch -> Flax layout).
_MAPPING: dict[str, tuple[str, Callable, Callable]] = {
    "input_projection.kernel": ("input_projection.weight", _transpose, _transpose),
    "input_projection.bias": ("input_projection.bias", _identity, _identity),
    "conv1d.kernel": ("conv1d.weight", _conv_kernel_to_weight, _conv_weight_to_kernel),
    "conv1d.bias": ("conv1d.bias", _identity, _identity),
    "decay_gate.A_log": ("decay_gate.A_log", _identity, _identity),
    "decay_gate.dt_bias": ("decay_gate.dt_bias", _identity, _identity),
    "D": ("D", _identity, _identity),
    "state_weight": ("state_weight", _identity, _identity),
    "g_norm.scale": ("g_norm.weight", _identity, _identity),
    "output_projection.kernel": ("output_projection.weight", _transpose, _transpose),
}
_TORCH_TO_FLAX = {torch_name: flax_path for flax_path, (torch_name, _, _) in _MAPPING.items()}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        flat.update(_flatten(value, f"{path}.") if isinstance(value, dict) else {path: value})
    return flat


def _pure_params(layer_or_state: M2RNN | nnx.State | dict) -> dict:
    if isinstance(layer_or_state, nnx.Module):
        return nnx.to_pure_dict(nnx.state(layer_or_state, nnx.Param))
    if isinstance(layer_or_state, nnx.State):
        return nnx.to_pure_dict(layer_or_state)
    if isinstance(layer_or_state, dict):
        return layer_or_state
    raise ValueError(
        f"layer_or_state: expected an M2RNN layer, an nnx.State or a pure dict, got {type(layer_or_state).__name__}"
    )


def torch_state_dict_from_flax(layer_or_state: M2RNN | nnx.State | dict) -> dict[str, torch.Tensor]:
    """The lm-engine state dict (name -> torch tensor, same dtypes) of an M2RNN layer, its Param state or pure dict.

    Also converts a gradient tree of the same structure (the layouts are the same linear maps).
    """
    state_dict = {}
    for path, value in _flatten(_pure_params(layer_or_state)).items():
        if path not in _MAPPING:
            raise ValueError(f"layer_or_state: unknown M2RNN parameter {path!r}; expected one of {sorted(_MAPPING)}")
        name, to_torch_layout, _ = _MAPPING[path]
        state_dict[name] = to_torch(to_torch_layout(np.asarray(value)))
    return state_dict


def load_flax_into_torch(layer_or_state: M2RNN | nnx.State | dict, module: torch.nn.Module) -> torch.nn.Module:
    """Copy the Flax parameters into an lm-engine-layout torch module (strict: every name must match)."""
    module.load_state_dict(torch_state_dict_from_flax(layer_or_state), strict=True)
    return module


def flax_params_from_torch_state_dict(state_dict: dict[str, torch.Tensor], layer: M2RNN) -> M2RNN:
    """Write lm-engine weights into ``layer`` in place (cast to each parameter's dtype) and return it.

    Raises ValueError for a missing, unexpected or wrongly shaped entry.
    """
    params = nnx.state(layer, nnx.Param)
    current = _flatten(nnx.to_pure_dict(params))
    expected = {_MAPPING[path][0] for path in current}
    if set(state_dict) != expected:
        raise ValueError(
            f"state_dict: expected keys {sorted(expected)}; missing {sorted(expected - set(state_dict))}, "
            f"unexpected {sorted(set(state_dict) - expected)}"
        )
    updates: dict = {}
    for name, tensor in state_dict.items():
        path = _TORCH_TO_FLAX[name]
        value = _MAPPING[path][2](_to_numpy(tensor))
        old = current[path]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"state_dict[{name!r}]: expected Flax shape {tuple(old.shape)} after conversion, got {value.shape}"
            )
        node = updates
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = jnp.asarray(value, dtype=old.dtype)
    nnx.replace_by_pure_dict(params, updates)
    nnx.update(layer, params)
    return layer


def torch_layer_from_flax(layer: M2RNN, dtype: torch.dtype | None = None) -> M2RNNTorch:
    """An ``M2RNNTorch`` with the same config and weights as ``layer`` (default dtype: the layer's compute dtype)."""
    c = layer.config
    if dtype is None:
        dtype = to_torch(np.zeros((), dtype=layer.dtype)).dtype
    module = M2RNNTorch(
        layer.hidden_size,
        num_heads=c.num_heads,
        k_head_dim=c.k_head_dim,
        v_head_dim=c.v_head_dim,
        num_q_heads=c.num_q_heads,
        num_k_heads=c.num_k_heads,
        num_v_heads=c.num_v_heads,
        num_f_heads=c.num_f_heads,
        num_g_heads=c.num_g_heads,
        num_weight_heads=c.num_weight_heads,
        kernel_size=c.kernel_size,
        activation_function=c.activation_function,
        use_residual=c.use_residual,
        add_bias=c.add_bias,
        gradient_clipping=c.gradient_clipping,
        norm_eps=c.norm_eps,
        dtype=dtype,
    )
    return load_flax_into_torch(layer, module)


def randomize_layer_params(layer: M2RNN, seed: int, scale: float = 0.3) -> M2RNN:
    """Perturb every parameter in place: p += scale * std(p) * noise (std 1 for constant p), then return layer.

    Makes parity checks sensitive to layout mistakes that the structured init hides (W = I, D = 1, norm = 1).
    The noise is drawn with NumPy (``seed``): no JAX compilation.
    """
    rng = np.random.default_rng(seed)
    params = nnx.state(layer, nnx.Param)

    def perturb(leaf: jax.Array) -> jax.Array:
        value = np.asarray(leaf, dtype=np.float64)
        spread = float(np.std(value)) or 1.0
        return jnp.asarray(value + scale * spread * rng.standard_normal(value.shape), dtype=leaf.dtype)

    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map(perturb, nnx.to_pure_dict(params)))
    nnx.update(layer, params)
    return layer


def _errors(actual: Any, expected: torch.Tensor) -> dict[str, float]:
    actual = np.asarray(actual, dtype=np.float64)
    expected = _to_numpy(expected).astype(np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch between JAX {actual.shape} and torch {expected.shape}")
    max_abs = float(np.max(np.abs(actual - expected), initial=0.0))
    return {"abs": max_abs, "rel": max_abs / max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)}


def _run(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x: jax.Array, state: M2RNNState | None):
    return nnx.merge(graphdef, params, rest)(x, state)


@partial(jax.jit, static_argnums=0)  # one compilation per layer structure, reused by later comparisons
def _outputs_and_grads(graphdef, params, rest, x, state, cotangents):
    """Layer outputs and the vjp of (y, new state) w.r.t. (params, x, state)."""
    outputs, vjp = jax.vjp(lambda p, x_, s: _run(graphdef, p, rest, x_, s), params, x, state)
    return outputs, vjp(cotangents)


def compare_layer_with_torch(layer: M2RNN, x: jax.Array, state: M2RNNState | None = None, seed: int = 0) -> dict:
    """Run ``layer`` and its ``M2RNNTorch`` twin on x (B, S, h) and return their differences.

    Returns ``{name: {"abs": max |jax - torch|, "rel": that / max |torch|}}`` for the output ``y``, the new
    ``conv_state`` and ``recurrent_state``, and the gradients (random cotangents on y and the new recurrent
    state, fixed by ``seed``) w.r.t. x (``grad/x``), every parameter (``grad/<lm-engine name>``) and, when
    ``state`` is given, the incoming states (``grad/state.conv``, ``grad/state.recurrent``).
    The layer runs with its own config (backend included); the twin uses the layer's compute dtype.
    Meaningful when the layer's dtype equals its param_dtype (float32 or float64; float64 needs x64).
    """
    module = torch_layer_from_flax(layer)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    y_shape, state_shape = jax.eval_shape(partial(_run, graphdef), params, rest, x, state)
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(y_shape.shape).astype(np.dtype(y_shape.dtype))
    dh = rng.standard_normal(state_shape.recurrent.shape).astype(np.dtype(state_shape.recurrent.dtype))
    zero_conv = None if state_shape.conv is None else jnp.zeros(state_shape.conv.shape, state_shape.conv.dtype)
    cotangents = (jnp.asarray(dy), M2RNNState(zero_conv, jnp.asarray(dh)))
    (y, new_state), (grad_params, grad_x, grad_state) = _outputs_and_grads(graphdef, params, rest, x, state, cotangents)

    x_t = to_torch(x).requires_grad_()
    conv_in = rec_in = None
    if state is not None:
        rec_in = to_torch(state.recurrent).requires_grad_()
        if state.conv is not None:
            conv_in = to_torch(state.conv).transpose(1, 2).detach().requires_grad_()
    y_t, (conv_t, rec_t) = module(x_t, conv_in, rec_in)
    torch.autograd.backward([y_t, rec_t], [to_torch(dy), to_torch(dh)])

    errors = {"y": _errors(y, y_t), "recurrent_state": _errors(new_state.recurrent, rec_t)}
    if new_state.conv is not None:
        errors["conv_state"] = _errors(new_state.conv, conv_t.transpose(1, 2))
    errors["grad/x"] = _errors(grad_x, x_t.grad)
    torch_params = dict(module.named_parameters())
    for name, grad in torch_state_dict_from_flax(grad_params).items():
        errors[f"grad/{name}"] = _errors(_to_numpy(grad), torch_params[name].grad)
    if rec_in is not None:
        errors["grad/state.recurrent"] = _errors(grad_state.recurrent, rec_in.grad)
    if conv_in is not None:
        errors["grad/state.conv"] = _errors(grad_state.conv, conv_in.grad.transpose(1, 2))
    return errors

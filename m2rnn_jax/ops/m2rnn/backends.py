"""Registry of M2RNN backends and the rule that resolves ``backend="auto"``.

A backend is a function

    fn(q, k, v, W, f, h0, *, cu_seqlens, gradient_clipping, state_dtype, interpret, shapes) -> (y, h_final)

that receives validated inputs with their original head counts (``h0`` may be None, ``gradient_clipping`` is None
or |c|) and their sizes ``shapes`` (the :class:`~m2rnn_jax.ops.m2rnn.validation.M2RNNShapes` of
``validate_inputs``, or of one shard under a mesh; a direct call may pass None and the backend validates), and
returns ``y`` and the final state in any float dtype; the op casts them to the contract dtypes.
Kernel backends live in their own modules, which call :func:`register_backend` when imported; they are imported
lazily so that a missing optional dependency of one backend never breaks the others.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.m2rnn.validation import M2RNNShapes
from m2rnn_jax.ops.platform import default_platform
from m2rnn_jax.typing import Interpret


class Backend(Protocol):
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        W: jax.Array,
        f: jax.Array,
        h0: jax.Array | None,
        *,
        cu_seqlens: jax.Array | None,
        gradient_clipping: float | None,
        state_dtype: jnp.dtype,
        interpret: Interpret,
        shapes: M2RNNShapes | None,
    ) -> tuple[jax.Array, jax.Array]: ...


BACKEND_NAMES = ("auto", "scan", "pallas_gpu", "pallas_tpu")
PALLAS_BACKENDS = ("pallas_gpu", "pallas_tpu")

_REGISTRY: dict[str, Backend] = {}
_LAZY_MODULES = {
    "scan": "m2rnn_jax.ops.m2rnn.scan_backend",
    "pallas_gpu": "m2rnn_jax.ops.m2rnn.pallas_gpu",
    "pallas_tpu": "m2rnn_jax.ops.m2rnn.pallas_tpu",
}


def register_backend(name: str, fn: Backend) -> None:
    """Register ``fn`` as the implementation of backend ``name`` (one of :data:`BACKEND_NAMES`, not "auto")."""
    if name not in _LAZY_MODULES:
        raise ValueError(f"backend name: expected one of {sorted(_LAZY_MODULES)}, got {name!r}")
    _REGISTRY[name] = fn


def _platform() -> str:
    """The default device's platform (:func:`m2rnn_jax.ops.platform.default_platform`; a seam for tests)."""
    return default_platform()


def resolve_backend_name(backend: str, input_dtype: jnp.dtype = jnp.float32, v_dim: int | None = None) -> str:
    """Map ``backend`` (possibly "auto") to a concrete backend name.

    "auto" goes by the default device: pallas_gpu on NVIDIA GPUs, pallas_tpu on TPUs, scan elsewhere; float64
    inputs always get scan (the fused kernels compute in float32 and reject float64). On NVIDIA GPUs float32
    inputs with V > 16 (``v_dim``, when given) also get scan: the fused backward then runs its (V, V) products as
    exact float32 dots on few warps and was measured 5x slower than the scan (H200, B=128 S=128 N=4 K=2 V=64,
    forward+backward 27.1 vs 5.4 ms; bf16 inputs 1.27 ms fused; experiments/RESULTS.md session 8).
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)}, got {backend!r}")
    if backend != "auto":
        return backend
    if jnp.dtype(input_dtype) == jnp.float64:
        return "scan"
    platform = _platform()
    if platform == "gpu_nvidia" and jnp.dtype(input_dtype) == jnp.float32 and v_dim is not None and v_dim > 16:
        return "scan"
    return {"gpu_nvidia": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "scan")


def get_backend(name: str) -> Backend:
    """Return the implementation of concrete backend ``name``, importing its module on first use."""
    if name not in _REGISTRY:
        importlib.import_module(_LAZY_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"backend: {name!r} is not available (its module did not register it)")
    return _REGISTRY[name]


def available_backends() -> list[str]:
    """Concrete backends whose modules import on this machine."""
    names = []
    for name in _LAZY_MODULES:
        try:
            get_backend(name)
        except ImportError:
            continue
        names.append(name)
    return names

"""Causal depthwise 1-D convolution over time with a decoding state (SPEC §3.2 step 4, §8).

``y[t, c] = act(sum_j kernel[j, c] * x[t - (kernel_size - 1) + j, c] + bias[c])``: taps ordered oldest -> newest,
zero left padding (or the carried state) before the first token. The state is the last ``kernel_size - 1`` raw
(pre-conv) inputs, so running a sequence in pieces while carrying the state equals running it at once.
With ``segment_ids`` (documents, :mod:`m2rnn_jax.layers.documents`) taps that reach into an earlier document read
zeros, and the returned state keeps only inputs of the last document.

Two functions compute it: :func:`causal_conv_reference` is the plain formula differentiated by JAX (the layer uses
it with ``segment_ids``); :func:`causal_conv` (the layer without ``segment_ids``) gives the same values behind a
``jax.custom_vjp`` whose residuals are only the raw inputs (x and the state in their own dtypes, the parameters).
Autodiff of the plain formula keeps float32 copies of the window and of the pre-activation and splits the
window's cotangent back into [state | x]; the custom backward recomputes the pre-activation from x and reads its
cotangent (kept in the output cotangent's dtype: bf16 in bf16 layers) through a few fused passes: the kernel and
bias gradients as sibling reductions over (B, S), dx and d state as the transposed conv written straight into each.

:func:`causal_conv` has three backends (``backend=``): "jnp", the custom VJP above in XLA; "pallas_gpu", the fused
Pallas-Triton kernels of :mod:`pallas_kernels.gpu.causal_conv` (one pass over x for y; one pass over x and dy for
dx, d kernel and d bias; d state from the first kernel_size - 1 tokens by the "jnp" backward); and
"pallas_gpu_transpose", the "jnp" path up to dz (which XLA fuses with the layer's ops after the conv), then the
backward kernel with dz for dy and no activation for dx, d kernel and d bias (one pass over dz and x where XLA
made two; on an H100 0.917 -> 0.834 ms forward + backward alone, the 1L hybrid's step within the spread between
runs). "auto" is "jnp": on the H200 the fused kernels are correct and 3.4x faster
forward but only 1.15x forward + backward, and neutral in the train step (docs/norm_conv_vjp.md); the environment
variable ``M2RNN_JAX_CONV_BACKEND`` (read when a call is traced) naming a kernel backend makes "auto" pick it on an
NVIDIA GPU (the default device) for bf16 / f16 / f32 inputs and output, "jnp" elsewhere. Under a mesh the kernels
run inside ``jax.shard_map``: batch split over the data/fsdp/expert axes, channels over ``tensor`` (when they
divide).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from m2rnn_jax.layers.documents import document_index
from m2rnn_jax.layers.manual_axes import vary_together
from m2rnn_jax.ops.platform import on_nvidia_gpu
from m2rnn_jax.ops.rounding import stored_in
from m2rnn_jax.parallel.axes import HEAD_MESH_AXIS, auto_axis_sizes, batch_split_axes, spec_entry
from m2rnn_jax.parallel.context.axis import context_axis_size
from m2rnn_jax.parallel.context.mixers import causal_conv_over_context
from m2rnn_jax.typing import Dtype

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"silu": jax.nn.silu}
CONV_BACKENDS = ("auto", "jnp", "pallas_gpu", "pallas_gpu_transpose")
KERNEL_BACKENDS = ("pallas_gpu", "pallas_gpu_transpose")  # the backends that run Pallas kernels
BACKEND_ENV_VAR = "M2RNN_JAX_CONV_BACKEND"  # what "auto" prefers (module docstring)


def _window(x: jax.Array, state: jax.Array) -> jax.Array:
    """[state | x] in x's dtype: (B, kernel_size - 1 + S, C); the state is rounded to x's dtype as it is read."""
    return jnp.concatenate([state.astype(x.dtype), x], axis=1)


def _tap_products(window: jax.Array, kernel: jax.Array, seq_len: int) -> list[jax.Array]:
    """Tap j of every output: ``window[:, j : j + S] * kernel[j]`` (B, S, C) in kernel's (compute) dtype."""
    return [window[:, j : j + seq_len].astype(kernel.dtype) * kernel[j] for j in range(kernel.shape[0])]


def _last_inputs(x: jax.Array, state: jax.Array) -> jax.Array:
    """The next state: the last kernel_size - 1 entries of [state | x] (B, kernel_size - 1, C) in state's dtype."""
    tail = state.shape[1]
    seq_len = x.shape[1]
    recent = _window(x[:, seq_len - min(seq_len, tail) :], state)  # only the entries that can end up in the state
    return recent[:, recent.shape[1] - tail :].astype(state.dtype)


def causal_conv_reference(
    x: jax.Array,
    state: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    activation: str | None,
    dtype: Dtype,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The conv as a plain formula, differentiated by JAX: the layer's path with ``segment_ids``, and the
    reference that :func:`causal_conv` is tested against.

    Args:
        x: (B, S, C) raw inputs.
        state: (B, kernel_size - 1, C) the raw inputs before x.
        kernel: (kernel_size, C) taps, oldest -> newest.
        bias: (C,) or None.
        activation: a key of ``ACTIVATIONS`` or None.
        dtype: output dtype; the math runs in ``promote_types(float32, dtype)``.
        segment_ids: (B, S) document ids or None (see :class:`CausalDepthwiseConv1d`).

    Returns:
        y (B, S, C) in ``dtype`` and the new state (B, kernel_size - 1, C) in state's dtype.
    """
    batch, seq_len, _ = x.shape
    kernel_size = kernel.shape[0]
    compute_dtype = jnp.promote_types(jnp.float32, dtype)
    padded = _window(x, state)  # (B, S + kernel_size - 1, C)
    new_state = padded[:, seq_len:]
    taps = _tap_products(padded, kernel.astype(compute_dtype), seq_len)
    if segment_ids is not None:
        document = document_index(segment_ids, batch, seq_len)  # (B, S)
        padded_document = jnp.pad(document, ((0, 0), (kernel_size - 1, 0)))  # the state is document 0
        taps = [
            jnp.where((padded_document[:, j : j + seq_len] == document)[..., None], tap, 0)
            for j, tap in enumerate(taps)
        ]
        in_last_document = padded_document[:, seq_len:] == document[:, -1:]
        new_state = jnp.where(in_last_document[..., None], new_state, 0)
    y = sum(taps)
    if bias is not None:
        y = y + bias.astype(compute_dtype)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y.astype(dtype), new_state.astype(state.dtype)


def causal_conv(
    x: jax.Array,
    state: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    activation: str | None,
    dtype: Dtype,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """:func:`causal_conv_reference` without documents, with a custom backward.

    Same arguments (no ``segment_ids``) and results: y (B, S, C) in ``dtype``, new state (B, kernel_size - 1, C)
    in state's dtype. ``backend``: one of :data:`CONV_BACKENDS` (module docstring; :func:`resolve_conv_backend`);
    ``interpret`` runs the "pallas_gpu" kernels in Pallas' interpret mode (any platform, for tests). The state is a
    slice of the inputs and is differentiated by JAX. Under ``jax.shard_map`` the inputs are first cast to vary
    over the same manual axes (:mod:`m2rnn_jax.layers.manual_axes`).
    """
    inputs = vary_together(x, state, kernel, bias)  # cotangent types (shard_map)
    name = resolve_conv_backend(backend, inputs, dtype)
    if name == "pallas_gpu":
        y = _kernels_on_mesh(lambda *a: _fused_conv_output(*a, activation, dtype, interpret), *inputs)
    elif name == "pallas_gpu_transpose":
        y = _kernels_on_mesh(lambda *a: _conv_output(*a, activation, dtype, "kernel", interpret), *inputs)
    else:
        y = _conv_output(*inputs, activation, dtype, "jnp", False)
    return y, _last_inputs(x, state)


def resolve_conv_backend(backend: str, inputs: tuple[jax.Array | None, ...], dtype: Dtype) -> str:
    """The concrete backend of :func:`causal_conv`: ``backend`` unless it is "auto". "auto" is "jnp" unless the
    environment variable :data:`BACKEND_ENV_VAR` names one of :data:`KERNEL_BACKENDS`: then that one on an NVIDIA
    GPU when every input (x, state, kernel, bias; None skipped) and ``dtype`` are bf16 / f16 / f32, else "jnp"."""
    if backend not in CONV_BACKENDS:
        raise ValueError(f"backend: expected one of {list(CONV_BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    preferred = os.environ.get(BACKEND_ENV_VAR, "") or "jnp"
    if preferred not in CONV_BACKENDS[1:]:
        raise ValueError(f"{BACKEND_ENV_VAR}: expected one of {list(CONV_BACKENDS[1:])} or unset, got {preferred!r}")
    if preferred == "jnp":
        return "jnp"
    if not on_nvidia_gpu():
        return "jnp"
    dtypes = [jnp.dtype(dtype)] + [jnp.dtype(a.dtype) for a in inputs if a is not None]
    return preferred if all(d in _kernels().SUPPORTED_DTYPES for d in dtypes) else "jnp"


def _kernels() -> ModuleType:
    """:mod:`pallas_kernels.gpu.causal_conv`, imported on first use (Pallas-Triton; only the kernel backends need
    it)."""
    return importlib.import_module("pallas_kernels.gpu.causal_conv")


def _pre_activation(
    x: jax.Array, state: jax.Array, kernel: jax.Array, bias: jax.Array | None, compute_dtype: Dtype
) -> tuple[jax.Array, jax.Array]:
    """(window (B, kernel_size - 1 + S, C) in x's dtype, conv + bias (B, S, C) in ``compute_dtype``)."""
    window = _window(x, state)
    z = sum(_tap_products(window, kernel.astype(compute_dtype), x.shape[1]))
    if bias is not None:
        z = z + bias.astype(compute_dtype)
    return window, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _conv_output(
    x: jax.Array,
    state: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    activation: str | None,
    dtype: Dtype,
    transpose: str,
    interpret: bool,
) -> jax.Array:
    """y (B, S, C) in ``dtype``: the activation of the conv of [state | x] plus the bias. ``transpose``: how the
    backward forms dx, d kernel and d bias from dz: "jnp" (XLA) or "kernel" (the Pallas backward kernel with no
    activation; ``interpret`` runs it in interpret mode)."""
    _, z = _pre_activation(x, state, kernel, bias, jnp.promote_types(jnp.float32, dtype))
    y = z if activation is None else ACTIVATIONS[activation](z)
    return y.astype(dtype)


def _conv_output_fwd(x, state, kernel, bias, activation, dtype, transpose, interpret):
    return _conv_output(x, state, kernel, bias, activation, dtype, transpose, interpret), (x, state, kernel, bias)


def _conv_output_bwd(
    activation: str | None,
    dtype: Dtype,
    transpose: str,
    interpret: bool,
    residuals: tuple[jax.Array, jax.Array, jax.Array, jax.Array | None],
    dy: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Cotangents of (x, state, kernel, bias) from dy (B, S, C), the pre-activation recomputed from the inputs."""
    x, state, kernel, bias = residuals
    compute_dtype = jnp.promote_types(jnp.float32, dtype)
    seq_len = x.shape[1]
    kernel_size = kernel.shape[0]
    window, z = _pre_activation(x, state, kernel, bias, compute_dtype)
    dz = dy.astype(compute_dtype)
    if activation is not None:
        (dz,) = jax.vjp(ACTIVATIONS[activation], z)[1](dz)
    # dz is the one activation-sized array this backward writes and reads back (twice): kept in dy's dtype when that
    # is narrower (bf16 layers: the rounding a bf16 autodiff of the layer applies to this cotangent), half the bytes.
    # stored_in keeps it so: without its barrier XLA's GPU compiler wrote dz in float32 for its two readers (the 1L
    # hybrid's H200 step, session 12's profile: 20 float32 (B, S, C) buffers a step, each written once, read twice)
    dz = stored_in(dz, jnp.promote_types(dy.dtype, x.dtype))
    # d window[i] = sum_j kernel[j] dz[i - j] (the transposed conv), with dz[i - j] = dz_padded[i - j + ks - 1]
    taps = kernel.astype(compute_dtype)
    dz_padded = jnp.pad(dz, ((0, 0), (kernel_size - 1, kernel_size - 1), (0, 0)))

    def dwindow(start: int, length: int) -> jax.Array:
        """d window[start : start + length] (B, length, C) in x's dtype (as the window's cast back from compute)."""
        shifted = [
            dz_padded[:, start + kernel_size - 1 - j : start + kernel_size - 1 - j + length] * taps[j]
            for j in range(kernel_size)
        ]
        return sum(shifted).astype(x.dtype)

    dstate = dwindow(0, kernel_size - 1).astype(state.dtype)
    if transpose == "kernel":  # one pass over dz and x: the backward kernel with dz for dy and no activation
        dx, dkernel, dbias = _kernels().causal_conv_backward(
            x, state, kernel, bias, dz, activation=None, interpret=interpret
        )
        return dx, dstate, dkernel.astype(kernel.dtype), None if bias is None else dbias.astype(bias.dtype)
    # d kernel[j] = sum over (B, S) of dz * window[:, j : j + S], d bias = sum of dz: sibling reductions of one read
    dkernel = jnp.stack(
        [jnp.sum(dz * window[:, j : j + seq_len].astype(compute_dtype), axis=(0, 1)) for j in range(kernel_size)]
    )
    dbias = None if bias is None else jnp.sum(dz, axis=(0, 1)).astype(bias.dtype)
    return dwindow(kernel_size - 1, seq_len), dstate, dkernel.astype(kernel.dtype), dbias


_conv_output.defvjp(_conv_output_fwd, _conv_output_bwd)


def _kernels_on_mesh(
    run: Callable[..., jax.Array], x: jax.Array, state: jax.Array, kernel: jax.Array, bias: jax.Array | None
) -> jax.Array:
    """``run(x, state, kernel, bias)`` (a conv whose forward or backward runs Pallas kernels), inside
    ``jax.shard_map`` when the current mesh has auto axes that split the batch or the channels (a Pallas kernel is
    opaque to XLA's partitioner, which would gather its inputs). The backward is linear in dy, so shard_map's
    transpose (summing the replicated parameters' cotangents) is exact."""
    sizes = auto_axis_sizes()
    batch_axes = batch_split_axes(sizes, x.shape[0])
    channel_shards = sizes.get(HEAD_MESH_AXIS, 1)
    channel_axis = HEAD_MESH_AXIS if channel_shards > 1 and x.shape[-1] % channel_shards == 0 else None
    if not batch_axes and channel_axis is None:
        return run(x, state, kernel, bias)
    tokens = P(spec_entry(batch_axes), None, channel_axis)
    specs = (tokens, tokens, P(None, channel_axis), None if bias is None else P(channel_axis))
    return jax.shard_map(run, in_specs=specs, out_specs=tokens, check_vma=False)(x, state, kernel, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_conv_output(
    x: jax.Array,
    state: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    activation: str | None,
    dtype: Dtype,
    interpret: bool,
) -> jax.Array:
    """:func:`_conv_output` by the fused kernels: y (B, S, C) in ``dtype``."""
    return _kernels().causal_conv_forward(
        x, state, kernel, bias, activation=_activation(activation), out_dtype=dtype, interpret=interpret
    )


def _fused_conv_output_fwd(x, state, kernel, bias, activation, dtype, interpret):
    return _fused_conv_output(x, state, kernel, bias, activation, dtype, interpret), (x, state, kernel, bias)


def _fused_conv_output_bwd(
    activation: str | None,
    dtype: Dtype,
    interpret: bool,
    residuals: tuple[jax.Array, jax.Array, jax.Array, jax.Array | None],
    dy: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """dx, d kernel, d bias from the backward kernel; d state, which only the first kernel_size - 1 tokens reach,
    from :func:`_conv_output_bwd` of those tokens."""
    x, state, kernel, bias = residuals
    dx, dkernel, dbias = _kernels().causal_conv_backward(
        x, state, kernel, bias, dy, activation=_activation(activation), interpret=interpret
    )
    tail = state.shape[1]
    head = (x[:, :tail], state, kernel, bias)
    dstate = _conv_output_bwd(activation, dtype, "jnp", False, head, dy[:, :tail])[1] if tail else jnp.zeros_like(state)
    return dx, dstate, dkernel.astype(kernel.dtype), None if bias is None else dbias.astype(bias.dtype)


_fused_conv_output.defvjp(_fused_conv_output_fwd, _fused_conv_output_bwd)


def _activation(name: str | None) -> Callable[[jax.Array], jax.Array] | None:
    return None if name is None else ACTIVATIONS[name]


class CausalDepthwiseConv1d(nnx.Module):
    """Depthwise causal conv with parameters ``kernel`` (kernel_size, C) and optional ``bias`` (C,).

    lm-engine stores ``conv1d.weight`` as (C, 1, kernel_size): ``kernel = weight[:, 0, :].T``.
    The convolution and the activation run in ``promote_types(float32, dtype)``; the output is cast to ``dtype``.

    Args:
        channels: C.
        kernel_size: number of taps (>= 1).
        activation: ``"silu"`` or ``None`` (identity), applied after the bias.
        use_bias: add a learnable bias (zeros at init).
        initializer_range: std of the N(0, std) kernel init.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        activation: str | None = "silu",
        use_bias: bool = False,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels <= 0:
            raise ValueError(f"channels: expected a positive value, got {channels}")
        if kernel_size <= 0:
            raise ValueError(f"kernel_size: expected a positive value, got {kernel_size}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)} or None, got {activation!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev=initializer_range)
        self.kernel = nnx.Param(
            init(rngs.params(), (kernel_size, channels), param_dtype), out_sharding=(None, None), eager_sharding=False
        )
        self.bias = (
            nnx.Param(jnp.zeros((channels,), dtype=param_dtype), out_sharding=(None,), eager_sharding=False)
            if use_bias
            else None
        )

    def init_state(self, batch_size: int, dtype: Dtype = jnp.float32) -> jax.Array:
        """Zero state (B, kernel_size - 1, C): the conv of a sequence's first tokens sees zero padding."""
        return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), dtype=dtype)

    def __call__(
        self, x: jax.Array, state: jax.Array | None = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """x (B, S, C), state (B, kernel_size - 1, C) or None -> (y (B, S, C) in ``dtype``, new state).

        The new state holds the last ``kernel_size - 1`` raw inputs of ``[state, x]`` in the state's dtype
        (``x.dtype`` when ``state`` is None). ``segment_ids`` (B, S): document ids; a tap whose input lies in an
        earlier document than its output reads zero (the state counts as the document at position 0), and state
        entries outside the last document are zero.
        """
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"x: expected shape (B, S, {self.channels}), got {x.shape}")
        if context_axis_size() > 1:  # the sequence is split over devices: halo exchange between the shards
            return causal_conv_over_context(self, x, state, segment_ids=segment_ids)
        batch, seq_len, _ = x.shape
        if state is None:
            state = self.init_state(batch, dtype=x.dtype)
        expected_state = (batch, self.kernel_size - 1, self.channels)
        if state.shape != expected_state:
            raise ValueError(f"state: expected shape {expected_state}, got {state.shape}")

        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        if segment_ids is not None:
            return causal_conv_reference(
                x, state, kernel, bias, activation=self.activation, dtype=self.dtype, segment_ids=segment_ids
            )
        return causal_conv(x, state, kernel, bias, activation=self.activation, dtype=self.dtype)

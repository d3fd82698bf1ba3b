"""Causal depthwise conv over time as fused NVIDIA GPU kernels (Pallas, Triton lowering): forward and backward.

With the window ``w = [state | x]`` (B, ks - 1 + S, C) and ``ks`` taps ordered oldest -> newest,

    z[t] = sum_j kernel[j] * w[t + j] + bias,        y[t] = act(z[t])                              (forward)
    dz[t] = dy[t] * act'(z[t]),  dw[i] = sum_j kernel[j] * dz[i - j],
    d kernel[j] = sum_{b, t} dz[t] * w[t + j],  d bias = sum_{b, t} dz[t]                          (backward)

Neither kernel builds the window: a program reads its rows of x shifted by each tap (the rows before the
sequence come from the state, a masked load that only the first row block issues), so every input is read once
from memory and the shifted re-reads hit the cache. Arithmetic is float32 whatever the input dtype.

The forward runs one program per (sequence, block of rows, block of channels) and writes y only. The backward
recomputes the pre-activation from x (nothing saved but the inputs): a program walks ``blocks_per_program``
row blocks of one (sequence, channel block); per block it reads x at 2 ks - 1 row shifts, evaluates dz at the ks
shifts that dx needs (dz[t .. t + ks - 1]), writes dx, and sums d kernel and d bias in registers. It writes one
float32 partial sum per program, which the caller reduces. The cotangent of the state (its ks - 1 rows only need
dz of the first ks - 1 tokens) is left to the caller. Rows past S and channels past C are masked, so S and C are
arbitrary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Activation = Callable[[jax.Array], jax.Array] | None
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class ConvKernelConfig:
    """Launch parameters of both kernels.

    block_s, block_c: rows and channels of a program's tile (powers of two; Triton's block shapes must be).
    blocks_per_program: row blocks one backward program walks (its d kernel / d bias partial sums cover
        ``block_s * blocks_per_program`` rows, so the partial-sum arrays are that many times smaller than x).
    num_warps, num_stages: Triton's warps per program and software-pipeline depth.
    """

    block_s: int = 32
    block_c: int = 128
    blocks_per_program: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_s", "block_c", "blocks_per_program", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("block_s", "block_c"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"{name}: expected a power of two, got {value}")

    def compiler_params(self) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_config(seq_len: int, channels: int, *, backward: bool = False) -> ConvKernelConfig:
    """The launch parameters for x (B, seq_len, channels), picked by timing on the H200 (2026-12-04, bf16, 4 taps,
    SiLU, (8, 4096, 2048); ``python -m experiments.bench.norm_conv_check --conv-configs ...``, docs/norm_conv_vjp.md):
    forward tiles of 32 rows x 128 channels on 4 warps (0.137-0.146 ms; 8- and 4-row tiles 0.19-0.22 ms); backward
    tiles of 16 x 128 on 4 warps, walks of 512 rows (0.695 ms; 32-row tiles 0.77-0.79, 8-row tiles 0.86, 4-row
    tiles 0.88-0.91 ms). Tiles shrink to the next power of two of a smaller S or C, and the backward's warps with
    them (16 values per thread)."""
    block_s = min(16 if backward else 32, _next_power_of_two(seq_len))
    block_c = min(128, _next_power_of_two(channels))
    if not backward:
        return ConvKernelConfig(block_s=block_s, block_c=block_c, blocks_per_program=1)
    blocks_per_program = max(1, min(512 // block_s, -(-seq_len // block_s)))
    num_warps = max(1, min(4, block_s * block_c // 512))
    return ConvKernelConfig(
        block_s=block_s, block_c=block_c, blocks_per_program=blocks_per_program, num_warps=num_warps
    )


def _output(shape: tuple[int, ...], dtype: jnp.dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output type that varies over the manual mesh axes ``like`` varies over (inside a ``jax.shard_map`` with
    ``check_vma=True`` a kernel's outputs must say so); a plain one elsewhere."""
    manual = getattr(jax.typeof(like), "manual_axis_type", None)
    if not getattr(manual, "varying", None):
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)


def _check_inputs(x: jax.Array, state: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> None:
    """ValueError naming the argument for shapes and dtypes the kernels do not take."""
    if x.ndim != 3:
        raise ValueError(f"x: expected shape (B, S, C), got {x.shape}")
    batch, _, channels = x.shape
    if kernel.ndim != 2 or kernel.shape[1] != channels or kernel.shape[0] < 1:
        raise ValueError(f"kernel: expected shape (kernel_size >= 1, {channels}), got {kernel.shape}")
    expected_state = (batch, kernel.shape[0] - 1, channels)
    if state.shape != expected_state:
        raise ValueError(f"state: expected shape {expected_state}, got {state.shape}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias: expected shape ({channels},), got {bias.shape}")
    for name, array in (("x", x), ("state", state), ("kernel", kernel), ("bias", bias)):
        if array is not None and jnp.dtype(array.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: expected dtype bfloat16, float16 or float32, got {jnp.dtype(array.dtype)}")


class _Tiles:
    """Index helpers of one program's (block_s, block_c) tile: rows ``row0 + [0, block_s)`` of sequence b."""

    def __init__(self, x_ref, state_ref, b, row0, col0, config: ConvKernelConfig):
        self.x_ref, self.state_ref, self.b = x_ref, state_ref, b
        self.seq_len, self.channels = x_ref.shape[1], x_ref.shape[2]
        self.rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (config.block_s, 1), 0)  # (block_s, 1)
        self.row0, self.col0, self.block_s, self.block_c = row0, col0, config.block_s, config.block_c
        self.cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, config.block_c), 1)  # (1, block_c)
        self.col_ok = self.cols < self.channels

    def window(self, shift: int) -> jax.Array:
        """w at token rows + shift in float32 (block_s, block_c): x where the row is >= 0, the state (rows
        -(ks - 1) .. -1, rounded to x's dtype as the layer's window is) before that, zero past S or C. Indices are
        clamped into bounds (the interpreter reads every index; the GPU skips masked ones)."""
        rows = self.rows + shift
        from_x = (rows >= 0) & (rows < self.seq_len) & self.col_ok
        x_rows = jnp.clip(rows, 0, self.seq_len - 1)
        value = pltriton.load(self.x_ref.at[self.b, x_rows, self.cols], mask=from_x, other=0).astype(jnp.float32)
        tail = self.state_ref.shape[1]
        if tail == 0 or shift >= 0:
            return value
        from_state = (rows < 0) & self.col_ok
        state_rows = jnp.clip(rows + tail, 0, tail - 1)
        before = pltriton.load(self.state_ref.at[self.b, state_rows, self.cols], mask=from_state, other=0)
        return jnp.where(rows < 0, before.astype(self.x_ref.dtype).astype(jnp.float32), value)

    def token(self, ref, shift: int = 0) -> jax.Array:
        """ref (B, S, C) at token rows + shift in float32, zero past S or C (shift >= 0)."""
        rows = self.rows + shift
        ok = (rows < self.seq_len) & self.col_ok
        rows = jnp.minimum(rows, self.seq_len - 1)
        return pltriton.load(ref.at[self.b, rows, self.cols], mask=ok, other=0).astype(jnp.float32)

    def channel_vector(self, ref, index: int | None = None) -> jax.Array:
        """(1, block_c) float32 row of a (C,) or (n, C) parameter (``index`` picks the row)."""
        cols = pl.ds(self.col0, self.block_c)
        view = ref.at[cols] if index is None else ref.at[jnp.int32(index), cols]
        return pltriton.load(view, mask=self.col_ok[0], other=0).astype(jnp.float32)[None, :]

    def store(self, ref, value: jax.Array) -> None:
        """Write the tile into ref (B, S, C) at its token rows, masked past S and C."""
        ok = (self.rows < self.seq_len) & self.col_ok
        view = ref.at[self.b, pl.ds(self.row0, self.block_s), pl.ds(self.col0, self.block_c)]
        pltriton.store(view, value.astype(ref.dtype), mask=ok)


def _taps(tiles: _Tiles, kernel_ref) -> list[jax.Array]:
    return [tiles.channel_vector(kernel_ref, j) for j in range(kernel_ref.shape[0])]


def _pre_activation(windows: list[jax.Array], taps: list[jax.Array], bias: jax.Array | None) -> jax.Array:
    """z = sum_j taps[j] * windows[j] (+ bias), float32 (block_s, block_c)."""
    z = sum(tap * window for tap, window in zip(taps, windows, strict=True))
    return z if bias is None else z + bias


def _forward_kernel(x_ref, state_ref, kernel_ref, *rest, activation: Activation, config: ConvKernelConfig):
    bias_ref, y_ref = rest if len(rest) == 2 else (None, rest[0])
    b, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tiles = _Tiles(x_ref, state_ref, b, i * config.block_s, c * config.block_c, config)
    kernel_size = kernel_ref.shape[0]
    taps = _taps(tiles, kernel_ref)
    bias = None if bias_ref is None else tiles.channel_vector(bias_ref)
    windows = [tiles.window(j - (kernel_size - 1)) for j in range(kernel_size)]
    z = _pre_activation(windows, taps, bias)
    tiles.store(y_ref, z if activation is None else activation(z))


def _backward_kernel(
    x_ref, state_ref, kernel_ref, *rest, activation: Activation, config: ConvKernelConfig, has_bias: bool
):
    if has_bias:
        bias_ref, dy_ref, dx_ref, dkernel_ref, dbias_ref = rest
    else:
        (dy_ref, dx_ref, dkernel_ref), bias_ref, dbias_ref = rest, None, None
    b, g, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kernel_size = kernel_ref.shape[0]
    tail = kernel_size - 1
    first_row = g * config.blocks_per_program * config.block_s
    tiles_at = lambda row0: _Tiles(x_ref, state_ref, b, row0, c * config.block_c, config)
    taps = _taps(tiles_at(first_row), kernel_ref)  # the parameters are loaded once per program
    bias = None if bias_ref is None else tiles_at(first_row).channel_vector(bias_ref)

    def row_block(k, sums):
        tiles = tiles_at(first_row + k * config.block_s)
        # dz at rows t + d for d = 0 .. tail; z[t + d] reads w at rows t + d - tail .. t + d. Written in the order
        # that keeps few tiles live: each window tile is loaded when first needed, each dz consumed at once.
        windows = [tiles.window(shift) for shift in range(-tail, 1)]
        dkernel, dbias = sums
        dx = None
        for d in range(kernel_size):
            if d:
                windows = windows[1:] + [tiles.window(d)]
            z = _pre_activation(windows, taps, bias)
            dy = tiles.token(dy_ref, d)  # zero past S, so dz is too
            dz = dy if activation is None else jax.vjp(activation, z)[1](dy)[0]
            if d == 0:  # d kernel[j] += sum_t dz[t] w[t + j], d bias += sum_t dz[t]
                dkernel = tuple(acc + jnp.sum(dz * w, axis=0) for acc, w in zip(dkernel, windows, strict=True))
                dbias = dbias + jnp.sum(dz, axis=0)
            # dx[t] = dw[t + tail] = sum_j kernel[j] dz[t + tail - j]: dz[t + d] meets kernel[tail - d]
            term = taps[tail - d] * dz
            dx = term if dx is None else dx + term
        tiles.store(dx_ref, dx)
        return dkernel, dbias

    zeros = jnp.zeros((config.block_c,), jnp.float32)
    dkernel, dbias = jax.lax.fori_loop(
        0, config.blocks_per_program, row_block, (tuple(zeros for _ in range(kernel_size)), zeros)
    )
    cols = pl.ds(c * config.block_c, config.block_c)
    col_ok = c * config.block_c + jax.lax.iota(jnp.int32, config.block_c) < x_ref.shape[2]
    for j, partial in enumerate(dkernel):
        pltriton.store(dkernel_ref.at[b, g, jnp.int32(j), cols], partial, mask=col_ok)
    if dbias_ref is not None:
        pltriton.store(dbias_ref.at[b, g, cols], dbias, mask=col_ok)


def _state_operand(x: jax.Array, state: jax.Array) -> jax.Array:
    """The state as the kernels take it: a one-row dummy like x's rows when kernel_size is 1 (never read; a ref
    needs a row)."""
    return state if state.shape[1] else jnp.zeros_like(x[:, :1])


def causal_conv_forward(
    x: jax.Array,
    state: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    activation: Activation,
    out_dtype: jnp.dtype,
    config: ConvKernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y = act(conv([state | x]) + bias).

    Args:
      x: (B, S, C) bf16 / f16 / f32. state: (B, ks - 1, C) the inputs before x. kernel: (ks, C) taps, oldest ->
        newest. bias: (C,) or None. activation: an elementwise function of float32 arrays or None.
      out_dtype: dtype of y. config: launch parameters (``default_config(S, C)`` when None).

    Returns:
      y (B, S, C) in ``out_dtype``.
    """
    _check_inputs(x, state, kernel, bias)
    if jnp.dtype(out_dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"out_dtype: expected bfloat16, float16 or float32, got {jnp.dtype(out_dtype)}")
    batch, seq_len, channels = x.shape
    config = config or default_config(seq_len, channels)
    tail_state = _state_operand(x, state)
    operands = (x, tail_state, kernel) + (() if bias is None else (bias,))
    grid = (batch, pl.cdiv(seq_len, config.block_s), pl.cdiv(channels, config.block_c))
    return pl.pallas_call(
        functools.partial(_forward_kernel, activation=activation, config=config),
        out_shape=_output(x.shape, out_dtype, x),
        grid=grid,
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="causal_conv_forward",
    )(*operands)


def causal_conv_backward(
    x: jax.Array,
    state: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    dy: jax.Array,
    *,
    activation: Activation,
    config: ConvKernelConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Cotangents of x, kernel and bias from dy; the pre-activation is recomputed from x and the state.

    Args: as :func:`causal_conv_forward`, plus dy (B, S, C) the cotangent of y; config defaults to
      ``default_config(S, C, backward=True)``.

    Returns:
      dx (B, S, C) in x's dtype, d kernel (ks, C) float32 and d bias (C,) float32 (None without bias). The
      state's cotangent is not computed (it depends only on the first ks - 1 tokens; see the module docstring).
    """
    _check_inputs(x, state, kernel, bias)
    if dy.shape != x.shape or jnp.dtype(dy.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"dy: expected shape {x.shape} in bfloat16, float16 or float32, got {dy.shape} {dy.dtype}")
    batch, seq_len, channels = x.shape
    kernel_size = kernel.shape[0]
    config = config or default_config(seq_len, channels, backward=True)
    groups = pl.cdiv(seq_len, config.block_s * config.blocks_per_program)
    tail_state = _state_operand(x, state)
    operands = (x, tail_state, kernel) + (() if bias is None else (bias,)) + (dy,)
    out_shape = [
        _output(x.shape, x.dtype, x),
        _output((batch, groups, kernel_size, channels), jnp.float32, x),
    ]
    if bias is not None:
        out_shape.append(_output((batch, groups, channels), jnp.float32, x))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, activation=activation, config=config, has_bias=bias is not None),
        out_shape=out_shape,
        grid=(batch, groups, pl.cdiv(channels, config.block_c)),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="causal_conv_backward",
    )(*operands)
    dbias = None if bias is None else jnp.sum(outs[2], axis=(0, 1))
    return outs[0], jnp.sum(outs[1], axis=(0, 1)), dbias

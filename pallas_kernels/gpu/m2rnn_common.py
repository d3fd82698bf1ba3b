"""Pieces shared by the M2RNN forward and backward GPU kernels (Pallas, Triton lowering).

Both kernels work on packed tokens: dense (B, S, ...) inputs are viewed as (B*S, ...) with
``cu_seqlens = [0, S, 2S, ...]``, so one kernel serves dense and varlen inputs. Feature sizes reaching the kernels
are powers of two >= 16 (the caller zero-pads K and V; zero padding is exact, see ``m2rnn_jax.ops.m2rnn.pallas_gpu``).

Grid of both kernels: (B, N, K // block_k): one program per (sequence, output head, block of state rows).
Rows of the state evolve independently (SPEC §2.2), so splitting K needs no communication inside the recurrence;
only reductions over K (y, dv, df) produce per-K-block partials that the caller sums.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tunable launch parameters of the M2RNN GPU kernels.

    block_k: state rows per program (a power of two >= 16); None means all K rows in one program.
    chunk_size: the forward stores the state every ``chunk_size`` steps for the backward (memory O(S / chunk)).
    recompute_block: the backward recomputes ``recompute_block`` states at a time into registers (a statically
        unrolled block, so keep it small: code size and registers grow with it) and walks them backward; it must
        divide ``chunk_size``.
    num_warps, num_stages: Triton launch parameters of both kernels.
    prefetch: how many steps ahead the forward walks load their inputs (1 was fastest on the H200: deeper queues
        cost registers and moves).
    approx_tanh: for 16-bit inputs, use the ``tanh.approx.f32`` instruction (max relative error about 2^-11, as
        the authors' kernels do) instead of an exact formula (``gluon_tanh``; ~3e-7). The default (SPEC §0.2 allows
        an approximate tanh where a kernel documents and tests it): on the H200 it makes the forward 1.5x faster
        (2.71 -> 1.81 ms at the paper shape, run 17) with the same error against the float32 reference to three
        digits (y 1.97e-3, gradients <= 3.3e-3 relative L2), because rounding y and the state's mma operand to
        16 bits dominates. float32 inputs and interpret mode (CPU) always run exact tanh.
    split_dot: for 16-bit inputs, feed the float32 state to the tensor cores as a sum of two 16-bit parts
        (about 16 mantissa bits) instead of rounding it to one 16-bit value.
    gluon_forward: run the forward with the explicit-layout Gluon kernel (``m2rnn_forward_gluon``) where it
        applies (see ``m2rnn_jax.ops.m2rnn.pallas_gpu.use_gluon_forward``); False keeps the Pallas-Triton forward.
    gluon_rows: state rows per program of the Gluon forward (None = all K rows: one warp per head; 32 was
        fastest at B=8 on the H200, 16 at B=1).
    gluon_tanh: exact tanh form of the Gluon forward: "mixed" (fastest on the H200), "newton" (one ex2 + Newton
        reciprocal on the FMA pipe) or "rcp" (ex2 + rcp, two special-function ops), used where ``approx_tanh``
        is False.
    gluon_backward: run the backward with the Gluon kernel (``m2rnn_backward_gluon``) where the Gluon forward
        runs (see ``m2rnn_jax.ops.m2rnn.pallas_gpu.use_gluon_backward``); False keeps the Pallas-Triton backward.
        ``default_config`` sets it: faster at B=8 and at B=1 of the paper shape (H200 run 26).
    gluon_block: steps the Gluon backward recomputes at a time into shared memory (gcd with chunk_size; 2 x 4
        bytes x rows x V x gluon_block of shared memory per program, and B N K V chunk_size / gluon_block floats
        of global scratch).
    """

    block_k: int | None = None
    chunk_size: int = 128
    recompute_block: int = 2
    num_warps: int = 2
    num_stages: int = 1
    prefetch: int = 1
    approx_tanh: bool = True
    split_dot: bool = False
    gluon_forward: bool = True
    gluon_rows: int | None = 32
    gluon_tanh: str = "mixed"
    gluon_backward: bool = False
    gluon_block: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk_size", "recompute_block", "num_warps", "num_stages", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.recompute_block > 16:
            raise ValueError(f"recompute_block: expected at most 16 (it is unrolled), got {self.recompute_block}")
        if self.chunk_size % self.recompute_block:
            raise ValueError(
                f"recompute_block: expected a divisor of chunk_size = {self.chunk_size}, got {self.recompute_block}"
            )
        if self.block_k is not None and (self.block_k < 16 or self.block_k & (self.block_k - 1)):
            raise ValueError(f"block_k: expected None or a power of two >= 16, got {self.block_k}")

    def rows_per_program(self, k_dim: int) -> int:
        """Rows of the (padded) state handled by one program: ``block_k`` capped at K."""
        return k_dim if self.block_k is None else min(self.block_k, k_dim)

    def compiler_params(self) -> pltriton.CompilerParams:
        """Explicit Triton compiler params (the default GPU lowering differs between jax 0.10 and 0.11)."""
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class StepNumerics:
    """How one recurrence step is computed.

    carry_dtype: dtype the state is rounded to after every step (its storage dtype).
    acc_dtype: dtype of the step arithmetic (float32, or float64 for float64 inputs).
    dot_dtype: operand dtype of the tensor-core products (the input dtype for 16-bit inputs, else acc_dtype).
    """

    carry_dtype: jnp.dtype
    acc_dtype: jnp.dtype
    dot_dtype: jnp.dtype
    approx_tanh: bool
    split_dot: bool
    interpret: bool

    @classmethod
    def create(cls, input_dtype: jnp.dtype, carry_dtype: jnp.dtype, config: KernelConfig, interpret: bool):
        acc_dtype = jnp.promote_types(carry_dtype, jnp.float32)
        sixteen_bit = jnp.dtype(input_dtype).itemsize == 2
        dot_dtype = jnp.dtype(input_dtype) if sixteen_bit else acc_dtype
        return cls(
            carry_dtype=jnp.dtype(carry_dtype),
            acc_dtype=jnp.dtype(acc_dtype),
            dot_dtype=dot_dtype,
            approx_tanh=config.approx_tanh and sixteen_bit and not interpret,
            split_dot=config.split_dot and sixteen_bit,
            interpret=interpret,
        )

    def matmul(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """a (M, L) in acc_dtype times b (L, P) already in dot_dtype -> (M, P) in acc_dtype."""
        if self.dot_dtype == self.acc_dtype:
            return jnp.dot(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=self.acc_dtype)
        a_hi = a.astype(self.dot_dtype)
        out = jnp.dot(a_hi, b, preferred_element_type=self.acc_dtype)
        if self.split_dot:
            a_lo = (a - a_hi.astype(self.acc_dtype)).astype(self.dot_dtype)
            out = out + jnp.dot(a_lo, b, preferred_element_type=self.acc_dtype)
        return out

    def outer_matmul(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """a^T b for a (L, M), b (L, P) in acc_dtype -> (M, P); one rounded pass (it feeds a long sum, dW)."""
        dims = (((0,), (0,)), ((), ()))
        if self.dot_dtype == self.acc_dtype:
            return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=self.acc_dtype)
        return lax.dot_general(
            a.astype(self.dot_dtype), b.astype(self.dot_dtype), dims, preferred_element_type=self.acc_dtype
        )

    def tanh(self, x: jax.Array) -> jax.Array:
        if self.approx_tanh:
            return pltriton.approx_tanh(x)
        if self.acc_dtype != jnp.float32:
            return jnp.tanh(x)
        if self.interpret:
            return tanh_f32(x)
        return _tanh_f32_ptx(x)

    def round_state(self, h: jax.Array) -> jax.Array:
        """Round the new state to its storage dtype (a no-op for a float32 carry)."""
        if self.carry_dtype == self.acc_dtype:
            return h
        return h.astype(self.carry_dtype).astype(self.acc_dtype)


_TWO_LOG2_E = 2.8853900817779268  # 2 / ln(2)


def tanh_f32(x: jax.Array) -> jax.Array:
    """Branch-free float32 tanh: 1 - 2 / (1 + 2^(2 x log2 e)) (the formula of the GPU kernels, in plain jnp).

    Its maximum absolute error is a few float32 ulps of 1 (~2e-7) for every x and it saturates exactly to +-1;
    the relative error grows near 0, which does not matter here because Z_t enters the state additively,
    blended with values of order one. The kernels evaluate the same formula with ``_tanh_f32_ptx``.
    """
    return 1.0 - 2.0 / (1.0 + jnp.exp2(x * _TWO_LOG2_E))


# One multiply, ex2, add, rcp, fma per element: 5 instructions of which 2 special-function ops, against ~22
# instructions with a data-dependent branch for libdevice tanhf. ex2.approx.ftz has a relative error below 2^-22
# and rcp.approx.ftz below 1 ulp, so the result stays within ~3e-7 of tanh in absolute terms.
_TANH_PTX = """{
  .reg .f32 t;
  mul.ftz.f32 t, $1, 0f4038AA3B;
  ex2.approx.ftz.f32 t, t;
  add.ftz.f32 t, t, 0f3F800000;
  rcp.approx.ftz.f32 t, t;
  fma.rn.ftz.f32 $0, t, 0fC0000000, 0f3F800000;
}"""


def _tanh_f32_ptx(x: jax.Array) -> jax.Array:
    [result] = pltriton.elementwise_inline_asm(
        _TANH_PTX, args=[x], constraints="=f,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)]
    )
    return result


@dataclasses.dataclass(frozen=True)
class HeadMap:
    """Source-head group sizes: output head n reads source head n // group (SPEC §0.3)."""

    q: int
    k: int
    v: int
    f: int
    w: int

    @classmethod
    def create(cls, num_heads: int, q, k, v, f, w) -> HeadMap:
        return cls(
            q=num_heads // q.shape[1],
            k=num_heads // k.shape[1],
            v=num_heads // v.shape[1],
            f=num_heads // f.shape[1],
            w=num_heads // w.shape[0],
        )


def step_inputs(refs, t: jax.Array, head: jax.Array, rows: pl.Slice, heads: HeadMap, acc_dtype: jnp.dtype):
    """Load the inputs of step t for one program: q_t, k_t (rows,), v_t (V,), f_t scalar, in acc_dtype."""
    q_ref, k_ref, v_ref, f_ref = refs
    q_t = q_ref[t, head // heads.q, rows].astype(acc_dtype)
    k_t = k_ref[t, head // heads.k, rows].astype(acc_dtype)
    v_t = v_ref[t, head // heads.v, :].astype(acc_dtype)
    f_t = f_ref[t, head // heads.f].astype(acc_dtype)
    return q_t, k_t, v_t, f_t


def recurrence_step(h_prev, w_dot, k_t, v_t, f_t, numerics: StepNumerics):
    """One step for a block of rows: h_prev (rows, V) -> (Z_t, H_t), both (rows, V) in acc_dtype."""
    z = numerics.tanh(numerics.matmul(h_prev, w_dot) + k_t[:, None] * v_t[None, :])
    return z, blend(h_prev, z, f_t, numerics)


def blend(h_prev, z, f_t, numerics: StepNumerics):
    """H_t = f_t H_{t-1} + (1 - f_t) Z_t (as Z_t + f_t (H_{t-1} - Z_t): two instructions), rounded to the state's
    storage dtype."""
    return numerics.round_state(z + f_t * (h_prev - z))


def walk_forward(lo, hi, h, w_dot, load, emit, numerics: StepNumerics, prefetch: int):
    """Run steps t in [lo, hi) from state h (rows, V) and return the state after them.

    ``load(t)`` returns (q_t, k_t, v_t, f_t) and must accept any t >= lo (clamp inside). The inputs of step
    t + prefetch are requested at step t, so a load has ``prefetch`` steps of the dependent chain to arrive.
    ``emit(t, h_prev, z, h_new, q_t)`` performs the per-step side effects (stores) of the caller.
    """

    def step(t, carry):
        h_prev, queue = carry
        (q_t, k_t, v_t, f_t), rest = queue[0], queue[1:]
        upcoming = load(t + prefetch)
        z, h_new = recurrence_step(h_prev, w_dot, k_t, v_t, f_t, numerics)
        emit(t, h_prev, z, h_new, q_t)
        return h_new, rest + (upcoming,)

    queue = tuple(load(lo + i) for i in range(prefetch))
    h, _ = lax.fori_loop(lo, hi, step, (h, queue))
    return h


def sequence_bounds(cu_ref, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[start, end) token range of sequence b."""
    return cu_ref[b], cu_ref[b + 1]


def cdiv(a, b):
    return (a + b - 1) // b


def row_slice(kb: jax.Array, rows: int) -> pl.Slice:
    return pl.ds(pl.multiple_of(kb * rows, rows), rows)

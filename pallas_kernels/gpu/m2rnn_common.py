"""Pieces shared by the M2RNN forward and backward GPU kernels (Pallas, Triton lowering).

Both kernels work on packed tokens: dense (B, S, ...) inputs are viewed as (B*S, ...) with
``cu_seqlens = [0, S, 2S, ...]``, so one kernel serves dense and varlen inputs. Feature sizes reaching the kernels
are powers of two >= 16 (the caller zero-pads K and V; zero padding is exact, see ``m2rnn_jax.ops.pallas_gpu``).

Head packing: one program owns P = ``heads_per_program`` heads side by side, a state tile (rows, P*V) whose column
j belongs to head j // V of the pack. W comes block-diagonal (P*V, P*V) per pack (the caller assembles it), so one
tensor-core product advances all P heads; v, f, y and dy are per-column vectors of the pack; a q or k shared by
the whole pack (Nq = 1 in the paper) is one (rows,) vector, otherwise it is gathered per column. The per-step
fixed latency (barriers, reductions, the tanh chain) is paid once for P heads. N is padded to a multiple of P by
the caller; padded heads read the inputs of head N - 1 and their outputs are dropped.

Grid of both kernels: (B, N / P, K // block_k): one program per (sequence, head pack, block of state rows).
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
    heads_per_program: P, heads packed side by side in one program (a power of two).
    num_warps, num_stages: Triton launch parameters of both kernels.
    prefetch: how many steps ahead the forward walks load their inputs (1 was fastest on the H200: deeper queues
        cost registers and moves).
    approx_tanh: use the ``tanh.approx.f32`` instruction (max relative error about 2^-11) instead of the
        branch-free exact formula. Only for 16-bit inputs; interpret mode (CPU) runs the exact formula instead.
    split_dot: for 16-bit inputs, feed the float32 state to the tensor cores as a sum of two 16-bit parts
        (about 16 mantissa bits) instead of rounding it to one 16-bit value.
    """

    block_k: int | None = None
    chunk_size: int = 128
    recompute_block: int = 2
    heads_per_program: int = 1
    num_warps: int = 2
    num_stages: int = 1
    prefetch: int = 1
    approx_tanh: bool = False
    split_dot: bool = False

    def __post_init__(self) -> None:
        for name in ("chunk_size", "recompute_block", "heads_per_program", "num_warps", "num_stages", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.recompute_block > 16:
            raise ValueError(f"recompute_block: expected at most 16 (it is unrolled), got {self.recompute_block}")
        if self.chunk_size % self.recompute_block:
            raise ValueError(
                f"recompute_block: expected a divisor of chunk_size = {self.chunk_size}, got {self.recompute_block}"
            )
        if self.heads_per_program & (self.heads_per_program - 1):
            raise ValueError(f"heads_per_program: expected a power of two, got {self.heads_per_program}")
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
class HeadPacking:
    """Which source heads the columns of a head pack read (SPEC §0.3: output head n reads source n // group).

    num_heads: N, the real output heads (the caller pads to a multiple of ``per_program``; padded heads read the
    inputs of head N - 1). per_program: P. v_dim: V (padded). q, k, v, f: group sizes N / N_x of each input.
    """

    num_heads: int
    per_program: int
    v_dim: int
    q: int
    k: int
    v: int
    f: int

    @classmethod
    def create(cls, num_heads: int, per_program: int, columns: int, q, k, v, f) -> "HeadPacking":
        """From the kernel operands: q (T, Nq, K), k (T, Nk, K), v (T, Nv * V), f (T, Nf); columns = P * V."""
        v_dim = columns // per_program
        return cls(
            num_heads=num_heads,
            per_program=per_program,
            v_dim=v_dim,
            q=num_heads // q.shape[1],
            k=num_heads // k.shape[1],
            v=num_heads // (v.shape[1] // v_dim),
            f=num_heads // f.shape[1],
        )

    @property
    def columns(self) -> int:
        """P * V, the width of a pack's state tile."""
        return self.per_program * self.v_dim

    def slots(self, group: int) -> int:
        """Distinct vectors a pack reads from an input with this group size: 1 when the whole pack shares one
        source head (and never pads: then P divides N), else P (one per head, repeats allowed)."""
        return 1 if group % self.per_program == 0 else self.per_program

    def column_heads(self, pack: jax.Array) -> jax.Array:
        """(P*V,) int32: the output head of each column of the pack, padded heads clamped to N - 1."""
        column = lax.broadcasted_iota(jnp.int32, (self.columns,), 0)
        return jnp.minimum(pack * self.per_program + column // self.v_dim, self.num_heads - 1)

    def column_within_head(self) -> jax.Array:
        """(P*V,) int32: the column index inside its head (0 .. V-1) of every column of a pack."""
        return lax.broadcasted_iota(jnp.int32, (self.columns,), 0) % self.v_dim


def shared_or_gathered(ref, t, pack, rows: pl.Slice, group: int, packing: HeadPacking, acc_dtype) -> jax.Array:
    """q_t or k_t of a pack from ref (T, N_x, K): (rows, 1) when the pack shares one source head, else the
    (rows, P*V) gather of each column's source row block."""
    if packing.slots(group) == 1:
        return ref[t, pack * packing.per_program // group, rows].astype(acc_dtype)[:, None]
    gathered = ref[t, packing.column_heads(pack) // group, rows]  # (P*V, rows)
    return gathered.T.astype(acc_dtype)


def step_inputs(refs, t, pack, rows: pl.Slice, packing: HeadPacking, acc_dtype: jnp.dtype):
    """Inputs of step t for one program, in acc_dtype: q_t and k_t (rows, 1) or (rows, P*V) (see
    :func:`shared_or_gathered`), v_t and f_t (P*V,) per column.

    refs: q (T, Nq, K), k (T, Nk, K), v (T, Nv * V) (heads flattened into the columns), f (T, Nf).
    """
    q_ref, k_ref, v_ref, f_ref = refs
    q_t = shared_or_gathered(q_ref, t, pack, rows, packing.q, packing, acc_dtype)
    k_t = shared_or_gathered(k_ref, t, pack, rows, packing.k, packing, acc_dtype)
    heads = packing.column_heads(pack)
    if packing.v == 1 and packing.num_heads % packing.per_program == 0:
        columns = pl.ds(pl.multiple_of(pack * packing.columns, packing.columns), packing.columns)
        v_t = v_ref[t, columns]
    else:
        v_t = v_ref[t, heads // packing.v * packing.v_dim + packing.column_within_head()]
    f_t = f_ref[t, heads // packing.f]
    return q_t, k_t, v_t.astype(acc_dtype), f_t.astype(acc_dtype)


def head_sums(x: jax.Array, packing: HeadPacking) -> jax.Array:
    """Sum each head's V columns: x (..., P*V) -> (..., P)."""
    return jnp.sum(x.reshape(x.shape[:-1] + (packing.per_program, packing.v_dim)), axis=-1)


def row_reduction(x: jax.Array, slots: int, packing: HeadPacking) -> jax.Array:
    """Reduce x (rows, P*V) over the columns of each slot (see :meth:`HeadPacking.slots`): (rows,) for one slot,
    else (P, rows) per head."""
    if slots == 1:
        return jnp.sum(x, axis=1)
    return head_sums(x, packing).T


def slot_range(pack, slots: int) -> jax.Array | pl.Slice:
    """Index of a pack's slots on the head axis of a per-slot output (T, N / P * slots, K)."""
    if slots == 1:
        return pack
    return pl.ds(pl.multiple_of(pack * slots, slots), slots)


def recurrence_step(h_prev, w_dot, k_t, v_t, f_t, numerics: StepNumerics):
    """One step for a pack's block of rows: h_prev (rows, P*V), w_dot (P*V, P*V) block-diagonal, k_t (rows, 1) or
    (rows, P*V), v_t and f_t (P*V,) -> (Z_t, H_t), both (rows, P*V) in acc_dtype."""
    z = numerics.tanh(numerics.matmul(h_prev, w_dot) + k_t * v_t[None, :])
    return z, blend(h_prev, z, f_t, numerics)


def blend(h_prev, z, f_t, numerics: StepNumerics):
    """H_t = f_t H_{t-1} + (1 - f_t) Z_t (as Z_t + f_t (H_{t-1} - Z_t): two instructions), rounded to the state's
    storage dtype."""
    return numerics.round_state(z + f_t * (h_prev - z))


def walk_forward(lo, hi, h, w_dot, load, emit, numerics: StepNumerics, prefetch: int):
    """Run steps t in [lo, hi) from state h (rows, P*V) and return the state after them.

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

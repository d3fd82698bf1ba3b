"""Channel mixers: dense SwiGLU MLP and mixture of experts (SPEC §9.3, §0.6).

Auxiliary-loss contract (agreed with the decoder): ``MLP.__call__(x)`` returns ``y`` only;
``MoE.__call__(x)`` returns ``(y, aux_loss)`` where ``aux_loss`` is a >= float32 scalar (float64 for float64 models)
computed over the tokens of this call and **already multiplied by** ``router_aux_loss_coef``; the decoder sums it
over layers and adds it to the language-modelling loss (as lm-engine does). No ``nnx.Intermediate`` state is sown,
so both modules stay pure under ``jax.jit`` / ``nnx.scan``.

SwiGLU (both modules): ``c_fc`` emits 2I features **interleaved** like lm-engine's packed SwiGLU: gate = even
columns, up = odd columns, ``y = c_proj(up * silu(gate))`` with the activation in >= float32. Converting an
lm-engine checkpoint therefore copies ``c_fc.weight.T`` as is (no de-interleaving).

MoE routing (lm-engine reference path, ``normalized_topk``): router logits ``x @ gate.kernel`` (float32), top-k
experts per token by logit, routing weights = softmax over the k selected logits. Each selected expert is a
SwiGLU of intermediate size I; one always-on shared expert (intermediate ``shared_intermediate_size``, no gate) is
added. Aux loss = switch load-balancing loss ``E * sum_e P_e F_e`` (P = mean router probability, F = fraction of
the T*k selections that went to expert e) + 0.1 * router z-loss ``mean(logsumexp(logits)**2)``.
The experts run as grouped matmuls (``jax.lax.ragged_dot``, or the megablox Pallas kernels on TPU:
``MoEConfig.grouped_matmul``, :mod:`m2rnn_jax.layers.grouped_matmul`) over the T*k (token, expert) pairs sorted by
expert: exact (no capacity, no token dropping), static shapes, jit-friendly. Under a mesh with an ``expert`` axis
> 1 the pairs travel to the shard holding their expert and back by all-to-all (``MoEConfig.dispatch``,
:mod:`m2rnn_jax.layers.moe_dispatch`); the result is the same.

Parameters (Flax path -> lm-engine name, kernels stored (in, out); expert kernels (E, in, out)):

=========================  =========================  ===============  ==================  =====================
Flax path                  lm-engine name             Flax shape       init                logical axes
=========================  =========================  ===============  ==================  =====================
c_fc.kernel (MLP)          c_fc.weight                (h, 2I)          N(0, σ)             (embed, mlp)
c_proj.kernel (MLP)        c_proj.weight              (I, h)           N(0, σ/sqrt(2L))    (mlp, embed)
gate.kernel (MoE)          gate.weight                (h, E)           N(0, σ)             (embed, None)
c_fc.kernel (MoE)          c_fc.weight (E, 2I, h)     (E, h, 2I)       N(0, σ)             (expert, embed, mlp)
c_proj.kernel (MoE)        c_proj.weight (E, h, I)    (E, I, h)        N(0, σ/sqrt(2L))    (expert, mlp, embed)
c_fc_shared.kernel         c_fc_shared.weight         (h, 2I_s)        N(0, σ)             (embed, mlp)
c_proj_shared.kernel       c_proj_shared.weight       (I_s, h)         N(0, σ/sqrt(2L))    (mlp, embed)
=========================  =========================  ===============  ==================  =====================

Biases (zeros, only with ``add_bias``) follow their kernel's output axis. Only parameters with an ``expert`` axis
are routed: a token uses ``top_k / num_experts`` of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.grouped_matmul import GROUPED_MATMUL_CHOICES, grouped_matmul, resolve_grouped_matmul
from m2rnn_jax.layers.linear import linear_columns, output_projection_std, sharded_linear
from m2rnn_jax.layers.moe_dispatch import (
    DISPATCH_CHOICES,
    mesh_is_split,
    resolve_dispatch,
    run_experts_all_to_all,
    run_experts_local,
)
from m2rnn_jax.layers.validation import init_layer, require_positive_int
from m2rnn_jax.ops.platform import on_nvidia_gpu
from m2rnn_jax.typing import Dtype

Z_LOSS_WEIGHT = 0.1


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Dense SwiGLU channel mixer: ``intermediate_size`` I (2752 at 400M)."""

    intermediate_size: int
    add_bias: bool = False

    def __post_init__(self):
        require_positive_int("intermediate_size", self.intermediate_size)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture of SwiGLU experts (7B: 128 experts, top-8, I = 256, shared I = 1024, coef 0.001).

    ``shared_intermediate_size=None`` drops the shared expert. ``dispatch`` (see
    :mod:`m2rnn_jax.layers.moe_dispatch`): ``"auto"`` (default) exchanges the routed rows by all-to-all over the
    mesh's ``expert`` axis when it is > 1 and the batch splits over the batch axes, else runs them in place;
    ``"local"`` always in place (XLA partitions it: every chip then holds the routed rows of the global batch);
    ``"all_to_all"`` requires the exchange whenever the expert axis is > 1 (ValueError if the batch does not split).
    ``grouped_matmul`` (see :mod:`m2rnn_jax.layers.grouped_matmul`): ``"auto"`` (megablox kernels on a TPU
    backend when hidden and intermediate sizes are multiples of 128, ``jax.lax.ragged_dot`` otherwise),
    ``"ragged_dot"`` or ``"megablox"``.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int | None = None
    router_aux_loss_coef: float = 0.001
    add_bias: bool = False
    dispatch: str = "auto"
    grouped_matmul: str = "auto"

    def __post_init__(self):
        for name in ("num_experts", "top_k", "intermediate_size"):
            require_positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected <= num_experts={self.num_experts}, got {self.top_k}")
        if self.shared_intermediate_size is not None:
            require_positive_int("shared_intermediate_size", self.shared_intermediate_size)
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef: expected >= 0, got {self.router_aux_loss_coef}")
        if self.dispatch not in DISPATCH_CHOICES:
            raise ValueError(f"dispatch: expected one of {DISPATCH_CHOICES}, got {self.dispatch!r}")
        if self.grouped_matmul not in GROUPED_MATMUL_CHOICES:
            raise ValueError(f"grouped_matmul: expected one of {GROUPED_MATMUL_CHOICES}, got {self.grouped_matmul!r}")


# The even (gate) and odd (up) columns of an interleaved SwiGLU projection. The split is applied to the kernel
# (in, 2I), once per call, and the two halves are separate matmuls: splitting the (tokens, 2I) product instead is a
# stride-2 lane shuffle of every activation row, whose TPU code generation grew with the number of tokens (a
# 400M preset's one-layer train step at 4096 tokens: minutes of compile and ~8 GiB of compiler memory for this
# alone; experiments/RESULTS.md, "Session 6: TPU pod compiles").
GATE_COLUMNS, UP_COLUMNS = slice(0, None, 2), slice(1, None, 2)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gate, up (..., I) -> (..., I) ``up * silu(gate)``, computed in >= float32, returned in ``gate.dtype``."""
    compute = jnp.promote_types(jnp.float32, gate.dtype)
    return (up.astype(compute) * jax.nn.silu(gate.astype(compute))).astype(gate.dtype)


class MLP(nnx.Module):
    """Dense SwiGLU channel mixer: x (B, S, hidden) -> y (B, S, hidden) in ``dtype`` (see the module docstring)."""

    def __init__(
        self,
        hidden_size: int,
        config: MLPConfig,
        *,
        num_layers: int,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init_layer(self, hidden_size, config, num_layers=num_layers, dtype=dtype)
        I = config.intermediate_size
        kw = dict(use_bias=config.add_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = sharded_linear(hidden_size, 2 * I, ("embed", "mlp"), std=initializer_range, **kw)
        self.c_proj = sharded_linear(
            I, hidden_size, ("mlp", "embed"), std=output_projection_std(initializer_range, num_layers), **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate, up = (linear_columns(self.c_fc, x, columns) for columns in (GATE_COLUMNS, UP_COLUMNS))
        hidden = swiglu(gate, up)
        if on_nvidia_gpu():
            # Materialized once: XLA's GPU compiler otherwise writes the (tokens, I) SwiGLU output a second time in the
            # backward, recomputed from gate and up, for c_proj's kernel gradient (24 x 0.17 ms of the 400M 1L
            # hybrid's H100 step, experiments/RESULTS.md session 21; with the barrier that step took 244.8 ms
            # against 247.1 / 248.5 ms without, one H100, session 25). Not on TPUs, where XLA fuses the SwiGLU
            # into the projection (the barrier there added 0.8% to a v5e step's bytes accessed, session 24).
            hidden = jax.lax.optimization_barrier(hidden)
        return self.c_proj(hidden)


def route_tokens(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """logits (T, E) -> (weights (T, k) float32 softmax over the k largest logits, experts (T, k) int32)."""
    top_logits, experts = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top_logits.astype(jnp.promote_types(jnp.float32, logits.dtype)), axis=-1)
    return weights, experts.astype(jnp.int32)


def router_aux_loss(logits: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch load-balancing loss + 0.1 * z-loss (unweighted) from logits (T, E) and selections experts (T, k)."""
    logits = logits.astype(jnp.promote_types(jnp.float32, logits.dtype))
    num_experts = logits.shape[-1]
    mean_probability = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)  # (E,), sums to 1
    counts = jnp.bincount(experts.reshape(-1), length=num_experts).astype(logits.dtype)
    switch_loss = num_experts * jnp.sum(mean_probability * counts / jnp.sum(counts))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    return switch_loss + Z_LOSS_WEIGHT * z_loss


class ExpertLinear(nnx.Module):
    """E independent linear maps with ``kernel`` (E, in, out), applied to rows grouped by expert."""

    def __init__(self, num_experts, in_features, out_features, axes, *, std, use_bias, dtype, param_dtype, rngs):
        init = jax.nn.initializers.normal(stddev=std)
        self.dtype = dtype
        self.kernel = nnx.Param(
            init(rngs.params(), (num_experts, in_features, out_features), param_dtype),
            out_sharding=("expert", *axes),
            eager_sharding=False,
        )
        self.bias = (
            nnx.Param(
                jnp.zeros((num_experts, out_features), dtype=param_dtype),
                out_sharding=("expert", axes[-1]),
                eager_sharding=False,
            )
            if use_bias
            else None
        )

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        """(kernel (E, in, out), bias (E, out) or None) as arrays, the argument of :func:`expert_linear`."""
        return self.kernel[...], None if self.bias is None else self.bias[...]


def expert_linear(
    x: jax.Array,
    group_sizes: jax.Array,
    row_experts: jax.Array,
    weights: tuple[jax.Array, jax.Array | None],
    dtype: Dtype,
    columns: slice = slice(None),
    implementation: str = "ragged_dot",
    *,
    interpret: bool = False,
) -> jax.Array:
    """x (R, in) rows sorted by expert, group_sizes (E,) rows per expert (rows past their sum are in no group),
    row_experts (R,), weights (kernel (E, in, out), bias (E, out) or None) -> (R, out) in ``dtype`` or, with
    ``columns``, only those output columns (computed from those kernel columns). ``implementation`` and
    ``interpret``: see :func:`~m2rnn_jax.layers.grouped_matmul.grouped_matmul`."""
    kernel, bias = weights
    y = grouped_matmul(x, kernel[..., columns], group_sizes, dtype, implementation, interpret=interpret)
    if bias is not None:
        y = y + bias[..., columns].astype(dtype)[row_experts]
    return y


def expert_swiglu(
    rows: jax.Array,
    group_sizes: jax.Array,
    row_experts: jax.Array,
    weights: dict[str, Any],
    dtype: Dtype,
    implementation: str = "ragged_dot",
    *,
    interpret: bool = False,
) -> jax.Array:
    """The routed SwiGLU experts: rows (R, h) sorted by expert -> (R, h) in ``dtype``; ``weights`` holds the
    ``"c_fc"`` and ``"c_proj"`` (kernel, bias) pairs (see :func:`expert_linear`, also for ``implementation``)."""
    gate, up = (
        expert_linear(
            rows, group_sizes, row_experts, weights["c_fc"], dtype, columns, implementation, interpret=interpret
        )
        for columns in (GATE_COLUMNS, UP_COLUMNS)
    )
    hidden = swiglu(gate, up)
    return expert_linear(
        hidden, group_sizes, row_experts, weights["c_proj"], dtype, implementation=implementation, interpret=interpret
    )


class MoE(nnx.Module):
    """Mixture of SwiGLU experts: x (B, S, hidden) -> (y (B, S, hidden) in ``dtype``, weighted aux loss ())."""

    def __init__(
        self,
        hidden_size: int,
        config: MoEConfig,
        *,
        num_layers: int,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init_layer(self, hidden_size, config, num_layers=num_layers, dtype=dtype)
        out_std = output_projection_std(initializer_range, num_layers)
        kw = dict(use_bias=config.add_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        E, I = config.num_experts, config.intermediate_size
        self.gate = sharded_linear(
            hidden_size,
            E,
            ("embed", None),
            std=initializer_range,
            use_bias=False,
            dtype=jnp.promote_types(jnp.float32, dtype),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.c_fc = ExpertLinear(E, hidden_size, 2 * I, ("embed", "mlp"), std=initializer_range, **kw)
        self.c_proj = ExpertLinear(E, I, hidden_size, ("mlp", "embed"), std=out_std, **kw)
        if config.shared_intermediate_size is None:
            self.c_fc_shared = self.c_proj_shared = None
        else:
            I_s = config.shared_intermediate_size
            self.c_fc_shared = sharded_linear(hidden_size, 2 * I_s, ("embed", "mlp"), std=initializer_range, **kw)
            self.c_proj_shared = sharded_linear(I_s, hidden_size, ("mlp", "embed"), std=out_std, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected last axis of size {self.hidden_size}, got shape {x.shape}")
        c = self.config
        tokens = x.reshape(-1, self.hidden_size).astype(self.dtype)  # (T, h)
        logits = self.gate(tokens)  # (T, E) float32
        weights, experts = route_tokens(logits, c.top_k)
        y = self._routed_experts(x, tokens, weights, experts)
        if self.c_fc_shared is not None:
            gate, up = (linear_columns(self.c_fc_shared, tokens, c) for c in (GATE_COLUMNS, UP_COLUMNS))
            y = y + self.c_proj_shared(swiglu(gate, up))
        aux_loss = c.router_aux_loss_coef * router_aux_loss(logits, experts)
        return y.reshape(x.shape).astype(self.dtype), aux_loss.astype(jnp.promote_types(jnp.float32, self.dtype))

    def _routed_experts(self, x: jax.Array, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """x (B, S, h), its tokens (T = B S, h), weights (T, k), experts (T, k) -> sum_k weights * expert_k(token)
        (T, h) in >= float32, on one device or expert-parallel (``config.dispatch``)."""
        c = self.config
        params = {"c_fc": self.c_fc.weights(), "c_proj": self.c_proj.weights()}
        dispatch = resolve_dispatch(c.dispatch, c.num_experts, x.shape[0])
        implementation = resolve_grouped_matmul(c.grouped_matmul, self.hidden_size, c.intermediate_size)
        if dispatch == "local" and mesh_is_split():  # XLA partitions the local program, not a Pallas kernel
            implementation = "ragged_dot"
        experts_fn = functools.partial(expert_swiglu, dtype=self.dtype, implementation=implementation)
        if dispatch == "local":
            return run_experts_local(experts_fn, tokens, weights, experts, params, c.num_experts)
        shape = (*x.shape[:2], c.top_k)
        y = run_experts_all_to_all(
            experts_fn,
            tokens.reshape(x.shape),
            weights.reshape(shape),
            experts.reshape(shape),
            params,
            c.num_experts,
        )
        return y.reshape(tokens.shape)

"""The full lm-engine M2RNN sequence mixer as a Flax NNX module (SPEC §3, §2.3, §8, §0).

Dataflow for x (B, S, h), with C = Nq*K + Nk*K + Nv*V conv channels:

1. ``input_projection``: h -> C + Nf + Ng*V, split ``[q | k | v | f | g]``.
2. f <- softplus decay gate, ``f = exp(-exp(A_log) * softplus(f_raw + dt_bias))`` in float32, cast to dtype.
3. ``[q | k | v]`` -> causal depthwise conv (``kernel_size`` taps, SiLU); skipped when ``kernel_size`` is None.
4. ``(y, H_T) = m2rnn(q, k, v, W, f, H_0)`` with the layer's ``gradient_clipping`` and ``backend``.
5. ``y <- y + D * v`` (post-conv v) when ``use_residual``.
6. ``y <- y * SiLU(g)`` (SiLU in float32), g broadcast per head block when Ng < N (SPEC §0.3).
7. RMSNorm over all N*V features jointly, then ``output_projection`` N*V -> h.

Parameters (Flax path -> lm-engine name; kernels are stored transposed, ``kernel = weight.T``):

=============================  =============================  ======================  =========================
Flax path                      lm-engine name                 Flax shape              init
=============================  =============================  ======================  =========================
input_projection.kernel        input_projection.weight        (h, C + Nf + Ng*V)      N(0, initializer_range)
input_projection.bias          input_projection.bias          (C + Nf + Ng*V,)        zeros (only if add_bias)
conv1d.kernel                  conv1d.weight (C, 1, ks)       (ks, C)                 N(0, initializer_range)
conv1d.bias                    conv1d.bias                    (C,)                    zeros (only if add_bias)
decay_gate.A_log               decay_gate.A_log               (N,) float32            log U(A_init_min, A_init_max)
decay_gate.dt_bias             decay_gate.dt_bias             (N,) float32            softplus^-1(dt), SPEC §2.3
D                              D                              (N, V)                  ones (only if use_residual)
state_weight                   state_weight                   (Nw, V, V)              identity per head, or
                                                                                      N(0, state_weight_init_std)
g_norm.scale                   g_norm.weight                  (N*V,)                  ones
output_projection.kernel       output_projection.weight       (N*V, h)                N(0, initializer_range /
                                                                                      sqrt(2 * num_layers))
=============================  =============================  ======================  =========================

``conv1d.kernel[j, c] = conv1d.weight[c, 0, j]`` (taps oldest -> newest). A_log and dt_bias are stored in
``promote_types(float32, param_dtype)``. Logical sharding axes: input_projection (embed, None), conv (None, None),
A_log/dt_bias (heads,), D (heads, None), state_weight (heads, None, None), g_norm (heads,),
output_projection (heads, embed).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.conv import ACTIVATIONS, CausalDepthwiseConv1d
from m2rnn_jax.layers.decay_gate import SoftplusDecayGate, validate_decay_gate_init
from m2rnn_jax.layers.documents import document_starts
from m2rnn_jax.layers.linear import linear_blocks, output_projection_std, sharded_linear
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.validation import init_layer, require_positive_int
from m2rnn_jax.ops import m2rnn
from m2rnn_jax.ops.m2rnn.backends import BACKEND_NAMES
from m2rnn_jax.parallel.context.axis import context_axis_size
from m2rnn_jax.parallel.context.m2rnn import context_m2rnn
from m2rnn_jax.typing import Dtype

QUERY_CHOICES = ("token", "learned")


@dataclasses.dataclass(frozen=True)
class M2RNNConfig:
    """Hyper-parameters of the M2RNN mixer (lm-engine ``M2RNNArgs``; defaults = the paper's configs).

    ``num_heads`` is N, the number of state heads. ``num_v_heads``, ``num_f_heads``, ``num_g_heads`` and
    ``num_weight_heads`` default to N; every head count must divide N and the largest of
    (Nq, Nk, Nv, Nf, Nw) must equal N. The decay gate is sized N, so Nf = N; the residual D (N, V) needs Nv = N.
    ``state_weight_init_std``: None initialises W as the identity per head (the paper's and lm-engine's init); a
    number draws W from N(0, std), as the GRU and RNN weights are (init only: lm-engine configs have no such field).
    ``query``: "token" (the paper's) reads q_t from the input projection through the conv like k and v; "learned" is
    one learned (Nq, K) query for every token (parameter ``query``, init N(0, 1); no q columns in the projection or
    the conv), so the readout q^T H_t depends on the state alone (a research option for state tracking,
    experiments/state_tracking/SEARCH.md rows 22-23; no lm-engine counterpart).
    """

    num_heads: int
    k_head_dim: int = 64
    v_head_dim: int = 16
    num_q_heads: int = 1
    num_k_heads: int = 1
    num_v_heads: int | None = None
    num_f_heads: int | None = None
    num_g_heads: int | None = None
    num_weight_heads: int | None = None
    kernel_size: int | None = 4
    activation_function: str | None = "silu"
    use_residual: bool = True
    add_bias: bool = False
    gradient_clipping: float | None = 1.0
    A_init_min: float = 0.0
    A_init_max: float = 16.0
    dt_init_min: float = 1e-3
    dt_init_max: float = 0.1
    dt_init_floor: float = 1e-4
    state_weight_init_std: float | None = None
    query: str = "token"
    norm_eps: float = 1e-5
    backend: str = "auto"

    def __post_init__(self):
        for name in ("num_heads", "k_head_dim", "v_head_dim", "num_q_heads", "num_k_heads"):
            require_positive_int(name, getattr(self, name))
        for name in ("num_v_heads", "num_f_heads", "num_g_heads", "num_weight_heads"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, self.num_heads)
            else:
                require_positive_int(name, value)
        heads = self.head_counts
        for name, count in heads.items():
            if self.num_heads % count != 0:
                raise ValueError(f"{name}: expected a divisor of num_heads={self.num_heads}, got {count}")
        largest = max(count for name, count in heads.items() if name != "num_g_heads")
        if largest != self.num_heads:
            raise ValueError(
                f"num_heads: expected max(num_q_heads, num_k_heads, num_v_heads, num_f_heads, num_weight_heads)"
                f" = {largest}, got {self.num_heads} (head counts {heads})"
            )
        if self.num_f_heads != self.num_heads:
            raise ValueError(
                f"num_f_heads: expected num_heads={self.num_heads} (the decay gate has one A_log/dt_bias per "
                f"state head), got {self.num_f_heads}"
            )
        if self.use_residual and self.num_v_heads != self.num_heads:
            raise ValueError(
                f"num_v_heads: expected num_heads={self.num_heads} when use_residual (D is (N, V)), "
                f"got {self.num_v_heads}"
            )
        if self.kernel_size is None:
            if self.activation_function is not None:
                raise ValueError(
                    f"activation_function: expected None when kernel_size is None, got {self.activation_function!r}"
                )
        else:
            require_positive_int("kernel_size", self.kernel_size)
            if self.activation_function is not None and self.activation_function not in ACTIVATIONS:
                raise ValueError(
                    f"activation_function: expected one of {sorted(ACTIVATIONS)} or None, "
                    f"got {self.activation_function!r}"
                )
        if self.query not in QUERY_CHOICES:
            raise ValueError(f"query: expected one of {QUERY_CHOICES}, got {self.query!r}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {self.backend!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps: expected > 0, got {self.norm_eps}")
        if self.state_weight_init_std is not None and self.state_weight_init_std <= 0:
            raise ValueError(f"state_weight_init_std: expected None or > 0, got {self.state_weight_init_std}")
        validate_decay_gate_init(
            self.A_init_min, self.A_init_max, self.dt_init_min, self.dt_init_max, self.dt_init_floor
        )

    @property
    def head_counts(self) -> dict[str, int]:
        """Every head count by field name (after defaults are filled in)."""
        names = ("num_q_heads", "num_k_heads", "num_v_heads", "num_f_heads", "num_g_heads", "num_weight_heads")
        return {name: getattr(self, name) for name in names}

    @property
    def q_channels(self) -> int:
        """Nq*K projected query channels, 0 for a learned query."""
        return self.num_q_heads * self.k_head_dim if self.query == "token" else 0

    @property
    def conv_channels(self) -> int:
        """C = Nq*K + Nk*K + Nv*V (Nk*K + Nv*V with a learned query): the [q | k | v] channels of the conv."""
        return self.q_channels + self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim

    @property
    def projection_size(self) -> int:
        """Output width of the input projection: C + Nf + Ng*V."""
        return self.conv_channels + self.num_f_heads + self.num_g_heads * self.v_head_dim


class M2RNNState(NamedTuple):
    """Decoding state of one M2RNN layer.

    conv: (B, kernel_size - 1, C) raw pre-conv [q | k | v] inputs, or None when the layer has no conv.
    recurrent: (B, N, K, V) matrix state of every head.
    """

    conv: jax.Array | None
    recurrent: jax.Array


class M2RNN(nnx.Module):
    """M2RNN sequence mixer: x (B, S, hidden) -> (y (B, S, hidden), M2RNNState).

    ``state=None`` starts from zeros (conv padding and H_0); the returned state continues the sequence, so
    running S tokens at once equals running them in pieces (or one by one) while carrying the state.
    When ``state`` is None the new state is kept in ``promote_types(float32, dtype)``; a given state keeps its
    dtypes. The recurrence always carries its state in at least float32 (SPEC §0.2).

    Args:
        hidden_size: h.
        config: the mixer's hyper-parameters.
        num_layers: number of layers of the model (depth-scaled init of the output projection).
        initializer_range: sigma of the N(0, sigma) inits.
        dtype: compute dtype (bfloat16 in training); param_dtype: storage dtype of the parameters.
        check_values: the op's opt-in value checks (None: the ``M2RNN_JAX_CHECKS`` environment variable decides;
            :func:`m2rnn_jax.ops.m2rnn.op.m2rnn`, ``docs/value_checks.md``).
    """

    def __init__(
        self,
        hidden_size: int,
        config: M2RNNConfig,
        *,
        num_layers: int,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        check_values: bool | None = None,
        rngs: nnx.Rngs,
    ):
        init_layer(self, hidden_size, config, num_layers=num_layers, dtype=dtype)
        if initializer_range <= 0:
            raise ValueError(f"initializer_range: expected > 0, got {initializer_range}")
        self.check_values = check_values
        N, V = config.num_heads, config.v_head_dim

        self.input_projection = sharded_linear(
            hidden_size,
            config.projection_size,
            ("embed", None),
            std=initializer_range,
            use_bias=config.add_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.decay_gate = SoftplusDecayGate(
            N,
            A_init_min=config.A_init_min,
            A_init_max=config.A_init_max,
            dt_init_min=config.dt_init_min,
            dt_init_max=config.dt_init_max,
            dt_init_floor=config.dt_init_floor,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.conv1d = (
            None
            if config.kernel_size is None
            else CausalDepthwiseConv1d(
                config.conv_channels,
                config.kernel_size,
                activation=config.activation_function,
                use_bias=config.add_bias,
                initializer_range=initializer_range,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )
        self.D = (
            nnx.Param(jnp.ones((N, V), dtype=param_dtype), out_sharding=("heads", None), eager_sharding=False)
            if config.use_residual
            else None
        )
        weight_shape = (config.num_weight_heads, V, V)
        if config.state_weight_init_std is None:
            state_weight = jnp.broadcast_to(jnp.eye(V, dtype=param_dtype), weight_shape)
        else:
            state_weight = jax.nn.initializers.normal(config.state_weight_init_std)(
                rngs.params(), weight_shape, param_dtype
            )
        self.state_weight = nnx.Param(
            state_weight,
            out_sharding=("heads", None, None),
            eager_sharding=False,
        )
        if config.query == "learned":
            self.query = nnx.Param(
                jax.nn.initializers.normal(1.0)(rngs.params(), (config.num_q_heads, config.k_head_dim), param_dtype),
                out_sharding=(None, None),
                eager_sharding=False,
                no_weight_decay=True,  # a readout direction, not a weight matrix: decay would only shrink it
            )
        self.g_norm = RMSNorm(N * V, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype, scale_sharding="heads")
        self.output_projection = sharded_linear(
            N * V,
            hidden_size,
            ("heads", "embed"),
            std=output_projection_std(initializer_range, num_layers),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def init_state(self, batch_size: int, max_length: int, dtype: Dtype = jnp.float32) -> M2RNNState:
        """Zero state for ``batch_size`` sequences (``max_length`` is ignored: the state has a fixed size)."""
        c = self.config
        conv = None if self.conv1d is None else self.conv1d.init_state(batch_size, dtype=dtype)
        recurrent = jnp.zeros((batch_size, c.num_heads, c.k_head_dim, c.v_head_dim), dtype=dtype)
        return M2RNNState(conv=conv, recurrent=recurrent)

    def __call__(
        self, x: jax.Array, state: M2RNNState | None = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, M2RNNState]:
        """x (B, S, hidden) -> (y (B, S, hidden) in ``dtype``, new M2RNNState).

        segment_ids: optional (B, S) document ids; each new document starts from a zero state and conv tail
        (:mod:`m2rnn_jax.layers.documents`; the op's ``reset``, which runs the scan backend).
        """
        c = self.config
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape (B, S, {self.hidden_size}), got {x.shape}")
        batch, seq_len, _ = x.shape
        if state is None:
            state = self.init_state(batch, seq_len, dtype=jnp.promote_types(jnp.float32, self.dtype))
        elif (state.conv is None) != (self.conv1d is None):
            expected = "None (the layer has no conv)" if self.conv1d is None else "an array (B, kernel_size - 1, C)"
            raise ValueError(f"state.conv: expected {expected}, got {None if state.conv is None else state.conv.shape}")
        N, K, V = c.num_heads, c.k_head_dim, c.v_head_dim
        reset = None if segment_ids is None else document_starts(segment_ids, batch, seq_len)

        # each block from its own kernel columns: no concatenate of the blocks' gradients (layers/linear.py)
        qkv, f_raw, g = linear_blocks(
            self.input_projection, x.astype(self.dtype), (c.conv_channels, c.num_f_heads, c.num_g_heads * V)
        )
        f = self.decay_gate(f_raw, final_exponential=True)  # (B, S, N)
        conv_state = state.conv
        if self.conv1d is not None:
            qkv, conv_state = self.conv1d(qkv, state.conv, segment_ids=segment_ids)
        q, k, v = jnp.split(qkv, [c.q_channels, c.q_channels + c.num_k_heads * K], axis=-1)
        if c.query == "learned":
            q = jnp.broadcast_to(self.query[...].astype(self.dtype), (batch, seq_len, c.num_q_heads, K))
        q = q.reshape(batch, seq_len, c.num_q_heads, K)
        k = k.reshape(batch, seq_len, c.num_k_heads, K)
        v = v.reshape(batch, seq_len, c.num_v_heads, V)

        W = self.state_weight[...].astype(self.dtype)
        recurrence = context_m2rnn if context_axis_size() > 1 else m2rnn  # context: pipelined across the shards
        y, recurrent = recurrence(
            q,
            k,
            v,
            W,
            f,
            state.recurrent,
            reset=reset,
            gradient_clipping=c.gradient_clipping,
            backend=c.backend,
            check_values=self.check_values,
        )  # y (B, S, N, V)
        if self.D is not None:
            y = y + v * self.D[...].astype(self.dtype)

        gate_dtype = jnp.promote_types(jnp.float32, self.dtype)
        gate = jax.nn.silu(g.reshape(batch, seq_len, c.num_g_heads, V).astype(gate_dtype))
        gate = jnp.repeat(gate.astype(self.dtype), N // c.num_g_heads, axis=2)  # per head block (SPEC §0.3)
        y = self.g_norm((y * gate).reshape(batch, seq_len, N * V))
        return self.output_projection(y), M2RNNState(conv=conv_state, recurrent=recurrent)

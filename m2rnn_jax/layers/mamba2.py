"""Mamba2 sequence mixer (SPEC §9.4) around the SSD op (chunked form for training, recurrent for decoding).

Per head h (H heads of dim P = I / H) with state s (P, N), groups G (head h reads B/C group h // (H / G)),
dt_t = softplus(dt_raw_t + dt_bias), A = -exp(A_log) (the shared decay gate, SPEC §2.3; no dt clamp):

    s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_tᵀ,        y_t = s_t C_t + D x_t

The recurrence is the SSD op (:func:`m2rnn_jax.ops.ssd`: chunked form for training, step-by-step form for one
token), run in >= float32. Document resets (``segment_ids``, :mod:`m2rnn_jax.layers.documents`) become the op's
``reset``.

Layer dataflow for x (B, S, h): ``in_proj`` -> [z (I) | xBC (I + 2 G N) | dt_raw (H)]; causal conv (SiLU, with bias)
on xBC -> [x | B | C]; SSD; + D x; ``y * SiLU(z)``; RMSNorm over all I features; ``out_proj``.

Parameters (Flax path -> lm-engine name; kernels stored transposed):

===================  =======================  ========================  ======================  ===============
Flax path            lm-engine name           Flax shape                init                    logical axes
===================  =======================  ========================  ======================  ===============
in_proj.kernel       in_proj.weight           (h, 2I + 2GN + H)         N(0, σ)                 (embed, None)
conv1d.kernel        conv1d.weight (C,1,ks)   (ks, I + 2GN)             N(0, σ)                 (None, None)
conv1d.bias          conv1d.bias              (I + 2GN,)                zeros                   (None,)
decay_gate.A_log     decay_gate.A_log         (H,) >= float32           log U(0, 16)            (heads,)
decay_gate.dt_bias   decay_gate.dt_bias       (H,) >= float32           SPEC §2.3               (heads,)
D                    D                        (H,)                      ones                    (heads,)
norm.scale           norm.weight              (I,)                      ones                    (heads,)
out_proj.kernel      out_proj.weight          (I, h)                    N(0, σ / sqrt(2 L))     (heads, embed)
===================  =======================  ========================  ======================  ===============
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.conv import CausalDepthwiseConv1d
from m2rnn_jax.layers.decay_gate import SoftplusDecayGate, validate_decay_gate_init
from m2rnn_jax.layers.documents import document_starts
from m2rnn_jax.layers.linear import linear_blocks, output_projection_std, sharded_linear
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.validation import init_layer, require_positive_int
from m2rnn_jax.ops import ssd
from m2rnn_jax.parallel.context.axis import context_axis_size
from m2rnn_jax.parallel.context.mixers import ssd_over_context
from m2rnn_jax.typing import Dtype


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Hyper-parameters of Mamba2 (lm-engine ``Mamba2Args``; 400M: 64 heads, I = 1216 (P = 19), N = 216, G = 1).

    ``num_heads`` H must divide ``intermediate_size`` I (head dim P = I / H); ``num_groups`` G must divide H.
    """

    num_heads: int
    intermediate_size: int
    state_size: int = 128
    num_groups: int = 1
    kernel_size: int = 4
    chunk_size: int = 256
    add_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    A_init_min: float = 0.0
    A_init_max: float = 16.0
    dt_init_min: float = 1e-3
    dt_init_max: float = 0.1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        for name in ("num_heads", "intermediate_size", "state_size", "num_groups", "kernel_size", "chunk_size"):
            require_positive_int(name, getattr(self, name))
        if self.intermediate_size % self.num_heads != 0:
            raise ValueError(
                f"intermediate_size: expected a multiple of num_heads={self.num_heads}, got {self.intermediate_size}"
            )
        if self.num_heads % self.num_groups != 0:
            raise ValueError(f"num_groups: expected a divisor of num_heads={self.num_heads}, got {self.num_groups}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected > 0, got {self.norm_eps}")
        validate_decay_gate_init(
            self.A_init_min, self.A_init_max, self.dt_init_min, self.dt_init_max, self.dt_init_floor
        )

    @property
    def head_dim(self) -> int:
        """P = I / H."""
        return self.intermediate_size // self.num_heads

    @property
    def conv_channels(self) -> int:
        """I + 2 G N: the [x | B | C] channels that go through the conv."""
        return self.intermediate_size + 2 * self.num_groups * self.state_size


class Mamba2State(NamedTuple):
    """Decoding state: conv (B, kernel_size - 1, I + 2GN) raw pre-conv inputs; recurrent (B, H, P, N)."""

    conv: jax.Array
    recurrent: jax.Array


class Mamba2(nnx.Module):
    """Mamba2 mixer: x (B, S, hidden) -> (y (B, S, hidden), Mamba2State).

    Sequences longer than one token use the SSD chunked form (chunk ``min(chunk_size, S)``), a single token the
    recurrent step; both continue from ``state`` (None = zeros). When ``state`` is None the new state is kept in
    ``promote_types(float32, dtype)``; a given state keeps its dtypes.
    """

    def __init__(
        self,
        hidden_size: int,
        config: Mamba2Config,
        *,
        num_layers: int,
        initializer_range: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init_layer(self, hidden_size, config, num_layers=num_layers, dtype=dtype)
        c = config
        I, H = c.intermediate_size, c.num_heads
        kw = dict(use_bias=c.add_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = sharded_linear(
            hidden_size, I + c.conv_channels + H, ("embed", None), std=initializer_range, **kw
        )
        self.conv1d = CausalDepthwiseConv1d(
            c.conv_channels,
            c.kernel_size,
            activation="silu",
            use_bias=c.use_conv_bias,
            initializer_range=initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.decay_gate = SoftplusDecayGate(
            H,
            A_init_min=c.A_init_min,
            A_init_max=c.A_init_max,
            dt_init_min=c.dt_init_min,
            dt_init_max=c.dt_init_max,
            dt_init_floor=c.dt_init_floor,
            dtype=jnp.promote_types(jnp.float32, dtype),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.D = nnx.Param(jnp.ones((H,), dtype=param_dtype), out_sharding=("heads",), eager_sharding=False)
        self.norm = RMSNorm(I, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype, scale_sharding="heads")
        self.out_proj = sharded_linear(
            I, hidden_size, ("heads", "embed"), std=output_projection_std(initializer_range, num_layers), **kw
        )

    def init_state(self, batch_size: int, max_length: int, dtype: Dtype = jnp.float32) -> Mamba2State:
        """Zero state (``max_length`` is ignored: the state has a fixed size)."""
        c = self.config
        return Mamba2State(
            conv=self.conv1d.init_state(batch_size, dtype=dtype),
            recurrent=jnp.zeros((batch_size, c.num_heads, c.head_dim, c.state_size), dtype=dtype),
        )

    def __call__(
        self, x: jax.Array, state: Mamba2State | None = None, *, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, Mamba2State]:
        """x (B, S, hidden) -> (y (B, S, hidden) in ``dtype``, new Mamba2State).

        segment_ids: optional (B, S) document ids; each new document starts from a zero state and conv tail
        (:mod:`m2rnn_jax.layers.documents`).
        """
        c = self.config
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape (B, S, {self.hidden_size}), got {x.shape}")
        batch, seq_len, _ = x.shape
        compute_dtype = jnp.promote_types(jnp.float32, self.dtype)
        if state is None:
            state = self.init_state(batch, seq_len, dtype=compute_dtype)
        I, H, N, G = c.intermediate_size, c.num_heads, c.state_size, c.num_groups

        # each block from its own kernel columns: no concatenate of the blocks' gradients (layers/linear.py)
        z, xBC, dt_raw = linear_blocks(self.in_proj, x.astype(self.dtype), (I, c.conv_channels, H))
        reset = None if segment_ids is None else document_starts(segment_ids, batch, seq_len)
        xBC, conv_state = self.conv1d(xBC, state.conv, segment_ids=segment_ids)
        xs, B, C = jnp.split(xBC.astype(compute_dtype), [I, I + G * N], axis=-1)
        xs = xs.reshape(batch, seq_len, H, c.head_dim)
        B, C = B.reshape(batch, seq_len, G, N), C.reshape(batch, seq_len, G, N)
        dt = self.decay_gate.time_step(dt_raw)  # (B, S, H) in compute_dtype
        log_decay = self.decay_gate(dt_raw, final_exponential=False)  # dt * A

        h0 = state.recurrent.astype(compute_dtype)
        scan = ssd_over_context if context_axis_size() > 1 else ssd
        y, recurrent = scan(xs, dt, log_decay, B, C, h0, reset=reset, chunk_size=c.chunk_size)
        y = y + self.D[...].astype(compute_dtype)[:, None] * xs
        y = y.reshape(batch, seq_len, I) * jax.nn.silu(z.astype(compute_dtype))
        out = self.out_proj(self.norm(y))
        return out, Mamba2State(conv=conv_state, recurrent=recurrent.astype(state.recurrent.dtype))

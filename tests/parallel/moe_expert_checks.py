"""Expert-parallel MoE checks on 8 fake CPU devices; run as a subprocess by ``test_moe_expert_parallel.py``.

Prints ``OK <check>`` for every check that passes; any failure raises (non-zero exit, traceback on stderr).
Float64 is enabled when run as a script (the float64 cases); the float32 cases build float32 modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2rnn_jax.layers.mlp import MoE, MoEConfig
from m2rnn_jax.parallel.mesh import build_mesh
from m2rnn_jax.parallel.shardings import parameter_shardings

HIDDEN = 8
TOLERANCE = {jnp.float32: 1e-5, jnp.float64: 1e-10}


def make_moe(num_experts: int, top_k: int, dtype, *, bias: bool = False, skew: bool = False, **config) -> MoE:
    """A small MoE; ``skew``: the router sends nearly every token to expert 1 (its logit gets +40 from input
    feature 0, which :func:`make_input` sets to 4)."""
    moe = MoE(
        HIDDEN,
        MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            intermediate_size=6,
            shared_intermediate_size=4,
            router_aux_loss_coef=0.1,
            add_bias=bias,
            **config,
        ),
        num_layers=2,
        initializer_range=0.5,
        dtype=dtype,
        param_dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    if bias:  # non-zero biases, so their gradients and the per-row bias gather are exercised
        for linear in (moe.c_fc, moe.c_proj):
            linear.bias[...] = jax.random.normal(jax.random.key(7), linear.bias.shape, dtype)
    if skew:
        moe.gate.kernel[...] = moe.gate.kernel[...].at[0, 1].set(10.0)
    return moe


def make_input(batch: int, seq_len: int, dtype, *, skew: bool = False) -> jax.Array:
    x = jax.random.normal(jax.random.key(1), (batch, seq_len, HIDDEN), dtype)
    return x.at[..., 0].set(4.0) if skew else x


def loss_and_grads(moe: MoE, x: jax.Array):
    """(loss, aux, y, grads of every parameter, grad of x), jitted; loss = sum(y cos y) + aux."""
    graphdef, params = nnx.split(moe)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * jnp.cos(y)) + aux, (y, aux)

    (value, (y, aux)), (grads, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return value, aux, y, grads, dx


def on_mesh(mesh_axes: dict[str, int], moe: MoE, x: jax.Array):
    """:func:`loss_and_grads` under ``mesh_axes``, parameters placed by the sharding rules, x split over the batch
    axes; also whether the traced program has an all_to_all."""
    mesh = build_mesh(mesh_axes)
    graphdef, params = nnx.split(moe)
    params = jax.device_put(params, parameter_shardings(params, mesh))
    batch_axes = tuple(a for a in ("data", "fsdp", "expert") if mesh_axes.get(a, 1) > 1)
    seq_axis = "context" if mesh_axes.get("context", 1) > 1 else None
    x = jax.device_put(x, NamedSharding(mesh, P(batch_axes, seq_axis)))
    with jax.set_mesh(mesh):
        moe = nnx.merge(graphdef, params)
        result = loss_and_grads(moe, x)
        jaxpr = str(jax.make_jaxpr(lambda x: moe(x)[0])(x))
    return result, "all_to_all" in jaxpr


def assert_close(got, expected, tolerance: float, label: str) -> None:
    """Every entry within ``tolerance`` of the array's largest magnitude (sums over shards run in another order)."""
    value, aux, y, grads, dx = got
    e_value, e_aux, e_y, e_grads, e_dx = expected
    pairs = {"y": (y, e_y), "aux": (aux, e_aux), "loss": (value, e_value), "dx": (dx, e_dx)}
    flat, e_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(e_grads))
    assert len(flat) == len(e_flat), label
    pairs.update({f"d{path}": (leaf[...], e_flat[path][...]) for path, leaf in flat})
    for name, (a, b) in pairs.items():
        b = np.asarray(b)
        scale = max(float(np.max(np.abs(b))), 1.0)
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=tolerance * scale, err_msg=f"{label}: {name}")


# (name, mesh, num_experts, top_k, dtype, batch, seq_len, bias, skew)
CASES = [
    ("expert2_data4_f32", {"expert": 2, "data": 4}, 4, 2, jnp.float32, 8, 5, False, False),
    ("expert4_fsdp2_f64", {"expert": 4, "fsdp": 2}, 8, 3, jnp.float64, 8, 4, True, False),
    ("expert8_f64_skewed", {"expert": 8}, 8, 2, jnp.float64, 8, 3, False, True),
    ("expert8_top1_f32_skewed", {"expert": 8}, 16, 1, jnp.float32, 16, 2, True, True),
    ("expert2_fsdp2_tensor2_f32", {"expert": 2, "fsdp": 2, "tensor": 2}, 4, 2, jnp.float32, 4, 6, False, False),
    ("expert2_context2_data2_f64", {"expert": 2, "context": 2, "data": 2}, 6, 4, jnp.float64, 4, 6, True, True),
]


def check_matches_unsharded() -> None:
    """The expert-parallel layer == the same layer on one device: y, aux, loss, every gradient."""
    for name, mesh_axes, experts, top_k, dtype, batch, seq_len, bias, skew in CASES:
        moe = make_moe(experts, top_k, dtype, bias=bias, skew=skew)
        x = make_input(batch, seq_len, dtype, skew=skew)
        expected = loss_and_grads(moe, x)
        if skew:  # the case is what it says: most pairs go to expert 1 (on expert shard 0)
            logits = x.reshape(-1, HIDDEN) @ moe.gate.kernel[...]
            assert float(jnp.mean(jnp.argmax(logits, axis=-1) == 1)) > 0.9, name
        got, has_all_to_all = on_mesh(mesh_axes, moe, x)
        assert has_all_to_all, f"{name}: no all-to-all in the expert-parallel program"
        assert_close(got, expected, TOLERANCE[dtype], name)
        print(f"OK matches_unsharded_{name}")


def check_local_dispatch_and_fallback() -> None:
    """dispatch="local" (and "auto" with a batch that does not split) runs the in-place program: same values, no
    shard_map / all_to_all in the MoE's jaxpr."""
    mesh_axes = {"expert": 2, "data": 2, "fsdp": 2}
    moe = make_moe(4, 2, jnp.float64, dispatch="local")
    x = make_input(8, 3, jnp.float64)
    got, _ = on_mesh(mesh_axes, moe, x)
    assert_close(got, loss_and_grads(moe, x), 1e-10, "local")
    auto = make_moe(4, 2, jnp.float64)
    with jax.set_mesh(build_mesh(mesh_axes)):
        local_jaxpr = str(jax.make_jaxpr(lambda x: moe(x))(x))
        auto_jaxpr = str(jax.make_jaxpr(lambda x: auto(x))(x))
        fallback_jaxpr = str(jax.make_jaxpr(lambda x: auto(x))(x[:3]))  # 3 sequences do not split over 8 shards
    assert "all_to_all" in auto_jaxpr and "shard_map" in auto_jaxpr
    for jaxpr in (local_jaxpr, fallback_jaxpr):
        assert "all_to_all" not in jaxpr and "shard_map" not in jaxpr
    print("OK local_dispatch")
    print("OK auto_falls_back_to_local")


def check_errors() -> None:
    """An expert axis that does not divide the experts, and an all_to_all request whose batch does not split."""
    x = make_input(8, 2, jnp.float32)
    with jax.set_mesh(build_mesh({"expert": 8})):
        try:
            make_moe(4, 2, jnp.float32)(x)
        except ValueError as error:
            assert "num_experts: expected a multiple of the expert axis size 8" in str(error), error
        else:
            raise AssertionError("4 experts on expert=8 did not raise")
    with jax.set_mesh(build_mesh({"expert": 2, "data": 4})):
        try:
            make_moe(4, 2, jnp.float32, dispatch="all_to_all")(make_input(4, 2, jnp.float32))
        except ValueError as error:
            assert "batch: expected a multiple of the batch shards" in str(error), error
        else:
            raise AssertionError("a batch of 4 on 8 batch shards did not raise")
    print("OK errors")


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    check_matches_unsharded()
    check_local_dispatch_and_fallback()
    check_errors()

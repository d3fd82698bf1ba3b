"""Sharding checks on 8 fake CPU devices; run as a subprocess by ``test_sharded.py`` (XLA_FLAGS set there).

Prints ``OK <check>`` for every check that passes; any failure raises (non-zero exit, traceback on stderr).
"""

from __future__ import annotations

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_jax.data.sources import make_source
from m2rnn_jax.ops.m2rnn.scan_backend import scan_backend
from m2rnn_jax.ops.m2rnn.sharding import run_sharded
from m2rnn_jax.parallel.batches import global_batch
from m2rnn_jax.parallel.mesh import build_mesh
from m2rnn_jax.parallel.shardings import batch_sharding, replicated
from m2rnn_jax.testing import random_m2rnn_inputs
from m2rnn_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from m2rnn_jax.train.optimizer import build_optimizer, learning_rate_schedule
from m2rnn_jax.train.presets import state_tracking_model
from m2rnn_jax.train.state import abstract_train_state, create_train_state, model_graphdef, train_state_shardings
from m2rnn_jax.train.step import make_train_step
from tests.train.tiny import tiny_train_config

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
LAYOUTS = {"dp": {"data": 8}, "fsdp": {"fsdp": 8}, "tp": {"data": 2, "tensor": 4}, "fsdp_tp": {"fsdp": 2, "tensor": 4}}


def check_op_shard_map() -> None:
    """run_sharded == the plain backend (values and all gradients) for every head-broadcast case."""
    mesh = build_mesh({"data": 2, "tensor": 4})
    inputs = random_m2rnn_inputs(
        jax.random.key(0),
        batch=4,
        seq_len=6,
        num_heads=8,
        k_dim=4,
        v_dim=3,
        num_q_heads=1,
        num_k_heads=2,
        num_v_heads=8,
        num_f_heads=8,
        num_w_heads=4,
    )
    names = ("q", "k", "v", "W", "f", "h0")
    args = tuple(inputs[name] for name in names)
    kwargs = dict(cu_seqlens=None, gradient_clipping=0.5, state_dtype=jnp.float32, interpret=False)

    def loss(fn, *a):
        y, h = fn(*a, **kwargs)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h**2)

    expected = jax.value_and_grad(lambda *a: loss(scan_backend, *a), argnums=tuple(range(6)))(*args)
    with jax.set_mesh(mesh):
        sharded_fn = jax.jit(
            jax.value_and_grad(
                lambda *a: loss(lambda *b, **k: run_sharded(scan_backend, *b, **k), *a), argnums=tuple(range(6))
            )
        )
        got = sharded_fn(*args)
        assert "shard_map" in str(jax.make_jaxpr(lambda *a: run_sharded(scan_backend, *a, **kwargs))(*args))
    np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
    for name, a, b in zip(names, got[1], expected[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)
    print("OK op_shard_map_matches_unsharded")


def check_op_needs_no_communication() -> None:
    """With inputs already split over (batch, heads), the sharded forward has no collective at all."""
    mesh = build_mesh({"data": 2, "tensor": 4})
    inputs = random_m2rnn_inputs(
        jax.random.key(1),
        batch=4,
        seq_len=5,
        num_heads=8,
        k_dim=4,
        v_dim=3,
        num_q_heads=1,
        num_k_heads=4,
        num_v_heads=8,
        num_f_heads=8,
        num_w_heads=8,
    )
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    specs = {
        "q": P("data", None, None, None),
        "k": P("data", None, "tensor", None),
        "v": P("data", None, "tensor", None),
        "W": P("tensor", None, None),
        "f": P("data", None, "tensor"),
        "h0": P("data", "tensor", None, None),
    }
    args = [jax.device_put(inputs[n], NamedSharding(mesh, specs[n])) for n in ("q", "k", "v", "W", "f", "h0")]
    fn = lambda *a: run_sharded(
        scan_backend,
        *a,
        cu_seqlens=None,
        gradient_clipping=None,  # noqa: E731
        state_dtype=jnp.float32,
        interpret=False,
    )
    with jax.set_mesh(mesh):
        hlo = jax.jit(fn).lower(*args).compile().as_text()
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"collectives in the sharded recurrence: {found}"
    print("OK op_no_collectives")


def check_public_op_routes_kernels_through_shard_map() -> None:
    """m2rnn(backend=pallas_*) under a mesh runs in shard_map and equals scan, also inside a caller's shard_map.

    Inside a caller's shard_map over "data" the op must leave that manual axis alone and split only "tensor".
    """
    from jax.sharding import PartitionSpec as P

    from m2rnn_jax import m2rnn

    mesh = build_mesh({"data": 2, "tensor": 4})
    inputs = random_m2rnn_inputs(
        jax.random.key(2),
        batch=4,
        seq_len=5,
        num_heads=8,
        k_dim=4,
        v_dim=3,
        num_q_heads=1,
        num_k_heads=1,
        num_v_heads=8,
        num_f_heads=8,
        num_w_heads=8,
    )
    args = tuple(inputs[name] for name in ("q", "k", "v", "W", "f", "h0"))

    def loss(backend: str, *a):
        y, h = m2rnn(*a, gradient_clipping=1.0, backend=backend, interpret=backend != "scan")
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h**2)

    expected = jax.value_and_grad(lambda *a: loss("scan", *a), argnums=tuple(range(6)))(*args)
    with jax.set_mesh(mesh):
        kernel_loss = lambda *a: loss("pallas_gpu", *a)  # noqa: E731
        assert "shard_map" in str(jax.make_jaxpr(kernel_loss)(*args)), "the op did not enter shard_map"
        got = jax.jit(jax.value_and_grad(kernel_loss, argnums=tuple(range(6))))(*args)

        def per_data_shard(*a):  # the caller splits the batch itself; the op may split heads only
            return jax.lax.psum(kernel_loss(*a), "data")

        batch_specs = (P("data"), P("data"), P("data"), P(), P("data"), P("data"))
        nested = jax.jit(jax.shard_map(per_data_shard, in_specs=batch_specs, out_specs=P(), axis_names={"data"}))
        nested_value = nested(*args)
    np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
    np.testing.assert_allclose(float(nested_value), float(expected[0]), rtol=1e-5)
    for name, a, b in zip(("q", "k", "v", "W", "f", "h0"), got[1], expected[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)
    print("OK public_op_kernels_in_shard_map")


def check_public_op_varlen_in_shard_map() -> None:
    """Varlen inputs under a mesh: the op splits heads only (the packed tokens stay whole) and equals scan.

    The data axis is left unsplit (varlen tokens are never split): each block runs on both of its devices, and the
    clamp of the gradient clipping (binding here) must still see the whole cotangent (it saw half of it before the
    fix in run_sharded)."""
    from m2rnn_jax import m2rnn

    mesh = build_mesh({"data": 2, "tensor": 4}, devices=jax.devices()[:8])
    inputs = random_m2rnn_inputs(
        jax.random.key(3),
        batch=0,
        seq_len=0,
        num_heads=8,
        k_dim=4,
        v_dim=3,
        num_q_heads=1,
        num_k_heads=2,
        num_v_heads=8,
        num_f_heads=8,
        num_w_heads=4,
        cu_seqlens=[0, 3, 3, 7],
    )
    names = ("q", "k", "v", "W", "f", "h0")
    args = tuple(inputs[name] for name in names)

    def loss(backend: str, *a):
        y, h = m2rnn(
            *a, cu_seqlens=inputs["cu_seqlens"], gradient_clipping=1.0, backend=backend, interpret=backend != "scan"
        )
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h**2)

    expected = jax.value_and_grad(lambda *a: loss("scan", *a), argnums=tuple(range(6)))(*args)
    for backend in ("pallas_gpu", "pallas_tpu"):
        with jax.set_mesh(mesh):
            kernel_loss = lambda *a, backend=backend: loss(backend, *a)  # noqa: E731
            assert "shard_map" in str(jax.make_jaxpr(kernel_loss)(*args)), "the op did not enter shard_map"
            got = jax.jit(jax.value_and_grad(kernel_loss, argnums=tuple(range(6))))(*args)
        np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5, err_msg=backend)
        for name, a, b in zip(names, got[1], expected[1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=f"{backend} {name}")
    print("OK public_op_varlen_in_shard_map")


def _run_steps(mesh_axes: dict[str, int], steps: int = 2, config=None):
    config = config or tiny_train_config()
    mesh = build_mesh(mesh_axes, devices=jax.devices()[: int(np.prod(list(mesh_axes.values())))])
    optimizer = build_optimizer(config.optimizer, config.steps)
    state, shardings = create_train_state(config.model, optimizer, config.seed, mesh)
    sharding = batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(
            model_graphdef(config.model), optimizer, learning_rate_schedule(config.optimizer, config.steps)
        ),
        in_shardings=(shardings, sharding),
        out_shardings=(shardings, replicated(mesh)),
    )
    source = make_source(config.data, config.model.vocab_size)
    losses = []
    with jax.set_mesh(mesh):
        for step in range(steps):
            batch = global_batch(
                lambda rows, step=step: source.train_batch(step, 8, config.batch_size, rows),
                sharding,
                config.batch_size,
                8,
            )
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
    return config, optimizer, mesh, state, shardings, losses


def check_sharded_steps_match_single_device() -> None:
    _, _, _, reference, _, reference_losses = _run_steps({"data": 1})
    for name, axes in LAYOUTS.items():
        _, _, mesh, state, shardings, losses = _run_steps(axes)
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=name)
        specs = {str(s.spec) for s in jax.tree.leaves(shardings.params)}
        if "tensor" in axes:
            assert any("tensor" in s for s in specs), (name, specs)
        if "fsdp" in axes:
            assert any("fsdp" in s for s in specs), (name, specs)
        print(f"OK sharded_step_{name}")


def check_scanned_layers_match_unrolled() -> None:
    """``model.scan_layers``: a 3-layer M2RNN stack scanned over its stacked parameters trains on data x tensor
    and fsdp x tensor meshes exactly as unrolled on one device (losses and parameters)."""
    model = state_tracking_model(
        "s3", hidden_size=16, num_layers=3, num_heads=4, k_head_dim=4, v_head_dim=4, intermediate_size=16
    )
    _, _, _, reference, _, reference_losses = _run_steps({"data": 1}, config=tiny_train_config(model=model))
    scanned = tiny_train_config(model=model.replace(scan_layers=True))
    for name in ("tp", "fsdp_tp"):
        _, _, _, state, _, losses = _run_steps(LAYOUTS[name], config=scanned)
        np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=name)
        print(f"OK scanned_layers_{name}")


def check_restore_onto_another_mesh() -> None:
    config, optimizer, _, state, _, _ = _run_steps({"data": 8}, steps=1)
    with tempfile.TemporaryDirectory() as directory:
        checkpointer = Checkpointer(directory, async_save=True)
        checkpointer.save(state, {"data_position": {"next_step": 1}})
        checkpointer.wait_until_finished()
        for axes in ({"data": 2, "tensor": 4}, {"fsdp": 4, "tensor": 2}, {"data": 1}):
            mesh = build_mesh(axes, devices=jax.devices()[: int(np.prod(list(axes.values())))])
            abstract = abstract_train_state(config.model, optimizer)
            shardings = train_state_shardings(abstract, optimizer, mesh)
            restored, metadata = checkpointer.restore(abstract_with_shardings(abstract, shardings))
            assert metadata["data_position"]["next_step"] == 1
            for a, b, s in zip(
                jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True
            ):
                assert a.sharding == s, (axes, a.sharding, s)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            print(f"OK restore_onto_{'_'.join(f'{k}{v}' for k, v in axes.items())}")
        checkpointer.close()


def check_heads_must_divide_the_tensor_axis() -> None:
    from m2rnn_jax.train.config import MeshConfig
    from m2rnn_jax.train.trainer import Trainer

    config = tiny_train_config(mesh=MeshConfig(data=1, tensor=8))  # 4 M2RNN heads on 8 tensor shards
    with tempfile.TemporaryDirectory() as directory:
        try:
            Trainer(config, directory)
        except ValueError as err:
            assert "model.m2rnn.num_heads: expected a multiple of mesh.tensor=8" in str(err), err
        else:
            raise AssertionError("4 heads on 8 tensor shards was accepted")
    print("OK heads_must_divide_tensor")


if __name__ == "__main__":
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.device_count()}"
    checks = sys.argv[1:] or ["op", "steps", "restore"]
    if "op" in checks:
        check_op_shard_map()
        check_op_needs_no_communication()
        check_public_op_routes_kernels_through_shard_map()
        check_public_op_varlen_in_shard_map()
    if "steps" in checks:
        check_sharded_steps_match_single_device()
        check_scanned_layers_match_unrolled()
    if "restore" in checks:
        check_restore_onto_another_mesh()
        check_heads_must_divide_the_tensor_axis()

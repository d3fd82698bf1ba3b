"""The Gluon forward of the pallas_gpu backend (explicit register layouts): when it is chosen, what it compiles to,
and (tests marked ``gpu``) its results against the scan reference through the Pallas-Triton backward.

CPU CI cannot run the kernel: it checks the selection predicate, and, where Triton 3.6 is importable, the offline
compile (PTX with tensor-core mma, no barriers, no shared memory).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.ops.m2rnn.pallas_gpu import m2rnn_pallas_gpu, use_gluon_forward
from m2rnn_jax.testing import random_m2rnn_inputs, relative_error
from pallas_kernels.gpu.m2rnn_common import KernelConfig
from tests.kernels.test_pallas_gpu import NAMES, _outputs_and_grads

COMMON = dict(
    dense=True,
    interpret=False,
    input_dtype=jnp.bfloat16,
    carry_dtype=jnp.float32,
    k_padded=64,
    v_padded=16,
    tokens=8 * 4096,
    num_heads=84,
    config=KernelConfig(gluon_forward=True),
)


def test_predicate_accepts_the_paper_case():
    assert use_gluon_forward(**COMMON)
    assert use_gluon_forward(**(COMMON | dict(input_dtype=jnp.float16, k_padded=16)))
    assert use_gluon_forward(**(COMMON | dict(k_padded=128)))


@pytest.mark.parametrize(
    "change",
    [
        dict(dense=False),  # varlen
        dict(interpret=True),  # CPU interpret mode
        dict(input_dtype=jnp.float32),
        dict(input_dtype=jnp.float64, carry_dtype=jnp.float64),
        dict(carry_dtype=jnp.bfloat16),  # state_dtype=bfloat16
        dict(k_padded=256),
        dict(v_padded=32),
        dict(tokens=2**27),  # offsets beyond int32
        dict(config=KernelConfig(gluon_forward=False)),
    ],
)
def test_predicate_falls_back(change):
    assert not use_gluon_forward(**(COMMON | change))


def test_cpu_interpret_call_keeps_the_pallas_forward():
    """On CPU (interpret mode) the backend never reaches the Gluon kernel: the call needs no Triton."""
    args = random_m2rnn_inputs(
        jax.random.PRNGKey(0), batch=1, seq_len=5, num_heads=2, k_dim=16, v_dim=16, dtype=jnp.bfloat16
    )
    y, h = m2rnn_pallas_gpu(
        *(args[n] for n in NAMES), cu_seqlens=None, gradient_clipping=None, state_dtype=jnp.float32, interpret=True
    )
    assert y.shape == (1, 5, 2, 16) and h.shape == (1, 2, 16, 16)


_HAS_TRITON = importlib.util.find_spec("triton") is not None


# CI installs triton (the [gpu] extra), so there a missing triton fails the test instead of skipping it.
@pytest.mark.skipif(not _HAS_TRITON and not os.environ.get("CI"), reason="needs triton (3.6): pip install -e '.[gpu]'")
@pytest.mark.parametrize("dtype,k_dim", [("bf16", 64), ("fp16", 32)])
def test_offline_compile_stages_inputs_and_uses_mma(dtype, k_dim):
    """The per-step inputs go through shared memory in blocks (two stages of STAGED_STEPS steps: q, k rows, v and
    f repeated along V), with barriers only between blocks, none in the per-step loops."""
    from pallas_kernels.gpu.m2rnn_forward_gluon import STAGED_STEPS, GluonForwardSpec, compile_forward

    spec = GluonForwardSpec(
        seq_len=300,
        num_heads=6,
        k_dim=k_dim,
        v_dim=16,
        group_q=3,
        group_k=6,
        group_v=1,
        group_f=2,
        group_w=1,
        chunk_size=128,
        dtype=dtype,
        f_dtype="fp32",
        save_checkpoints=True,
    )
    compiled = compile_forward(spec)
    per_step = 2 * k_dim * 2 + 16 * 2 + 16 * 4  # q, k rows (16-bit), v (16-bit), f (float32, repeated along V)
    assert compiled.shared_mem_bytes == 2 * STAGED_STEPS * per_step and compiled.num_warps == 1
    assert "mma.sync.aligned.m16n8k16" in compiled.ptx
    step_loops = _innermost_loop_bodies(compiled.ptx)
    assert len(step_loops) == 2 and all("ld.shared" in body or "ldmatrix" in body for body in step_loops)
    assert "bar.sync" in compiled.ptx and not any("bar.sync" in body for body in step_loops)


def _innermost_loop_bodies(ptx: str) -> list[str]:
    """PTX text of each innermost loop: from a label that no nested loop header follows to the branch back to it."""
    lines = ptx.splitlines()
    bodies = []
    for i, line in enumerate(lines):
        label = re.match(r"(\$L__BB\w+):", line.strip())
        if not label:
            continue
        for j in range(i + 1, len(lines)):
            if re.match(r"\$L__BB\w+:.*Loop", lines[j].strip()):
                break
            if re.search(r"\bbra(\.uni)?\s+" + re.escape(label.group(1)) + ";", lines[j]):
                bodies.append("\n".join(lines[i : j + 1]))
                break
    return bodies


# ---------------------------------------------------------------------------------------------------------------
# Real GPU (pytest -m gpu -p no:randomly tests/kernels -n 0 on the device machine)


def _backend(config: KernelConfig | None, state_dtype=jnp.float32, backend: str = "pallas_gpu"):
    from m2rnn_jax.ops.m2rnn.scan_backend import scan_backend

    def fn(args):
        call_args = tuple(args.get(n) for n in NAMES)
        options = dict(cu_seqlens=None, gradient_clipping=1.0, state_dtype=jnp.dtype(state_dtype), interpret=False)
        if backend == "scan":
            y, h = scan_backend(*call_args, **options)
        else:
            y, h = m2rnn_pallas_gpu(*call_args, config=config, **options)
        return y.astype(jnp.float32), h.astype(jnp.float32)

    return jax.jit(fn)


GPU_CASES = {
    # name: (batch, seq_len, heads, K, V, Nq, Nk, Nv, Nf, Nw, dtype, with_h0)
    "mixed_heads_h0_ragged_chunk": (2, 300, 6, 64, 16, 3, 1, 6, 2, 6, jnp.bfloat16, True),
    "k32_f16_no_h0": (3, 129, 4, 32, 16, 4, 2, 4, 4, 1, jnp.float16, False),
    "k_padded_48_v12": (1, 64, 2, 48, 12, 1, 1, 2, 2, 2, jnp.bfloat16, True),
    "paper_shape": (8, 4096, 84, 64, 16, 1, 1, 84, 84, 84, jnp.bfloat16, False),
}


def gpu_case_inputs(case: str, seed: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Random inputs of GPU_CASES[case]: the 16-bit values the kernel gets (h0 in float32) and the same values in
    float32 for the scan reference."""
    batch, seq_len, heads, k_dim, v_dim, nq, nk, nv, nf, nw, dtype, with_h0 = GPU_CASES[case]
    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(seed),
        batch=batch,
        seq_len=seq_len,
        num_heads=heads,
        k_dim=k_dim,
        v_dim=v_dim,
        num_q_heads=nq,
        num_k_heads=nk,
        num_v_heads=nv,
        num_f_heads=nf,
        num_w_heads=nw,
        dtype=dtype,
        with_h0=with_h0,
    )
    low = {n: inputs[n] for n in NAMES if n in inputs}
    if with_h0:
        low["h0"] = low["h0"].astype(jnp.float32)
    return low, {n: x.astype(jnp.float32) for n, x in low.items()}


GLUON_CONFIGS = {
    "rows64_newton": KernelConfig(gluon_forward=True, approx_tanh=False, gluon_rows=None, gluon_tanh="newton"),
    "rows32_mixed": KernelConfig(gluon_forward=True, approx_tanh=False, gluon_rows=32, gluon_tanh="mixed"),
    "rows16_rcp": KernelConfig(
        gluon_forward=True, approx_tanh=False, gluon_rows=16, gluon_tanh="rcp", block_k=16, num_warps=1
    ),
    "rows32_approx": KernelConfig(gluon_forward=True, approx_tanh=True, gluon_rows=32),
}


@pytest.mark.gpu
@pytest.mark.parametrize("config_name", sorted(GLUON_CONFIGS))
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_gluon_forward_against_f32_scan(case, config_name):
    """Gluon forward + Pallas-Triton backward vs the float32 scan on the same 16-bit values: y, h_final and every
    gradient; and the Gluon forward vs the Pallas-Triton forward (same numerics, so much closer)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    low, rounded = gpu_case_inputs(case, seed=21)
    key = jax.random.PRNGKey(22)
    expected = _outputs_and_grads(_backend(None, backend="scan"), rounded, key)
    gluon = _outputs_and_grads(_backend(GLUON_CONFIGS[config_name]), low, key)
    pallas = _outputs_and_grads(_backend(KernelConfig(gluon_forward=False)), low, key)
    for name in expected:
        assert np.isfinite(gluon[name]).all(), name
        assert relative_error(gluon[name], expected[name]) < 1e-2, name
    for name in ("y", "h_final"):
        assert relative_error(gluon[name], pallas[name]) < 5e-3, name


@pytest.mark.gpu
def test_gpu_gluon_checkpoints_match_pallas_forward():
    """The residual checkpoints of both forwards agree (the backward reads them in this layout)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from m2rnn_jax.ops.m2rnn import pallas_gpu

    inputs = random_m2rnn_inputs(
        jax.random.PRNGKey(23), batch=2, seq_len=300, num_heads=4, k_dim=64, v_dim=16, dtype=jnp.bfloat16
    )
    args = tuple(inputs[n] for n in ("q", "k", "v", "W", "f"))
    h0 = inputs["h0"].astype(jnp.float32)

    def checkpoints(config):
        def fn(q, k, v, w, f, h0):
            tokens = q.shape[0] * q.shape[1]
            pack = lambda x: x.reshape((tokens,) + x.shape[2:])
            cu = jnp.arange(3, dtype=jnp.int32) * q.shape[1]
            static = pallas_gpu._Static(
                config=config, num_chunks=2 * 3, clip=None, interpret=False, gluon_forward=config.gluon_forward
            )
            _, (ckpt, _) = pallas_gpu._run_forward(
                pack(q), pack(k), pack(v), w, f.reshape(tokens, -1), h0, cu, static, save=True
            )
            return ckpt

        return np.asarray(jax.jit(fn)(*args, h0))

    config = GLUON_CONFIGS["rows32_mixed"]
    assert relative_error(checkpoints(config), checkpoints(dataclasses.replace(config, gluon_forward=False))) < 5e-3

"""The Gluon backward of the pallas_gpu backend (explicit register layouts): when it is chosen, what it compiles to,
and (tests marked ``gpu``) every gradient against the scan reference.

CPU CI cannot run the kernel: it checks the selection predicate, and, where Triton 3.6 is importable, the offline
compile (PTX with tensor-core mma, one warp, shared memory for the recomputed block only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import pytest

from m2rnn_jax.ops.m2rnn.pallas_gpu import use_gluon_backward
from m2rnn_jax.testing import relative_error
from pallas_kernels.gpu.m2rnn_common import KernelConfig
from tests.kernels.test_gluon_forward import GPU_CASES, _backend, gpu_case_inputs
from tests.kernels.test_pallas_gpu import _outputs_and_grads


def test_predicate_follows_the_gluon_forward_and_the_config():
    config = KernelConfig(gluon_backward=True)
    assert use_gluon_backward(gluon_forward=True, config=config)
    assert not use_gluon_backward(gluon_forward=False, config=config)  # varlen, f32, interpret, ...: Pallas
    assert not use_gluon_backward(gluon_forward=True, config=dataclasses.replace(config, gluon_backward=False))


def test_default_config_takes_the_gluon_backward():
    from m2rnn_jax.ops.m2rnn.pallas_gpu import default_config

    assert default_config(batch=8, num_heads=84, k_dim=64).gluon_backward  # paper shape, B=8 (H200 run 26)
    b1 = default_config(batch=1, num_heads=84, k_dim=64)
    assert b1.gluon_backward and b1.gluon_rows == 16  # rows split over 4 programs: faster too (run 26)
    assert not KernelConfig().gluon_backward  # explicit configs keep the Pallas-Triton backward unless asked


_HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not _HAS_TRITON and not os.environ.get("CI"), reason="needs triton (3.6): pip install -e '.[gpu]'")
@pytest.mark.parametrize("dtype,k_dim,rows,block,clip", [("bf16", 64, 32, 4, 1.0), ("fp16", 32, 16, 8, None)])
def test_offline_compile(dtype, k_dim, rows, block, clip):
    from pallas_kernels.gpu.m2rnn_backward_gluon import GluonBackwardSpec, compile_backward

    spec = GluonBackwardSpec(
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
        batch=2,
        rows=rows,
        block=block,
        clip=clip,
    )
    compiled = compile_backward(spec)
    assert compiled.num_warps == 1
    recompute = block * rows * 16 * (4 + 2 * 2)  # Z_t (float32), H_{t-1} and dP_t (16-bit) of one block
    inputs = block * (2 * rows + 3 * 16) * 4  # q, k rows; v, dy, f (along V): staged in float32
    outputs = block * (2 * rows * 2 + 16 * 2 + 4)  # dq, dk rows, dv (16-bit); df (float32)
    assert compiled.shared_mem_bytes == recompute + inputs + outputs
    assert "mma.sync.aligned.m16n8k16" in compiled.ptx


# ---------------------------------------------------------------------------------------------------------------
# Real GPU (pytest -m gpu -p no:randomly tests/kernels -n 0 on the device machine)

GLUON_BACKWARD_CONFIGS = {
    "rows32_block4_approx": KernelConfig(
        gluon_forward=True, gluon_backward=True, approx_tanh=True, gluon_rows=32, gluon_block=4
    ),
    "rows32_block4_mixed": KernelConfig(
        gluon_forward=True, gluon_backward=True, approx_tanh=False, gluon_rows=32, gluon_tanh="mixed", gluon_block=4
    ),
    "rows16_block8_approx": KernelConfig(
        gluon_forward=True, gluon_backward=True, approx_tanh=True, gluon_rows=16, gluon_block=8, block_k=16, num_warps=1
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("config_name", sorted(GLUON_BACKWARD_CONFIGS))
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_gluon_backward_against_f32_scan(case, config_name):
    """Gluon forward + Gluon backward vs the float32 scan on the same 16-bit values (clip 1): y, h_final and every
    gradient (q, k, v, W, f, h0)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    low, rounded = gpu_case_inputs(case, seed=31)
    key = jax.random.PRNGKey(32)
    expected = _outputs_and_grads(_backend(None, backend="scan"), rounded, key)
    got = _outputs_and_grads(_backend(GLUON_BACKWARD_CONFIGS[config_name]), low, key)
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    assert all(error < 1e-2 for error in errors.values()), errors

"""One device call: ceilings, correctness at the paper shape and timings of kernel variants (H200).

    PYTHONPATH=. python3 experiments/bench/gpu_check.py --out $OUT [--steps correctness,default,forward,...]

Steps (``--steps``, comma-separated, run in this order): ceilings, correctness, default, forward, backward, scan,
shapes, final, profile, profile_approx, ablation, occupancy, gluon, gluon_bwd, staged, b1_backward, layer,
more.

1. Ceilings of this GPU: device-to-device copy bandwidth and a bf16 matmul rate (METHOD.md).
2. Correctness: the bf16 kernel (each correctness variant) vs the float32 scan reference on the same bf16-rounded
   values at the paper's 400M layer shape (B=8, S=4096, N=84, K=64, V=16, Nq=Nk=1, clip 1, h0 None): relative
   L2 error ||out - ref|| / ||ref|| of y, h_final and the gradients of q, k, v, W, f.
3. Timings (forward, forward+backward, memory) of launch-parameter variants, of the default, of the scan
   reference, and at B=1 and S=16384.
4. profile: one untimed forward and forward+backward call of the default kernels, to run under
   ``ncu --clock-control none -k regex:m2rnn ...``.
5. ablation: timings with some per-step input loads pointed at token 0 (wrong results, diagnostic only).
6. gluon: the Gluon forward (explicit register layouts) with the Pallas-Triton backward: correctness at the paper
   shape (exact and approximate tanh), timings against the Pallas forward in the same run, B=1 and S=16384.
7. staged: the Gluon kernels as they are now (inputs staged through shared memory), exact and approximate tanh:
   correctness at the paper shape and forward+backward timings; profile_approx: ``profile`` with approximate tanh.
8. gluon_bwd: the Gluon backward (with the Gluon forward): correctness at the paper shape, forward+backward timings
   of its variants against the Pallas-Triton backward in the same run, and B=1.
9. layer: the whole M2RNN layer at the 400M shape, each op backend: times, and errors against the float32 layer.
Every result is appended to $OUT/results.jsonl as soon as it exists; a table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_jax.bench.op import (
    SHAPES,
    bench,
    format_table,
    forward_and_training_step,
    make_inputs,
    median_ms,
    op_function,
)
from m2rnn_jax.ops.m2rnn.pallas_gpu import default_config
from pallas_kernels.gpu import m2rnn_common
from pallas_kernels.gpu.m2rnn_common import KernelConfig

BASE = KernelConfig(
    block_k=64,
    chunk_size=128,
    recompute_block=2,
    num_warps=2,
    num_stages=1,
    prefetch=1,
    approx_tanh=False,
    gluon_forward=False,
)  # the Pallas-Triton forward, exact tanh (runs 1-7)
FORWARD_VARIANTS = {
    "base": BASE,
    "prefetch2": dataclasses.replace(BASE, prefetch=2),
    "prefetch4": dataclasses.replace(BASE, prefetch=4),
    "warps1": dataclasses.replace(BASE, num_warps=1),
    "approx_tanh": dataclasses.replace(BASE, approx_tanh=True),
    "bk32_w1": dataclasses.replace(BASE, block_k=32, num_warps=1),
}
BACKWARD_VARIANTS = {
    "base": BASE,
    "rb4": dataclasses.replace(BASE, recompute_block=4),
    "prefetch4": dataclasses.replace(BASE, prefetch=4),
    "warps1": dataclasses.replace(BASE, num_warps=1),
    "approx_tanh": dataclasses.replace(BASE, approx_tanh=True),
    "c64": dataclasses.replace(BASE, chunk_size=64),
}
# More, smaller programs (more warps per scheduler to hide latency; ncu: 2.5 active warps per scheduler at B=8).
OCCUPANCY_VARIANTS = {
    "bk32_w2": (dataclasses.replace(BASE, block_k=32), True),
    "bk16_w1": (dataclasses.replace(BASE, block_k=16, num_warps=1), True),
    "bk16_w2": (dataclasses.replace(BASE, block_k=16), False),
    "bk32_w4": (dataclasses.replace(BASE, block_k=32, num_warps=4), False),
}
CORRECTNESS_VARIANTS = ("base", "approx_tanh")
# Gluon forward (explicit register layouts) + the Pallas-Triton backward, against BASE (Pallas forward).
GLUON = dataclasses.replace(BASE, gluon_forward=True)
GLUON_VARIANTS = {
    f"gluon rows{rows or 64} {tanh}": dataclasses.replace(GLUON, gluon_rows=rows, gluon_tanh=tanh)
    for rows in (None, 32)
    for tanh in ("rcp", "newton", "mixed")
} | {
    "gluon rows32 approx_tanh": dataclasses.replace(GLUON, gluon_rows=32, approx_tanh=True),
    "pallas (same run)": BASE,
}
GLUON_CORRECTNESS = ("gluon rows64 newton", "gluon rows32 mixed", "gluon rows32 newton")
# Gluon forward + Gluon backward (block = steps recomputed at a time into shared memory), against the Gluon
# forward + Pallas-Triton backward of run 9 (the default before).
GLUON_FWD = dataclasses.replace(GLUON, gluon_rows=32, gluon_tanh="mixed")
GLUON_BWD_VARIANTS = {
    f"gluon bwd rows32 block{block}": dataclasses.replace(GLUON_FWD, gluon_backward=True, gluon_block=block)
    for block in (4, 8)
} | {
    "gluon bwd rows16 block4": dataclasses.replace(GLUON_FWD, gluon_backward=True, gluon_rows=16, gluon_block=4),
    "gluon fwd + pallas bwd (same run)": GLUON_FWD,
}
# Session 3: the Gluon kernels with their inputs staged through shared memory (forward) or loaded as 32-bit
# registers and converted at use (backward); exact ("mixed") and approximate tanh.
GLUON_DEFAULT = dataclasses.replace(GLUON_FWD, gluon_backward=True)
STAGED_VARIANTS = {
    f"staged {tanh}": dataclasses.replace(GLUON_DEFAULT, approx_tanh=tanh == "approx") for tanh in ("mixed", "approx")
}


class Recorder:
    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "results.jsonl")
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def ceilings(rec: Recorder) -> None:
    x = jnp.ones((256 * 2**20,), jnp.float32)  # 1 GiB
    copy = jax.jit(lambda a: a * 1.0001)
    ms = median_ms(copy, x, iters=20)
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda p, q: p @ q)
    mm_ms = median_ms(matmul, a, a, iters=10)
    rec.add(
        {"kind": "ceiling", "copy_tb_per_s": 2 * x.nbytes / ms / 1e9, "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}
    )


def relative_errors(actual: dict, expected: dict) -> dict:
    out = {}
    for name, ref in expected.items():
        ref = np.asarray(ref, np.float64)
        act = np.asarray(actual[name], np.float64)
        out[name] = float(np.linalg.norm(act - ref) / np.linalg.norm(ref)) if np.isfinite(act).all() else float("nan")
    return out


def outputs_and_grads(fn, args, dy):
    (y, h), pullback = jax.vjp(fn, args)
    grads = pullback((dy.astype(y.dtype), jnp.zeros_like(h)))[0]
    return {"y": y, "h_final": h} | {"d" + n: g for n, g in grads.items()}


def correctness(rec: Recorder, variants, configs: dict[str, KernelConfig] = BACKWARD_VARIANTS) -> None:
    """bf16 kernel variants vs the float32 scan on the same bf16-rounded values, at the paper shape."""
    shape = SHAPES["400m"]
    bf16 = make_inputs(shape)
    rounded = {n: x.astype(jnp.float32) for n, x in bf16.items()}
    dy = jax.random.normal(jax.random.PRNGKey(3), (shape.batch, shape.seq_len, shape.num_heads, shape.v_dim))
    reference = jax.jit(lambda a, d: outputs_and_grads(op_function("scan"), a, d))(rounded, dy)
    reference = jax.device_get(reference)
    for variant in variants:
        config = configs[variant]
        try:
            kernel = op_function("pallas_gpu", config)
            got = jax.jit(lambda a, d, kernel=kernel: outputs_and_grads(kernel, a, d))(bf16, dy)
            rec.add(
                {
                    "kind": "correctness",
                    "shape": shape.label(),
                    "variant": variant,
                    "relative_l2_vs_f32_scan": relative_errors(jax.device_get(got), reference),
                }
            )
        except Exception as err:
            rec.add({"kind": "correctness", "variant": variant, "error": _error(err)})
    del reference


def correctness_f32(rec: Recorder) -> None:
    """float32 inputs: the kernel against the float32 reference at a smaller shape."""
    small = dataclasses.replace(SHAPES["400m"], batch=2, seq_len=512, dtype="float32")
    f32 = make_inputs(small)
    dy = jax.random.normal(jax.random.PRNGKey(4), (small.batch, small.seq_len, small.num_heads, small.v_dim))
    try:
        ref = jax.jit(lambda a, d: outputs_and_grads(op_function("scan"), a, d))(f32, dy)
        got = jax.jit(lambda a, d: outputs_and_grads(op_function("pallas_gpu", BASE), a, d))(f32, dy)
        rec.add(
            {
                "kind": "correctness",
                "shape": small.label(),
                "variant": "base",
                "relative_l2_vs_f32_scan": relative_errors(jax.device_get(got), jax.device_get(ref)),
            }
        )
    except Exception as err:
        rec.add({"kind": "correctness", "shape": small.label(), "variant": "base", "error": _error(err)})


def layer_check(
    rec: Recorder,
    backends: tuple[str, ...] = ("pallas_gpu", "scan"),
    hidden: int = 1024,
    heads: int = 84,
    timing_shape: tuple[int, int] = (8, 4096),
    error_shape: tuple[int, int] = (4, 2048),
) -> None:
    """The whole ``M2RNN`` layer at the 400M shape (h=1024, N=84, K=64, V=16, Nq=Nk=1, bf16 compute, float32
    parameters, init values): forward and forward+backward times of each op backend at (B, S) = timing_shape, and
    relative L2 errors of y and of the gradients of every parameter against the float32 scan layer at error_shape."""
    from flax import nnx

    from m2rnn_jax.layers.m2rnn import M2RNN, M2RNNConfig

    def build(backend: str, dtype) -> M2RNN:
        config = M2RNNConfig(num_heads=heads, k_head_dim=64, v_head_dim=16, backend=backend)
        return M2RNN(hidden, config, num_layers=24, dtype=dtype, rngs=nnx.Rngs(0))

    def functions(layer: M2RNN):
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

        def loss(p, x, probe):
            y, _ = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(y.astype(jnp.float32) * probe), y

        forward = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x)[0])
        grads = jax.jit(jax.grad(loss, has_aux=True))
        return params, forward, grads

    def named_outputs(grads, params, x, probe) -> dict:
        """y and the gradient of every parameter ("d/<path>") of one call, on the host."""
        param_grads, y = jax.device_get(grads(params, x, probe))
        return {"y": y} | {"d/" + "/".join(map(str, path)): g for path, g in nnx.to_flat_state(param_grads)}

    key_x, key_probe = jax.random.split(jax.random.PRNGKey(5))
    for backend in backends:
        params, forward, grads = functions(build(backend, jnp.bfloat16))
        x = jax.random.normal(key_x, (*timing_shape, hidden), jnp.bfloat16)
        probe = jax.random.normal(key_probe, (*timing_shape, hidden), jnp.float32)
        rec.add(
            {
                "kind": "layer_timing",
                "backend": backend,
                "shape": f"B={timing_shape[0]} S={timing_shape[1]} h={hidden} N={heads} K=64 V=16 bf16",
                "forward_ms": median_ms(forward, params, x, iters=5, repeats=3),
                "fwd_bwd_ms": median_ms(grads, params, x, probe, iters=3, repeats=3),
            }
        )
    x = jax.random.normal(key_x, (*error_shape, hidden), jnp.float32)
    probe = jax.random.normal(key_probe, (*error_shape, hidden), jnp.float32)
    params, _, grads = functions(build("scan", jnp.float32))
    reference = named_outputs(grads, params, x, probe)
    for backend in backends:
        params, _, grads = functions(build(backend, jnp.bfloat16))
        got = named_outputs(grads, params, x.astype(jnp.bfloat16), probe)
        rec.add(
            {
                "kind": "layer_correctness",
                "backend": backend,
                "shape": f"B={error_shape[0]} S={error_shape[1]} bf16 vs float32 scan layer",
                "relative_l2": relative_errors(got, reference),
            }
        )


def _error(err: Exception) -> str:
    return (f"{type(err).__name__}: {err}\n" + traceback.format_exc())[-3000:]


def timed(rec: Recorder, shape_name: str, backend: str, config, variant: str, with_backward: bool) -> None:
    try:
        row = bench(SHAPES[shape_name], backend, config=config, variant=variant, with_backward=with_backward)
    except Exception as err:
        row = {"shape": SHAPES[shape_name].label(), "backend": backend, "variant": variant, "error": _error(err)}
    rec.add({"kind": "timing"} | row)


@contextlib.contextmanager
def frozen_loads(names: tuple[str, ...]):
    """Diagnostic ablation, results WRONG on purpose: the kernels read the inputs ``names`` (of q, k, v, f) of token 0
    at every step instead of token t, so those loads hit L1 instead of L2/HBM while every instruction stays.
    The time saved is what the latency of those per-step loads costs."""
    # the package re-exports functions under the module names: fetch the modules themselves
    modules = [importlib.import_module(f"pallas_kernels.gpu.m2rnn_{name}") for name in ("forward", "backward")]
    original = m2rnn_common.step_inputs

    def patched(refs, t, head, rows, heads, acc_dtype):
        fresh = original(refs, t, head, rows, heads, acc_dtype)
        frozen = original(refs, t * 0, head, rows, heads, acc_dtype)
        return tuple(f if n in names else x for n, x, f in zip("qkvf", fresh, frozen))

    jax.clear_caches()  # traced kernels are cached (custom_vjp, pallas_call): retrace with the patch, then without
    for module in modules:
        module.step_inputs = patched
    try:
        yield
    finally:
        for module in modules:
            module.step_inputs = original
        jax.clear_caches()


def ablation(rec: Recorder) -> None:
    for names, with_backward in ((("q", "k"), False), (("q", "k", "v", "f"), True)):
        with frozen_loads(names):
            timed(rec, "400m", "pallas_gpu", BASE, "frozen loads " + "".join(names), with_backward=with_backward)
    timed(rec, "400m", "pallas_gpu", BASE, "base (same run)", with_backward=True)


def profile_once(config: KernelConfig | None = None) -> None:
    """One forward and one forward+backward call of the kernels of ``config`` (None: the default) at the paper
    shape, untimed: the launches a profiler run (ncu -k regex:m2rnn) looks at."""
    shape = SHAPES["400m"]
    args = make_inputs(shape)
    forward, fwd_bwd = forward_and_training_step(op_function("pallas_gpu", config))
    y = jax.block_until_ready(forward(args))
    dy = jax.random.normal(jax.random.PRNGKey(1), y.shape, jnp.float32).astype(y.dtype)
    jax.block_until_ready(fwd_bwd(args, dy))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/m2rnn_gpu_check"))
    parser.add_argument("--steps", default="ceilings,correctness,default,forward,backward,scan,shapes,more")
    args = parser.parse_args()
    steps = args.steps.split(",")
    rec = Recorder(args.out)
    rec.add(
        {
            "kind": "env",
            "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "python": sys.version.split()[0],
        }
    )
    start = time.time()
    if "ceilings" in steps:
        ceilings(rec)
    if "correctness" in steps:
        correctness(rec, ("base",))
    if "default" in steps:
        timed(rec, "400m", "pallas_gpu", None, "default (auto)", with_backward=True)
    if "forward" in steps:
        for name, config in FORWARD_VARIANTS.items():
            timed(rec, "400m", "pallas_gpu", config, name, with_backward=False)
    if "backward" in steps:
        for name, config in BACKWARD_VARIANTS.items():
            timed(rec, "400m", "pallas_gpu", config, name, with_backward=True)
    if "scan" in steps:
        for shape_name in ("400m", "400m-b1"):
            timed(rec, shape_name, "scan", None, "reference", with_backward=True)
    if "shapes" in steps:
        for shape_name in ("400m-b1", "400m-s16k"):
            timed(rec, shape_name, "pallas_gpu", None, "default (auto)", with_backward=True)
        for name, block_k, warps in (("bk64_w2", 64, 2), ("bk32_w1", 32, 1)):
            config = dataclasses.replace(BASE, block_k=block_k, num_warps=warps)
            timed(rec, "400m-b1", "pallas_gpu", config, name, with_backward=True)
    if "final" in steps:
        for shape_name in ("400m", "400m-b1", "400m-s16k", "400m-b1-s16k"):
            timed(rec, shape_name, "pallas_gpu", None, "default (auto)", with_backward=True)
        timed(rec, "400m", "pallas_gpu", dataclasses.replace(BASE, approx_tanh=True), "approx_tanh", with_backward=True)
    if "profile" in steps:
        profile_once()
    if "profile_approx" in steps:
        profile_once(STAGED_VARIANTS["staged approx"])
    if "ablation" in steps:
        ablation(rec)
    if "occupancy" in steps:
        for name, (config, with_backward) in OCCUPANCY_VARIANTS.items():
            timed(rec, "400m", "pallas_gpu", config, name, with_backward=with_backward)
    if "gluon" in steps:
        correctness(rec, GLUON_CORRECTNESS, GLUON_VARIANTS)
        for name, config in GLUON_VARIANTS.items():
            timed(rec, "400m", "pallas_gpu", config, name, with_backward=name.startswith("pallas"))
        for rows in (16, 32):
            config = dataclasses.replace(GLUON, gluon_rows=rows, gluon_tanh="mixed", block_k=16, num_warps=1)
            timed(rec, "400m-b1", "pallas_gpu", config, f"gluon rows{rows} mixed", with_backward=rows == 16)
        timed(
            rec,
            "400m-s16k",
            "pallas_gpu",
            GLUON_VARIANTS["gluon rows32 mixed"],
            "gluon rows32 mixed",
            with_backward=True,
        )
    if "gluon_bwd" in steps:
        correctness(rec, ("gluon bwd rows32 block4", "gluon bwd rows16 block4"), GLUON_BWD_VARIANTS)
        for name, config in GLUON_BWD_VARIANTS.items():
            timed(rec, "400m", "pallas_gpu", config, name, with_backward=True)
        b1 = dataclasses.replace(GLUON_BWD_VARIANTS["gluon bwd rows32 block4"], gluon_rows=16, block_k=16, num_warps=1)
        timed(rec, "400m-b1", "pallas_gpu", b1, "gluon bwd rows16 block4", with_backward=True)
    if "staged" in steps:
        correctness(rec, tuple(STAGED_VARIANTS), STAGED_VARIANTS)
        for name, config in STAGED_VARIANTS.items():
            timed(rec, "400m", "pallas_gpu", config, name, with_backward=True)
    if "b1_backward" in steps:
        # B=1 (rows split over 4 programs per head): the Pallas-Triton backward against the Gluon backward
        default_b1 = default_config(batch=1, num_heads=84, k_dim=64)
        for gluon_backward in (False, True):
            timed(
                rec,
                "400m-b1",
                "pallas_gpu",
                dataclasses.replace(default_b1, gluon_backward=gluon_backward),
                "gluon bwd rows16" if gluon_backward else "pallas bwd",
                with_backward=True,
            )
    if "layer" in steps:
        layer_check(rec)
    if "more" in steps:
        correctness(rec, [v for v in CORRECTNESS_VARIANTS if v != "base"])
        correctness_f32(rec)
    rec.add({"kind": "done", "seconds": time.time() - start})
    timings = [r for r in rec.rows if r.get("kind") == "timing"]
    print(format_table(timings))
    for row in rec.rows:
        if row.get("kind") in ("ceiling", "correctness"):
            print(json.dumps({k: v for k, v in row.items() if k != "kind"})[:600])
    return 0


if __name__ == "__main__":
    sys.exit(main())

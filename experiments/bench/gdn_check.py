"""GPU check of the gated delta rule's pallas_gpu backend: errors against the float32 chunked reference (outputs,
final state, every gradient) and timings (median of host-timed calls after warm-up, synchronised with
block_until_ready) of several kernel / inverse variants, in one call.

    PYTHONPATH=. python3 experiments/bench/gdn_check.py --out $OUT

Writes ``$OUT/gdn_check.json`` (rewritten atomically after every step) and prints a table last.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp

from m2rnn_jax.ops.chunking import chunk_decays, split_chunks
from m2rnn_jax.ops.gated_delta_rule.chunked import (
    chunk_factors,
    local_factors,
    to_chunks,
    triangular_inverse,
    unit_lower_inverse,
    xla_outputs,
)
from m2rnn_jax.ops.gated_delta_rule.op import gated_delta_rule
from m2rnn_jax.ops.gated_delta_rule.pallas_gpu import (
    default_states_configs,
    fused_chunk_outputs,
    fused_local_factors,
    gated_delta_rule_pallas_gpu,
)
from m2rnn_jax.testing import random_gdn_inputs, relative_error
from pallas_kernels.gpu.gdn_chunk_factors import (
    FactorsBackwardKernelConfig,
    FactorsKernelConfig,
    chunk_factors_backward,
    chunk_factors_forward,
)
from pallas_kernels.gpu.gdn_chunk_outputs import (
    DEFAULT_FACTOR_COTANGENTS_CONFIG,
    DEFAULT_STATE_COTANGENTS_CONFIG,
    OutputsKernelConfig,
    chunk_outputs_backward,
    chunk_outputs_forward,
)
from pallas_kernels.gpu.gdn_chunk_states import StatesKernelConfig, chunk_states_backward, chunk_states_forward
from pallas_kernels.gpu.gdn_walk_cotangents import WalkCotangentsKernelConfig, walk_input_cotangents

ARGS = ("q", "k", "v", "beta", "log_alpha", "h0")
K = StatesKernelConfig
F = FactorsKernelConfig
O = OutputsKernelConfig
W = WalkCotangentsKernelConfig
# name -> the arguments of gated_delta_rule_pallas_gpu that differ from its defaults
FUSED = "fused"
XLA_STAGES = {"local": "xla", "local_backward": "xla", "outputs": "xla", "walk_cotangents": "xla"}
# the XLA chunk-local stage with its inverse as XLA's doubling matmuls (the fused local stage inverts in its kernel)
XLA_DOUBLING = {"local": "xla", "inverse": "doubling"}
VARIANTS = {
    "default": {},  # default_states_configs(--chunk), the stages of FUSED_BY_DEFAULT fused (bf16)
    "xla_stages": XLA_STAGES,
    # one stage fused, the others XLA's (the defaults fuse all four)
    # the chunk-local stage in one kernel, XLA's autodiff for its backward
    "fused_local": XLA_STAGES | {"local": FUSED},
    "fused_local_bwd": XLA_STAGES | {"local": FUSED, "local_backward": FUSED},  # and its backward in one kernel too
    "fused_outputs": XLA_STAGES | {"outputs": FUSED},  # the output stage and its backward in kernels
    "fused_walk": XLA_STAGES | {"walk_cotangents": FUSED},  # dWk, dKd, da in one kernel
    "fused_all": {"local": FUSED, "local_backward": FUSED, "outputs": FUSED, "walk_cotangents": FUSED},
    "xla_doubling": XLA_DOUBLING,
    "f32w4_b32w4": XLA_DOUBLING | {"forward_config": K(32, 4, 2), "backward_config": K(32, 4, 2)},
    "f64w4_b64w4": XLA_DOUBLING | {"forward_config": K(64, 4, 2), "backward_config": K(64, 4, 2)},
    "f32w4_b32w8": XLA_DOUBLING | {"forward_config": K(32, 4, 2), "backward_config": K(32, 8, 2)},
}
FACTORS_SWEEP = [F(128, 4, 1), F(64, 4, 1), F(128, 8, 1), F(64, 8, 1), F(128, 4, 2)]
LOCAL_BACKWARD_SWEEP = [  # the configurations without register spills offline (C=64, K=256, V=512 bf16)
    FactorsBackwardKernelConfig(block_k=64, block_v=64, num_warps=8, num_stages=1),  # the default
    FactorsBackwardKernelConfig(block_k=32, block_v=32, num_warps=8, num_stages=3),
    FactorsBackwardKernelConfig(block_k=32, block_v=64, num_warps=8, num_stages=1),
    FactorsBackwardKernelConfig(block_k=32, block_v=64, num_warps=8, num_stages=2),  # 8 B spilled
]
# the output kernels: forward and state cotangents (one column block a program), factor cotangents (a loop)
OUTPUTS_SWEEP = [O(64, 8, 1), O(128, 8, 1), O(64, 4, 1), O(128, 4, 1), O(32, 4, 1)]
FACTOR_COTANGENTS_SWEEP = [O(64, 8, 2), O(64, 8, 1), O(32, 8, 3), O(32, 8, 2), O(64, 4, 2)]
WALK_COTANGENTS_SWEEP = [
    W(block_k=128, block_v=64, num_warps=8, num_stages=2),
    W(block_k=128, block_v=32, num_warps=8, num_stages=3),
    W(block_k=64, block_v=64, num_warps=4, num_stages=2),  # the default
    W(block_k=128, block_v=64, num_warps=8, num_stages=1),
    W(block_k=64, block_v=64, num_warps=8, num_stages=3),
]
KERNEL_SWEEP = [K(16, 4, 2), K(32, 2, 2), K(32, 4, 2), K(32, 8, 2), K(64, 4, 2), K(64, 8, 2), K(64, 8, 1), K(32, 4, 1)]


def median_ms(fn, *args, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forward_and_backward(fn):
    """jit of (inputs, cotangents) -> (o, h_final, gradients of the six inputs)."""

    def run(inputs, do, dh):
        (o, h), vjp = jax.vjp(lambda *a: fn(*a), *(inputs[n] for n in ARGS))
        return o, h, vjp((do, dh))

    return jax.jit(run)


def errors(result, reference) -> dict[str, float]:
    o, h, grads = result
    o_ref, h_ref, grads_ref = reference
    out = {"o": relative_error(o, o_ref), "h_final": relative_error(h, h_ref)}
    out.update({f"d{n}": relative_error(g, g_ref) for n, g, g_ref in zip(ARGS, grads, grads_ref)})
    return out


def config_label(cfg) -> str:
    """``bk64_bv64_w8_s1``: a launch configuration in a timing's name (block_k only where the config has one)."""
    block_k = getattr(cfg, "block_k", None)
    return ("" if block_k is None else f"bk{block_k}_") + f"bv{cfg.block_v}_w{cfg.num_warps}_s{cfg.num_stages}"


def sweep_timings(prefix: str, configs, kernel_for, *args) -> dict[str, float | str]:
    """``{prefix}_{label}_ms`` of ``kernel_for(cfg)(*args)`` (jitted) for each launch configuration; a launch that
    does not fit records ``{prefix}_{label}_error`` instead, so it does not lose the others."""
    out = {}
    for cfg in configs:
        name = f"{prefix}_{config_label(cfg)}"
        try:
            out[f"{name}_ms"] = median_ms(jax.jit(kernel_for(cfg)), *args)
        except Exception as e:
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def output_stage_timings(Qd, QK, starts, w, interpret: bool) -> dict[str, float | str]:
    """The output stage O = Qd S + QK W (B=8 ... bf16) forward and forward+backward by XLA and by the kernels, then
    each kernel alone at the configurations of the sweeps."""
    dtype = Qd.dtype
    do = jax.random.normal(jax.random.key(4), (Qd.shape[0], Qd.shape[2], Qd.shape[3], Qd.shape[1], w.shape[-1]), dtype)
    stages = {
        "xla": lambda *a: xla_outputs(*a, dtype, dot_dtype=dtype),
        "fused": lambda *a: fused_chunk_outputs(*a, dtype, interpret),
    }
    factors = (Qd, QK, starts, w)
    out = {}
    for name, stage in stages.items():
        out[f"outputs_{name}_fwd_ms"] = median_ms(jax.jit(stage), *factors)
        vjp = jax.jit(lambda *a, stage=stage: jax.vjp(stage, *a)[1](do))
        out[f"outputs_{name}_vjp_ms"] = median_ms(vjp, *factors)
    kernels = {
        "outputs_fwd": lambda cfg: (
            lambda *a: chunk_outputs_forward(*a, out_dtype=dtype, config=cfg, interpret=interpret)
        ),
        "outputs_state_cot": lambda cfg: (
            lambda *a: chunk_outputs_backward(
                *a, do, state_config=cfg, factor_config=DEFAULT_FACTOR_COTANGENTS_CONFIG, interpret=interpret
            )[2:]
        ),
        "outputs_factor_cot": lambda cfg: (
            lambda *a: chunk_outputs_backward(
                *a, do, state_config=DEFAULT_STATE_COTANGENTS_CONFIG, factor_config=cfg, interpret=interpret
            )[:2]
        ),
    }
    for kind, build in kernels.items():
        configs = FACTOR_COTANGENTS_SWEEP if kind == "outputs_factor_cot" else OUTPUTS_SWEEP
        out.update(sweep_timings(kind, configs, build, *factors))
    return out


def local_backward_timings(chunks, decays, interpret: bool) -> dict[str, float | str]:
    """The chunk-local stage's backward kernel alone at the sweep's launches, for random cotangents of the five
    factors (the forward kernel's T)."""
    default = jax.lax.Precision.DEFAULT
    inputs = (chunks["q"], chunks["k"], chunks["v"], chunks["beta"], *decays)
    *factors, T = chunk_factors_forward(*inputs, precision=default, interpret=interpret)
    keys = jax.random.split(jax.random.key(6), len(factors))
    cotangents = tuple(jax.random.normal(key, f.shape, f.dtype) for key, f in zip(keys, factors))

    def kernel_for(cfg):
        return lambda cts: chunk_factors_backward(*inputs, T, cts, precision=default, config=cfg, interpret=interpret)

    return sweep_timings("local_bwd", LOCAL_BACKWARD_SWEEP, kernel_for, cotangents)


def walk_cotangent_timings(starts, w, interpret: bool) -> dict[str, float | str]:
    """dWk = -dW Sᵀ, dKd = W Gᵀ, da = <G, S> as the XLA backward forms them and by the kernel at the sweep's
    launches (random dW and G of W's and S's shapes and dtype)."""
    key_w, key_g = jax.random.split(jax.random.key(5))
    dw = jax.random.normal(key_w, w.shape, w.dtype)
    g_next = jax.random.normal(key_g, starts.shape, starts.dtype)

    def xla(dw, starts, w, g_next):
        dwk = -jnp.einsum("...cv,...kv->...ck", dw, starts)
        dkd = jnp.einsum("...cv,...kv->...ck", w, g_next)
        return dwk, dkd, jnp.sum(g_next.astype(jnp.float32) * starts.astype(jnp.float32), axis=(-2, -1))

    def kernel_for(cfg):
        return lambda *a: walk_input_cotangents(*a, config=cfg, interpret=interpret)

    out = {"walk_cotangents_xla_ms": median_ms(jax.jit(xla), dw, starts, w, g_next)}
    return out | sweep_timings("walk_cotangents", WALK_COTANGENTS_SWEEP, kernel_for, dw, starts, w, g_next)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--k-dim", type=int, default=256)
    parser.add_argument("--v-dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (a CPU dry run)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--no-sweep", action="store_true", help="skip the chunk-factor / kernel-config breakdown")
    parser.add_argument("--profile", action="store_true", help="profile default fwd+bwd; top GPU kernels")
    parser.add_argument("--no-resets", action="store_true", help="skip the check with resets")
    parser.add_argument("--no-reference-timing", action="store_true", help="use the reference for errors only")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining steps after this")
    args = parser.parse_args()
    t0 = time.time()
    shape = dict(B=args.batch, S=args.seq, H=args.heads, K=args.k_dim, V=args.v_dim, C=args.chunk)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "shape": shape,
        "dtype": "bfloat16",
        "steps": {},
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gdn_check.json")

    def save():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)

    def step(name, body):
        if time.time() - t0 > args.budget_s:
            record["steps"][name] = {"skipped": "time budget"}
        else:
            try:
                record["steps"][name] = body()
            except Exception as e:  # one broken variant must not lose the others' numbers
                record["steps"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                traceback.print_exc()
        print(name, json.dumps(record["steps"][name]), flush=True)
        save()

    dims = (args.batch, args.seq, args.heads, args.k_dim, args.v_dim)
    bf16 = random_gdn_inputs(0, *dims, dtype=jnp.bfloat16)
    bf16.pop("reset")
    f32 = {n: x.astype(jnp.float32) for n, x in bf16.items()}
    key_o, key_h = jax.random.split(jax.random.key(1))
    do = jax.random.normal(key_o, (*dims[:3], args.v_dim), jnp.float32)
    dh = jax.random.normal(key_h, (args.batch, args.heads, args.k_dim, args.v_dim), jnp.float32)

    def chunked(*a, reset=None):
        return gated_delta_rule(*a, reset=reset, chunk_size=args.chunk, backend="chunked")

    reference = jax.device_get(forward_and_backward(chunked)(f32, do, dh))

    def reference_timing():
        fwd = jax.jit(lambda x: chunked(*(x[n] for n in ARGS)))
        return {"fwd_ms": median_ms(fwd, f32), "fwd_bwd_ms": median_ms(forward_and_backward(chunked), f32, do, dh)}

    if not args.no_reference_timing:
        step("chunked_f32_reference", reference_timing)

    def variant(**choices):
        def fn(*a, reset=None):
            o, h = gated_delta_rule_pallas_gpu(*a, reset, chunk_size=args.chunk, interpret=args.interpret, **choices)
            return o.astype(a[0].dtype), h

        def body():
            both = forward_and_backward(fn)
            out = {"errors_vs_f32": errors(jax.device_get(both(bf16, do.astype(jnp.bfloat16), dh)), reference)}
            fwd = jax.jit(lambda x: fn(*(x[n] for n in ARGS)))
            out["fwd_ms"] = median_ms(fwd, bf16)
            out["fwd_bwd_ms"] = median_ms(both, bf16, do.astype(jnp.bfloat16), dh)
            defaults = dict(zip(("forward_config", "backward_config"), default_states_configs(args.chunk)))
            out["config"] = {
                name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                for name, value in (defaults | choices).items()
            }
            return out

        return body

    for name in args.variants:
        step(name, variant(**VARIANTS[name]))

    def breakdown():
        chunks = {n: split_chunks(bf16[n], args.chunk) for n in ("q", "k", "v")}  # (B, n, C, H, ...)
        chunks |= {n: to_chunks(bf16[n], args.chunk) for n in ("beta", "log_alpha")}  # (B, H, n, C)

        default = jax.lax.Precision.DEFAULT
        xla_local = functools.partial(
            local_factors, inverse=lambda A: unit_lower_inverse(A, default), dot_dtype=jnp.bfloat16
        )
        fused_local = lambda *a: fused_local_factors(*a, default, "xla", args.interpret)  # noqa: E731
        fused_local_bwd = lambda *a: fused_local_factors(*a, default, FUSED, args.interpret)  # noqa: E731

        def factors(c, local=xla_local):
            return chunk_factors(c["q"], c["k"], c["v"], c["beta"], c["log_alpha"], None, local=local)

        def factor_grad(local):
            run = functools.partial(factors, local=local)
            return jax.jit(lambda c: jax.vjp(run, c)[1](jax.tree.map(jnp.ones_like, run(c))))

        f = jax.jit(factors)(chunks)
        h0 = bf16["h0"]
        solve_check = jax.jit(lambda A: (unit_lower_inverse(A, default), triangular_inverse(A)))
        A = jnp.tril(0.3 * jax.random.normal(jax.random.key(2), (64, args.chunk, args.chunk)), -1)
        inv_d, inv_t = solve_check(A)
        out = {
            "chunk_factors_fwd_ms": median_ms(jax.jit(factors), chunks),
            "chunk_factors_vjp_ms": median_ms(factor_grad(xla_local), chunks),
            "chunk_factors_fused_fwd_ms": median_ms(jax.jit(functools.partial(factors, local=fused_local)), chunks),
            "chunk_factors_fused_vjp_ms": median_ms(factor_grad(fused_local), chunks),
            "chunk_factors_fused_bwd_kernel_vjp_ms": median_ms(factor_grad(fused_local_bwd), chunks),
            "inverse_doubling_default_precision_vs_trsm_rel": relative_error(inv_d, inv_t),
        }
        decays = chunk_decays(chunks["log_alpha"], None)[:3]
        out.update(local_backward_timings(chunks, decays, args.interpret))

        def factors_kernel(cfg):
            return lambda c, d: chunk_factors_forward(
                c["q"], c["k"], c["v"], c["beta"], *d, precision=default, config=cfg, interpret=args.interpret
            )

        out.update(sweep_timings("factors", FACTORS_SWEEP, factors_kernel, chunks, decays))
        walk = functools.partial(
            chunk_states_forward, config=default_states_configs(args.chunk)[0], interpret=args.interpret
        )
        w, starts, _ = jax.jit(walk)(f.U, f.Wk, f.Kd, f.carry, h0)
        out.update(output_stage_timings(f.Qd, f.QK, starts, w, args.interpret))
        out.update(walk_cotangent_timings(starts, w, args.interpret))
        for cfg in KERNEL_SWEEP:
            name = f"bv{cfg.block_v}_w{cfg.num_warps}_s{cfg.num_stages}"
            fwd_kernel = jax.jit(
                lambda U, Wk, Kd, a, h, cfg=cfg: chunk_states_forward(
                    U, Wk, Kd, a, h, config=cfg, interpret=args.interpret
                )
            )
            bwd_kernel = jax.jit(
                lambda Wk, Kd, a, dw, ds, dh_, cfg=cfg: chunk_states_backward(
                    Wk, Kd, a, dw, ds, dh_, config=cfg, interpret=args.interpret
                )
            )
            try:
                w, starts, _ = fwd_kernel(f.U, f.Wk, f.Kd, f.carry, h0)
                out[f"states_fwd_{name}_ms"] = median_ms(fwd_kernel, f.U, f.Wk, f.Kd, f.carry, h0)
                out[f"states_bwd_{name}_ms"] = median_ms(bwd_kernel, f.Wk, f.Kd, f.carry, w, starts, dh)
            except Exception as e:
                out[f"states_{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        return out

    if not args.no_sweep:
        step("breakdown", breakdown)

    def profile():
        def fn(*a):
            o, h = gated_delta_rule_pallas_gpu(*a, None, chunk_size=args.chunk, interpret=args.interpret)
            return o.astype(a[0].dtype), h

        both = forward_and_backward(fn)
        cts = (bf16, do.astype(jnp.bfloat16), dh)
        jax.block_until_ready(both(*cts))
        logdir = tempfile.mkdtemp()
        jax.profiler.start_trace(logdir, create_perfetto_trace=True)
        for _ in range(3):
            jax.block_until_ready(both(*cts))
        jax.profiler.stop_trace()
        (trace_path,) = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
        shutil.copy(trace_path, os.path.join(args.out, "gdn_fwd_bwd_trace.json.gz"))
        with gzip.open(trace_path) as f:
            events = json.load(f)["traceEvents"]
        names = {
            e["pid"]: e["args"].get("name", "")
            for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"
        }
        gpu = {pid for pid, name in names.items() if "gpu" in name.lower() or "cuda" in name.lower()}
        totals, counts = collections.Counter(), collections.Counter()
        for e in events:
            if e.get("ph") == "X" and (not gpu or e.get("pid") in gpu):
                totals[e["name"]] += e.get("dur", 0) / 3e3  # ms per call
                counts[e["name"]] += 1
        top = [[name, round(ms, 4), counts[name] // 3] for name, ms in totals.most_common(45)]
        return {
            "gpu_processes": sorted(names[p] for p in gpu),
            "total_ms_per_call": round(sum(totals.values()), 3),
            "top_ms_per_call": top,
        }

    if args.profile:
        step("profile_default_fwd_bwd", profile)

    def with_resets():
        reset = jax.random.uniform(jax.random.key(3), (args.batch, args.seq)) < 1e-3
        ref = forward_and_backward(lambda *a: chunked(*a, reset=reset))(f32, do, dh)

        def fused(*a):
            o, h = gated_delta_rule_pallas_gpu(*a, reset, chunk_size=args.chunk, interpret=args.interpret)
            return o.astype(a[0].dtype), h

        got = forward_and_backward(fused)(bf16, do.astype(jnp.bfloat16), dh)
        return {"resets": int(reset.sum()), "errors_vs_f32": errors(jax.device_get(got), jax.device_get(ref))}

    if not args.no_resets:
        step("resets_default_variant", with_resets)

    print(f"\n{'step':28s} {'fwd ms':>8s} {'f+b ms':>8s}  max rel err (o, h, grads)")
    for name, r in record["steps"].items():
        errs = r.get("errors_vs_f32", {})
        worst = max(errs.values()) if errs else float("nan")
        print(
            f"{name:28s} {r.get('fwd_ms', float('nan')):8.3f} {r.get('fwd_bwd_ms', float('nan')):8.3f}  {worst:.2e}"
            f"  {r.get('error', '')[:120]}"
        )
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

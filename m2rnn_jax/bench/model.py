"""Model-level benchmark of a preset: each distinct block, each mixer alone, the LM head + loss, the train step.

    m2rnn-jax bench --model hybrid-gdn-m2rnn-1l-400m --batch 8 --seq-len 4096 --json out.json

Rows (see ``docs/benchmarks.md``):

- the ``embedding`` row: the token embedding, forward and forward+backward;
- one ``block`` row per distinct mixer letter of ``layer_pattern`` (a :class:`~m2rnn_jax.models.decoder.DecoderBlock`:
  norm + mixer + norm + MLP/MoE, with the preset's remat) and one ``mixer`` row for its mixer alone: forward ms,
  forward+backward ms (``jax.vjp`` and its pullback for random cotangents, gradients of the parameters and the
  input), and the compiled temporaries of each;
- the ``head`` row: LM head + cross-entropy at (B*S, h) x (h, vocab);
- the ``optimizer`` row: the step's optimizer update alone (every parameter and moment, random gradients);
- the ``sum`` row: embedding + sum over blocks of (count x block forward+backward) + head + optimizer, beside the
  step;
- the ``step`` row: the whole train step as the trainer builds it (``make_train_step`` + ``build_optimizer`` +
  a fresh ``TrainState``, donated, random tokens): ms per step, tokens/s, MFU, peak memory, compile seconds.

Each block is created alone with its parameters made once (the mixer row reuses them); the train step (and then the
optimizer update on the state it leaves) runs first, so the whole model is gone before any block is built and the
allocator's peak is the step's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2rnn_jax.bench.loss import bench_lm_head_loss
from m2rnn_jax.bench.report import format_table
from m2rnn_jax.bench.timing import (
    COMPILE_PHASE_EVENTS,
    Compiled,
    compile_timed,
    footprint_bytes,
    median_ms,
    peak_bytes,
    temp_bytes,
    to_gib,
)
from m2rnn_jax.models.config import SUPPORTED_DTYPES, ModelConfig
from m2rnn_jax.models.counting import abstract_decoder
from m2rnn_jax.models.decoder import MIXER_CLASSES, REMAT_POLICIES, DecoderBlock, embed_tokens
from m2rnn_jax.models.loss import next_token_targets
from m2rnn_jax.train.compile_cache import describe_compile_cache
from m2rnn_jax.train.config import OptimizerConfig
from m2rnn_jax.train.flops import peak_flops_per_device, training_flops_per_token
from m2rnn_jax.train.optimizer import build_optimizer, global_norm, learning_rate_schedule
from m2rnn_jax.train.overrides import apply_overrides
from m2rnn_jax.train.presets import get_preset, list_presets
from m2rnn_jax.train.state import TrainState, init_train_state, model_graphdef
from m2rnn_jax.train.step import make_train_step

SCHEDULE_STEPS = 100_000  # length of the learning-rate schedule the benchmarked optimizer is built for
SEED = 0
SUMMED_KINDS = ("embedding", "block", "head", "optimizer")  # rows in the sum of parts (blocks x their count)


@dataclasses.dataclass(frozen=True)
class Timing:
    """How to time: ``repeats`` batches of ``iters`` calls after one warm-up call (median reported)."""

    iters: int = 10
    repeats: int = 5


def part(kind: str, label: str, letter: str | None = None, count: int | None = 1) -> dict:
    """The fields every row starts with: ``kind``, ``part`` (the table label), ``letter``, ``count``."""
    return {"kind": kind, "part": label, "letter": letter, "count": count}


def measured(row: dict, measure: Callable[[], dict]) -> dict:
    """``row`` with the fields ``measure()`` returns, or with ``error`` when the device fails (out of memory, a
    kernel that does not run): one failing part must not lose the others of a long GPU run. Each finished row is
    also printed to stderr as one JSON line, so a run stopped by a time limit still shows what it measured."""
    try:
        row = {**row, **measure()}
    except jax.errors.JaxRuntimeError as err:
        row = {**row, "error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    return row


def resolve_config(
    preset: str,
    dtype: str | None = None,
    remat: str | None = None,
    head_statistics: str | None = None,
    scan_layers: bool | None = None,
    head_logits: str | None = None,
    overrides: Sequence[str] = (),
) -> ModelConfig:
    """The preset's config with the compute ``dtype``, ``remat``, ``head_statistics``, ``scan_layers`` and
    ``head_logits`` replaced where given (None keeps the preset's), then the ``KEY=VALUE`` ``overrides`` on the
    model config applied (``gated_deltanet.chunk_size=128``; :func:`m2rnn_jax.train.overrides.apply_overrides`).

    Raises:
        ValueError: unknown preset (the message lists the known names), unknown override key, or a value the
            config rejects.
    """
    names = list_presets()
    if preset not in names:
        raise ValueError(f"model: expected one of the presets {', '.join(names)}; got {preset!r}")
    config = get_preset(preset)
    if dtype is not None:
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype: expected one of {SUPPORTED_DTYPES}, got {dtype!r}")
        config = config.replace(dtype=dtype)
    if remat is not None:
        config = config.replace(remat=remat)
    if head_statistics is not None:
        config = config.replace(head_statistics=head_statistics)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
    if head_logits is not None:
        config = config.replace(head_logits=head_logits)
    return apply_overrides(config, list(overrides))


def mixer_kinds(config: ModelConfig) -> dict[str, int]:
    """Mixer letter -> number of blocks of that kind, in order of first appearance in ``layer_pattern``."""
    return dict(Counter(config.layer_pattern))


def random_like(key: jax.Array, tree: Any) -> Any:
    """Standard-normal arrays with the shapes and dtypes of ``tree`` (ShapeDtypeStructs or arrays)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten(
        [jax.random.normal(k, leaf.shape, jnp.float32).astype(leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def time_forward_backward(fn: Callable[[Any, jax.Array], Any], params: Any, x: jax.Array, timing: Timing) -> dict:
    """Times ``fn(params, x)`` alone and with its full backward (gradients of ``params`` and ``x`` for random
    cotangents of every output); returns ms, compiled temporaries (GiB) and compile seconds of both."""
    forward = jax.jit(fn)
    cotangent = random_like(jax.random.PRNGKey(SEED + 1), jax.eval_shape(fn, params, x))

    @jax.jit
    def forward_backward(params, x, cotangent):
        out, pullback = jax.vjp(fn, params, x)
        return out, pullback(cotangent)

    fwd = compile_timed(forward, params, x)
    fwd_bwd = compile_timed(forward_backward, params, x, cotangent)
    return {
        "forward_ms": median_ms(fwd.executable, params, x, iters=timing.iters, repeats=timing.repeats),
        "fwd_bwd_ms": median_ms(fwd_bwd.executable, params, x, cotangent, iters=timing.iters, repeats=timing.repeats),
        "forward_temp_gib": to_gib(temp_bytes(fwd.executable)),
        "fwd_bwd_temp_gib": to_gib(temp_bytes(fwd_bwd.executable)),
        "compile_s": fwd.compile_s + fwd_bwd.compile_s,
    }


def random_hidden(config: ModelConfig, batch: int, seq_len: int) -> jax.Array:
    """(B, S, h) standard-normal hidden states in the compute dtype (what a block sees: RMS ~1)."""
    shape = (batch, seq_len, config.hidden_size)
    return jax.random.normal(jax.random.PRNGKey(SEED + 2), shape, jnp.float32).astype(config.compute_dtype)


def block_function(graphdef: nnx.GraphDef, remat: str) -> Callable[[nnx.State, jax.Array], tuple]:
    """(params, x (B, S, h)) -> (x (B, S, h), aux loss) of one block from a fresh state, rematerialised as the
    decoder does for ``remat`` (a :data:`~m2rnn_jax.models.config.REMAT_CHOICES` name)."""

    def apply(params: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, _, aux_loss = nnx.merge(graphdef, params)(x)
        return y, aux_loss

    return apply if remat == "none" else jax.checkpoint(apply, policy=REMAT_POLICIES[remat])


def mixer_function(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """(params, x (B, S, h)) -> y (B, S, h) of one mixer from a zero state (the final state is dropped)."""

    def apply(params: nnx.State, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(x, None)[0]

    return apply


def bench_block(config: ModelConfig, letter: str, count: int, batch: int, seq_len: int, timing: Timing) -> list[dict]:
    """The ``block`` and ``mixer`` rows of one mixer letter that ``count`` blocks use (parameters created once)."""
    block = DecoderBlock(letter, config, rngs=nnx.Rngs(SEED))
    x = random_hidden(config, batch, seq_len)
    name = MIXER_CLASSES[letter].__name__
    block_graph, block_params = nnx.split(block)
    mixer_graph, mixer_params = nnx.split(block.mixer)
    return [
        measured(
            part("block", f"block {letter} ({name})", letter, count),
            lambda: time_forward_backward(block_function(block_graph, config.remat), block_params, x, timing),
        ),
        measured(
            part("mixer", f"mixer {letter} alone", letter, count),
            lambda: time_forward_backward(mixer_function(mixer_graph), mixer_params, x, timing),
        ),
    ]


def bench_head(config: ModelConfig, batch: int, seq_len: int, timing: Timing) -> dict:
    """The ``head`` row: LM head + mean cross-entropy at the model's width and vocabulary, chunked as the train step
    computes it (:func:`m2rnn_jax.bench.loss.bench_lm_head_loss` without the plain comparison)."""
    return measured(
        part("head", "lm head + loss"),
        lambda: bench_lm_head_loss(
            batch,
            seq_len,
            config.hidden_size,
            config.vocab_size,
            config.dtype,
            timing.iters,
            timing.repeats,
            compare_plain=False,
        ),
    )


def bench_embedding(config: ModelConfig, batch: int, seq_len: int, timing: Timing) -> dict:
    """The ``embedding`` row: the decoder's token embedding (lookup forward; forward+backward adds the scatter of
    the (B, S, h) cotangent into the (vocab, h) gradient), with N(0, 1) parameters of the decoder's shapes."""
    graphdef, abstract = nnx.split(abstract_decoder(config).embed)
    params = random_like(jax.random.PRNGKey(SEED + 8), abstract)
    tokens = random_batch(config, batch, seq_len)["inputs"]

    def apply(params: nnx.State, ids: jax.Array) -> jax.Array:
        return embed_tokens(nnx.merge(graphdef, params).embedding[...], ids, config.compute_dtype)

    return measured(part("embedding", "embedding"), lambda: time_forward_backward(apply, params, tokens, timing))


def random_batch(config: ModelConfig, batch: int, seq_len: int) -> dict[str, jax.Array]:
    """A train batch of uniform random tokens: ``inputs`` and next-token ``targets``, both (B, S) int32."""
    window = jax.random.randint(jax.random.PRNGKey(SEED + 6), (batch, seq_len + 1), 0, config.vocab_size)
    inputs, targets, _, _ = next_token_targets(window)
    return {"inputs": inputs, "targets": targets}


def time_carried(executable: Any, carry: Any, *args: Any, timing: Timing) -> tuple[float, Any]:
    """(ms per call, last carry) of ``executable(carry, *args) -> (carry, outputs)``, each call fed the carry the
    previous call returned (so a donated carry stays valid)."""
    carried = [carry]
    del carry

    def call() -> Any:
        carried[0], outputs = executable(carried[0], *args)
        return carried[0], outputs

    ms = median_ms(call, iters=timing.iters, repeats=timing.repeats)
    return ms, carried.pop()


def step_fields(config: ModelConfig, batch: int, seq_len: int, ms: float, compiled: Compiled) -> dict:
    """The ``step`` row's numbers from its measured ms per step and its compiled executable (call right after the
    step ran: the peak is the allocator's, else the executable's own footprint)."""
    tokens_per_s = batch * seq_len / (ms / 1e3)
    flops_per_token = training_flops_per_token(config, seq_len)
    peak_flops = peak_flops_per_device()
    measured_peak = peak_bytes()
    peak = measured_peak if measured_peak is not None else footprint_bytes(compiled.executable)
    return {
        "forward_ms": None,
        "fwd_bwd_ms": ms,
        "forward_temp_gib": None,
        "fwd_bwd_temp_gib": to_gib(temp_bytes(compiled.executable)),
        "compile_s": compiled.compile_s,
        **compiled.phases,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "model_tflops_per_s": flops_per_token * tokens_per_s / 1e12,
        "peak_flops_per_device": peak_flops,
        "mfu": None if peak_flops is None else flops_per_token * tokens_per_s / peak_flops,
        "peak_memory_gib": to_gib(peak),
        "peak_memory_source": "memory_stats" if measured_peak is not None else "memory_analysis",
    }


def optimizer_update_function(optimizer: optax.GradientTransformation) -> Callable:
    """(state, grads) -> (state after one optimizer update, global norm of the updates): the step's update alone."""

    def update(state: TrainState, grads: Any) -> tuple[TrainState, jax.Array]:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state), global_norm(updates)

    return update


def time_optimizer_update(optimizer: optax.GradientTransformation, state: TrainState, timing: Timing) -> dict:
    """The ``optimizer`` row's numbers: one update of every parameter and moment (donated) for random gradients."""
    grads = jax.tree.map(lambda p: 1e-3 * p, random_like(jax.random.PRNGKey(SEED + 7), state.params))
    update = jax.jit(optimizer_update_function(optimizer), donate_argnums=0)
    compiled = compile_timed(update, state, grads)
    ms, _ = time_carried(compiled.executable, state, grads, timing=timing)
    return {
        "forward_ms": None,
        "fwd_bwd_ms": ms,
        "forward_temp_gib": None,
        "fwd_bwd_temp_gib": to_gib(temp_bytes(compiled.executable)),
        "compile_s": compiled.compile_s,
    }


def train_step_function(
    config: ModelConfig, optimizer_config: OptimizerConfig | None = None, schedule_steps: int = SCHEDULE_STEPS
) -> tuple[Callable, optax.GradientTransformation]:
    """The trainer's jitted train step for ``config`` (state donated) and its optimizer: AdamW of
    ``optimizer_config`` (None: ``OptimizerConfig()``) with a schedule of ``schedule_steps``."""
    optimizer_config = OptimizerConfig() if optimizer_config is None else optimizer_config
    optimizer = build_optimizer(optimizer_config, schedule_steps)
    schedule = learning_rate_schedule(optimizer_config, schedule_steps)
    return jax.jit(make_train_step(model_graphdef(config), optimizer, schedule), donate_argnums=0), optimizer


def bench_training(config: ModelConfig, batch: int, seq_len: int, timing: Timing) -> tuple[dict, dict]:
    """The ``step`` and ``optimizer`` rows: the trainer's jitted, donated train step on one device (AdamW of
    ``OptimizerConfig()``, a fresh state, random tokens), then its optimizer update alone on the state it left."""
    step, optimizer = train_step_function(config)
    tokens = random_batch(config, batch, seq_len)
    left: dict[str, TrainState] = {}  # the state the step leaves, for the optimizer row

    def measure_step() -> dict:
        state = jax.jit(lambda: init_train_state(config, optimizer, SEED))()
        compiled = compile_timed(step, state, tokens)
        ms, left["state"] = time_carried(compiled.executable, state, tokens, timing=timing)
        return step_fields(config, batch, seq_len, ms, compiled)

    step_row = measured(part("step", "train step (measured)"), measure_step)
    optimizer_row = part("optimizer", "optimizer update")
    if "state" not in left:
        return step_row, {**optimizer_row, "error": "not run: the train step failed"}
    return step_row, measured(optimizer_row, lambda: time_optimizer_update(optimizer, left.pop("state"), timing))


def abstract_train_step(config: ModelConfig, batch: int, seq_len: int) -> tuple[Callable, TrainState, Any]:
    """(step, state, tokens): the trainer's jitted train step (:func:`train_step_function`) and shape-only inputs
    for it (a fresh state, a (batch, seq_len) token batch), so that any preset traces, lowers and compiles on any
    machine without allocating."""
    step, optimizer = train_step_function(config)
    state = jax.eval_shape(lambda: init_train_state(config, optimizer, SEED))
    tokens = jax.eval_shape(lambda: random_batch(config, batch, seq_len))
    return step, state, tokens


def compile_training(config: ModelConfig, batch: int, seq_len: int) -> dict:
    """The ``compile`` row's numbers: the trainer's donated train step compiled for abstract inputs (nothing is
    allocated, so presets larger than the device compile too): compile seconds, the executable's memory per device
    (arguments, outputs, donated aliases, temporaries, generated code, footprint = arguments + outputs - aliases +
    temporaries) against the device's memory where it reports it, and the compiler's FLOP estimate."""
    compiled = compile_timed(*abstract_train_step(config, batch, seq_len))
    analysis = compiled.executable.memory_analysis()
    cost = compiled.executable.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    footprint = footprint_bytes(compiled.executable)
    fields = ("argument", "output", "alias", "temp", "generated_code")
    row = {f"{name}_gib": to_gib(getattr(analysis, f"{name}_size_in_bytes", None)) for name in fields}
    row.update(
        compile_s=compiled.compile_s,
        **compiled.phases,
        footprint_gib=to_gib(footprint),
        device_memory_gib=to_gib(limit),
        fits=None if limit is None or footprint is None else footprint <= limit,
        flops=cost.get("flops"),
        flops_per_token=training_flops_per_token(config, seq_len),
    )
    return row


def format_phases(row: dict) -> str:
    """`` (trace 2.1 s, lower 4.5 s, backend compile 60.0 s)`` from a row's stage seconds ("" when it has none)."""
    stages = [(name.removesuffix("_s").replace("_", " "), row[name]) for name in COMPILE_PHASE_EVENTS if name in row]
    return f" ({', '.join(f'{label} {seconds:.1f} s' for label, seconds in stages)})" if stages else ""


def format_compile_report(report: dict) -> str:
    """One line per number of :func:`compile_training`'s row, under the report's heading."""
    row = report["rows"][0]
    shapes = report["shapes"]
    if "error" in row:
        return f"{report['preset']}: compile failed: {row['error'][:2000]}"
    fits = {None: "unknown (the device reports no memory limit)", True: "yes", False: "NO"}[row["fits"]]

    def gib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f} GiB"

    return "\n".join(
        [
            f"{report['preset']} on {report['device']} (jax {report['jax']}): B={shapes['batch']} "
            f"S={shapes['seq_len']} {shapes['dtype']} (params {shapes['param_dtype']}) remat={shapes['remat']}",
            f"compile {row['compile_s']:.1f} s{format_phases(row)}; {report['compile_cache']}",
            f"memory per device: arguments {gib(row['argument_gib'])}, outputs {gib(row['output_gib'])}, "
            f"donated {gib(row['alias_gib'])}, temporaries {gib(row['temp_gib'])}, "
            f"code {gib(row['generated_code_gib'])}",
            f"footprint {gib(row['footprint_gib'])} of {gib(row['device_memory_gib'])}: fits {fits}",
            f"compiler FLOP estimate {row['flops']:.3e}" if row["flops"] else "compiler FLOP estimate n/a",
        ]
    )


def sum_of_parts(rows: list[dict], step_ms: float | None) -> dict:
    """The ``sum`` row: sum of count x forward+backward over the block rows, plus the embedding, the head and the
    optimizer update, and its share of the measured step (the rest is the final norm, the metrics and glue); its
    numbers are None when a part or the step failed."""
    summed = [row for row in rows if row["kind"] in SUMMED_KINDS]
    row = part("sum", "sum of parts", count=None)
    if step_ms is None or any("error" in r for r in summed):
        return {**row, "fwd_bwd_ms": None, "measured_ms": step_ms, "fraction_of_step": None, "unaccounted_ms": None}
    total = sum(r["count"] * r["fwd_bwd_ms"] for r in summed)
    return {
        **row,
        "fwd_bwd_ms": total,
        "measured_ms": step_ms,
        "fraction_of_step": total / step_ms,
        "unaccounted_ms": step_ms - total,
    }


def run_model_bench(
    preset: str,
    config: ModelConfig,
    batch: int,
    seq_len: int,
    timing: Timing = Timing(),
    step_only: bool = False,
    compile_only: bool = False,
) -> dict:
    """Benchmarks ``config`` (from :func:`resolve_config`; ``preset`` names it in the report) at (batch, seq_len);
    returns the JSON report (device, versions, shapes, rows). ``step_only`` keeps only the train step and the
    optimizer update rows (no per-part rows, no sum); ``compile_only`` only compiles the step
    (:func:`compile_training`, one ``compile`` row, nothing run or allocated).

    Raises:
        ValueError: non-positive batch / seq_len.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if compile_only:
        row = measured(part("compile", "train step (compiled only)"), lambda: compile_training(config, batch, seq_len))
        return report_fields(preset, config, batch, seq_len, timing, [row])
    step, optimizer = bench_training(config, batch, seq_len, timing)
    if step_only:
        return report_fields(preset, config, batch, seq_len, timing, [optimizer, step])
    rows = [bench_embedding(config, batch, seq_len, timing)]
    rows += [
        row
        for letter, count in mixer_kinds(config).items()
        for row in bench_block(config, letter, count, batch, seq_len, timing)
    ]
    rows += [bench_head(config, batch, seq_len, timing), optimizer]
    rows += [sum_of_parts(rows, step.get("fwd_bwd_ms")), step]
    return report_fields(preset, config, batch, seq_len, timing, rows)


def report_fields(preset: str, config: ModelConfig, batch: int, seq_len: int, timing: Timing, rows: list[dict]) -> dict:
    """The JSON report around ``rows``: device, versions, shapes and timing settings."""
    device = jax.devices()[0]
    return {
        "device": str(device.device_kind),
        "platform": device.platform,
        "jax": jax.__version__,
        "preset": preset,
        "shapes": {
            "batch": batch,
            "seq_len": seq_len,
            "tokens_per_step": batch * seq_len,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "layer_pattern": config.layer_pattern,
            "dtype": config.dtype,
            "param_dtype": config.param_dtype,
            "remat": config.remat,
            "head_statistics": config.head_statistics,
            "head_logits": config.head_logits,
            "scan_layers": config.scan_layers,
        },
        "timing": dataclasses.asdict(timing),
        "compile_cache": describe_compile_cache(),  # a program found in the cache compiles in seconds
        "rows": rows,
    }


TABLE_COLUMNS = (
    ("part", "part", "{}"),
    ("count", "count", "{}"),
    ("fwd ms", "forward_ms", "{:.3f}"),
    ("fwd+bwd ms", "fwd_bwd_ms", "{:.3f}"),
    ("fwd temp GiB", "forward_temp_gib", "{:.3f}"),
    ("fwd+bwd temp GiB", "fwd_bwd_temp_gib", "{:.3f}"),
    ("compile s", "compile_s", "{:.1f}"),
)
NOTE_COLUMN = ("note", "note", "{}")  # shown only when a part failed


def _table_row(row: dict) -> dict:
    """A row as the table shows it: mixer rows indented under their block, ERROR in the note of a failed part."""
    shown = {**row, "part": f"  {row['part']}"} if row["kind"] == "mixer" else dict(row)
    if "error" in row:
        shown["note"] = "ERROR"
    return shown


def _step_line(step: dict) -> str:
    if "error" in step:
        return "train step: ERROR (below)"
    mfu = "n/a" if step["mfu"] is None else f"{100 * step['mfu']:.1f}%"
    peak = "n/a" if step["peak_memory_gib"] is None else f"{step['peak_memory_gib']:.3f} GiB"
    return (
        f"train step: {step['fwd_bwd_ms']:.3f} ms/step, {step['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, "
        f"peak memory {peak} ({step['peak_memory_source']}), compile {step['compile_s']:.1f} s{format_phases(step)}"
    )


def _sum_line(total: dict) -> str:
    if total["fwd_bwd_ms"] is None:
        return "sum of parts: n/a (a part or the step failed)"
    return (
        f"sum of parts {total['fwd_bwd_ms']:.3f} ms vs measured {total['measured_ms']:.3f} ms "
        f"({100 * total['fraction_of_step']:.0f}%); unaccounted {total['unaccounted_ms']:.3f} ms "
        "(final norm, metrics, glue)"
    )


def format_report(report: dict) -> str:
    """The report of :func:`run_model_bench` as a heading, a table of rows, two summary lines and one line per
    failed part."""
    shapes = report["shapes"]
    rows = {row["kind"]: row for row in report["rows"]}
    heading = (
        f"{report['preset']} on {report['device']} (jax {report['jax']}): B={shapes['batch']} "
        f"S={shapes['seq_len']} h={shapes['hidden_size']} vocab={shapes['vocab_size']} {shapes['dtype']} "
        f"(params {shapes['param_dtype']}) remat={shapes['remat']} pattern={shapes['layer_pattern']} "
        f"head statistics={shapes.get('head_statistics', 'two_pass')} "
        f"head logits={shapes.get('head_logits', 'float32')} scan layers={shapes.get('scan_layers', False)}"
    )
    errors = [f"{row['part']}: {row['error'][:500]}" for row in report["rows"] if "error" in row]
    columns = (*TABLE_COLUMNS, NOTE_COLUMN) if errors else TABLE_COLUMNS
    table = format_table(columns, [_table_row(row) for row in report["rows"]])
    return "\n".join(
        [heading, table, _step_line(rows["step"]), *([_sum_line(rows["sum"])] if "sum" in rows else []), *errors]
    )


def failed_parts(report: dict) -> list[str]:
    """Labels of the rows whose measurement failed."""
    return [row["part"] for row in report["rows"] if "error" in row]

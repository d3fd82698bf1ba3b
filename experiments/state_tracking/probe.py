"""The recurrence alone on a group word problem: token -> recurrent state -> linear readout, nothing else.

    python -m experiments.state_tracking.probe --cell m2rnn --group a5 --train-length 4 --steps 4000
    python -m experiments.state_tracking.probe --cell rnn --group a5 --width 256 --train-length 4

The decoders of the comparison answer position 2 (the multiplication table) without composing anything: the
token's embedding reaches the output through the residual stream and the MLP, and M2RNN's readout query q_t comes
from the current token, so "state holds x_1, the next token's query or MLP looks the pair up" is enough. Position 3
then needs a lookup of three elements, which is not learned. Here the prediction at position t is a linear map of
the recurrent output alone (for M2RNN y_t = H_t^T q with a learned q that does not depend on the token), so getting
position 2 right means the state after two tokens names their product, and the step that made it is the one every
later position needs. The question this answers: is the bypass what stops composition from being learned?

Cells: ``rnn``, h_t = tanh(h_{t-1} W + E[x_t] + b) (width ``--width``); ``m2rnn``, the M2RNN op (``--heads`` heads
of K x V) with k_t, v_t and the forget value f_t = sigmoid(.) read from per-token tables, and the query q learned
once (``--query fixed``) or, as in the decoders, read per token from a table (``--query token``: position 2 can then
be a lookup of x_1 in the state by x_2's query, the decoders' shortcut without their residual stream). The readout
is linear (``--readout linear``) or, as the decoders' residual stream and MLP give it, a ReLU MLP of the recurrent
output and the current token's embedding (``--readout token_mlp``, width ``--width``: position 2 can then be a
lookup of x_1 from the state and x_2 from the token path, the other shortcut). AdamW
(warmup, cosine to ``--min-lr-ratio`` (10%) of ``--lr`` over ``--steps``; with ``--anneal-steps N`` the rate holds
at ``--lr`` and the cosine takes the last N steps only; clip 1); ``--seconds`` stops training earlier (with a
``--steps`` far beyond what fits, the learning rate stays near its peak), and ``--anneal-fraction F`` then anneals
by the clock: the rate is multiplied by a cosine from 1 to ``--min-lr-ratio`` over the last F of ``--seconds``.
Prints the accuracy at positions 1 2 3 4 5 6 8 12 16 ... of the comparison's fixed evaluation set and writes
``--out`` (JSON) atomically.

Two training-only levers on what the recurrence sees beyond its training length (evaluation is unchanged: the whole
sequence in one pass from a zero state, no noise):

* ``--state-noise SIGMA``: after every ``--noise-every`` tokens (default 1: every step) the state carried to the
  next token gets i.i.d. N(0, SIGMA^2) added to each entry (M2RNN: every entry of every head's K x V state; rnn: every
  unit). The readout at t sees the clean state of step t; the noise enters the state that step t+1 starts from, so
  the loss at t+1 asks the recurrence to map a perturbed state back to the right one: a pull towards a contracting
  (error-correcting) update, where an update that is exact only on the states reached within the training length
  lets a per-step error compound. The M2RNN op runs the sequence in chunks of ``--noise-every`` tokens
  (``lax.scan`` over chunks, the op's ``h0`` and final state carrying the state between them).
* ``--segment LEN``: truncated back-propagation. A training sequence longer than LEN (a curriculum stage's length;
  shorter ones train as before) is run in segments of LEN tokens; the state is carried from one segment to the
  next through ``jax.lax.stop_gradient`` and the loss is at every position. The recurrence then sees (and is
  trained on) the states reached at long lengths while every gradient path stays at most LEN steps long. With both
  levers, LEN must be a multiple of ``--noise-every``.

``--save PATH`` writes the trained parameters and optimizer state (.npz) and ``--init PATH`` starts from them (the
same cell flags; the step count continues), so several levers can start from one model that has already left the
plateau and learned the short lengths. ``--steps +N`` then trains N more steps (the schedule still counts from
step 0), and ``--steps +N --anneal-steps A`` holds ``--lr`` for N - A of them and anneals over the last A (the
annealing of SEARCH.md rows 33-38, there done by choosing ``--steps`` so the cosine was near its end).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.state_tracking.positions import accuracy_curves, evaluation_batch
from m2rnn_jax.bench.report import write_json
from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.data.state_tracking import GROUPS, get_group, state_tracking_batch
from m2rnn_jax.ops.m2rnn import m2rnn
from m2rnn_jax.train.config import OptimizerConfig
from m2rnn_jax.train.optimizer import learning_rate_schedule

Params = dict[str, jax.Array]


def init_params(
    cell: str,
    order: int,
    width: int,
    heads: int,
    k: int,
    v: int,
    key: jax.Array,
    query: str = "fixed",
    readout: str = "linear",
) -> Params:
    """The parameters of one cell and its readout (``order`` = number of group elements; ``query``: the m2rnn
    query, one (heads, k) for every token or a table (order, heads, k); ``readout``: "linear" or "token_mlp")."""
    params = _cell_params(cell, order, width, heads, k, v, key, query)
    if readout == "token_mlp":
        features = params.pop("out").shape[0]
        keys = jax.random.split(jax.random.fold_in(key, 1), 3)
        params["token"] = jax.random.normal(keys[0], (order, width))
        params["hidden"] = jax.random.normal(keys[1], (features + width, width)) / np.sqrt(features + width)
        params["out"] = jax.random.normal(keys[2], (width, order)) / np.sqrt(width)
    return params


def _cell_params(cell: str, order: int, width: int, heads: int, k: int, v: int, key: jax.Array, query: str) -> Params:
    keys = jax.random.split(key, 8)
    if cell == "rnn":
        return {
            "embed": jax.random.normal(keys[0], (order, width)),
            "w": jax.random.normal(keys[1], (width, width)) / np.sqrt(width),
            "b": jnp.zeros((width,)),
            "out": jax.random.normal(keys[2], (width, order)) / np.sqrt(width),
        }
    return {
        "k": jax.random.normal(keys[0], (order, heads, k)),
        "v": jax.random.normal(keys[1], (order, heads, v)),
        "f": jnp.full((order, heads), -2.0),  # sigmoid(-2) = 0.12: the state is mostly overwritten
        "w": jax.random.normal(keys[2], (heads, v, v)) / np.sqrt(v),
        "q": jax.random.normal(keys[3], (order, heads, k) if query == "token" else (heads, k)),
        "out": jax.random.normal(keys[4], (heads * v, order)) / np.sqrt(heads * v),
    }


def logits(
    cell: str,
    params: Params,
    tokens: jax.Array,
    backend: str = "auto",
    *,
    chunk: int | None = None,
    segment: int | None = None,
    noise: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """(B, S) int tokens -> (B, S, order) logits, position t read from the recurrence's output at t (and, with
    the token MLP readout, from token t) (``backend``: the M2RNN op's backend). ``chunk`` / ``segment`` / ``noise``
    / ``key``: the training-time levers of :func:`segmented_features` (defaults: one pass, no noise)."""
    if chunk is None and segment is None and noise == 0.0:
        features, _ = recurrent_features(cell, params, tokens, backend)
    else:
        features = segmented_features(cell, params, tokens, backend, chunk, segment, noise, key)
    if "hidden" in params:  # token_mlp
        features = jax.nn.relu(jnp.concatenate([features, params["token"][tokens]], axis=-1) @ params["hidden"])
    return features @ params["out"]


def recurrent_features(
    cell: str, params: Params, tokens: jax.Array, backend: str, h0: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(B, S) int tokens -> ((B, S, F) the recurrence's output at every position (F = width or heads * V), the final
    state: rnn (B, width), m2rnn (B, heads, K, V)), starting from ``h0`` (that shape; None: zero)."""
    if cell == "rnn":
        inputs = params["embed"][tokens] + params["b"]  # (B, S, width)

        def step(h, x):
            h = jnp.tanh(h @ params["w"] + x)
            return h, h

        if h0 is None:
            h0 = jnp.zeros((tokens.shape[0], params["w"].shape[0]), inputs.dtype)
        final, states = jax.lax.scan(step, h0, jnp.swapaxes(inputs, 0, 1))
        return jnp.swapaxes(states, 0, 1), final
    batch, length = tokens.shape
    heads, k = params["q"].shape[-2:]
    q = params["q"][tokens] if params["q"].ndim == 3 else jnp.broadcast_to(params["q"], (batch, length, heads, k))
    forget = jax.nn.sigmoid(params["f"][tokens])
    y, final = m2rnn(q, params["k"][tokens], params["v"][tokens], params["w"], forget, h0, backend=backend)
    return y.reshape(batch, length, -1), final


def initial_state(cell: str, params: Params, batch: int) -> jax.Array:
    """The zero state of ``batch`` sequences: rnn (B, width), m2rnn (B, heads, K, V)."""
    if cell == "rnn":
        return jnp.zeros((batch, params["w"].shape[0]), params["w"].dtype)
    heads, v = params["w"].shape[0], params["w"].shape[-1]
    return jnp.zeros((batch, heads, params["k"].shape[-1], v), params["w"].dtype)


def segmented_features(
    cell: str,
    params: Params,
    tokens: jax.Array,
    backend: str,
    chunk: int | None = None,
    segment: int | None = None,
    noise: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """The recurrence run in chunks of ``chunk`` tokens (default ``segment``, else the whole sequence), the state
    carried from chunk to chunk; the same outputs as :func:`recurrent_features` when ``noise`` is 0.

    ``noise`` > 0 (needs ``key``): N(0, noise^2) added to every entry of the state after each chunk (the state the
    next chunk starts from; the outputs of a chunk are read before it). ``segment``: truncated back-propagation,
    the state carried past every ``segment`` tokens goes through ``stop_gradient`` (a multiple of ``chunk``).
    A sequence that is not a whole number of chunks ends with a shorter one."""
    batch, length = tokens.shape
    chunk = chunk or segment or length
    if segment is not None and segment % chunk:
        raise ValueError(f"segment: expected a multiple of the chunk ({chunk}), got {segment}")
    if noise > 0.0 and key is None:
        raise ValueError("key: state noise needs a random key")
    chunks_per_segment = (segment or length) // chunk
    whole = length // chunk
    h = initial_state(cell, params, batch)

    def carry_on(h: jax.Array, index: jax.Array) -> jax.Array:
        """The state after chunk ``index`` as the next chunk receives it."""
        if noise > 0.0:
            h = h + noise * jax.random.normal(jax.random.fold_in(key, index), h.shape, h.dtype)
        if segment is not None:
            h = jnp.where((index + 1) % chunks_per_segment == 0, jax.lax.stop_gradient(h), h)
        return h

    def body(h: jax.Array, item: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        index, piece = item
        features, h = recurrent_features(cell, params, piece, backend, h)
        return carry_on(h, index), features

    pieces = jnp.swapaxes(tokens[:, : whole * chunk].reshape(batch, whole, chunk), 0, 1)  # (whole, B, chunk)
    h, features = jax.lax.scan(body, h, (jnp.arange(whole), pieces))
    features = jnp.swapaxes(features, 0, 1).reshape(batch, whole * chunk, -1)
    if whole * chunk < length:
        rest, _ = recurrent_features(cell, params, tokens[:, whole * chunk :], backend, h)
        features = jnp.concatenate([features, rest], axis=1)
    return features


def warmup_steps(steps: int) -> int:
    """The schedule's linear warmup: min(100, steps / 2) steps."""
    return min(100, steps // 2)


def learning_rate(lr: float, steps: int, min_lr_ratio: float = 0.1, anneal_steps: int | None = None) -> optax.Schedule:
    """Linear warmup 0 -> ``lr`` over :func:`warmup_steps`, then a cosine to ``lr * min_lr_ratio`` at ``steps``;
    with ``anneal_steps`` the rate holds at ``lr`` until ``steps - anneal_steps`` and the cosine takes the rest (the
    library's warmup-stable-decay schedule, :func:`m2rnn_jax.train.optimizer.learning_rate_schedule`)."""
    config = OptimizerConfig(
        learning_rate=lr, warmup_steps=warmup_steps(steps), min_lr_ratio=min_lr_ratio, decay_steps=anneal_steps
    )
    return learning_rate_schedule(config, steps)


def timed_anneal(elapsed: float, seconds: float, fraction: float, min_lr_ratio: float) -> float:
    """The factor on the rate after ``elapsed`` of ``seconds`` of training: 1, then over the last ``fraction`` of
    the time a cosine to ``min_lr_ratio`` (an anneal that ends with the run whatever its step rate)."""
    start = seconds * (1.0 - fraction)
    progress = min(max((elapsed - start) / (seconds * fraction), 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    lr: float, steps: int, min_lr_ratio: float = 0.1, anneal_steps: int | None = None, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """AdamW on the :func:`learning_rate` schedule (decoupled ``weight_decay`` on every parameter, default none),
    global-norm clip 1."""
    schedule = learning_rate(lr, steps, min_lr_ratio, anneal_steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def train(args: argparse.Namespace) -> dict:
    """Trains one cell on ``args.group`` at ``args.train_length`` and returns the result (curves included)."""
    group = get_group(args.group)
    key = jax.random.key(args.seed)
    params = init_params(args.cell, group.order, args.width, args.heads, args.k, args.v, key, args.query, args.readout)
    optimizer = make_optimizer(args.lr, args.steps, args.min_lr_ratio, args.anneal_steps, args.weight_decay)
    opt_state = optimizer.init(params)
    first = 0
    if args.init is not None:
        params, opt_state, first = load_state(args.init, params, opt_state)

    noise_key = jax.random.fold_in(jax.random.key(args.seed), 7)

    def loss_fn(params: Params, inputs: jax.Array, targets: jax.Array, key: jax.Array) -> jax.Array:
        length = inputs.shape[1]  # static: the levers are chosen per curriculum stage
        segment = args.segment if args.segment is not None and length > args.segment else None
        chunk = args.noise_every if args.state_noise > 0.0 else None
        predicted = logits(
            args.cell, params, inputs, args.backend, chunk=chunk, segment=segment, noise=args.state_noise, key=key
        )
        return optax.softmax_cross_entropy_with_integer_labels(predicted, targets).mean()

    @jax.jit
    def step(params, opt_state, inputs, targets, key, rate_factor):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda update: update * rate_factor, updates)  # the rate (and the decay) times it
        return optax.apply_updates(params, updates), opt_state, loss

    started = time.perf_counter()
    log: list[dict] = []
    last_length, last_log = None, 0.0
    steps_done = first
    for number in range(first, args.steps):
        elapsed = time.perf_counter() - started
        if args.seconds is not None and elapsed > args.seconds:
            break
        progress = number / args.steps if args.seconds is None else elapsed / args.seconds
        length = args.train_length[min(int(progress * len(args.train_length)), len(args.train_length) - 1)]
        batch = state_tracking_batch(group, seed=args.seed, step=number, batch_size=args.batch_size, seq_len=length)
        inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
        factor = (
            1.0
            if args.anneal_fraction is None
            else timed_anneal(elapsed, args.seconds, args.anneal_fraction, args.min_lr_ratio)
        )
        noise = jax.random.fold_in(noise_key, number)
        params, opt_state, loss = step(params, opt_state, inputs, targets, noise, jnp.float32(factor))
        steps_done = number + 1
        seconds = time.perf_counter() - started
        due = args.log_seconds is not None and seconds - last_log >= args.log_seconds
        if (number + 1) % max(args.steps // 10, 1) == 0 or length != last_length or due:
            entry = {"step": number + 1, "length": length, "loss": float(loss), "seconds": round(seconds, 1)}
            log.append(entry if args.anneal_fraction is None else entry | {"rate_factor": factor})
            print(f"step {number + 1}: length {length}, loss {float(loss):.4f} ({seconds:.0f} s)", flush=True)
            last_length, last_log = length, seconds
    if args.save is not None:
        save_state(args.save, params, opt_state, steps_done)
    evaluation = evaluation_batch(args.group, args.eval_length, args.eval_sequences)
    forward = jax.jit(logits, static_argnums=(0, 3))
    predicted = jnp.argmax(forward(args.cell, params, jnp.asarray(evaluation["inputs"]), args.backend), -1)
    curves = accuracy_curves(np.asarray(predicted) == evaluation["targets"])
    settings = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    seconds = round(time.perf_counter() - started, 1)
    result = {"args": settings, "steps_done": steps_done, "start_step": first, "seconds": seconds, "curves": curves}
    return result | {"log": log}


def save_state(path: Path, params: Params, opt_state: optax.OptState, step: int) -> None:
    """Writes the parameters, the optimizer state and the number of steps done to ``path`` (.npz, atomically)."""
    leaves = jax.tree.leaves((params, opt_state))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, step=np.asarray(step), **{f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})


def saved_step(path: Path) -> int:
    """The number of steps done by the run that wrote ``path`` (a :func:`save_state` file)."""
    with np.load(path) as saved:
        return int(saved["step"])


def load_state(path: Path, params: Params, opt_state: optax.OptState) -> tuple[Params, optax.OptState, int]:
    """The state :func:`save_state` wrote, in the structure of ``params`` and ``opt_state`` (those of the same
    flags); raises ValueError when the leaves' count or shapes differ."""
    structure = jax.tree.structure((params, opt_state))
    expected = jax.tree.leaves((params, opt_state))
    with np.load(path) as saved:
        leaves = [saved[f"leaf{i}"] for i in range(len([name for name in saved.files if name.startswith("leaf")]))]
        step = int(saved["step"])
    if [leaf.shape for leaf in leaves] != [np.shape(leaf) for leaf in expected]:
        raise ValueError(f"{path}: saved with other flags (leaf shapes differ from this run's)")
    leaves = [jnp.asarray(leaf, dtype=jnp.result_type(old)) for leaf, old in zip(leaves, expected, strict=True)]
    params, opt_state = jax.tree.unflatten(structure, leaves)
    return params, opt_state, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.state_tracking.probe", description=__doc__)
    parser.add_argument("--cell", choices=["rnn", "m2rnn"], default="m2rnn")
    parser.add_argument("--group", choices=GROUPS, default="a5")
    parser.add_argument("--width", type=int, default=256, help="rnn: hidden width; token_mlp: the MLP's width")
    parser.add_argument("--heads", type=int, default=4, help="m2rnn: heads")
    parser.add_argument("--k", type=int, default=4, help="m2rnn: K (rows of a head's state)")
    parser.add_argument("--v", type=int, default=64, help="m2rnn: V (width of a row)")
    parser.add_argument(
        "--query", choices=["fixed", "token"], default="fixed", help="m2rnn: one learned query, or one per token"
    )
    parser.add_argument(
        "--readout",
        choices=["linear", "token_mlp"],
        default="linear",
        help="a linear map of the recurrent output, or a ReLU MLP of it and the token's embedding (width --width)",
    )
    parser.add_argument("--backend", default="auto", help="m2rnn: the op's backend (scan for V > 128 on a GPU)")
    parser.add_argument(
        "--train-length",
        type=int,
        nargs="+",
        default=[4],
        help="training length; several: a curriculum, each for an equal share of --steps (of --seconds if given)",
    )
    parser.add_argument(
        "--steps",
        default="4000",
        help="the step count the schedule ends at; +N: N more than --init's saved count (a continued run's length)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="the cosine ends at --lr times this, at step --steps"
    )
    parser.add_argument(
        "--anneal-steps",
        type=int,
        metavar="N",
        help="hold --lr after the warmup and anneal (the cosine) over the last N of --steps only; with --init the "
        "step count continues, so --steps SAVED+C+N gives C constant steps, then N annealed",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay, on every parameter"
    )
    parser.add_argument("--seconds", type=float, help="stop training after this long (then evaluate)")
    parser.add_argument(
        "--anneal-fraction",
        type=float,
        metavar="F",
        help="with --seconds: the rate (the schedule's) is multiplied by a cosine from 1 to --min-lr-ratio over the "
        "last F of the training time, so the anneal ends with the run at any step rate",
    )
    parser.add_argument(
        "--state-noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="training only: add N(0, SIGMA^2) to every entry of the state carried on after every --noise-every tokens",
    )
    parser.add_argument("--noise-every", type=int, default=1, help="--state-noise: tokens between noise draws")
    parser.add_argument(
        "--segment",
        type=int,
        metavar="LEN",
        help="truncated back-propagation: a training sequence longer than LEN runs in segments of LEN tokens, the "
        "state carried across through stop_gradient (loss at every position); with --state-noise a multiple of "
        "--noise-every",
    )
    parser.add_argument("--log-seconds", type=float, help="also print (and record) the loss this often")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-length", type=int, default=16)
    parser.add_argument("--eval-sequences", type=int, default=512)
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    parser.add_argument("--save", type=Path, help="write the trained parameters and optimizer state here (.npz)")
    parser.add_argument(
        "--init",
        type=Path,
        help="start from a --save file (the same cell flags and --steps / --lr); its step count continues, so the "
        "batches and noise draws do not repeat the earlier run's",
    )
    args = parser.parse_args(argv)
    more = args.steps.startswith("+")
    try:
        args.steps = int(args.steps.removeprefix("+"))
    except ValueError:
        parser.error(f"--steps: expected a positive int or +N, got {args.steps!r}")
    if more and args.init is not None and args.steps >= 1:
        try:
            args.steps += saved_step(args.init)
        except (OSError, KeyError, ValueError) as error:
            parser.error(f"--init: expected a --save file (.npz with a step count), got {args.init} ({error})")
    for name in ("width", "heads", "k", "v", "steps", "batch_size", "eval_length", "eval_sequences"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if min(args.train_length) < 1:
        parser.error(f"--train-length: expected positive lengths, got {args.train_length}")
    if not args.weight_decay >= 0.0:
        parser.error(f"--weight-decay: expected a non-negative number, got {args.weight_decay}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        parser.error(f"--min-lr-ratio: expected a value in [0, 1], got {args.min_lr_ratio}")
    warmup = warmup_steps(args.steps)
    if args.anneal_steps is not None and not 1 <= args.anneal_steps <= args.steps - warmup:
        parser.error(
            f"--anneal-steps: expected an int in [1, --steps - warmup = {args.steps - warmup}], got {args.anneal_steps}"
        )
    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds}")
    if args.anneal_fraction is not None:
        if args.seconds is None or args.anneal_steps is not None:
            parser.error("--anneal-fraction: expected --seconds and no --anneal-steps beside it")
        if not 0.0 < args.anneal_fraction <= 1.0:
            parser.error(f"--anneal-fraction: expected a value in (0, 1], got {args.anneal_fraction}")
    if not args.state_noise >= 0.0:
        parser.error(f"--state-noise: expected a non-negative number, got {args.state_noise}")
    if args.noise_every < 1:
        parser.error(f"--noise-every: expected a positive int, got {args.noise_every}")
    if args.log_seconds is not None and not args.log_seconds > 0:
        parser.error(f"--log-seconds: expected a positive number, got {args.log_seconds}")
    if args.segment is not None and args.segment < 1:
        parser.error(f"--segment: expected a positive int, got {args.segment}")
    if args.segment is not None and args.state_noise > 0.0 and args.segment % args.noise_every:
        parser.error(f"--segment: expected a multiple of --noise-every ({args.noise_every}), got {args.segment}")
    result = train(args)
    position = result["curves"]["position"]
    shown = [n for n in (1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 128, 256) if n <= len(position)]
    cells = " ".join(f"@{n}={100 * position[n - 1]:.1f}%" for n in shown)
    print(f"{args.cell} {args.group}: {result['steps_done']}/{args.steps} steps, {result['seconds']} s, {cells}")
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

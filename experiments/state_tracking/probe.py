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
(warmup, cosine to 10% over ``--steps``, clip 1); ``--seconds`` stops training earlier (with a ``--steps`` far
beyond what fits, the learning rate stays near its peak). Prints the accuracy at positions 1 2 3 4 5 6 8 12 16 ...
of the comparison's fixed evaluation set and writes ``--out`` (JSON) atomically.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.state_tracking.positions import accuracy_curves, evaluation_batch
from m2rnn_jax.data.atomic import atomic_file
from m2rnn_jax.data.state_tracking import GROUPS, get_group, state_tracking_batch
from m2rnn_jax.ops.m2rnn import m2rnn

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


def logits(cell: str, params: Params, tokens: jax.Array, backend: str = "auto") -> jax.Array:
    """(B, S) int tokens -> (B, S, order) logits, position t read from the recurrence's output at t (and, with
    the token MLP readout, from token t) (``backend``: the M2RNN op's backend)."""
    features = recurrent_features(cell, params, tokens, backend)
    if "hidden" in params:  # token_mlp
        features = jax.nn.relu(jnp.concatenate([features, params["token"][tokens]], axis=-1) @ params["hidden"])
    return features @ params["out"]


def recurrent_features(cell: str, params: Params, tokens: jax.Array, backend: str) -> jax.Array:
    """(B, S) int tokens -> (B, S, F) the recurrence's output at every position (F = width or heads * V)."""
    if cell == "rnn":
        inputs = params["embed"][tokens] + params["b"]  # (B, S, width)

        def step(h, x):
            h = jnp.tanh(h @ params["w"] + x)
            return h, h

        h0 = jnp.zeros((tokens.shape[0], params["w"].shape[0]), inputs.dtype)
        _, states = jax.lax.scan(step, h0, jnp.swapaxes(inputs, 0, 1))
        return jnp.swapaxes(states, 0, 1)
    batch, length = tokens.shape
    heads, k = params["q"].shape[-2:]
    q = params["q"][tokens] if params["q"].ndim == 3 else jnp.broadcast_to(params["q"], (batch, length, heads, k))
    forget = jax.nn.sigmoid(params["f"][tokens])
    y, _ = m2rnn(q, params["k"][tokens], params["v"][tokens], params["w"], forget, backend=backend)
    return y.reshape(batch, length, -1)


def train(args: argparse.Namespace) -> dict:
    """Trains one cell on ``args.group`` at ``args.train_length`` and returns the result (curves included)."""
    group = get_group(args.group)
    key = jax.random.key(args.seed)
    params = init_params(args.cell, group.order, args.width, args.heads, args.k, args.v, key, args.query, args.readout)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 2), args.steps, args.lr / 10),
            weight_decay=0.0,
        ),
    )
    opt_state = optimizer.init(params)

    def loss_fn(params: Params, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        predicted = logits(args.cell, params, inputs, args.backend)
        return optax.softmax_cross_entropy_with_integer_labels(predicted, targets).mean()

    @jax.jit
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    started = time.perf_counter()
    steps_done = 0
    for number in range(args.steps):
        elapsed = time.perf_counter() - started
        if args.seconds is not None and elapsed > args.seconds:
            break
        progress = number / args.steps if args.seconds is None else elapsed / args.seconds
        length = args.train_length[min(int(progress * len(args.train_length)), len(args.train_length) - 1)]
        batch = state_tracking_batch(group, seed=args.seed, step=number, batch_size=args.batch_size, seq_len=length)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))
        steps_done = number + 1
        if (number + 1) % max(args.steps // 10, 1) == 0:
            seconds = time.perf_counter() - started
            print(f"step {number + 1}: length {length}, loss {float(loss):.4f} ({seconds:.0f} s)", flush=True)
    evaluation = evaluation_batch(args.group, args.eval_length, args.eval_sequences)
    forward = jax.jit(logits, static_argnums=(0, 3))
    predicted = jnp.argmax(forward(args.cell, params, jnp.asarray(evaluation["inputs"]), args.backend), -1)
    curves = accuracy_curves(np.asarray(predicted) == evaluation["targets"])
    settings = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    seconds = round(time.perf_counter() - started, 1)
    return {"args": settings, "steps_done": steps_done, "seconds": seconds, "curves": curves}


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
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seconds", type=float, help="stop training after this long (then evaluate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-length", type=int, default=16)
    parser.add_argument("--eval-sequences", type=int, default=512)
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    args = parser.parse_args(argv)
    for name in ("width", "heads", "k", "v", "steps", "batch_size", "eval_length", "eval_sequences"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if min(args.train_length) < 1:
        parser.error(f"--train-length: expected positive lengths, got {args.train_length}")
    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds}")
    result = train(args)
    position = result["curves"]["position"]
    shown = [n for n in (1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 128, 256) if n <= len(position)]
    cells = " ".join(f"@{n}={100 * position[n - 1]:.1f}%" for n in shown)
    print(f"{args.cell} {args.group}: {result['steps_done']}/{args.steps} steps, {result['seconds']} s, {cells}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(args.out) as temporary:
            temporary.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

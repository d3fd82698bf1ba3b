"""What a trained probe's M2RNN recurrence does with its state, inside and beyond its training length.

    python -m experiments.state_tracking.dynamics --init full64.npz --group a5 --heads 8 --k 4 --v 64 \\
        --length 256 --at 16 --eps 0.01 0.1 --out dynamics.json

The probe (``probe.py``) learns A5 and S5 exactly up to about half its training length, and then the accuracy
decays: a per-step error compounds. This reads a ``--save`` file of the probe's ``m2rnn`` cell (the same cell flags)
and measures the state's dynamics along the fixed evaluation sequences, to tell apart the ways that can happen:

* ``parameters``: the forget values sigmoid(f) over every (token, head), in quantiles (a value near 1 keeps a head's
  state, a neutral direction along which an error stays), and the spectral norm of each head's W.
* ``perturbation``: the state after ``--at`` tokens gets N(0, eps^2) added to every entry (each ``--eps``) and the
  sequence runs on from it. Reported at offsets j = 1, 2, 4, ... after the perturbation: the mean distance between
  the perturbed and the clean state over the initial one (< 1: the update contracts the perturbation; falling to 0:
  the clean trajectory is an attractor), and the accuracy of the perturbed run beside the clean one. A chaotic
  update grows the ratio; a contracting one with an exact code keeps the accuracy.
* ``synchronisation``: pairs of sequences whose prefixes of ``--at`` tokens differ but have the same product (the
  second prefix's last token is chosen to make it so), followed by the same suffix. A recurrence that stores the
  group element as a finite-state code brings the two states together within a few tokens (its state is then a
  function of the product and the last few tokens); one that stores it in an analog state keeps them apart. Reported:
  the mean distance of the pair's states at the same offsets, over the mean distance of two unrelated states
  at the same position (the scale), and the fraction of pairs whose predictions agree.

The states are computed one token at a time with the M2RNN op (``backend`` scan, the state carried as ``h0``), so
the readout at every position is the probe's own (checked in the tests against the probe's one-pass logits).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.state_tracking.positions import evaluation_batch
from experiments.state_tracking.probe import Params, init_params, initial_state, load_state, make_optimizer
from m2rnn_jax.bench.report import write_json
from m2rnn_jax.data.state_tracking import GROUPS, Group, get_group
from m2rnn_jax.ops.m2rnn import m2rnn

FORGET_QUANTILES = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)


def load_probe(path: Path, group: Group, heads: int, k: int, v: int, query: str) -> tuple[Params, int]:
    """The parameters of an ``m2rnn`` probe saved with these cell flags (linear readout), and its step count."""
    params = init_params("m2rnn", group.order, 1, heads, k, v, jax.random.key(0), query)
    optimizer_state = make_optimizer(1e-3, 2).init(params)
    params, _, step = load_state(path, params, optimizer_state)
    return params, step


class Trajectory(NamedTuple):
    """The states after every token, (S, B, H, K, V), and the probe's argmax at every position, (B, S) int32."""

    states: jax.Array
    predictions: jax.Array


@jax.jit
def trajectory(params: Params, tokens: jax.Array, h0: jax.Array) -> Trajectory:
    """(B, S) tokens run from the state h0 (B, H, K, V), one token at a time through the op."""

    def step(h: jax.Array, token: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        heads, k = params["q"].shape[-2:]
        q = params["q"][token] if params["q"].ndim == 3 else jnp.broadcast_to(params["q"], (token.shape[0], heads, k))
        forget = jax.nn.sigmoid(params["f"][token])
        y, h = m2rnn(
            q[:, None], params["k"][token][:, None], params["v"][token][:, None], params["w"], forget[:, None], h,
            backend="scan",
        )  # fmt: skip
        return h, (h, y.reshape(y.shape[0], -1))

    _, (states, outputs) = jax.lax.scan(step, h0, tokens.T)
    return Trajectory(states, jnp.argmax(outputs @ params["out"], axis=-1).T.astype(jnp.int32))


def from_zero_state(params: Params, tokens: np.ndarray) -> Trajectory:
    """:func:`trajectory` of (B, S) tokens from the zero state, as the probe evaluates."""
    return trajectory(params, jnp.asarray(tokens), initial_state("m2rnn", params, tokens.shape[0]))


def offsets_within(span: int) -> list[int]:
    """1, 2, 4, 8, ... up to ``span`` (and ``span`` itself)."""
    offsets = [1 << n for n in range(span.bit_length()) if 1 << n <= span]
    return offsets + ([span] if offsets[-1] != span else [])


def parameter_summary(params: Params) -> dict:
    """Forget-value quantiles over every (token, head) and the spectral norm of each head's W."""
    forget = np.asarray(jax.nn.sigmoid(params["f"]))
    return {
        "forget_quantiles": {str(q): float(np.quantile(forget, q)) for q in FORGET_QUANTILES},
        "w_spectral_norm": [float(s) for s in np.linalg.norm(np.asarray(params["w"]), ord=2, axis=(1, 2))],
    }


def _distance(a: jax.Array, b: jax.Array) -> np.ndarray:
    """(S, B, ...) pairs -> (S,) the mean over B of the Euclidean distance of the whole state."""
    return np.asarray(jnp.sqrt(jnp.sum(jnp.reshape(a - b, (*a.shape[:2], -1)) ** 2, axis=-1)).mean(axis=1))


def perturbation_response(
    params: Params, tokens: np.ndarray, targets: np.ndarray, clean: Trajectory, at: int, eps: float, key: jax.Array
) -> dict:
    """The state after ``at`` tokens of ``clean`` (the run of ``tokens`` (B, S) from the zero state) plus N(0, eps^2)
    per entry, run on over the rest of ``tokens``."""
    start = clean.states[at - 1]
    perturbed_start = start + eps * jax.random.normal(key, start.shape, start.dtype)
    perturbed = trajectory(params, jnp.asarray(tokens[:, at:]), perturbed_start)
    initial = float(_distance(perturbed_start[None], start[None])[0])
    distance = _distance(perturbed.states, clean.states[at:])
    correct_clean = np.asarray(clean.predictions) == targets
    correct_perturbed = np.asarray(perturbed.predictions) == targets[:, at:]
    rows = {}
    for j in offsets_within(tokens.shape[1] - at):
        rows[str(j)] = {
            "distance_ratio": float(distance[j - 1] / initial) if initial > 0 else 0.0,
            "accuracy": float(correct_perturbed[:, j - 1].mean()),
            "accuracy_clean": float(correct_clean[:, at + j - 1].mean()),
        }
    return {"eps": eps, "at": at, "initial_distance": initial, "after": rows}


def equal_product_prefixes(group: Group, tokens: np.ndarray, at: int, seed: int) -> np.ndarray:
    """(B, S) tokens -> (B, S) tokens whose first ``at`` tokens are random with the same product as the input's
    first ``at`` (the last of them chosen to make it so) and whose suffix is the input's."""
    rng = np.random.default_rng(seed)
    batch = tokens.shape[0]
    other = tokens.copy()
    other[:, : at - 1] = rng.integers(0, group.order, size=(batch, at - 1))
    wanted = np.full(batch, group.identity)
    partial = np.full(batch, group.identity)
    for t in range(at):
        wanted = group.table[wanted, tokens[:, t]]
    for t in range(at - 1):
        partial = group.table[partial, other[:, t]]
    # the last token x with partial * x = wanted: the row of partial in the table holds every product exactly once
    other[:, at - 1] = np.argmax(group.table[partial] == wanted[:, None], axis=1)
    return other


def synchronisation(params: Params, group: Group, tokens: np.ndarray, first: Trajectory, at: int, seed: int) -> dict:
    """Two prefixes with the same product, the same suffix: how close their states come (see the module doc);
    ``first`` is the run of ``tokens`` from the zero state."""
    second = from_zero_state(params, equal_product_prefixes(group, tokens, at, seed))
    pair = _distance(first.states[at - 1 :], second.states[at - 1 :])
    unrelated = _distance(first.states[at - 1 :], jnp.roll(first.states[at - 1 :], 1, axis=1))
    agree = np.asarray(first.predictions) == np.asarray(second.predictions)
    rows = {}
    for j in [0, *offsets_within(tokens.shape[1] - at)]:
        rows[str(j)] = {
            "distance_ratio": float(pair[j] / unrelated[j]),
            "agreement": float(agree[:, at - 1 + j].mean()),
        }
    return {"at": at, "after": rows}


def analyse(args: argparse.Namespace) -> dict:
    """Every measurement of the module doc for the probe in ``args.init``."""
    group = get_group(args.group)
    params, step = load_probe(args.init, group, args.heads, args.k, args.v, args.query)
    batch = evaluation_batch(args.group, args.length, args.sequences)
    tokens, targets = batch["inputs"], batch["targets"]
    clean = from_zero_state(params, tokens)
    accuracy = (np.asarray(clean.predictions) == targets).mean(axis=0)
    key = jax.random.key(args.seed)
    return {
        "args": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
        "step": step,
        "parameters": parameter_summary(params),
        "accuracy": [float(a) for a in accuracy],
        "perturbation": [
            perturbation_response(params, tokens, targets, clean, args.at, eps, jax.random.fold_in(key, n))
            for n, eps in enumerate(args.eps)
        ],
        "synchronisation": synchronisation(params, group, tokens, clean, args.at, args.seed),
    }


def summary_lines(result: dict) -> list[str]:
    """The result as the few lines ``main`` prints."""
    forget = result["parameters"]["forget_quantiles"]
    norms = result["parameters"]["w_spectral_norm"]
    lines = [
        f"step {result['step']}: forget quantiles " + " ".join(f"{q}:{value:.3f}" for q, value in forget.items()),
        f"W spectral norm per head: min {min(norms):.2f}, max {max(norms):.2f}",
    ]
    for response in result["perturbation"]:
        cells = " ".join(
            f"+{j}: {row['distance_ratio']:.2f} ({100 * row['accuracy']:.1f}% vs {100 * row['accuracy_clean']:.1f}%)"
            for j, row in response["after"].items()
        )
        lines.append(f"perturbation eps={response['eps']} at {response['at']}: {cells}")
    cells = " ".join(
        f"+{j}: {row['distance_ratio']:.2f} ({100 * row['agreement']:.1f}%)"
        for j, row in result["synchronisation"]["after"].items()
    )
    lines.append(f"synchronisation at {result['synchronisation']['at']}: {cells}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.state_tracking.dynamics", description=__doc__)
    parser.add_argument("--init", type=Path, required=True, help="a probe --save file of the m2rnn cell")
    parser.add_argument("--group", choices=GROUPS, default="a5")
    parser.add_argument("--heads", type=int, default=4, help="the probe's --heads")
    parser.add_argument("--k", type=int, default=4, help="the probe's --k")
    parser.add_argument("--v", type=int, default=64, help="the probe's --v")
    parser.add_argument("--query", choices=["fixed", "token"], default="fixed", help="the probe's --query")
    parser.add_argument("--length", type=int, default=256, help="length of the evaluation sequences")
    parser.add_argument("--sequences", type=int, default=512, help="number of evaluation sequences")
    parser.add_argument("--at", type=int, default=16, help="perturb (and end the prefixes) after this many tokens")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.1], help="perturbation sizes (per entry)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    args = parser.parse_args(argv)
    for name in ("heads", "k", "v", "length", "sequences", "at"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive int, got {getattr(args, name)}")
    if args.at >= args.length:
        parser.error(f"--at: expected less than --length ({args.length}), got {args.at}")
    if any(not eps >= 0.0 for eps in args.eps):
        parser.error(f"--eps: expected non-negative numbers, got {args.eps}")
    if not args.init.is_file():
        parser.error(f"--init: expected a probe --save file, {args.init} does not exist")
    result = analyse(args)
    print("\n".join(summary_lines(result)))
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

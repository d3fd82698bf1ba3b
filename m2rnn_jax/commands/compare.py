"""``m2rnn-jax compare``: run the JAX model against the independent PyTorch twin.

Layer mode (default): builds one random M2RNN layer (every parameter perturbed away from its structured init),
copies its weights into ``M2RNNTorch`` and prints, for float32 and float64, the max absolute and relative
(max |jax - torch| / max |torch|) differences of the output, the new states and every gradient. Exit code 1 if any
relative error is over the tolerance of its dtype, 2 if PyTorch is missing or the input is bad.

Model mode (``--model PRESET_OR_WORKDIR``): the whole decoder of a model / training preset (random init with every
parameter perturbed) or of a run directory's checkpoint (``--step``, default latest), against
:class:`~m2rnn_jax.interop.torch_decoder.DecoderTorch` built from the lm-engine config translation: logits, MoE aux
loss, loss (mean next-token cross-entropy + aux), the decode path (``--prefill`` tokens cached, then one token at a
time) and the gradient of every parameter by lm-engine name. ``--batch`` / ``--seq-len`` set
the token batch.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from m2rnn_jax.commands.arguments import check_backend_hardware
from m2rnn_jax.commands.errors import fail

NAME = "compare"
DTYPE_NAMES = ("float32", "float64")


def _clipping(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(NAME, help="check the JAX M2RNN layer against the independent PyTorch reference")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-heads", type=int, default=4, help="N (also Nv, Nf, Nw)")
    p.add_argument("--k-head-dim", type=int, default=8)
    p.add_argument("--v-head-dim", type=int, default=4)
    p.add_argument("--num-q-heads", type=int, default=1)
    p.add_argument("--num-k-heads", type=int, default=1)
    p.add_argument("--num-g-heads", type=int, default=None, help="default: N")
    p.add_argument("--kernel-size", type=int, default=4)
    p.add_argument("--gradient-clipping", type=_clipping, default=1.0, help="a float or 'none'")
    p.add_argument(
        "--model",
        metavar="PRESET_OR_WORKDIR",
        default=None,
        help="compare the whole decoder of a preset (random weights) or a run directory (its checkpoint)",
    )
    p.add_argument("--step", type=int, default=None, help="with --model WORKDIR: checkpoint step (default: latest)")
    p.add_argument(
        "--prefill", type=int, default=None, help="with --model: tokens before the decode path (default: seq-len // 2)"
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--with-state", action="store_true", help="also feed a random incoming conv/recurrent state")
    p.add_argument("--backend", default="scan", help="op backend of the JAX layer (scan, pallas_gpu, ...)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, default=list(DTYPE_NAMES))
    p.add_argument(
        "--matmul-precision",
        choices=("highest", "default"),
        default="highest",
        help="JAX matmul precision for the layer's projections; 'default' lets GPUs use TF32 for float32 "
        "(relative errors ~1e-3 against torch's full float32)",
    )
    p.add_argument("--tol-float32", type=float, default=1e-5, help="max relative error allowed in float32")
    p.add_argument("--tol-float64", type=float, default=1e-10, help="max relative error allowed in float64")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _compare(args: argparse.Namespace, dtype_name: str) -> dict[str, dict[str, float]]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m2rnn_jax.interop.conversion import compare_layer_with_torch, randomize_layer_params
    from m2rnn_jax.layers import M2RNN, M2RNNConfig, M2RNNState

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(args.seed)

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape), dtype=dtype)

    with jax.enable_x64(dtype == jnp.float64), jax.default_matmul_precision(args.matmul_precision):
        config = M2RNNConfig(
            num_heads=args.num_heads,
            k_head_dim=args.k_head_dim,
            v_head_dim=args.v_head_dim,
            num_q_heads=args.num_q_heads,
            num_k_heads=args.num_k_heads,
            num_g_heads=args.num_g_heads,
            kernel_size=args.kernel_size,
            gradient_clipping=args.gradient_clipping,
            backend=args.backend,
        )
        layer = M2RNN(
            args.hidden_size,
            config,
            num_layers=2,
            initializer_range=0.3,
            dtype=dtype,
            param_dtype=dtype,
            rngs=nnx.Rngs(jax.random.key(args.seed, impl="rbg")),  # rbg: cheaper to compile than threefry
        )
        randomize_layer_params(layer, args.seed + 1)
        x = normal((args.batch, args.seq_len, args.hidden_size))
        state = None
        if args.with_state:
            zeros = layer.init_state(args.batch, args.seq_len, dtype=dtype)
            conv = None if zeros.conv is None else normal(zeros.conv.shape)
            state = M2RNNState(conv=conv, recurrent=jnp.tanh(normal(zeros.recurrent.shape)))
        return compare_layer_with_torch(layer, x, state, seed=args.seed)


def _model_config_and_params(args: argparse.Namespace) -> tuple[Any, Any]:
    """(ModelConfig, restored nnx.State of parameters or None) of --model: a run directory or a preset name."""
    import json
    from pathlib import Path

    from m2rnn_jax.train.presets import list_presets, list_train_presets, train_config

    workdir = Path(args.model)
    if (workdir / "config.json").is_file():
        from m2rnn_jax.train.config import TrainConfig
        from m2rnn_jax.train.restore import restore_params

        config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
        return config.model, restore_params(config, workdir / "checkpoints", args.step, flag="--model").params
    if args.step is not None:
        raise ValueError(f"--step: only with --model WORKDIR (a run directory holding config.json), got {args.model!r}")
    if args.model in list_presets():
        from m2rnn_jax.train.presets import get_preset

        return get_preset(args.model), None
    if args.model in list_train_presets():
        return train_config(args.model).model, None
    raise ValueError(
        f"--model: expected a run directory holding config.json or a preset name "
        f"(m2rnn-jax info --list), got {args.model!r}"
    )


def _compare_model(args: argparse.Namespace, dtype_name: str, model_config: Any, restored: Any) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from m2rnn_jax.interop.model_parity import compare_model_with_torch, randomize_model_params
    from m2rnn_jax.models import Decoder

    with jax.enable_x64(dtype_name == "float64"), jax.default_matmul_precision(args.matmul_precision):
        config = model_config.replace(dtype=dtype_name, param_dtype=dtype_name, remat="none")
        model = Decoder(config, rngs=nnx.Rngs(jax.random.key(args.seed, impl="rbg")))
        if restored is None:
            randomize_model_params(model, args.seed + 1)
        else:
            nnx.update(model, jax.tree.map(lambda x: x.astype(dtype_name), restored))
        rng = np.random.default_rng(args.seed)
        shape = (args.batch, args.seq_len)
        input_ids = rng.integers(0, config.vocab_size, shape)
        targets = rng.integers(0, config.vocab_size, shape)
        return compare_model_with_torch(model, input_ids, targets, args.prefill)


def _tolerance(tolerances: dict[str, float], dtype_name: str, row: str) -> float:
    return tolerances[dtype_name]


def _print_table(results: dict[str, dict], tolerances: dict[str, float]) -> None:
    names = list(next(iter(results.values())))
    width = max(len(name) for name in names)
    header = f"{'':<{width}}" + "".join(f"  {d + ' abs':>13}  {d + ' rel':>13}" for d in results)
    print(header)
    for name in names:
        cells = []
        for dtype_name, errors in results.items():
            err = errors[name]
            flag = "!" if not err["rel"] < _tolerance(tolerances, dtype_name, name) else " "
            cells.append(f"  {err['abs']:>13.3e}  {err['rel']:>12.3e}{flag}")
        print(f"{name:<{width}}" + "".join(cells))


def run(args: argparse.Namespace) -> int:
    try:
        check_backend_hardware("--backend", args.backend)
    except ValueError as err:
        return fail(NAME, err)
    if importlib.util.find_spec("torch") is None:
        return fail(NAME, "torch: expected PyTorch installed (pip install m2rnn-jax[torch]), got no module 'torch'")
    tolerances = {"float32": args.tol_float32, "float64": args.tol_float64}
    try:
        if args.model is None:
            for name in ("step", "prefill"):
                if getattr(args, name) is not None:
                    raise ValueError(f"--{name}: only with --model")
            results = {dtype_name: _compare(args, dtype_name) for dtype_name in args.dtypes}
        else:
            model_config, restored = _model_config_and_params(args)
            results = {
                dtype_name: _compare_model(args, dtype_name, model_config, restored) for dtype_name in args.dtypes
            }
    except ValueError as err:
        return fail(NAME, err)
    _print_table(results, tolerances)
    failures = [
        f"{dtype_name} {name} rel {err['rel']:.3e} > {_tolerance(tolerances, dtype_name, name):g}"
        for dtype_name, errors in results.items()
        for name, err in errors.items()
        if not err["rel"] < _tolerance(tolerances, dtype_name, name)
    ]
    if failures:
        print("FAIL (relative error over tolerance, marked !):\n  " + "\n  ".join(failures))
        return 1
    print("PASS: " + ", ".join(f"{d} rel < {tolerances[d]:g}" for d in results))
    return 0

"""``m2rnn-jax eval``: evaluate the latest (or a given) checkpoint of a run at chosen lengths.

Examples::

    m2rnn-jax eval --workdir runs/s3 --lengths 64 256 1024 4096
    m2rnn-jax eval --workdir runs/text --data data/other_corpus      # validation.bin of a prepared directory
    m2rnn-jax eval --workdir runs/text --data held_out.bin           # every window of one token file

The run's ``config.json`` is used unless ``--preset`` / ``--config`` are given; ``--set`` overrides apply either
way (e.g. ``--set mesh.data=1`` to evaluate on another mesh). For state-tracking runs the table and the
``length_generalization.{json,png}`` report are written to ``--output`` (default: the workdir). For text runs it
prints loss, perplexity and bits per byte (bytes from the data directory's tokenizer, else the workdir's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from m2rnn_jax.commands.arguments import add_compile_cache_argument, existing_directory
from m2rnn_jax.commands.errors import fail

NAME = "eval"


def add_parser(subparsers: Any) -> None:
    from m2rnn_jax.commands.train import add_config_arguments
    from m2rnn_jax.parallel.distributed import add_distributed_arguments

    p = subparsers.add_parser(NAME, help="evaluate a run's checkpoint at several sequence lengths")
    p.add_argument("--workdir", required=True, help="run directory written by m2rnn-jax train")
    add_config_arguments(p)
    p.add_argument("--lengths", type=int, nargs="+", help="eval lengths (default: data.eval_lengths)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--output", help="where to write the report (default: --workdir)")
    p.add_argument(
        "--data",
        help="token data to evaluate: a prepare-data directory (its validation.bin) or one "
        ".bin/.npy token file (default: the run's data)",
    )
    add_compile_cache_argument(p)
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from m2rnn_jax.commands.train import resolve_config
    from m2rnn_jax.parallel.distributed import initialize_distributed
    from m2rnn_jax.train.compile_cache import use_compile_cache
    from m2rnn_jax.train.progress import Console

    try:
        use_compile_cache(args.compile_cache)
        workdir = existing_directory("--workdir", args.workdir, "run directory (written by m2rnn-jax train)")
        initialize_distributed(args)
        from m2rnn_jax.data.sources import make_source
        from m2rnn_jax.train.evaluation import Evaluator, format_table, write_report
        from m2rnn_jax.train.restore import check_same_model, read_run_config, restore_params

        config = _with_eval_data(resolve_config(args, read_run_config(workdir, "--workdir")), args)
        if args.preset or args.config:
            check_same_model(workdir, config, "--workdir")
        source = make_source(config.data, config.model.vocab_size)
        start = time.perf_counter()
        restored = restore_params(config, workdir / "checkpoints", args.step)
        restore_seconds = time.perf_counter() - start
        evaluator = Evaluator(
            restored.graphdef,
            restored.param_shardings,
            restored.mesh,
            source,
            config.data,
            token_bytes=_workdir_token_bytes(workdir) if source.token_bytes is None else None,
        )
    except ValueError as err:
        return fail(NAME, err)
    console = Console(enabled=jax.process_index() == 0)
    step = restored.step
    batches = {length: evaluator.num_batches(length) for length in config.data.eval_lengths}
    size = config.data.eval_batch_size
    console.header(
        f"m2rnn-jax eval: {args.workdir}",
        [
            ("checkpoint", f"step {step} (restored in {restore_seconds:.1f} s)"),
            (
                "model",
                f"{config.model.layer_pattern} ({config.model.num_layers} layers, hidden "
                f"{config.model.hidden_size}, vocab {config.model.vocab_size})",
            ),
            ("data", config.data.path or config.data.kind),
            ("lengths", ", ".join(f"{length} ({count} x {size} rows)" for length, count in batches.items())),
        ],
    )
    results = _evaluate(console, evaluator, restored.params, batches)
    print(f"checkpoint step {step}")
    print(format_table(results, config.data.seq_len))
    for length, r in sorted(results.items()):
        if "perplexity" in r:
            bpb = f" bits_per_byte={r['bits_per_byte']:.4f}" if "bits_per_byte" in r else ""
            print(
                f"validation length {length}: loss={r['loss']:.4f} perplexity={r['perplexity']:.3f}{bpb} "
                f"tokens={r['tokens']}"
            )
    if config.data.kind == "state_tracking":
        title = f"{config.data.group.upper()} state tracking, trained at length {config.data.seq_len} ({step} steps)"
        json_path, png_path = write_report(results, config.data.seq_len, args.output or workdir, title, {"step": step})
        print(f"wrote {json_path} and {png_path}")
    return 0


def _evaluate(console: Any, evaluator: Any, params: Any, batches: dict[int, int]) -> dict[int, dict[str, float]]:
    """Every length of ``batches`` ({length: number of batches}), one timed phase per length, with a progress over
    all batches (a bar on a terminal, a status line every 10 s elsewhere)."""
    progress = console.start_progress(sum(batches.values()), desc="eval", unit="batch", plain_every=10.0)
    results = {}
    for length, count in batches.items():
        with console.timed_phase(f"evaluating length {length} ({count} batches)", "evaluated"):
            results.update(
                evaluator.evaluate(params, (length,), on_batch=lambda: progress.update(progress.position + 1))
            )
    progress.close()
    return results


def _with_eval_data(config: Any, args: argparse.Namespace) -> Any:
    """``config`` with ``--lengths`` and ``--data`` applied (a directory replaces data.path; a file is evaluated
    whole, as data.path and data.eval_path)."""
    from m2rnn_jax.train.config import resolve_token_data
    from m2rnn_jax.train.overrides import merge

    changes: dict[str, Any] = {}
    if args.lengths:
        changes["eval_lengths"] = list(args.lengths)
    if args.data:
        data = Path(args.data)
        if not data.exists():
            raise ValueError(
                f"--data: expected a prepare-data directory or a token file, got {args.data!r} "
                f"(no such file or directory)"
            )
        changes.update(kind="token_file", path=str(data), eval_path=None if data.is_dir() else str(data))
        if data.is_dir():
            changes["eos_token_id"] = None
    config = merge(config, {"data": changes}) if changes else config
    return resolve_token_data(config, keep_vocab_size=True)


def _workdir_token_bytes(workdir: Path) -> Any:
    """UTF-8 bytes per token of the tokenizer copied into the run directory (None without one)."""
    from m2rnn_jax.data.tokenizer import HF_FILE, TIKTOKEN_FILE, load_tokenizer

    if not any((workdir / name).is_file() for name in (HF_FILE, TIKTOKEN_FILE)):
        return None
    return load_tokenizer(workdir).token_byte_lengths()

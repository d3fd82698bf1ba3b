"""A small-scale version of the paper's language-modelling table: seven ~28M-parameter models on one real corpus.

Every variant of :mod:`experiments.lm_table.configs` trains with the same data, tokens, optimizer and seed; the
validation perplexity is logged every ``--eval-every`` steps. Writes ``lm_table.json`` (per variant: parameters,
tokens, final validation loss / perplexity / bits per byte, tokens/s, the validation curve), ``lm_table.md`` (the
table beside the paper's 400M perplexities) and ``lm_table.png`` (validation loss curves) into ``--out``:

    python -m experiments.lm_table.prepare_corpus --output data/gutenberg        # once, on any machine
    python -m experiments.lm_table.run --data data/gutenberg --out results/       # on a GPU
    python -m experiments.lm_table.run --data data/gutenberg --out /tmp/t --steps 4 --batch 2 --seq-len 32 \
        --variants m2rnn attention --dtype float32                                # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from experiments.lm_table.configs import PAPER_PERPLEXITY_400M, PATTERNS, small_config


def train_variant(variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Trains one variant; returns its row (final eval, curve, throughput, parameter count)."""
    from m2rnn_jax.data.config import DataConfig
    from m2rnn_jax.models.counting import model_summary
    from m2rnn_jax.train.config import CheckpointConfig, OptimizerConfig, TrainConfig
    from m2rnn_jax.train.trainer import Trainer

    data = json.loads((Path(args.data) / "meta.json").read_text())
    model = small_config(variant, data["vocab_size"]).replace(dtype=args.dtype, remat=args.remat)
    config = TrainConfig(
        model=model,
        optimizer=OptimizerConfig(
            learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 10), weight_decay=0.1
        ),
        data=DataConfig(
            kind="token_file",
            path=str(args.data),
            seq_len=args.seq_len,
            eval_lengths=(args.seq_len,),
            eval_batch_size=args.batch,
            eval_windows=args.eval_windows,
            seed=args.seed,
        ),
        checkpoint=CheckpointConfig(every_steps=args.steps, keep=1),
        steps=args.steps,
        batch_size=args.batch,
        log_every=max(1, min(50, args.steps // 4)),
        eval_every=args.eval_every,
        seed=args.seed,
    )
    Trainer(config, workdir).run()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == f"eval_len{args.seq_len}"]
    speeds = [r["tokens_per_second"] for r in records if r["kind"] == "train" and "tokens_per_second" in r]
    final = evals[-1]
    return {
        "variant": variant,
        "layer_pattern": model.layer_pattern,
        "parameters": model_summary(model)["params_total"],
        "tokens": args.steps * args.batch * args.seq_len,
        "validation_loss": final["loss"],
        "validation_perplexity": final["perplexity"],
        "validation_bits_per_byte": final.get("bits_per_byte"),
        "tokens_per_second": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "curve": [(r["step"], r["loss"]) for r in evals],
    }


def write_outputs(rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("data", "steps", "batch", "seq_len", "learning_rate", "seed", "dtype")}
    (out / "lm_table.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    lines = [
        "| model | pattern | params | val. perplexity | bits/byte | tokens/s | paper 400M ppl (WikiText) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: r["validation_perplexity"]):
        bpb = f"{row['validation_bits_per_byte']:.4f}" if row["validation_bits_per_byte"] is not None else "-"
        speed = f"{row['tokens_per_second']:.0f}" if row["tokens_per_second"] else "-"
        lines.append(
            f"| {row['variant']} | `{row['layer_pattern']}` | {row['parameters'] / 1e6:.2f}M | "
            f"{row['validation_perplexity']:.3f} | {bpb} | {speed} | "
            f"{PAPER_PERPLEXITY_400M.get(row['variant'], '-')} |"
        )
    (out / "lm_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps, losses = zip(*row["curve"])
        ax.plot([s * args.batch * args.seq_len / 1e6 for s in steps], losses, marker=".", label=row["variant"])
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"~28M-parameter models on {Path(args.data).name} (seed {args.seed})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "lm_table.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared data directory (prepare_corpus.py)")
    parser.add_argument("--out", required=True, help="where lm_table.{json,md,png} go")
    parser.add_argument("--variants", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="none")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            rows.append(train_variant(variant, args, Path(tmp) / variant))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), file=sys.stderr, flush=True)
            write_outputs(rows, args)  # after every variant: a run cut short keeps the finished rows
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One training run of the multi-GPU comparison: the trainer of ``m2rnn-jax train`` for N steps, as a JSON row.

    python -m experiments.multi_gpu.train_run --label data --steps 8 --out rows/data.json -- \\
        --preset hybrid-gdn-m2rnn-1l-400m --workdir /tmp/runs/data --set mesh.data=2 ...

Everything after ``--`` is ``m2rnn-jax train``'s own arguments (``--preset``/``--set``/``--workdir`` and the
multi-process flags ``--coordinator-address``/``--num-processes``/``--process-id``): the config is resolved and the
:class:`~m2rnn_jax.train.trainer.Trainer` built exactly as the command does. The run trains ``--steps`` steps and
stops there without the end-of-run evaluation (``steps`` is set one higher, ``log_every`` to ``--steps``, so the
last record is step N; the stop writes one checkpoint). Each process then writes ``<out stem>.p<index>.json``:

``label``, ``process_index``, ``num_processes``, ``mesh`` (axis sizes), ``devices`` (``platform:kind``), ``seq_len``,
``batch_size``, ``steps``, ``dtype``; the main process adds ``loss`` and ``grad_norm`` of step N (the parameters
after N - 1 updates on step N's batch, which is the same batch in every layout), ``tokens_per_second``, ``mfu``,
``step_ms`` (steps 2..N: the first step carries the compile), and every process ``peak_gib`` (the allocator's
peak of each local device; ``null`` on CPUs, which keep no statistics) and ``wall_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from m2rnn_jax.data.atomic import atomic_file

GIB = 2**30


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this helper's arguments, ``m2rnn-jax train``'s arguments) from ``argv`` split at ``--``."""
    if "--" not in argv:
        raise ValueError("argv: expected '--' before the m2rnn-jax train arguments, got none")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="name of the layout (a row of the summary)")
    parser.add_argument("--steps", type=int, required=True, help="steps to train (N >= 2)")
    parser.add_argument("--out", required=True, help="row file; each process writes <stem>.p<index>.json")
    ours = parser.parse_args(argv[:split])
    if ours.steps < 2:
        raise ValueError(f"--steps: expected an int >= 2 (step 1 carries the compile), got {ours.steps}")
    from m2rnn_jax.cli import build_parser

    train = build_parser().parse_args(["train", *argv[split + 1 :]])
    train.overrides = [
        *train.overrides,
        f"steps={ours.steps + 1}",
        f"log_every={ours.steps}",
        f"checkpoint.every_steps={ours.steps + 1}",
    ]
    return ours, train


def last_train_record(workdir: Path) -> dict[str, Any]:
    """The last ``train`` record of ``<workdir>/metrics.jsonl``."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [record for record in records if record.get("kind") == "train"]
    if not train:
        raise ValueError(f"workdir: expected a train record in {workdir / 'metrics.jsonl'}, got none")
    return train[-1]


def peak_gib(devices: list) -> list[float | None]:
    """The allocator's peak GiB of each device (None where the device keeps no statistics)."""
    peaks = []
    for device in devices:
        value = (device.memory_stats() or {}).get("peak_bytes_in_use")
        peaks.append(None if value is None else value / GIB)
    return peaks


def train_and_measure(ours: argparse.Namespace, train: argparse.Namespace) -> dict[str, Any]:
    """Runs the training of ``train`` for ``ours.steps`` steps; returns this process's row."""
    start = time.perf_counter()
    from m2rnn_jax.parallel.distributed import initialize_distributed

    initialize_distributed(train)
    import jax

    from m2rnn_jax.commands.train import check_backends, resolve_config
    from m2rnn_jax.train.trainer import Trainer

    config = resolve_config(train)
    check_backends(config)
    trainer = Trainer(config, train.workdir, name=f"{train.preset or train.config} [{ours.label}]")
    status = trainer.run(stop_after=ours.steps)
    if status != 0 or trainer.step != ours.steps:
        raise RuntimeError(f"the run stopped at step {trainer.step} (status {status}), expected step {ours.steps}")
    device = jax.devices()[0]
    row: dict[str, Any] = {
        "label": ours.label,
        "process_index": jax.process_index(),
        "num_processes": jax.process_count(),
        "mesh": dict(trainer.mesh.shape),
        "devices": f"{jax.device_count()} x {device.platform}:{device.device_kind}",
        "seq_len": config.data.seq_len,
        "batch_size": config.batch_size,
        "steps": ours.steps,
        "dtype": config.model.dtype,
        "peak_gib": peak_gib(jax.local_devices()),
    }
    if jax.process_index() == 0:
        record = last_train_record(Path(train.workdir))
        row.update({name: record.get(name) for name in ("loss", "grad_norm", "tokens_per_second", "mfu")})
        row["step_ms"] = 1e3 / record["steps_per_second"] if record.get("steps_per_second") else None
    row["wall_s"] = time.perf_counter() - start
    return row


def row_path(out: str | Path, process_index: int) -> Path:
    """Where process ``process_index`` writes its row for ``--out out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.p{process_index}.json")


def main(argv: list[str] | None = None) -> int:
    ours, train = parse_arguments(sys.argv[1:] if argv is None else argv)
    row = train_and_measure(ours, train)
    path = row_path(ours.out, row["process_index"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(row, indent=1) + "\n")
    print(f"{ours.label}: " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

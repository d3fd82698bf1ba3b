"""Multi-process start-up: ``jax.distributed.initialize`` from command-line flags or environment variables.

Flags win over the environment: ``--coordinator-address`` / ``M2RNN_COORDINATOR_ADDRESS`` (host:port of process
0), ``--num-processes`` / ``M2RNN_NUM_PROCESSES``, ``--process-id`` / ``M2RNN_PROCESS_ID``. With none of them
set, nothing is initialised (single process), unless ``--distributed auto`` asks JAX to detect the cluster
(TPU pods, SLURM, ...). On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import argparse
import os

import jax

ENV_PREFIX = "M2RNN_"


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process")
    group.add_argument("--coordinator-address", help="host:port of process 0 (env M2RNN_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, help="number of processes (env M2RNN_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process's index (env M2RNN_PROCESS_ID)")
    group.add_argument(
        "--distributed",
        choices=("off", "auto"),
        default="off",
        help="'auto': let JAX detect the cluster (TPU pod, SLURM, ...)",
    )


def _setting(args: argparse.Namespace, name: str) -> str | None:
    value = getattr(args, name, None)
    if value is None:
        value = os.environ.get(ENV_PREFIX + name.upper())
    return None if value is None else str(value)


def initialize_distributed(args: argparse.Namespace) -> bool:
    """Calls ``jax.distributed.initialize`` when flags/env ask for it; returns True if it did."""
    address = _setting(args, "coordinator_address")
    num_processes = _setting(args, "num_processes")
    process_id = _setting(args, "process_id")
    given = [v is not None for v in (address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "--coordinator-address, --num-processes and --process-id: expected all three (or none), got "
            f"{address!r}, {num_processes!r}, {process_id!r}"
        )
    if all(given):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPUs use NCCL
        jax.distributed.initialize(address, num_processes=int(num_processes), process_id=int(process_id))
        return True
    if getattr(args, "distributed", "off") == "auto":
        jax.distributed.initialize()
        return True
    return False

"""How long JAX's own stages of a GPU train-step compile take, measured on a host without a GPU (issue 12 item 6).

    python3 experiments/bench/cuda_lowering_check.py [--preset hybrid-gdn-m2rnn-1l-7b] [--batch 1] [--seq-len 4096]
        [--no-scan-layers] [--remat full]

The trainer's donated train step (as ``m2rnn-jax bench --compile-only``) is traced and lowered for the ``cuda``
platform for abstract inputs, with every ``"auto"`` backend taking its NVIDIA-GPU choice (the GDN op's and the LM
head's Pallas-Triton kernels, which lower to Triton IR in this stage), and nothing compiled. It prints the trace and
lower seconds (:func:`m2rnn_jax.bench.timing.compile_phases`) and the Triton custom calls in the lowered module:
on the GPU, ``compile_s`` minus these is XLA's backend compile (which also compiles each Triton kernel).

Two choices cannot lower without a GPU and are replaced: attention runs the ``xla`` implementation (cuDNN's needs the
library) and the M2RNN op its ``scan`` backend (the Gluon kernels' launcher needs the CUDA jaxlib). Both are a
small part of a hybrid's step (3-5 attention blocks, one M2RNN block in the 1L presets).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import time
from unittest import mock

import jax

from m2rnn_jax.bench.model import SEED, format_phases, init_train_state, random_batch, train_step_function
from m2rnn_jax.bench.timing import compile_phases
from m2rnn_jax.testing import cuda_lowering_without_a_gpu
from m2rnn_jax.train.presets import get_preset

GPU = "gpu_nvidia"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="hybrid-gdn-m2rnn-1l-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--no-scan-layers", action="store_true", help="unrolled layers (default: scan_layers=True)")
    args = parser.parse_args()
    base = get_preset(args.preset)
    config = dataclasses.replace(
        base,
        remat=args.remat,
        scan_layers=not args.no_scan_layers,
        attention=dataclasses.replace(base.attention, implementation="xla"),
        m2rnn=dataclasses.replace(base.m2rnn, backend="scan"),
    )
    m2rnn_backends = importlib.import_module("m2rnn_jax.ops.m2rnn.backends")
    with (
        mock.patch("m2rnn_jax.ops.platform.default_platform", return_value=GPU),
        mock.patch.object(m2rnn_backends, "default_platform", return_value=GPU),
    ):
        step, optimizer = train_step_function(config)
        state = jax.eval_shape(lambda: init_train_state(config, optimizer, SEED))
        tokens = jax.eval_shape(lambda: random_batch(config, args.batch, args.seq_len))
        with compile_phases() as phases:
            start = time.perf_counter()
            with cuda_lowering_without_a_gpu():
                lowered = step.trace(state, tokens).lower(lowering_platforms=("cuda",))
            elapsed = time.perf_counter() - start
    text = lowered.as_text()
    print(
        f"{args.preset} (scan_layers={config.scan_layers}, remat {args.remat}, B={args.batch} S={args.seq_len}) "
        f"for cuda on {jax.devices()[0].platform}: trace + lower {elapsed:.1f} s{format_phases(phases)}; "
        f"{text.count('__gpu$xla.gpu.triton')} Triton custom calls; {len(text):,} characters of StableHLO"
    )


if __name__ == "__main__":
    main()

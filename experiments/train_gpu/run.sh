#!/usr/bin/env bash
# Training throughput on the GPU box: the tiny hybrid preset, then the paper's 400M M2RNN hybrid (bf16, remat),
# both through `m2rnn-jax train` on every local GPU (mesh: data x tensor as given), metrics.jsonl copied to OUT.
#
#   OUT=/tmp/out DATA=1 TENSOR=1 bash experiments/train_gpu/run.sh
# Results: experiments/RESULTS.md ("Training on the H200").
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT to a results folder}"
DATA="${DATA:-1}"
TENSOR="${TENSOR:-1}"
WORK="$(mktemp -d)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$OUT/gpu.csv" || true

run() {  # name preset overrides...
  local name="$1" preset="$2"; shift 2
  local sets=()
  for kv in "mesh.data=$DATA" "mesh.tensor=$TENSOR" "$@"; do sets+=(--set "$kv"); done
  python3 -m m2rnn_jax train --preset "$preset" --workdir "$WORK/$name" "${sets[@]}" \
    > "$OUT/$name.log" 2>&1 || echo "$name failed (exit $?)" >> "$OUT/$name.log"
  cp "$WORK/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null || true
}

run tiny-m2rnn tiny-m2rnn steps=300 optimizer.warmup_steps=30 batch_size=32 data.seq_len=512 \
  model.dtype=bfloat16 log_every=50 checkpoint.every_steps=300
run hybrid-m2rnn-400m hybrid-m2rnn-400m steps=40 optimizer.warmup_steps=5 batch_size=8 data.seq_len=2048 \
  model.dtype=bfloat16 model.remat=true log_every=10 checkpoint.every_steps=1000

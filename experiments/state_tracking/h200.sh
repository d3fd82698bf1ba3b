#!/usr/bin/env bash
# Issue 14's H200 measurements in one device call (<= 9 minutes on one H200), every result written to $OUT as it
# finishes:
#   (a) the S3 figure: every mixer, 3 seeds, the compare command's GPU recipe (train at 128, evaluate to 512);
#   (b) A5 for every mixer (1 seed, the same recipe) and the most promising M2RNN settings for A5 and S5;
#   (c) the state-tracking-s3-small preset (the >= 99.5% at 4x check).
# The jobs share the GPU (up to $MAX_JOBS processes at once, each with a small memory pool and a persistent
# compilation cache so that seeds 1 and 2 reuse seed 0's programs). Every job has a timeout inside the 9-minute
# budget; a job that times out gets SIGTERM, evaluates the step it reached and says so in its table; a final pass
# rebuilds the reports from every finished run.
#   Usage: OUT=/path bash experiments/state_tracking/h200.sh           (on the device; $OUT is created)
#          OUT=/tmp/st_smoke bash experiments/state_tracking/h200.sh --smoke   (CPU: the same jobs, a few steps each)
#   PARTS="s3 small large a5" (the default) picks the parts: s3 = (a), small = (c), large = M2RNN on A5/S5, a5 = A5
#   for every mixer.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SMOKE=0; [[ "${1:-}" == "--smoke" ]] && SMOKE=1
PARTS=" ${PARTS:-s3 small large a5} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.06
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache_state_tracking}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
ST="python3 -m experiments.state_tracking"
MODELS="m2rnn gru rnn gdn gdn-neg mamba2 attention"
if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  MAX_JOBS=1
  COMPARE="--recipe cpu --steps 3 --train-length 6 --batch-size 4 --hidden-size 16 --num-layers 1 --lengths 2 6
           --eval-sequences 8"
  SEEDS="0"; RUN_SECONDS=60; A5_RUN_SECONDS=60; BUDGET=${BUDGET:-3600}
  SWEEP_SMOKE=(--set steps=3 --set optimizer.warmup_steps=1 --set batch_size=4 --set data.seq_len=6
               --set 'data.curriculum=[]' --set 'data.eval_lengths=[6]' --set data.eval_batch_size=8
               --set model.hidden_size=16 --set model.num_layers=1 --set model.layer_pattern=M
               --set model.mlp.intermediate_size=16)
else
  MAX_JOBS=${MAX_JOBS:-16}
  COMPARE="--recipe gpu"
  SEEDS="0 1 2"; RUN_SECONDS=130; A5_RUN_SECONDS=90; BUDGET=${BUDGET:-540}   # seconds for the whole script
  SWEEP_SMOKE=()
fi
START=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"; } \
  > "$OUT/environment.txt" 2>&1
echo "state-tracking H200 script: budget ${BUDGET}s, smoke=$SMOKE, parts$PARTS, max $MAX_JOBS jobs at once" \
  > "$OUT/status.txt"

job() {  # job NAME SECONDS CMD...: runs in the background (at most MAX_JOBS at once), log in $OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  while (( $(jobs -rp | wc -l) >= MAX_JOBS )); do wait -n; done
  local left=$(( BUDGET - 75 - (SECONDS - START) ))  # 45 s grace after SIGTERM, ~30 s for the reports
  (( seconds > left )) && seconds=$left
  if (( seconds < 30 )); then echo "$name skipped: no time left" >> "$OUT/status.txt"; return; fi
  (
    local begin=$SECONDS
    timeout -k 45 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( SECONDS - begin ))s (timeout ${seconds}s)" >> "$OUT/status.txt"
  ) &
}

# (a) the S3 figure: one process per mixer, 3 seeds each, every run capped at RUN_SECONDS of training.
part s3 && for model in $MODELS; do
  job "s3_$model" 460 $ST compare $COMPARE --groups s3 --models $model --seeds $SEEDS --run-seconds $RUN_SECONDS \
    --out "$OUT/s3"
done
# (c) the S3 small preset (6000 steps; float32 since this session).
part small && job s3_small 420 $ST --groups s3 --size small --seeds 0 --out "$OUT/s3_small" "${SWEEP_SMOKE[@]}"
part small && job s3_small_bf16 420 $ST --groups s3 --size small --seeds 0 --out "$OUT/s3_small_bf16" \
  --set model.dtype=bfloat16 "${SWEEP_SMOKE[@]}"   # the control: the preset as it was (bfloat16)
# (b) M2RNN on A5 and S5: the settings of experiments/state_tracking/SEARCH.md, as presets.
part large && for preset in a5-large s5-large; do
  job "m2rnn_${preset}" 440 $ST --groups ${preset%%-*} --size ${preset#*-} --seeds 0 --out "$OUT/m2rnn_$preset" \
    "${SWEEP_SMOKE[@]}"
done
part large && job m2rnn_a5-large_s1 440 $ST --groups a5 --size large --seeds 1 --out "$OUT/m2rnn_a5-large_s1" \
  "${SWEEP_SMOKE[@]}"
part large && job m2rnn_a5-large_1l 440 $ST --groups a5 --size large --seeds 0 --out "$OUT/m2rnn_a5-large_1l" \
  --set model.num_layers=1 --set model.layer_pattern=M "${SWEEP_SMOKE[@]}"  # one layer: the recurrence only
part large && job m2rnn_a5-large_v128 440 $ST --groups a5 --size large --seeds 0 --out "$OUT/m2rnn_a5-large_v128" \
  --set model.m2rnn.k_head_dim=2 --set model.m2rnn.v_head_dim=128 "${SWEEP_SMOKE[@]}"  # the control: V < n|G|
# (b) A5 for every mixer (item 4): 1 seed, two processes of three or four mixers.
part a5 && job a5_compare_1 460 $ST compare $COMPARE --groups a5 --models m2rnn gru rnn gdn-neg --seeds 0 \
  --run-seconds $A5_RUN_SECONDS --out "$OUT/a5"
part a5 && job a5_compare_2 460 $ST compare $COMPARE --groups a5 --models gdn mamba2 attention --seeds 0 \
  --run-seconds $A5_RUN_SECONDS --out "$OUT/a5"

wait
# The reports over every run that finished (the per-mixer processes each wrote a partial one).
part s3 && $ST compare $COMPARE --groups s3 --seeds $SEEDS --out "$OUT/s3" --report-only > "$OUT/s3_report.log" 2>&1
part a5 && $ST compare $COMPARE --groups a5 --seeds 0 --out "$OUT/a5" --report-only > "$OUT/a5_report.log" 2>&1
echo "done in $(( SECONDS - START ))s" >> "$OUT/status.txt"
find "$OUT" -name checkpoints -type d -prune -exec rm -rf {} +   # keep $OUT small: results, logs, figures
cat "$OUT/status.txt"
cat "$OUT/s3/compare.md" "$OUT/a5/compare.md" 2>/dev/null
for name in s3_small s3_small_bf16 m2rnn_a5-large m2rnn_a5-large_s1 m2rnn_a5-large_1l m2rnn_a5-large_v128 \
  m2rnn_s5-large; do
  [[ -f "$OUT/$name.log" ]] && { echo "== $name"; grep -A6 "^| group" "$OUT/$name.log" | tail -4; }
done

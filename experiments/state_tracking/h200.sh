#!/usr/bin/env bash
# Issue 14's H200 measurements as two device calls of <= 9 minutes each, in priority order:
#   call 1: the S3 figure (7 mixers x 3 seeds, the compare command's GPU recipe: train at 128, evaluate to 512)
#           and the state-tracking-s3-small preset (the >= 99.5% at 4x check);
#   call 2: A5 for every mixer (1 seed, the same recipe), the state-tracking-a5-large preset, and the recurrence
#           alone (experiments/state_tracking/probe.py, RNN and M2RNN) with the largest data budget one call gives:
#           the open question of SEARCH.md.
#   Usage: OUT=/tmp/st1 bash experiments/state_tracking/h200.sh 1        (on the device; $OUT is created)
#          OUT=/tmp/st2 bash experiments/state_tracking/h200.sh 2
#          OUT=/tmp/st_smoke bash experiments/state_tracking/h200.sh 1 --smoke   (CPU: the same jobs, tiny budgets)
#   $OUT ends as one archive st_call<N>.tgz (the device returns at most 8 files); KEEP_OUT_TREE=1 keeps the tree.
#
# Why it looks like this (the first version ran 16 processes at once; raw logs of that run: 16 processes on 16
# cores and one GPU, every compile 2-30x slower than alone: M2RNN's first train step 167 s, cached ones 3-8 s; tiny
# models at 12-70 steps/s; almost every run hit its timeout):
#   * at most 5 processes, each pinned to its own cores (taskset, nproc / jobs cores each), XLA's compile threads
#     limited to those cores (--xla_gpu_force_compilation_parallelism), no GEMM autotuning (--xla_gpu_autotune_level=0:
#     these models' matmuls are tiny; autotuning is compile time) and no multi-threaded Eigen on the host; flags the
#     installed XLA rejects are dropped (checked first, written to environment.txt);
#   * the seeds (and models) of a process run one after another in ONE process, all processes share one persistent
#     compilation cache (seeds 1-2 load seed 0's programs; on a warm machine a repeated call reuses them all);
#   * every compare process has a deadline (--deadline-seconds): each run trains for an equal share of the time
#     left, is evaluated at every position and written; time a run leaves unused goes to the next. The preset runs
#     get SIGTERM early enough for their own evaluation (they evaluate the step reached). A final pass rebuilds
#     the reports. `timeout -k` behind every process is only the safety net.
#
# Time plan (seconds; BUDGET=540 for the whole script, 60 s under the device call's 600 s limit). Per-run
# numbers for the H200 are upper bounds from the failed run (16 processes at once): they only say the plan is
# not optimistic; the deadlines make it fit whatever the real speed is. A run the deadline cuts is recorded as
# "N of 3000" steps; running the same call again on the warm machine resumes it (RUNS below).
#   0-15     environment, XLA flag check (one jax import)
#   15-490   jobs (below), all started at once: the compare processes' deadline is 465 s after the script's start
#            (~450 s from their own start, after imports), the presets get SIGTERM 400 s after theirs
#   490-525  reports over every finished run (no compiles), cleanup, printing
# call 1 (5 processes, 3 cores each):
#   s3_m2rnn      M2RNN x 3 seeds: compile ~60 s (first seed: 2 lengths + evaluation; cached later),
#                 3000 steps at >= 12-18 steps/s (failed run, 16 processes; alone ~2-5x faster) -> ~150 s per run
#   s3_gru_rnn    GRU, RNN x 3 seeds: 6 runs of ~75 s (both learned S3 by step 900; 7-100 steps/s in the failed run)
#   s3_gdn        GDN [0, 1], GDN [-1, 1] x 3 seeds: 6 runs of ~75 s
#   s3_ssm_attn   Mamba2, attention x 3 seeds: 6 runs of ~75 s (45-70 steps/s in the failed run)
#   s3_small      state-tracking-s3-small, 6000 steps: SIGTERM at 400 s, then its evaluation (128/512/2048, ~60 s)
# call 2 (5 processes, 3 cores each):
#   a5_recurrent  A5, M2RNN / GRU / RNN / GDN [-1, 1], seed 0: 4 runs of ~115 s
#   a5_others     A5, GDN [0, 1] / Mamba2 / attention, seed 0: 3 runs of ~150 s
#   a5_large      state-tracking-a5-large, seed 0: SIGTERM at 400 s (4 train + 3 evaluation compiles), evaluation ~60 s
#   probe_m2rnn   probe.py, the M2RNN op alone, 8 heads K=4 x V=64 (learned A5 at length 4 on the CPU, SEARCH.md
#                 #13: 100% at 4, 90.8% at 8), scan backend, A5 at lengths 4 -> 8 -> 16 (a third of the time each),
#                 batch 512, constant lr 1e-3: trains 380 s, 3 compiles, evaluation to 64 ~10 s
#   probe_rnn     probe.py, tanh RNN width 512 (SEARCH.md #9: 99.8% at 4, 75% at 8), the same budget
#   (state-tracking-s5-large is not run: S5 contains A5's difficulty and more; it waits for an A5 result)
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CALL=${1:-}
SMOKE=0; [[ "${2:-}" == "--smoke" ]] && SMOKE=1
if [[ "$CALL" != 1 && "$CALL" != 2 ]]; then
  echo "usage: OUT=DIR bash $0 {1|2} [--smoke]: call 1 = the S3 figure + s3-small, call 2 = A5 / S5" >&2
  exit 2
fi
OUT=${OUT:-/tmp/st$CALL}; mkdir -p "$OUT"
# The runs (checkpoints included) live in RUNS, kept between calls on a warm machine: running a call again resumes
# its unfinished runs and skips the finished ones. $OUT gets everything but the checkpoints at the end.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.15
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache_state_tracking}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
ST="python3 -m experiments.state_tracking"
JOBS=5
BUDGET=${BUDGET:-540}
if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  JOBS=1   # the CPU box has 2 cores: the jobs run one after another
  COMPARE=(--recipe cpu --steps 3 --train-length 6 --batch-size 4 --hidden-size 16 --num-layers 1 --lengths 2 6
           --eval-sequences 8)
  RUNS=${RUNS:-$OUT}
  SEEDS="0 1"; DEADLINE=600; PRESET_SECONDS=300; PRESET_GRACE=60; BUDGET=${SMOKE_BUDGET:-3600}
  PROBE_SECONDS=20; PROBE=(--train-length 4 --steps 3 --batch-size 4 --eval-length 8 --eval-sequences 8)
  PRESET_SMOKE=(--set steps=3 --set optimizer.warmup_steps=1 --set batch_size=4 --set data.seq_len=6
                --set 'data.curriculum=[]' --set 'data.eval_lengths=[6]' --set data.eval_batch_size=8
                --set data.eval_batches=1 --set model.hidden_size=16 --set model.num_layers=1
                --set model.layer_pattern=M --set model.mlp.intermediate_size=16)
else
  COMPARE=(--recipe gpu)
  RUNS=${RUNS:-$PWD/runs/st_h200_call$CALL}
  SEEDS="0 1 2"
  DEADLINE=$(( BUDGET - 75 ))        # 465 s after the start (less what has passed when a job starts)
  PRESET_SECONDS=$(( BUDGET - 140 ))  # 400 s, then SIGTERM: the preset evaluates the step it reached ...
  PRESET_GRACE=75                     # ... within 75 s (SIGKILL at ~490 s)
  PROBE_SECONDS=$(( BUDGET - 160 ))   # 380 s of training, then the evaluation at every position up to 64
  PROBE=(--train-length 4 8 16 --steps 10000000 --batch-size 512 --lr 1e-3 --eval-length 64 --eval-sequences 1024
         --seconds "$PROBE_SECONDS")   # lengths 4, 8, 16: a third of the time each; --steps far away: constant lr
  PRESET_SMOKE=()
fi
mkdir -p "$RUNS"
START=$SECONDS
CORES=$(nproc)
PER_JOB=$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)

# XLA flags, kept only if the installed XLA accepts them (an unknown flag aborts every process).
FLAGS="--xla_gpu_force_compilation_parallelism=$PER_JOB --xla_gpu_autotune_level=0 --xla_cpu_multi_thread_eigen=false"
CHECK="import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
  echo "cores $CORES, jobs $JOBS x $PER_JOB cores, GPUs $GPUS, compilation cache $JAX_COMPILATION_CACHE_DIR"
  if XLA_FLAGS="$FLAGS" python3 -c "$CHECK"; then echo "XLA_FLAGS=$FLAGS"
  else FLAGS=""; echo "XLA flags rejected: running without them"; python3 -c "$CHECK"; fi
} > "$OUT/environment.txt" 2>&1
[[ -n "$FLAGS" ]] && export XLA_FLAGS="$FLAGS"
echo "state-tracking H200 call $CALL: budget ${BUDGET}s, smoke=$SMOKE, $JOBS jobs at once" > "$OUT/status.txt"

SLOT=0
job() {  # job NAME SECONDS GRACE CMD...: in the background on its own cores (and GPU), log in $OUT/NAME.log;
  # SIGTERM after SECONDS, SIGKILL GRACE seconds later
  local name=$1 seconds=$2 grace=$3; shift 3
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  local first=$(( (SLOT % JOBS) * PER_JOB )) gpu=$(( GPUS > 0 ? SLOT % GPUS : 0 ))
  local pin=(); command -v taskset > /dev/null && (( CORES >= JOBS )) && pin=(taskset -c "$first-$(( first + PER_JOB - 1 ))")
  SLOT=$(( SLOT + 1 ))
  (
    local begin=$SECONDS
    CUDA_VISIBLE_DEVICES=$gpu timeout -k "$grace" "$seconds" "${pin[@]}" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( SECONDS - begin ))s (limit ${seconds}s) started at $(( begin - START ))s" >> "$OUT/status.txt"
  ) &
}
# compare_job NAME GROUP SEEDS MODELS...: the compare command with a deadline; the timeout is the safety net.
compare_job() {
  local name=$1 group=$2 seeds=$3; shift 3
  local deadline=$DEADLINE
  (( SMOKE )) || deadline=$(( DEADLINE - (SECONDS - START) ))
  job "$name" $(( deadline + 30 )) 15 $ST compare "${COMPARE[@]}" --groups "$group" --models "$@" --seeds $seeds \
    --deadline-seconds "$deadline" --out "$RUNS/$group"
}
# probe_job NAME ARGS...: the recurrence-only probe on A5, training stopped by its own clock.
probe_job() {
  local name=$1; shift
  job "$name" $(( PROBE_SECONDS + 60 )) 15 python3 -m experiments.state_tracking.probe --group a5 "${PROBE[@]}" \
    --out "$OUT/$name.json" "$@"
}
# preset_job NAME GROUP SIZE SEED [--set ...]: a state-tracking preset, SIGTERM after PRESET_SECONDS (it then
# saves, evaluates the step it reached and prints its table: PRESET_GRACE seconds before the kill).
preset_job() {
  local name=$1 group=$2 size=$3 seed=$4; shift 4
  job "$name" "$PRESET_SECONDS" "$PRESET_GRACE" $ST --groups "$group" --size "$size" --seeds "$seed" --out "$RUNS/$name" \
    "${PRESET_SMOKE[@]}" "$@"
}

if [[ $CALL == 1 ]]; then
  compare_job s3_m2rnn s3 "$SEEDS" m2rnn
  compare_job s3_gru_rnn s3 "$SEEDS" gru rnn
  compare_job s3_gdn s3 "$SEEDS" gdn gdn-neg
  compare_job s3_ssm_attn s3 "$SEEDS" mamba2 attention
  preset_job s3_small s3 small 0
else
  compare_job a5_recurrent a5 0 m2rnn gru rnn gdn-neg
  compare_job a5_others a5 0 gdn mamba2 attention
  preset_job a5_large a5 large 0
  probe_job probe_m2rnn --cell m2rnn --heads 8 --k 4 --v 64 --backend scan
  probe_job probe_rnn --cell rnn --width 512
fi
wait

GROUP=$([[ $CALL == 1 ]] && echo s3 || echo a5)
REPORT_SEEDS=$([[ $CALL == 1 ]] && echo "$SEEDS" || echo 0)
$ST compare "${COMPARE[@]}" --groups $GROUP --seeds $REPORT_SEEDS --out "$RUNS/$GROUP" --report-only \
  > "$OUT/${GROUP}_report.log" 2>&1
echo "done in $(( SECONDS - START ))s" >> "$OUT/status.txt"
if [[ "$RUNS" == "$OUT" ]]; then
  find "$OUT" -name checkpoints -type d -prune -exec rm -rf {} +   # keep $OUT small: results, logs, figures
else
  tar -C "$RUNS" --exclude=checkpoints -cf - . | tar -C "$OUT" -xf -
fi
cat "$OUT/environment.txt" "$OUT/status.txt"
cat "$OUT/$GROUP/compare.md" 2>/dev/null
for log in "$OUT"/s3_small.log "$OUT"/*_large*.log; do
  [[ -f "$log" ]] && { echo "== $(basename "$log" .log)"; grep -A6 "^| group" "$log" | tail -4; }
done
for log in "$OUT"/probe_*.log; do [[ -f "$log" ]] && { echo "== $(basename "$log" .log)"; tail -1 "$log"; }; done
# The device returns at most 8 files from $OUT, none deeper than two folders: pack everything into one archive
# (the text above is also in the call's output). Unpack here with `tar xzf st_call<N>.tgz`.
if [[ -z "${KEEP_OUT_TREE:-}" && "$RUNS" != "$OUT" ]]; then  # (RUNS = OUT: the runs stay for resuming)
  ARCHIVE=$(mktemp -d)/st_call$CALL.tgz
  tar -C "$OUT" -czf "$ARCHIVE" . && find "$OUT" -mindepth 1 -delete && mv "$ARCHIVE" "$OUT/"
  ls -la "$OUT"
fi

#!/usr/bin/env bash
# Issue 14's H200 measurements as five device calls of <= 9 minutes each:
#   call 1: the S3 figure: 7 mixers x 3 seeds, the compare command's GPU recipe (train at 128, evaluate to 512);
#   call 2: A5 for every mixer (1 seed, the same recipe), the state-tracking-a5-large preset, and the recurrence
#           alone (experiments/state_tracking/probe.py, M2RNN and RNN): the open question of SEARCH.md;
#   call 3: state-tracking-s3-small (the >= 99.5% at 4x check, float32) and the same preset in bfloat16 (the fused
#           kernels): is bfloat16 what held it at 99.44% in session 5?
#   call 4: state-tracking-a5-large (seed 0, the learned query) alone for the whole budget: trained 4 -> 64,
#           evaluated at 64/256/1024: >= 99% at 256 (4x)? (SEARCH.md rows 23 and 25);
#   call 5: state-tracking-s5-large the same (reaches 64 only when run again on the warm machine: it resumes)
#   call 6: the recurrence alone (probe.py), annealed on the GPU: A5 at 64 from SEARCH.md row 37's saved model and
#           S5 at 16 from row 36b's, each a constant-rate stage then a cosine to 1e-5 by the clock, batch 512
#   call 7: the recurrence alone from scratch, one seed (SEED) of one group (SCRATCH_GROUP, a5 or s5), the whole
#           recipe of SEARCH.md's best row in one call: curriculum at 1e-3, the anneal to 1e-5, then 1e-5 with
#           weight decay 1.0 (rows 31-43)
#   Usage: OUT=/tmp/st1 bash experiments/state_tracking/h200.sh 1        (on the device; $OUT is created)
#          OUT=/tmp/st2 bash experiments/state_tracking/h200.sh 2
#          OUT=/tmp/st3 bash experiments/state_tracking/h200.sh 3
#          OUT=/tmp/st4 bash experiments/state_tracking/h200.sh 4
#          OUT=/tmp/st5 bash experiments/state_tracking/h200.sh 5
#          OUT=/tmp/st6 bash experiments/state_tracking/h200.sh 6
#          SEED=0 SCRATCH_GROUP=a5 OUT=/tmp/st7 bash experiments/state_tracking/h200.sh 7
#          OUT=/tmp/st_smoke bash experiments/state_tracking/h200.sh 1 --smoke   (CPU: the same jobs, tiny budgets)
#          bash experiments/state_tracking/h200.sh 1 --plan    (prints the jobs and their commands, runs nothing)
#          OUT=/tmp/st_times bash experiments/state_tracking/h200.sh times   (each model's train step alone, <= 3 min:
#            $OUT/step_times.json, the measured costs: COSTS=step_times.json bash h200.sh 1 splits call 1 by them)
#   Environment: JOBS (processes at once, default 2), BUDGET (seconds, default 540), RUNS (where the runs live),
#   CACHE_ARCHIVE=1 (also return the compilation cache as $OUT/st_jax_cache.tgz, see the end), KEEP_OUT_TREE=1
#   (keep $OUT as a tree instead of one archive st_call<N>.tgz: the device returns at most 8 files); with --smoke,
#   SMOKE_JOBS (default 1: the CPU box has 2 cores) and SMOKE_BUDGET (default 3600); call 6: ANNEAL_DECAY (the
#   probes' --weight-decay, default 0; SEARCH.md row 43), ANNEAL_LR / ANNEAL_FRACTION / ANNEAL_MIN_RATIO (the
#   schedule: --lr, default 1e-3; --anneal-fraction, default 0.6; --min-lr-ratio, default 0.01; ANNEAL_LR=1e-5
#   ANNEAL_MIN_RATIO=1 ANNEAL_DECAY=1.0 is row 43's constant low rate with decay), ANNEAL_A5_INIT / ANNEAL_S5_INIT
#   (the saved models it continues; defaults in the case below); call 7: SEED (default 0), SCRATCH_GROUP (a5 or
#   s5, default a5); COSTS=FILE (a step_times JSON:
#   its "runs" replace the COST table below for the models it measured), TIMES_SECONDS (the times call, default 180).
#
# Why it looks like this. Session 7 ran 16 processes at once (every compile 2-30x slower, almost every run hit its
# timeout); session 8's call 1 ran 5 (456 s, experiments/results/h200_2026-12-03_session8/st_call1): every compare
# run was cut by its deadline far from its 3000 steps (M2RNN 1065-1307, GRU ~1470, RNN 1857-2827, GDN 1250-1422,
# GDN [-1, 1] 1139-2174, Mamba2 1781-2224, attention 2489-3000). Two causes, both measured on the H200:
#   * float32 M2RNN ran its fused pallas_gpu backward, 27.1 ms forward+backward at the comparison's shape
#     (B=128 S=128 N=4 K=2 V=64) against 5.4 ms on the scan: backend "auto" now picks the scan there (4c9da9a);
#   * without MPS the GPU time-slices between processes, and these models are launch-bound: processes cannot
#     overlap on the GPU, they only lose to context switches (GRU 233 steps/s at length 32 while the others
#     compiled, 13-25 at 128 with five training). More processes only overlap compiles (host side).
# So: JOBS=2 processes (one trains while the other compiles), each pinned to nproc / JOBS cores (taskset), XLA's
# compile threads limited to those (--xla_gpu_force_compilation_parallelism), no GEMM autotuning
# (--xla_gpu_autotune_level=0), no multi-threaded Eigen on the host; flags the installed XLA rejects are dropped
# (checked first, written to environment.txt). The models of a job run one after another in ONE process, and all
# share one persistent compilation cache (on a warm machine, or with the cache carried in, a repeated call compiles
# nothing). Call 1 passes --stack-seeds: the 3 seeds of a model train as ONE vmapped program
# (experiments/state_tracking/stacked.py), which costs about one seed's launches when the step is launch-bound
# (session 9's call 1, one seed after another: 30-75% of the 3000 steps in 450 s,
# experiments/results/h200_2026-12-04_session9/st_call1). Stacked (session 11): every run of the figure
# reached its 3000 steps in 461 s of calls (338 s, then two resumes on the warm machine: 106 s, 17 s).
# Every compare process has a deadline (--deadline-seconds):
# each run trains for an equal share of the time left, is evaluated at every position and written; time a run
# leaves unused goes to the next ("N of 3000" steps when cut). The preset and probe jobs end at fixed times after
# the script's start (SIGTERM: a preset saves, evaluates the step it reached and prints its table). A final pass
# rebuilds the report. Jobs beyond JOBS wait for a free slot (and take its cores); `timeout -k` is the safety net.
# Running a call again on the warm machine resumes its unfinished runs from RUNS and skips the finished ones.
#
# The split of call 1 (GPU seconds per 3000-step run, one process alone on the H200, ESTIMATED: COST below; the
# times call measures them: experiments/state_tracking/step_times.py times each model's train step alone at 32 and
# 128 and multiplies by the curriculum's steps there; COSTS=its JSON then replaces the table, model by model):
#   M2RNN: measured pieces: op forward+backward on the scan 5.40 ms per layer at 128 (x 2 layers) + the rest of the
#     step 0.7 ms (bf16 step 3.27 ms - 2 x 1.27 ms op) = 11.5 ms at 128, ~3.4 ms at 32 (the scan is launch-bound:
#     ~ length) -> 2100 x 11.5 + 900 x 3.4 ms = 27 s.
#   the others: no alone measurement at 128. Session 8's median steps/s at 128 with ~5 processes training, times
#     4.5 (M2RNN's fused step: 18.4 steps/s alone, 4.2-4.5 in that run), gives ms per step alone at 128: GRU 15,
#     GDN 13 (both signs), RNN 10, Mamba2 8.6, attention 6.2; at 32 the near-alone 4.3-4.7 ms of the first runs
#     (GRU, GDN, Mamba2: 212-233 steps/s while the others compiled), 3-4 ms for the rest -> GRU 35, GDN 31,
#     GDN [-1, 1] 31, RNN 25, Mamba2 22, attention 16 s.
#   So per step M2RNN on the scan sits with the recurrences (GRU and GDN may be heavier: the x 4.5 is rough), and
#   its compiles are the longest. The models go to JOBS processes largest first, each to the least-loaded one (LPT);
#   in a process the cheapest run first, so time a fast run leaves goes to the costly ones. JOBS=2:
#     process 1: GRU, M2RNN, RNN x 3 seeds          (87 s per seed: ~260 s of GPU)
#     process 2: GDN, GDN [-1, 1], Mamba2, attention (100 s per seed: ~300 s of GPU)
#   ~560 s of GPU against ~450 s of deadline one seed after another; stacked (--stack-seeds), a model's three seeds
#   cost about one seed's launches, ~190 s if the step stays launch-bound. Running it again on the warm machine
#   resumes what was cut (the stacked state is checkpointed) and skips the finished runs.
#   One process finishing early gives the other the GPU alone, so an unequal split costs little.
#
# Time plan (seconds; BUDGET=540, 60 s under the device call's 600 s limit; STOP = BUDGET - 75 = 465):
#   0-15     environment, XLA flag check (one jax import)
#   15-465   jobs: compare processes finish by STOP (deadline = STOP - the time already passed)
#   465-525  reports over every finished run (no compiles), archive, printing
# call 1 (2 processes, 8 cores each): the two compare jobs above (s3_1, s3_2), 9 and 12 runs.
# call 2 (2 processes; jobs 3-4 start when a slot frees):
#   a5            A5, all 7 mixers, seed 0 (~190 s of GPU estimated; time-sliced with the other slot): deadline STOP
#   a5_large      state-tracking-a5-large, seed 0 (16000 steps, cut; resumes when run again): SIGTERM at 220 s,
#                 then its evaluation at 64/256/1024 (killed 75 s later)
#   probe_m2rnn   probe.py, the M2RNN op alone, 8 heads K=4 x V=64 (SEARCH.md #13), scan, A5 at lengths 4 -> 8 -> 16
#                 (a third of the time each), batch 512, constant lr 1e-3: from a5_large's end (~250 s) to 350 s,
#                 then its evaluation to 64 (~10 s)
#   probe_rnn     probe.py, tanh RNN width 512 (SEARCH.md #9), the same: from ~365 s to 440 s
#   With JOBS=2 the probes get ~100 and ~75 s (at length 4 a step should take ~1 ms, not measured: 2000 steps of 512
#   sequences, the ~1M sequences after which they learned A5 at length 4 on the CPU, take seconds); JOBS=4 starts
#   all four at once (probes train to 350 / 440 s) at the price of the compare runs' GPU share (a quarter, not half).
#   (state-tracking-s5-large: call 5)
# call 6 (one process at a time, all the cores):
#   anneal_a5     probe.py from results/cpu_a5/..._more_anneal2.npz (row 37: 100 / 97.9 / 78.8% at 64 / 128 / 256,
#                 17k steps of 128 at 64 on the CPU), length 64, batch 512: 1e-3 for the first 40% of its time,
#                 then a cosine to 1e-5 over the rest (--anneal-fraction 0.6); training ends by 230 s, evaluated
#                 to 512 (8x)
#   anneal_s5     the same from results/cpu_s5/s5_m2rnn_16_anneal.npz (row 36b: 99.3 / 76.0 / 30.2% at 16 / 32 /
#                 64), length 16; training ends by 450 s, evaluated to 128 (8x)
#   Why: on the CPU annealing at the final length moved the exact range from 0.56x to 1.7x (rows 33-37) and it was
#   still growing; the GPU runs many times the CPU's sequences per call (row 19: 52k steps of 512 at 4-16 in
#   110 s, with another process). The step rate at 64 is not measured, so the anneal follows the clock and ends
#   with the run whatever the rate.
# call 7 (one process at a time, all the cores; SEED=N, SCRATCH_GROUP=a5|s5): three probe runs chained through
#   their saved models, each by its own clock (the step rates at 32-64 are not measured), the M2RNN cell of row 13
#   (8 heads K=4 x V=64), batch 512:
#   scratch_<group>_s<seed>_curriculum  from scratch at 1e-3: A5 4, 8, 16, 32, 64, 64 (equal shares of the time),
#                 S5 4, 4, 8, 16 (its plateau at 4 is ~2.5x A5's, row 32); training ends by 195 s
#   ..._anneal    1e-3, then a cosine to 1e-5 over the last 60% (row 40a's schedule) at the final length (A5 64,
#                 S5 16): ends by 375 s
#   ..._decay     1e-5 with weight decay 1.0 (row 43): ends by 450 s (~60 s); evaluated to 8x the final length
#   The first two are evaluated to 4x.
#   Why: on the GPU the probe crossed A5's plateau and learned 4 -> 8 -> 16 in 110 s (row 19); every later stage of
#   the CPU lineage (rows 31-43, ~7M sequences, hours on one core) is ~3 minutes of the H200's 45k sequences/s at
#   64 (row 40a). Several seeds: one call per seed (SEED=1, SEED=2).
# call 3 (2 processes):
#   s3_small      state-tracking-s3-small (float32, 4 layers h=256, 6000 steps; session 8 reached 1763 in 400 s with
#                 five processes and the slow fused float32 backward): SIGTERM at 420 s, evaluation 128/512/2048
#   s3_small_bf16 the same preset in bfloat16 (fused kernels, ~3 ms steps at the tiny shape): SIGTERM at 420 s
# calls 4 and 5 (one process, all the cores, the whole budget; each preset alone):
#   a5_large (call 4) / s5_large (call 5)   state-tracking-{a5,s5}-large, seed 0 (16000 steps, 4 -> 8 -> 16 -> 64,
#                 the learned query): SIGTERM at 420 s, then its evaluation at 64/256/1024 (killed 75 s later)
#   Why: with the learned query the presets' decoder left A5's plateau and was exact at its training length (99.88%
#   at 16) but not at 2x or 4x (SEARCH.md row 23, CPU); the -large presets (now with that query) train on to 64, so
#   256 is their 4x. Why alone: at V = 320 / 640 the step is compute-bound in the V x V state weight, ~linear in the
#   length (measured on the H200 with both at once: A5 58 / 16 / 4.1 steps/s at 4 / 16 / 64, S5 ~35 / 5.5 at 4 / 16,
#   experiments/results/h200_2026-12-04_session13/st_large_rates): together A5 would reach 64 at ~320 s (~400 steps
#   there) and S5 would not leave length 8. Alone (about twice those rates, estimated) A5 reaches 64 after ~3 minutes
#   and trains there to 420 s (~2000 steps); S5 (4x A5's cost per position) reaches 64 near the end: call 5 run twice
#   more on the warm machine resumes it from RUNS (a checkpoint every 2000 steps and at the SIGTERM).
#
# Tests: experiments/state_tracking/test_h200.py (syntax, usage, the --plan of every call and JOBS),
# test_step_times.py (the times call, COSTS=). Docs: docs/state_tracking.md, "The H200 script".
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CALL=${1:-}
MODE=${2:-}
if [[ ! "$CALL" =~ ^[1-7]$ && "$CALL" != times ]] \
  || [[ -n "$MODE" && "$MODE" != --smoke && "$MODE" != --plan ]]; then
  echo "usage: OUT=DIR bash $0 {1|2|3|4|5|6|7|times} [--smoke|--plan]: call 1 = the S3 figure, call 2 = A5 +" \
    "probes, call 3 = state-tracking-s3-small (float32, bfloat16), call 4 / 5 = state-tracking-a5-large / s5-large," \
    "call 6 = the probe annealed (A5, S5), call 7 = the probe from scratch (SEED, SCRATCH_GROUP)," \
    "times = each model's train step alone (step_times)" >&2
  exit 2
fi
SMOKE=0; [[ "$MODE" == --smoke ]] && SMOKE=1
PLAN=0; [[ "$MODE" == --plan ]] && PLAN=1
JOBS=${JOBS:-2}
if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then echo "JOBS: expected a positive integer, got '$JOBS'" >&2; exit 2; fi
BUDGET=${BUDGET:-540}
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || (( BUDGET < 300 )); then
  echo "BUDGET: expected an integer >= 300 (seconds), got '$BUDGET'" >&2; exit 2
fi
TIMES_SECONDS=${TIMES_SECONDS:-180}
if ! [[ "$TIMES_SECONDS" =~ ^[0-9]+$ ]] || (( TIMES_SECONDS < 60 )); then
  echo "TIMES_SECONDS: expected an integer >= 60 (seconds), got '$TIMES_SECONDS'" >&2; exit 2
fi
ANNEAL_DECAY=${ANNEAL_DECAY:-0}
if ! [[ "$ANNEAL_DECAY" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "ANNEAL_DECAY: expected a non-negative number, got '$ANNEAL_DECAY'" >&2; exit 2
fi
# unit_number NAME VALUE: exit 2 unless VALUE is a number in (0, 1] (decimal or 1e-5 style)
unit_number() {
  if ! python3 -c 'import sys; v = float(sys.argv[1]); sys.exit(not 0 < v <= 1)' "$2" 2> /dev/null; then
    echo "$1: expected a number in (0, 1], got '$2'" >&2; exit 2
  fi
}
ANNEAL_LR=${ANNEAL_LR:-1e-3}; unit_number ANNEAL_LR "$ANNEAL_LR"
ANNEAL_FRACTION=${ANNEAL_FRACTION:-0.6}; unit_number ANNEAL_FRACTION "$ANNEAL_FRACTION"
ANNEAL_MIN_RATIO=${ANNEAL_MIN_RATIO:-0.01}; unit_number ANNEAL_MIN_RATIO "$ANNEAL_MIN_RATIO"
SEED=${SEED:-0}
if ! [[ "$SEED" =~ ^[0-9]+$ ]]; then echo "SEED: expected a non-negative integer, got '$SEED'" >&2; exit 2; fi
SCRATCH_GROUP=${SCRATCH_GROUP:-a5}
if [[ "$SCRATCH_GROUP" != a5 && "$SCRATCH_GROUP" != s5 ]]; then
  echo "SCRATCH_GROUP: expected a5 or s5, got '$SCRATCH_GROUP'" >&2; exit 2
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.15
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache_state_tracking}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
ST="python3 -m experiments.state_tracking"
MODELS=(m2rnn gru rnn gdn gdn-neg mamba2 attention)
# Estimated GPU seconds of one 3000-step compare run alone on the H200 (derivation in the header): the fallback
# for every model that COSTS=FILE (a step_times JSON) does not measure.
declare -A COST=([m2rnn]=27 [gru]=35 [rnn]=25 [gdn]=31 [gdn-neg]=31 [mamba2]=22 [attention]=16)
COST_SOURCE="estimated (the COST table of $0)"
if [[ -n "${COSTS:-}" ]]; then
  # "model seconds" for each model of MODELS with a measured run in the file (rounded, at least 1).
  READ_COSTS='
import json, sys
path, models = sys.argv[1], sys.argv[2:]
try:
    runs = json.load(open(path))["runs"]
    seconds = {m: float(runs[m]["seconds"]) for m in models if (runs.get(m) or {}).get("seconds") is not None}
except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
    sys.exit(f"COSTS: expected a step_times JSON with runs.<model>.seconds, got {path!r} ({type(err).__name__}: {err})")
if not seconds:
    sys.exit(f"COSTS: expected runs.<model>.seconds for at least one of {models}, got none in {path!r}")
for model, value in seconds.items():
    print(model, max(1, round(value)))
'
  MEASURED=$(python3 -c "$READ_COSTS" "$COSTS" "${MODELS[@]}") || exit 2
  while read -r model seconds; do COST[$model]=$seconds; done <<< "$MEASURED"
  COST_SOURCE="measured in $COSTS: $(echo $(cut -d' ' -f1 <<< "$MEASURED")); the table for the others"
fi
COST_LINE="costs (GPU s per run, $COST_SOURCE): $(for model in "${MODELS[@]}"; do echo -n "$model=${COST[$model]} "; done)"
# The times below are seconds after the script's start. The runs (checkpoints included) live in RUNS, kept
# between calls on a warm machine: a call run again resumes its unfinished runs, skips the finished ones.
if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  JOBS=${SMOKE_JOBS:-1}   # the CPU box has 2 cores: the jobs run one after another
  COMPARE=(--recipe cpu --steps 3 --train-length 6 --batch-size 4 --hidden-size 16 --num-layers 1 --lengths 2 6
           --eval-sequences 8)
  RUNS=${RUNS:-$OUT}
  SEEDS="0 1"
  STOP=${SMOKE_BUDGET:-3600}; TIMES_END=$STOP; A5_LARGE_END=$STOP; PROBE_M2RNN_END=$STOP; PROBE_RNN_END=$STOP; SMALL_END=$STOP
  LARGE_END=$STOP
  ANNEAL_A5_END=45; ANNEAL_S5_END=110   # the anneals train by the clock (--steps 10000000): ~30 s each
  SCRATCH_ENDS=(40 100 160)             # call 7's three stages, ~25 s of training each
  SCRATCH_A5=(--train-length 4 8 --final-length 8 --eval-length 16)
  SCRATCH_S5=(--train-length 4 4 --final-length 4 --eval-length 8)
  PRESET_GRACE=60
  ANNEAL=(--batch-size 4 --eval-sequences 8)
  ANNEAL_A5=(--train-length 8 --eval-length 16)
  ANNEAL_S5=(--train-length 4 --eval-length 8)
  PROBE=(--train-length 4 --steps 3 --batch-size 4 --eval-length 8 --eval-sequences 8)
  TIMES=(--recipe cpu --train-length 4 --hidden-size 16 --num-layers 1 --batch-size 4 --iters 1 --repeats 1)
  PRESET_SMOKE=(--set steps=3 --set optimizer.warmup_steps=1 --set optimizer.decay_steps=null
                --set batch_size=4 --set data.seq_len=6
                --set 'data.curriculum=[]' --set 'data.eval_lengths=[6]' --set data.eval_batch_size=8
                --set data.eval_batches=1 --set model.hidden_size=16 --set model.num_layers=1
                --set model.layer_pattern=M --set model.mlp.intermediate_size=16)
else
  COMPARE=(--recipe gpu)
  TIMES=(--recipe gpu)
  RUNS=${RUNS:-$PWD/runs/st_h200_call$CALL}
  SEEDS="0 1 2"
  STOP=$(( BUDGET - 75 ))               # 465: every compare run evaluated and written by then
  TIMES_END=$(( TIMES_SECONDS - 10 ))   # 170: step_times killed (its JSON holds every measurement done by then)
  A5_LARGE_END=$(( BUDGET - 320 ))      # 220: SIGTERM, then its evaluation within PRESET_GRACE
  PROBE_M2RNN_END=$(( BUDGET - 190 ))   # 350: end of its training
  PROBE_RNN_END=$(( BUDGET - 100 ))     # 440
  SMALL_END=$(( BUDGET - 120 ))         # 420: SIGTERM for both s3-small runs
  LARGE_END=$(( BUDGET - 120 ))         # 420: SIGTERM for the -large run of call 4 or 5
  ANNEAL_A5_END=$(( BUDGET - 310 ))     # 230: end of anneal_a5's training (call 6), killed 60 s later
  ANNEAL_S5_END=$(( BUDGET - 90 ))      # 450: end of anneal_s5's
  ANNEAL=(--batch-size 512 --eval-sequences 1024)
  ANNEAL_A5=(--train-length 64 --eval-length 512)
  ANNEAL_S5=(--train-length 16 --eval-length 128)
  SCRATCH_ENDS=($(( BUDGET - 345 )) $(( BUDGET - 165 )) $(( BUDGET - 90 )))   # 195, 375, 450: call 7's stages
  SCRATCH_A5=(--train-length 4 8 16 32 64 64 --final-length 64 --eval-length 512)
  SCRATCH_S5=(--train-length 4 4 8 16 --final-length 16 --eval-length 128)
  PRESET_GRACE=75
  PROBE=(--train-length 4 8 16 --steps 10000000 --batch-size 512 --lr 1e-3 --eval-length 64 --eval-sequences 1024)
  PRESET_SMOKE=()                       # (--steps far away: a constant lr; lengths 4, 8, 16: a third of the time each)
fi
PROBE_EVAL=15   # seconds of a probe's evaluation (to 64): its kill comes 45 s after that
[[ $CALL == times || $CALL == [4567] ]] && JOBS=1   # one process alone on the GPU, with all the cores
OUT=${OUT:-/tmp/st$CALL}
START=$SECONDS
CORES=$(nproc)
PER_JOB=$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))
FLAGS="--xla_gpu_force_compilation_parallelism=$PER_JOB --xla_gpu_autotune_level=0 --xla_cpu_multi_thread_eigen=false"
cache_size() { local size; size=$(du -sh "$JAX_COMPILATION_CACHE_DIR" 2> /dev/null | cut -f1); echo "${size:-none}"; }
if (( ! PLAN )); then
  mkdir -p "$OUT" "$RUNS"
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  # XLA flags, kept only if the installed XLA accepts them (an unknown flag aborts every process).
  CHECK="import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  { nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
    echo "cores $CORES, jobs $JOBS x $PER_JOB cores, GPUs $GPUS, compilation cache $JAX_COMPILATION_CACHE_DIR" \
      "($(cache_size) at the start)"
    if XLA_FLAGS="$FLAGS" python3 -c "$CHECK"; then echo "XLA_FLAGS=$FLAGS"
    else FLAGS=""; echo "XLA flags rejected: running without them"; python3 -c "$CHECK"; fi
    echo "$COST_LINE"
  } > "$OUT/environment.txt" 2>&1
  [[ -n "$FLAGS" ]] && export XLA_FLAGS="$FLAGS"
  LIMIT=$([[ $CALL == times ]] && echo "TIMES_SECONDS ${TIMES_SECONDS}s" || echo "budget ${BUDGET}s")
  echo "state-tracking H200 call $CALL: $LIMIT, smoke=$SMOKE, $JOBS jobs at once" > "$OUT/status.txt"
fi

# balance N MODEL...: the models in N groups, one line each: largest COST first, each to the group with the least
# COST so far (the first on ties); within a group the cheapest first. Empty groups are not printed.
balance() {
  local n=$1 model i best; shift
  local -a load groups
  for (( i = 0; i < n; i++ )); do load[i]=0; groups[i]=""; done
  for model in $(for model in "$@"; do echo "${COST[$model]} $model"; done | sort -s -k1,1nr | cut -d' ' -f2); do
    best=0
    for (( i = 1; i < n; i++ )); do (( load[i] < load[best] )) && best=$i; done
    load[best]=$(( load[best] + COST[$model] )); groups[best]="$model ${groups[best]}"
  done
  for (( i = 0; i < n; i++ )); do [[ -n "${groups[i]}" ]] && echo ${groups[i]}; done
}

# Slots: JOBS processes at once; slot i runs on cores [i * PER_JOB, (i + 1) * PER_JOB).
declare -a SLOT_PID=()
SLOT=0
take_slot() {  # sets SLOT to a free slot, waiting for a job to end if none is
  local i
  while :; do
    for (( i = 0; i < JOBS; i++ )); do
      if [[ -z "${SLOT_PID[i]:-}" ]] || ! kill -0 "${SLOT_PID[i]}" 2> /dev/null; then SLOT=$i; return; fi
    done
    wait -n
  done
}
elapsed() { echo $(( SECONDS - START )); }
job() {  # job NAME END MARGIN GRACE CMD...: in the background on a free slot's cores, log in $OUT/NAME.log;
  # SIGTERM at END (seconds after the start), SIGKILL GRACE seconds later. The word @LEFT@ in CMD becomes the
  # seconds left when it starts, less MARGIN (for the command's own clock).
  local name=$1 end=$2 margin=$3 grace=$4; shift 4
  if (( PLAN )); then echo "$name (until ${end}s): ${*//@LEFT@/\$((END-NOW-$margin))}"; return; fi
  take_slot
  local left=$(( end - $(elapsed) ))
  if (( left - margin < 30 )); then
    echo "$name skipped: ${left}s left at $(elapsed)s" >> "$OUT/status.txt"; return
  fi
  local args=("${@//@LEFT@/$(( left - margin ))}") first=$(( SLOT * PER_JOB ))
  local pin=(); command -v taskset > /dev/null && (( CORES >= JOBS )) && pin=(taskset -c "$first-$(( first + PER_JOB - 1 ))")
  (
    begin=$SECONDS
    timeout -k "$grace" "$left" "${pin[@]}" "${args[@]}" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( SECONDS - begin ))s (limit ${left}s, slot $SLOT) started at $(( begin - START ))s" \
      >> "$OUT/status.txt"
  ) &
  SLOT_PID[SLOT]=$!
}
# compare_job NAME GROUP SEEDS MODELS...: the compare command, every run done by STOP (its timeout: the safety net);
# STACK=(--stack-seeds) trains the seeds of each model as one program.
STACK=()
compare_job() {
  local name=$1 group=$2 seeds=$3; shift 3
  job "$name" $(( STOP + 30 )) 30 15 $ST compare "${COMPARE[@]}" "${STACK[@]}" --groups "$group" --models "$@" \
    --seeds $seeds --deadline-seconds @LEFT@ --out "$RUNS/$group"
}
# probe_job NAME END ARGS...: the recurrence-only probe on A5, training until END by its own clock, then its
# evaluation (killed PROBE_EVAL + 45 s after END).
probe_job() {
  local name=$1 end=$2; shift 2
  job "$name" $(( end + PROBE_EVAL + 45 )) $(( PROBE_EVAL + 45 )) 15 python3 -m experiments.state_tracking.probe \
    --group a5 "${PROBE[@]}" --seconds @LEFT@ --out "$OUT/$name.json" "$@"
}
# cell_job NAME END GROUP ARGS...: the probe's M2RNN cell (row 13: 8 heads K=4 x V=64), a constant schedule
# (--steps far away) that ARGS shape, training until END by its own clock, then its evaluation; writes
# $OUT/NAME.json and the model $OUT/NAME.npz.
cell_job() {
  local name=$1 end=$2 group=$3; shift 3
  job "$name" $(( end + PROBE_EVAL + 45 )) $(( PROBE_EVAL + 45 )) 15 python3 -m experiments.state_tracking.probe \
    --cell m2rnn --group "$group" --heads 8 --k 4 --v 64 --backend scan --steps 10000000 "${ANNEAL[@]}" "$@" \
    --log-seconds 20 --seconds @LEFT@ --out "$OUT/$name.json" --save "$OUT/$name.npz"
}
# anneal_job NAME END GROUP INIT --train-length L --eval-length E: the cell from the saved model INIT (its step
# count continues) at length L, ANNEAL_LR (1e-3) then annealed by the clock to ANNEAL_LR x ANNEAL_MIN_RATIO (1e-5)
# over the last ANNEAL_FRACTION (60%) of its time, weight decay ANNEAL_DECAY (0); then the evaluation to E.
anneal_job() {
  local name=$1 end=$2 group=$3 init=$4; shift 4
  cell_job "$name" "$end" "$group" --init "$init" "$@" --lr "$ANNEAL_LR" --min-lr-ratio "$ANNEAL_MIN_RATIO" \
    --anneal-fraction "$ANNEAL_FRACTION" --weight-decay "$ANNEAL_DECAY"
}
# scratch_jobs GROUP --train-length L... --final-length F --eval-length E: call 7's three chained stages (header).
scratch_jobs() {
  local group=$1 prefix="scratch_$1_s$SEED"; shift
  local -a curriculum=(); local final="" evaluate=""
  while (( $# )); do
    case $1 in
      --train-length) shift; while (( $# )) && [[ $1 != --* ]]; do curriculum+=("$1"); shift; done ;;
      --final-length) final=$2; shift 2 ;;
      --eval-length) evaluate=$2; shift 2 ;;
      *) echo "scratch_jobs: unknown argument '$1'" >&2; exit 2 ;;
    esac
  done
  cell_job "${prefix}_curriculum" "${SCRATCH_ENDS[0]}" "$group" --seed "$SEED" --train-length "${curriculum[@]}" \
    --lr 1e-3 --eval-length $(( 4 * final ))
  cell_job "${prefix}_anneal" "${SCRATCH_ENDS[1]}" "$group" --seed "$SEED" --init "$OUT/${prefix}_curriculum.npz" \
    --train-length "$final" --lr 1e-3 --min-lr-ratio 0.01 --anneal-fraction 0.6 --eval-length $(( 4 * final ))
  cell_job "${prefix}_decay" "${SCRATCH_ENDS[2]}" "$group" --seed "$SEED" --init "$OUT/${prefix}_anneal.npz" \
    --train-length "$final" --lr 1e-5 --weight-decay 1.0 --eval-length "$evaluate"
}
# preset_job NAME END GROUP SIZE SEED [--set ...]: a state-tracking preset, SIGTERM at END (it then saves,
# evaluates the step it reached and prints its table: PRESET_GRACE seconds before the kill).
preset_job() {
  local name=$1 end=$2 group=$3 size=$4 seed=$5; shift 5
  job "$name" "$end" 0 "$PRESET_GRACE" $ST --groups "$group" --size "$size" --seeds "$seed" --out "$RUNS/$name" \
    "${PRESET_SMOKE[@]}" "$@"
}

(( PLAN )) && echo "$COST_LINE" >&2
case $CALL in
  1)
    STACK=(--stack-seeds)
    mapfile -t PARTS < <(balance "$JOBS" "${MODELS[@]}")
    for part in "${!PARTS[@]}"; do compare_job "s3_$(( part + 1 ))" s3 "$SEEDS" ${PARTS[part]}; done
    ;;
  2)
    compare_job a5 a5 0 "${MODELS[@]}"
    preset_job a5_large "$A5_LARGE_END" a5 large 0
    probe_job probe_m2rnn "$PROBE_M2RNN_END" --cell m2rnn --heads 8 --k 4 --v 64 --backend scan
    probe_job probe_rnn "$PROBE_RNN_END" --cell rnn --width 512
    ;;
  3)
    preset_job s3_small "$SMALL_END" s3 small 0
    preset_job s3_small_bf16 "$SMALL_END" s3 small 0 --set model.dtype=bfloat16
    ;;
  4) preset_job a5_large "$LARGE_END" a5 large 0 ;;
  5) preset_job s5_large "$LARGE_END" s5 large 0 ;;
  6)
    RESULTS=experiments/state_tracking/results
    anneal_job anneal_a5 "$ANNEAL_A5_END" a5 "${ANNEAL_A5_INIT:-$RESULTS/cpu_a5/a5_m2rnn_levers_full_bptt_64_more_anneal2.npz}" \
      "${ANNEAL_A5[@]}"
    anneal_job anneal_s5 "$ANNEAL_S5_END" s5 "${ANNEAL_S5_INIT:-$RESULTS/cpu_s5/s5_m2rnn_16_anneal.npz}" "${ANNEAL_S5[@]}"
    ;;
  7)
    if [[ $SCRATCH_GROUP == a5 ]]; then scratch_jobs a5 "${SCRATCH_A5[@]}"; else scratch_jobs s5 "${SCRATCH_S5[@]}"; fi
    ;;
  times)
    job times "$TIMES_END" 0 15 python3 -m experiments.state_tracking.step_times "${TIMES[@]}" \
      --json "$OUT/step_times.json"
    ;;
esac
(( PLAN )) && exit 0
wait
if [[ $CALL == times ]]; then  # four files in $OUT: environment.txt, status.txt, times.log, step_times.json
  echo "done in $(elapsed)s; compilation cache $(cache_size)" >> "$OUT/status.txt"
  cat "$OUT/environment.txt" "$OUT/status.txt" "$OUT/times.log"
  ls -la "$OUT"
  exit 0
fi

if [[ $CALL == 1 || $CALL == 2 ]]; then  # calls 3-5 run presets only: no comparison to report
  GROUP=$([[ $CALL == 1 ]] && echo s3 || echo a5)
  REPORT_SEEDS=$([[ $CALL == 1 ]] && echo "$SEEDS" || echo 0)
  $ST compare "${COMPARE[@]}" --groups $GROUP --seeds $REPORT_SEEDS --out "$RUNS/$GROUP" --report-only \
    > "$OUT/${GROUP}_report.log" 2>&1
fi
echo "done in $(elapsed)s; compilation cache $(cache_size)" >> "$OUT/status.txt"
if [[ "$RUNS" == "$OUT" ]]; then
  find "$OUT" -name checkpoints -type d -prune -exec rm -rf {} +   # keep $OUT small: results, logs, figures
else
  tar -C "$RUNS" --exclude=checkpoints -cf - . | tar -C "$OUT" -xf -
fi
cat "$OUT/environment.txt" "$OUT/status.txt"
for report in "$OUT"/s3/compare.md "$OUT"/a5/compare.md; do [[ -f "$report" ]] && cat "$report"; done
for log in "$OUT"/s3_small*.log "$OUT"/[as]5_large.log; do
  [[ -f "$log" ]] && { echo "== $(basename "$log" .log)"; grep -A6 "^| group" "$log" | tail -4; }
done
for log in "$OUT"/probe_*.log "$OUT"/anneal_*.log "$OUT"/scratch_*.log; do [[ -f "$log" ]] && { echo "== $(basename "$log" .log)"; tail -1 "$log"; }; done
# The device returns at most 8 files from $OUT, none deeper than two folders: pack everything into one archive
# (the text above is also in the call's output). Unpack here with `tar xzf st_call<N>.tgz`.
if [[ -z "${KEEP_OUT_TREE:-}" && "$RUNS" != "$OUT" ]]; then  # (RUNS = OUT: the runs stay for resuming)
  ARCHIVE=$(mktemp -d)/st_call$CALL.tgz
  tar -C "$OUT" -czf "$ARCHIVE" . && find "$OUT" -mindepth 1 -delete && mv "$ARCHIVE" "$OUT/"
fi
# CACHE_ARCHIVE=1: the compilation cache as $OUT/st_jax_cache.tgz, to bring to the next session's fresh machine:
# here `mkdir -p runs && tar -C runs -xzf st_jax_cache.tgz`, then the device call with
# carry=["runs/jax_cache_state_tracking"] (the working tree and what is carried: 64 MiB at most together).
if [[ -n "${CACHE_ARCHIVE:-}" && -d "$JAX_COMPILATION_CACHE_DIR" ]]; then
  CACHE_TGZ=$(mktemp -d)/st_jax_cache.tgz
  tar -C "$(dirname "$JAX_COMPILATION_CACHE_DIR")" -czf "$CACHE_TGZ" "$(basename "$JAX_COMPILATION_CACHE_DIR")" \
    && mv "$CACHE_TGZ" "$OUT/"
  size=$(( $(stat -c %s "$OUT/st_jax_cache.tgz") / 1048576 ))
  echo "compilation cache archive: ${size} MiB$( (( size > 48 )) && echo ' (too large to carry beside the tree)')"
fi
ls -la "$OUT"

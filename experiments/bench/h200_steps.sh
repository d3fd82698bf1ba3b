#!/usr/bin/env bash
# Issue 12's H200 measurements in one device call: the GDN kernel check, the LM-head loss variants, the step-only
# remat comparison and the full per-part breakdown of the four 400M presets. Every part has its own timeout and
# writes to $OUT as it finishes (a time-out keeps what was done).  Usage (on the device): [PACK=$OUT/r.tgz OUT=/tmp/r] bash experiments/bench/h200_steps.sh PART...
# Never end a device command with `pkill -f python3`: the pattern matches the command's own shell and kills it.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=${B:-8}; S=${S:-4096}
run() {  # run NAME SECONDS CMD...: stdout+stderr to $OUT/NAME.log, status line to $OUT/status.txt
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? ${SECONDS}s-$start" | awk '{print}' >> "$OUT/status.txt"
  tail -25 "$OUT/$name.log"
  pack
}
with_base() {  # with_base CMD...: CMD with each file of AB_BASE copied over the same-position file of AB_PATH, then restored
  # AB_PATH / AB_BASE: space-separated lists of equal length (repository files / files shipped beside the tree, e.g.
  # AB_PATH="m2rnn_jax/layers/mlp.py" AB_BASE="ab_base/mlp.py"; ab_base/ is never committed)
  local paths=(${AB_PATH:-}) bases=(${AB_BASE:-}) i
  [ ${#paths[@]} -gt 0 ] && [ ${#paths[@]} -eq ${#bases[@]} ] || { echo "ab: AB_PATH and AB_BASE: lists of equal length"; return 1; }
  for i in "${!paths[@]}"; do [ -f "${paths[$i]}" ] && [ -f "${bases[$i]}" ] || { echo "ab: no file ${paths[$i]} or ${bases[$i]}"; return 1; }; done
  local keep; keep=$(mktemp -d)
  for i in "${!paths[@]}"; do cp "${paths[$i]}" "$keep/$i"; cp "${bases[$i]}" "${paths[$i]}"; done
  "$@"
  for i in "${!paths[@]}"; do cp "$keep/$i" "${paths[$i]}"; done
}
pack() {  # PACK=FILE: everything so far in one archive after every part (the device returns few files; a time-out keeps it)
  if [ -n "${PACK:-}" ]; then tar czf "$PACK.tmp" -C "$OUT" . && mv "$PACK.tmp" "$PACK"; fi
}
# donewhen: issue 12's done-when steps in one call (~390 s on an H100, session 25): the two hybrids, m2rnn-400m,
# attention-400m, then the 1L hybrid a second time (its MFU sits near the 35% target: two samples)
DONEWHEN="step-hybrid-gdn-m2rnn-1l-400m:none step-hybrid-gdn-400m:none step-m2rnn-400m:none step-attention-400m:none
again-hybrid-gdn-m2rnn-1l-400m:none"
for part in $(for p in "$@"; do if [ "$p" = donewhen ]; then echo $DONEWHEN; else echo "$p"; fi; done); do
  case $part in
    gdn) run gdn 150 env PYTHONPATH=. python3 experiments/bench/gdn_check.py --out "$OUT" --variants default xla_doubling \
           --no-sweep ;;
    mlp) run mlp 90 env PYTHONPATH=. python3 experiments/bench/mlp_check.py --batch "$B" --seq-len "$S" ;;
    inversetests) run inversetests 120 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu \
                    tests/kernels/test_unit_lower_inverse.py tests/kernels/test_gdn_gpu.py ;;
    loss) run loss 200 python3 -m m2rnn_jax.bench.loss --chunk-sizes 2048 4096 --statistics two_pass pallas_gpu \
            fused_matmul --json "$OUT/loss.json" ;;
    tiles) # one chunk's logits GEMM: XLA's (float32 logits) and the fused_matmul kernel's launch configurations
           run tiles 150 python3 -m m2rnn_jax.bench.loss --kernel-rows 2048 --json "$OUT/tiles.json" --tile-configs \
             128x128x64x4x3 128x128x64x8x3 128x256x64x8x3 256x128x64x8x3 128x128x64x4x4 64x256x64x4x3 \
             128x256x32x8x4 128x128x32x4x4 64x128x64x4x4 ;;
    tilesloss) # the whole loss with the fastest configuration of the tiles part (TILES=CFG overrides)
           best=${TILES:-$(python3 -c "import json; rows = json.load(open('$OUT/tiles.json'))['rows']
print(min((r for r in rows if r['variant'] == 'fused_matmul'), key=lambda r: r['with_exp_ms'])['config'])")}
           run tilesloss 120 python3 -m m2rnn_jax.bench.loss --chunk-sizes 2048 4096 --statistics fused_matmul \
             --fused-tiles "$best" --json "$OUT/tilesloss.json" ;;
    lossprofile) # where the loss's forward+backward device time goes, per source line, two_pass beside fused_matmul
           run lossprofile 200 python3 -m m2rnn_jax.bench.loss --chunk-sizes 4096 --statistics two_pass fused_matmul \
             --profile /tmp/lossprofile --json "$OUT/lossprofile.json" ;;
    logits16) # the loss with the logits written in bfloat16 (as the plain head does) beside float32 and fused_matmul
           run logits16 300 python3 -m m2rnn_jax.bench.loss --chunk-sizes 2048 4096 --statistics two_pass pallas_gpu \
             fused_matmul --logits-dtypes float32 bfloat16 --json "$OUT/logits16.json" ;;
    logits16tests) # the gpu tests of the bf16-logits paths (target shape vs the plain head; the statistics kernel)
           run logits16tests 240 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu \
             tests/models/test_lm_head_loss.py tests/kernels/test_softmax_xent_gpu.py -k "fused_kernels or compiled" ;;
    logits16profile) # per source line: two_pass and pallas_gpu with bfloat16 logits, 4096-token chunks
           run logits16profile 200 python3 -m m2rnn_jax.bench.loss --chunk-sizes 4096 --statistics two_pass pallas_gpu \
             --logits-dtypes bfloat16 --profile /tmp/logits16profile --json "$OUT/logits16profile.json" ;;
    oneread) # the loss with the one-read statistics (D over the logits, in place) beside pallas_gpu, bf16 logits
           run oneread 240 python3 -m m2rnn_jax.bench.loss --chunk-sizes 4096 8192 --statistics pallas_gpu one_read \
             --logits-dtypes bfloat16 --json "$OUT/oneread.json" ;;
    lossdefault) # the loss as the presets run it on an NVIDIA GPU (auto = one_read) beside pallas_gpu, each at its default chunk
           run lossdefault 150 python3 -m m2rnn_jax.bench.loss --statistics pallas_gpu one_read \
             --logits-dtypes bfloat16 --json "$OUT/lossdefault.json" ;;
    onereadtests) # the gpu tests of the one-read path (the kernel with a reference; the target shape vs the plain head)
           run onereadtests 240 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu \
             tests/models/test_lm_head_loss.py tests/kernels/test_softmax_xent_gpu.py -k "reference or one_read" ;;
    onereadsweep) # one chunk's statistics: the two-pass kernel beside the one-read kernel's launch configurations
           run onereadsweep 150 python3 -m m2rnn_jax.bench.loss --kernel-rows 4096 --logits-dtypes bfloat16 \
             --kernel-configs 4x2048x8x2 --one-read-configs 1x2048x4x2 1x1024x4x2 2x1024x4x2 2x2048x8x2 1x4096x8x2 \
             --json "$OUT/onereadsweep.json" ;;
    onereadprofile) # per source line: pallas_gpu and one_read with bfloat16 logits, each at its default chunk
           run onereadprofile 200 python3 -m m2rnn_jax.bench.loss --statistics pallas_gpu one_read \
             --logits-dtypes bfloat16 --profile /tmp/onereadprofile --json "$OUT/onereadprofile.json" ;;
    tilestests) run tilestests 300 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu \
                  tests/kernels/test_logits_softmax_tiles.py tests/models/test_lm_head_loss.py tests/kernels/test_gdn_gpu.py ;;
    steps) for preset in hybrid-gdn-m2rnn-1l-400m hybrid-gdn-400m; do for remat in full save_dots none; do
             run "step_${preset}_${remat}" 150 python3 -m m2rnn_jax bench --model "$preset" --batch "$B" --seq-len "$S" \
               --remat "$remat" --step-only --iters 5 --repeats 3 --json "$OUT/step_${preset}_${remat}.json"
           done; done ;;
    step-*) spec=${part#step-}; preset=${spec%:*}; remat=${spec##*:}  # step-PRESET:REMAT, one step-only run
           # STEP_ARGS: more bench arguments (e.g. "--head-statistics pallas_gpu"), TAG: a suffix of the file names
           run "step_${preset}_${remat}${TAG:-}" 170 python3 -m m2rnn_jax bench --model "$preset" --batch "$B" \
             --seq-len "$S" --remat "$remat" --step-only --iters 5 --repeats 3 ${STEP_ARGS:-} \
             --json "$OUT/step_${preset}_${remat}${TAG:-}.json" ;;
    again-*) TAG="${TAG:-}_again" bash "$0" "step-${part#again-}" ;;  # step-PRESET:REMAT once more, files tagged _again
    ab-*) spec=${part#ab-}  # step-PRESET:REMAT with the tree's files (TAG _new), then with AB_BASE's (_base; with_base)
           TAG=_new bash "$0" "step-$spec"
           TAG=_base with_base bash "$0" "step-$spec" ;;
    base-*) spec=${part#base-}  # only the second half of ab-: the step with AB_BASE's files (_base), when another
           # part of the same call already timed the tree's (e.g. stageab's _xla)
           TAG=_base with_base bash "$0" "step-$spec" ;;
    gdntests) run gdntests 300 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu tests/kernels/test_gdn_gpu.py ;;
    gdnc-*) chunk=${part#gdnc-}  # gdnc-C: the GDN op check at chunk length C (default kernels and the sweep, no resets)
           mkdir -p "$OUT/gdn_c$chunk"
           run "gdn_c$chunk" 240 env PYTHONPATH=. python3 experiments/bench/gdn_check.py --out "$OUT/gdn_c$chunk" \
             --chunk "$chunk" --variants default --no-resets ;;
    gdnfused) # the GDN op with the XLA stages beside each fused one and all fused (errors vs float32, fwd and fwd+bwd
              # ms), then the compiled GPU tests of every fused stage
           mkdir -p "$OUT/gdn_fused"
           run gdn_fused 240 env PYTHONPATH=. python3 experiments/bench/gdn_check.py --out "$OUT/gdn_fused" \
             --variants default xla_stages fused_local fused_local_bwd fused_outputs fused_walk fused_all --no-sweep --no-resets
           run gdnfusedtests 300 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu \
             tests/kernels/test_gdn_gpu.py -k fused_stages ;;
    convt) # the conv backends: the compiled GPU tests (pallas_gpu and pallas_gpu_transpose), then norm_conv_check
           # (reference, jnp, both kernel backends, and the norms) at the GDN conv's shape
           run convtests 240 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu \
             tests/kernels/test_causal_conv_gpu.py
           run convcheck 200 python3 -m experiments.bench.norm_conv_check --batch "$B" --seq-len "$S" --dtype bfloat16 ;;
    gdnsweep) # gdn_check's breakdown alone: each stage, XLA's and the kernels', and every kernel's launch sweep
           mkdir -p "$OUT/gdn_sweep"
           run gdn_sweep 330 env PYTHONPATH=. python3 experiments/bench/gdn_check.py --out "$OUT/gdn_sweep" \
             --variants --no-resets --no-reference-timing ;;
    stageab-*) spec=${part#stageab-}  # stageab-PRESET:REMAT: the step for each GDN stage choice in $STAGES (default
           # "xla all"): pallas_gpu.py's FUSED_BY_DEFAULT set to the named stages (local, local_backward (with local
           # only), outputs, walk_cotangents, joined by +; "all": the four; "xla": none) for that run; files _STAGE
           f=m2rnn_jax/ops/gated_delta_rule/pallas_gpu.py; keep=$(mktemp); cp "$f" "$keep"
           line='^FUSED_BY_DEFAULT: frozenset\[str\] = frozenset(.*)$'
           for stage in ${STAGES:-xla all}; do
             names=${stage//+/ }; [ "$stage" = all ] && names="local local_backward outputs walk_cotangents"
             [ "$stage" = xla ] && names=""
             cp "$keep" "$f"; ok=1; set_=""
             for name in $names; do
               case $name in local|local_backward|outputs|walk_cotangents) set_="$set_\"$name\", ";; *) ok=0;; esac
             done
             value="frozenset()"; [ -n "$set_" ] && value="frozenset({${set_%, }})"
             sed -i -E "s/$line/FUSED_BY_DEFAULT: frozenset[str] = $value/" "$f"
             if [ $ok = 1 ] && grep -qF "FUSED_BY_DEFAULT: frozenset[str] = $value" "$f"; then
               TAG=_${stage//+/_} bash "$0" "step-$spec"
             else echo "stageab: $stage: expected xla, all, or local / local_backward / outputs / walk_cotangents joined by +, and a FUSED_BY_DEFAULT line in $f" | tee -a "$OUT/status.txt"; fi
           done
           cp "$keep" "$f" ;;
    gdnab) # the GDN op check with the tree's files (gdn_new/, with the kernel-config sweep), then with AB_BASE's (gdn_base/)
           mkdir -p "$OUT/gdn_new" "$OUT/gdn_base"
           run gdn_new 240 env PYTHONPATH=. python3 experiments/bench/gdn_check.py --out "$OUT/gdn_new" --variants default
           with_base run gdn_base 150 env PYTHONPATH=. python3 experiments/bench/gdn_check.py --out "$OUT/gdn_base" \
             --variants default --no-sweep --no-resets ;;
    flags-*) spec=${part#flags-}; preset=${spec%:*}; remat=${spec##*:}  # flags-PRESET:REMAT: the step under XLA_FLAGS=$STEP_FLAGS
           run "step_${preset}_${remat}_flags" 170 env XLA_FLAGS="${STEP_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
             python3 -m m2rnn_jax bench --model "$preset" --batch "$B" --seq-len "$S" --remat "$remat" --step-only \
             --iters 5 --repeats 3 --json "$OUT/step_${preset}_${remat}_flags.json" ;;
    lm_table) run lm_table 560 python3 -m experiments.lm_table.run --data data/gutenberg --out "$OUT/lm_table" ;;
    parts-*) preset=${part#parts-}
           run "parts_$preset" 300 python3 -m m2rnn_jax bench --model "$preset" --batch "$B" --seq-len "$S" \
             --iters 5 --repeats 3 --json "$OUT/parts_$preset.json" ;;
    profile-*) preset=${part#profile-}  # where the step's device time goes (per source line of the model code)
           run "profile_$preset" 240 env XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m m2rnn_jax.bench.step_profile --model "$preset" --batch "$B" --seq-len "$S" \
             --steps 3 --top 60 --out "/tmp/profile_$preset" --json "$OUT/profile_$preset.json"
           tar czf "$OUT/profile_${preset}_raw.tgz" -C "/tmp/profile_$preset" train_step.hlo.txt.gz kernels.json.gz
           pack ;;  # again, with the raw profile (session 11's archive was packed before it and lacked it)
    compile-*) spec=${part#compile-}; preset=${spec%:*}; remat=${spec##*:}  # compile-PRESET:REMAT, nothing run
           # STEP_ARGS / TAG as for step-* (e.g. STEP_ARGS=--scan-layers TAG=_scan)
           run "compile_${preset}_${remat}${TAG:-}" 300 python3 -m m2rnn_jax bench --model "$preset" \
             --batch "${CB:-1}" --seq-len "$S" --remat "$remat" --compile-only ${STEP_ARGS:-} \
             --json "$OUT/compile_${preset}_${remat}${TAG:-}.json" ;;
    compilewarm-*) spec=${part#compilewarm-}  # compile-PRESET:REMAT twice, in two processes sharing a fresh
           # --compile-cache: the cold compile, then the warm one (a restarted run's); TAG gets _cold / _warm
           rm -rf /tmp/compilewarm_cache
           for round in cold warm; do
             TAG="${TAG:-}_$round" STEP_ARGS="${STEP_ARGS:-} --compile-cache /tmp/compilewarm_cache" bash "$0" "compile-$spec"
           done ;;
    compilelog-*) spec=${part#compilelog-}; preset=${spec%:*}; remat=${spec##*:}  # compile-PRESET:REMAT with XLA's pass log
           # (TF_CPP_VMODULE, TAG gets _log), then where XLA's time went (experiments/bench/xla_pass_times.py)
           name="compile_${preset}_${remat}${TAG:-}_log"
           TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1,gpu_compiler=1,nvptx_compiler=1 TAG="${TAG:-}_log" \
             bash "$0" "compile-$spec"
           python3 experiments/bench/xla_pass_times.py "$OUT/$name.log" --top 30 > "$OUT/${name}_passes.txt" 2>&1
           gzip -f "$OUT/$name.log"; head -80 "$OUT/${name}_passes.txt"; pack ;;
    optimizer) run optimizer 150 env PYTHONPATH=. python3 experiments/bench/optimizer_check.py ;;
    embedding) run embedding 60 env PYTHONPATH=. python3 experiments/bench/embedding_check.py ;;
    normconv) run normconv 100 python3 -m experiments.bench.norm_conv_check --batch "$B" --seq-len "$S" --dtype bfloat16 ;;
    vjptests) run vjptests 90 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider tests/layers/test_conv_vjp.py \
                tests/layers/test_norm_vjp.py -k shard_map ;;
    kerneltests) # the compiled kernels against their references (the interpret-mode tests run in CI), then the conv
                 # layer's tests with the fused kernels selected
                 run kerneltests 120 python3 -m pytest -n 0 -q -p no:randomly -p no:cacheprovider -m gpu \
                   tests/kernels/test_causal_conv_gpu.py tests/kernels/test_softmax_xent_gpu.py
                 run convlayertests 90 env M2RNN_JAX_CONV_BACKEND=pallas_gpu python3 -m pytest -n 0 -q -p no:randomly \
                   -p no:cacheprovider tests/layers/test_conv_vjp.py ;;
    convsweep) run convsweep 120 python3 -m experiments.bench.norm_conv_check --batch "$B" --seq-len "$S" \
                --dtype bfloat16 --conv-configs 32,128,64,4,1 8,128,64,8,1 16,128,32,4,1 32,128,16,8,1 4,128,128,4,1 \
                4,256,128,8,1 8,128,32,8,1 8,128,64,8,2 ;;
    losssweep) run losssweep 120 python3 -m m2rnn_jax.bench.loss --kernel-configs 2x2048x4x2 1x4096x4x2 4x2048x8x2 \
                8x2048x8x2 8x1024x4x2 2x2048x4x3 16x1024x8x2 --json "$OUT/softmax_xent_sweep.json" ;;
    smoke) run smoke 150 env PYTHONPATH=. python3 experiments/bench/gpu_smoke.py ;;
    gputests) run gputests 200 python3 -m pytest -n 0 -m gpu -q -x -p no:randomly tests/kernels/test_gdn_gpu.py tests/bench \
                tests/models/test_lm_head_loss.py ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done

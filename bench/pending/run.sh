#!/usr/bin/env bash
# The GPU measurements still pending, in parts that each fit one device call, from the package
# bench/pending/stage.sh leaves in .gpu/pending/ (carry it). From the repository root:
#   PARTS="decode attn_tests" bash bench/pending/run.sh
# Waiting for a GPU since 2026-12-08 (the opt-in paths written that day, and the defaults of
# 2026-12-07 that no whole-suite run has covered), in this order, each line one call:
#   PARTS="tma64 attnall"      PARTS="biasones gentests"
# Parts (each step capped by `timeout`; seconds are the caps, the usual run is shorter):
#   decode      (about 240 s) bench/generate/run_gpu_layer3.sh over the fused, attnproj and layer3
#               paths, each also with FLASHGPT_DECODE_L2_AHEAD=1 (docs/generate.md)
#   attnall     (at most 240 s) the whole attention_cuda_test, the kernels chosen as in use
#               (ATTN_FILTER: a gtest filter for part of it)
#   attn_tests  (about 170 s) the TMA backward forced (pipeline shapes, against the wgmma kernel),
#               the fused dQ convert's tests and the backward tests with it on, memcheck of both
#   attn_bench  (about 250 s) `flashgpt bench attention` up to s 4096 with the separate and the
#               fused dQ convert (wgmma and TMA backwards each), cuDNN's backward on the same
#               rows, and the joined tables (docs/attention_gpu.md)
#   tiles128    (about 180 s) the d128 TMA forward's tiles (kTma128Tiles; TILES128, default "0 1 2 3
#               4"): their pipeline-shape tests, `flashgpt bench attention` d128 forward rows under
#               FLASHGPT_ATTN_TMA128_TILE=k for each (validated first), cuDNN's forward on the same
#               rows, and the joined table tiles128.md (docs/attention_gpu.md)
#   tiles64     (about 30 s a tile) the same for the d64 tiles (kTma64Tiles; TILES64, default "3 5
#               6 7 8": the default, and the overlap tiles), tiles64.md
#   dqwarp      (about 150 s, at most 320 s) the TMA backward's dQ warp (FLASHGPT_ATTN_BWD_DQ_WARP=1):
#               its tests and the backward tests under it, memcheck of small shapes through it, `flashgpt bench
#               attention` up to s 4096 (wgmma and TMA without it, TMA with it), cuDNN's backward on
#               the same rows, and the joined table dqwarp.md (docs/attention_gpu.md)
#   switches    (about 400 s) bench/model/ab_switches.sh: the training step's opt-in paths named
#               in SWITCHES ("NAME=VALUE ...") alone and together against the defaults, with
#               their tests, profiles and torch.compile beside them (docs/model_gpu.md)
#   fixes       (about 90 s) the tests of what today's runs found: the decode engines' first call
#               after construction (attnproj, layer3), the attention backward's 1 x 1 reference
#   engine      (about 90 s) every CUDA engine test (generate_inference_cuda_test) with the
#               default decode path, then the seed decode bench at batch 1 and 8, default
#               against FLASHGPT_CUDA_DECODE=fused
#   attnproj    (about 185 s) bench/generate/run_gpu_attnproj.sh: the attnproj decode path at
#               batch 1, 8 and 64 against the fused one (docs/generate.md)
#   overlap     (about 420 s) FLASHGPT_OVERLAP (a second stream for the classifier's softmax, then
#               also the backward's weight products): its tests and memcheck, the seed step at
#               0, 1 (OVERLAP_SMS, softmax multiprocessors; and the products planned for 100) and 2
#               (both backward priorities),
#               interleaved, and torch.compile beside OVERLAP_BEST (docs/model_gpu.md, v9)
#   gentests    (about 100 s) every generate CUDA test, kernels and engines, nothing timed
#   torchdecode (about 200 s) the seed decode at batch 1 and 64 (TORCH_BATCHES=1,8,64 for others)
#               and the 512-token prefill beside bench/generate/torch_static_kv.py, eager and
#               torch.compile with CUDA graphs
#   decodefix   (about 250 s) FLASHGPT_DECODE_LN_LOADS_FIRST and FLASHGPT_DECODE_KEY_GROUP (the
#               batch-64 decode's LayerNorm and attention latency chains, both on by default):
#               their kernel tests, the engine tests, batch 64 and 1 against both off (and
#               each alone, and 16 keys), twice, torch.compile beside the defaults
#   gemvmma     (about 120 s) FLASHGPT_GEMV_MMA=1 (the layer products at 2 .. 8 rows on tensor cores,
#               docs/generate.md): the GEMV kernel tests and the engine tests it touches with it on,
#               then the seed decode at batch 1 (a control: not taken), 2 and 8 with it off and on,
#               interleaved, twice (ms/step)
#   bwdpad      (at most 250 s) the padded wgmma backward of head dims 96 and 32 (FLASHGPT_ATTN_BWD_PADDED=1):
#               its tests (against the fp64 reference and mma.sync, guard columns), memcheck and
#               initcheck of its small shapes, `flashgpt bench attention --head-dim 96` and 32 up to
#               s 4096 with the mma.sync and the padded wgmma backward on the same rows, FA2's
#               backward (torch SDPA) beside them, and the table bwdpad.md (docs/attention_gpu.md)
#   tma64       (about 200 s, at most 275 s) the d64 variant of the TMA backward
#               (FLASHGPT_ATTN_BWD_TMA64_VARIANT=1: 64-query blocks, four stages, two dQ buffers):
#               its tests and BackwardPipelineShapes, TmaBackwardMatchesWgmma under it, memcheck of
#               small shapes through it, `flashgpt bench attention --head-dim 64` s 512 .. 4096
#               causal and not plus the model shape (64 x 12, s 512, causal, dropout 0.1 and 0) with
#               wgmma and TMA with the switch off and TMA with it on, cuDNN's backward on the same
#               rows, and the joined table tma64.md (docs/attention_gpu.md)
#   biasones    (about 280 s, at most 300 s) FLASHGPT_BIAS_ONES=1 (qkv_b's and fc_b's gradients out of
#               the dW products over ln1 / ln2 stored with a ones column, docs/model_gpu.md): its
#               kernel and product tests, the whole model_cuda_test with it on, then
#               bench/model/ab_switches.sh (until 250 s): the seed step off / on interleaved, twice
#               each, profiled once each (profile_biasones.txt), memcheck of its ops tests, V = 50257
#               off / on where time is left; then model_cuda_test with the defaults
# Everything goes to $OUT: summary.txt (every step's status and figures), the tables
# (decode.txt, bwd_table.md, dq_fused.md, profile.txt, profile_biasones.txt, tiles128.md, tiles64.md, dqwarp.md,
# bwdpad.md, tma64.md) and pending_logs.tgz.
set -uo pipefail
R=$(cd "$(dirname "$0")/../.." && pwd)
PKG=$R/.gpu/pending
OUT=${OUT:-results/pending}
B=/tmp/pending_bins
L=$OUT/logs
S=$OUT/summary.txt
[ -f "$PKG/bins.tar.xz" ] || { echo "no $PKG/bins.tar.xz: run bench/pending/stage.sh first"; exit 1; }
rm -rf "$B"
mkdir -p "$L" "$B"
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
  "$PKG/bins.tar.xz" "$B" || exit 1
source "$R/bench/gpu_libs.sh"
gpu_libs "$B" "$B/flashgpt" || exit 1
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; echo "commit $(cat "$PKG/COMMIT")"; } |
  tee -a "$S"
status=0
# step NAME SECONDS COMMAND...: runs it into $L/NAME.log, then adds its exit status, gtest
# verdict, sanitizer summary, step figures and first failures to the summary.
step() {
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$L/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  { echo "== $name: rc $rc, $((SECONDS - t0)) s $(grep -E '^\[  (PASSED|FAILED)  \]|ERROR SUMMARY' "$L/$name.log" | tail -2 | tr '\n' ' ')"
    grep -oE '"step_ms":[0-9.]+|"tokens_per_s":[0-9.]+|"peak_gib":[0-9.]+' "$L/$name.log" | tr '\n' ' '
    grep -E '^\[  FAILED  \]|Failure|rror:' "$L/$name.log" | head -8; } | tee -a "$S"
}
start=$SECONDS
for part in ${PARTS:-decode attn_tests}; do
  case $part in
    decode)  # the layer3 script, with each path also under the L2-ahead prefetch
      VARIANTS="fused fused+l2ahead attnproj attnproj+l2ahead layer3 layer3+l2ahead" OUT=$OUT/decode DEADLINE=240 \
        bash "$R/bench/generate/run_gpu_layer3.sh" "$B" 2>&1 | tee "$L/decode.log" | grep -E '^(==|\|)' | tee -a "$S"
      cp "$OUT/decode/logs/table.txt" "$OUT/decode.txt" 2>/dev/null ;;
    attnall)  # the whole attention suite with the automatic kernel choice, nothing forced
      step attention_all 240 "$B/attention_cuda_test" --gtest_filter="${ATTN_FILTER:-*}" ;;
    attn_tests)
      step tma_bwd_tests 60 env FLASHGPT_ATTN_BWD_KERNEL=tma "$B/attention_cuda_test" \
        --gtest_filter='*BackwardPipelineShapes*:*TmaBackwardMatchesWgmma*:*ReportsKernels*'
      step dq_fused_tests 60 "$B/attention_cuda_test" --gtest_filter='*FusedDqConvert*'
      step dq_fused_backward_tests 45 env FLASHGPT_ATTN_BWD_FUSED_CONVERT=1 "$B/attention_cuda_test" \
        --gtest_filter='*Backward*:*Deterministic*:*Dropout*:*Gqa*:*Varlen*'
      step memcheck_tma_fused 35 env FLASHGPT_ATTN_BWD_KERNEL=tma FLASHGPT_ATTN_BWD_FUSED_CONVERT=1 \
        compute-sanitizer --tool memcheck --error-exitcode 9 "$B/attention_cuda_test" --gtest_filter='*SmallShapes*' ;;
    attn_bench)
      for fused in 0 1; do
        step bench_attn_fused$fused 90 env FLASHGPT_ATTN_BWD_FUSED_CONVERT=$fused "$B/flashgpt" bench attention \
          --device cuda --max-seqlen 4096 --min-time 0.1 --bwd-kernels wgmma,tma --out "$L/attn_fused$fused"
      done
      step cudnn_bwd 70 python3 "$R/bench/attention_gpu/cudnn_bwd.py" --out "$L/cudnn" --seqlens 512,1024,2048,4096 \
        --min-time-s 0.1 --ours "$L/attn_fused0/attention_cuda.csv"
      sed -n '/^|/p' "$L/cudnn_bwd.log" | tee "$OUT/bwd_table.md"
      python3 "$R/bench/attention_gpu/bwd_fused_table.py" --separate "$L/attn_fused0/attention_cuda.csv" \
        --fused fused="$L/attn_fused1/attention_cuda.csv" 2>&1 | tee "$OUT/dq_fused.md" ;;
    tiles128|tiles64)  # the tests first, then one bench per tile, cuDNN, the table
      if [ "$part" = tiles64 ]; then td=64 tvar=FLASHGPT_ATTN_TMA_TILE tiles=${TILES64:-3 5 6 7 8}; tfilt='*EveryTma64Tile*:*ForwardPipelineShapes*:*ReportsKernels*:-*EveryTma128Tile*'
      else td=128 tvar=FLASHGPT_ATTN_TMA128_TILE tiles=${TILES128:-0 1 2 3 4}; tfilt='*EveryTma128Tile*:*ForwardPipelineShapes*:*ReportsKernels*:-*EveryTma64Tile*'; fi
      step "tiles${td}_tests" 100 env FLASHGPT_ATTN_FWD_KERNEL=tma "$B/attention_cuda_test" --gtest_filter="$tfilt"
      for k in $tiles; do
        step "t${td}_$k" 45 env $tvar=$k "$B/flashgpt" bench attention --device cuda --no-backward \
          --head-dim $td --min-time 0.05 --out "$L/t${td}_$k"
      done
      step "cudnn$td" 60 python3 "$R/bench/attention_gpu/cudnn_fwd.py" --out "$L/cudnn$td" --head-dim $td --min-time-s 0.05
      python3 - "$L" $td $tiles <<'PY' 2>&1 | tee "$OUT/tiles$td.md" | tee -a "$S"
import csv, os, sys
L, td, tiles = sys.argv[1], sys.argv[2], sys.argv[3:]
def load(path, key, value):
    return {key(r): float(r[value]) for r in csv.DictReader(open(path))} if os.path.exists(path) else {}
key = lambda r: (int(r["seqlen"]), int(r["batch"]), int(r["heads"]), int(r["causal"]))
ours = {k: load(f"{L}/t{td}_{k}/attention_cuda.csv", key, "fwd_tflops") for k in tiles}
cudnn = load(f"{L}/cudnn{td}/cudnn_fwd.csv", key, "fwd_tflops")
rows = sorted({r for t in ours.values() for r in t}, key=lambda r: (r[3], r[0]))
print(f"d{td} TMA forward tiles ({'FLASHGPT_ATTN_TMA128_TILE' if td == '128' else 'FLASHGPT_ATTN_TMA_TILE'}=k): TFLOP/s and tile / cuDNN per row\n")
print("| s | b x h | causal | cuDNN | " + " | ".join(f"t{k} | t{k} / cuDNN" for k in tiles) + " | best |")
print("| --- " * (4 + 2 * len(tiles) + 1) + "|")
for r in rows:
    c = cudnn.get(r, float("nan"))
    cells = []
    for k in tiles:
        v = ours[k].get(r)
        cells += [f"{v:.1f}", f"{v / c:.3f}"] if v is not None else ["-", "-"]
    have = {k: ours[k][r] for k in tiles if r in ours[k]}
    best = max(have, key=have.get) if have else "-"
    print(f"| {r[0]} | {r[1]}x{r[2]} | {'yes' if r[3] else 'no'} | {c:.1f} | " + " | ".join(cells) + f" | t{best} |")
PY
      ;;
    dqwarp)  # the tests first, then the bench without and with the dQ warp, cuDNN, the table
      step dqwarp_tests 120 env FLASHGPT_ATTN_BWD_KERNEL=tma FLASHGPT_ATTN_BWD_DQ_WARP=1 "$B/attention_cuda_test" \
        --gtest_filter='*DqWarp*:*BackwardPipelineShapes*:*TmaBackwardMatchesWgmma*:*ReportsKernels*'
      step dqwarp_memcheck 30 env FLASHGPT_ATTN_BWD_KERNEL=tma FLASHGPT_ATTN_BWD_DQ_WARP=1 \
        compute-sanitizer --tool memcheck --error-exitcode 9 "$B/attention_cuda_test" \
        --gtest_filter='*DqWarpForSanitizer*:*SmallShapes*'
      # Without the dQ warp: wgmma and TMA; with it: TMA (its wgmma rows would be the same kernel).
      step bench_dqwarp0 60 env FLASHGPT_ATTN_BWD_DQ_WARP=0 "$B/flashgpt" bench attention --device cuda \
        --max-seqlen 4096 --min-time 0.05 --bwd-kernels wgmma,tma --out "$L/attn_dqwarp0"
      step bench_dqwarp1 50 env FLASHGPT_ATTN_BWD_DQ_WARP=1 "$B/flashgpt" bench attention --device cuda \
        --max-seqlen 4096 --min-time 0.05 --bwd-kernels tma --out "$L/attn_dqwarp1"
      step cudnn_bwd_dqwarp 60 python3 "$R/bench/attention_gpu/cudnn_bwd.py" --out "$L/cudnn_dqwarp" \
        --seqlens 512,1024,2048,4096 --min-time-s 0.05
      python3 "$R/bench/attention_gpu/bwd_ab_table.py" --ours "$L/attn_dqwarp0" "$L/attn_dqwarp1" \
        --cudnn "$L/cudnn_dqwarp" --column "dq-warp TMA=wgmma-tma+dqwarp" --column TMA=wgmma-tma --column wgmma=wgmma \
        --ratio "dq-warp TMA/TMA" --ratio "dq-warp TMA/cuDNN" \
        --title "backward TFLOP/s: the TMA backward with its dQ warp (FLASHGPT_ATTN_BWD_DQ_WARP=1), without, the wgmma
backward and cuDNN (torch SDPA); the dQ warp's ratios to the TMA backward and to cuDNN" 2>&1 |
        tee "$OUT/dqwarp.md" | tee -a "$S"
      ;;
    tma64)  # the tests first, then the bench with the switch off and on, cuDNN, the table
      step tma64_tests 120 env FLASHGPT_ATTN_BWD_TMA64_VARIANT=1 "$B/attention_cuda_test" \
        --gtest_filter='*64Variant*:*BackwardPipelineShapes*:*TmaBackwardMatchesWgmma*:*ReportsKernels*'
      step tma64_memcheck 30 env FLASHGPT_ATTN_BWD_TMA64_VARIANT=1 \
        compute-sanitizer --tool memcheck --error-exitcode 9 "$B/attention_cuda_test" \
        --gtest_filter='*64VariantForSanitizer*'
      # Off: wgmma and the TMA backward with its dQ warp; on: TMA, which is then the variant (its
      # wgmma rows would be the same kernel).
      step bench_tma64v0 45 env FLASHGPT_ATTN_BWD_TMA64_VARIANT=0 "$B/flashgpt" bench attention --device cuda \
        --head-dim 64 --min-seqlen 512 --max-seqlen 4096 --min-time 0.05 --bwd-kernels wgmma,tma --out "$L/attn_tma64v0"
      step bench_tma64v1 35 env FLASHGPT_ATTN_BWD_TMA64_VARIANT=1 "$B/flashgpt" bench attention --device cuda \
        --head-dim 64 --min-seqlen 512 --max-seqlen 4096 --min-time 0.05 --bwd-kernels tma --out "$L/attn_tma64v1"
      step cudnn_bwd_tma64 45 python3 "$R/bench/attention_gpu/cudnn_bwd.py" --out "$L/cudnn_tma64" \
        --seqlens 512,1024,2048,4096 --head-dims 64 --min-time-s 0.05
      python3 "$R/bench/attention_gpu/bwd_ab_table.py" --ours "$L/attn_tma64v0" "$L/attn_tma64v1" \
        --cudnn "$L/cudnn_tma64" --column "variant=wgmma-tma+dqwarp+tma64v" --column "TMA=wgmma-tma+dqwarp" \
        --column wgmma=wgmma --ratio variant/wgmma --ratio variant/TMA --ratio variant/cuDNN --ratio wgmma/cuDNN \
        --title "d64 backward TFLOP/s: the TMA backward's d64 variant (FLASHGPT_ATTN_BWD_TMA64_VARIANT=1), the TMA
backward with its dQ warp, the wgmma backward and cuDNN (torch SDPA); the variant's ratios" 2>&1 |
        tee "$OUT/tma64.md" | tee -a "$S"
      ;;
    switches)
      OUT=$OUT BINS_DIR=$B DEADLINE=${SWITCHES_DEADLINE:-400} bash "$R/bench/model/ab_switches.sh" >"$L/switches.log" 2>&1 || status=1
      cat "$OUT/ab/summary.txt" >>"$S" 2>/dev/null
      grep -E "^(all|default): profile:" "$OUT/ab/summary.txt" >"$OUT/profile.txt" 2>/dev/null ;;
    biasones)  # the tests first (a call cut short keeps them), then the A/B through ab_switches.sh
      t0=$SECONDS
      ops_filter='*BiasOnes*:SplitWeightBiasGrad*:*StridedOutput*:*EntryPointsRejectBadArguments*'
      step biasones_ops_tests 60 "$B/model_cuda_ops_test" --gtest_filter="$ops_filter"
      step biasones_model_tests 120 env FLASHGPT_BIAS_ONES=1 "$B/model_cuda_test"
      OUT=$OUT/biasones BINS_DIR=$B SWITCHES=FLASHGPT_BIAS_ONES=1 OPS_FILTER='-*' MODEL_TESTS=none TORCH_VOCABS=none \
        MEMCHECK_FILTER='SplitWeightBiasGrad*:*StridedOutput*:*BiasOnesProducts*/0:*BiasOnesProducts*/1' \
        DEADLINE=$((250 - (SECONDS - t0))) bash "$R/bench/model/ab_switches.sh" >"$L/biasones.log" 2>&1 || status=1
      cat "$OUT/biasones/ab/summary.txt" >>"$S" 2>/dev/null
      grep -E "^(all|default): profile:" "$OUT/biasones/ab/summary.txt" >"$OUT/profile_biasones.txt" 2>/dev/null
      left=$((300 - (SECONDS - t0))); [ $left -gt 60 ] && left=60
      # The defaults' suite last (the LayerNorm forwards and products it runs took new arguments).
      if [ $left -ge 10 ]; then step biasones_default_tests $left "$B/model_cuda_test"; fi ;;
    fixes)
      step decode_path_tests 60 "$B/generate_inference_cuda_test" \
        --gtest_filter='*AttnProjPathMatchesFused*:*Layer3PathMatchesFused*:*FirstCallRightAfterConstruction*'
      step attn_reference_tests 60 "$B/attention_cuda_test" --gtest_filter='*TmaBackwardMatchesWgmma*:*FusedDqConvert*' ;;
    gentests)  # every generate CUDA test (kernels and engines), nothing timed
      step generate_tests 150 "$B/generate_inference_cuda_test" ;;
    engine)
      step engine_tests 120 "$B/generate_inference_cuda_test"
      for b in 1 8; do
        for r in 1 2; do
          for mode in default fused; do
            local_env=(env); [ $mode = fused ] && local_env=(env FLASHGPT_CUDA_DECODE=fused)
            step "decode_${mode}_b${b}_r$r" 30 "${local_env[@]}" "$B/flashgpt" bench generate --device cuda \
              --preset seed --batch $b --prompt-tokens 128 --new-tokens 256
            grep -h "tokens/s" "$L/decode_${mode}_b${b}_r$r.log" | tail -1 | tee -a "$S"
          done
        done
      done ;;
    attnproj)
      OUT=$OUT/attnproj DEADLINE=185 bash "$R/bench/generate/run_gpu_attnproj.sh" "$B" >"$L/attnproj.log" 2>&1 || status=1
      grep -E '^(==|\|)' "$L/attnproj.log" | tee -a "$S" ;;
    overlap)  # in order of need, so that a call cut short still brings back the first steps
      step overlap_tests 90 "$B/model_cuda_test" --gtest_filter='*Overlap*'
      step overlap_all_tests 90 env FLASHGPT_OVERLAP=2 "$B/model_cuda_test"
      step overlap_ops_tests 60 "$B/model_cuda_ops_test" --gtest_filter='*Classifier*'
      seed=(bench train --vocab 100277 --batch 64 --context 512 --warmup 3 --steps 10)
      variants() {  # round
        step "seed_o0_r$1" 40 "$B/flashgpt" "${seed[@]}"
        for sms in ${OVERLAP_SMS:-16 48}; do
          step "seed_o1_s${sms}_r$1" 40 env FLASHGPT_OVERLAP=1 FLASHGPT_OVERLAP_SOFTMAX_SMS=$sms "$B/flashgpt" "${seed[@]}"
        done
        step "seed_o1_s32_g100_r$1" 40 env FLASHGPT_OVERLAP=1 FLASHGPT_OVERLAP_GEMM_SMS=100 "$B/flashgpt" "${seed[@]}"
        for prio in low high; do
          step "seed_o2_${prio}_r$1" 40 env FLASHGPT_OVERLAP=2 FLASHGPT_OVERLAP_BWD_PRIORITY=$prio "$B/flashgpt" "${seed[@]}"
        done
      }
      variants 1
      step torch_compile 130 env ${OVERLAP_BEST:-FLASHGPT_OVERLAP=2} python3 "$R/bench/model/torch_gpt.py" \
        --flashgpt "$B/flashgpt" --vocab 100277 --skip-eager --out "$L/torch_compile.json"
      sed -n '/^seed preset/,$p' "$L/torch_compile.log" | tee -a "$S"
      variants 2
      step overlap_memcheck 120 env FLASHGPT_OVERLAP=2 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$B/model_cuda_test" --gtest_filter='*OverlapGivesTheSameBits*' ;;
    torchdecode)  # our seed decode beside the PyTorch static-cache loop, eager and compiled
      step torch_decode 240 python3 "$R/bench/generate/torch_static_kv.py" --flashgpt "$B/flashgpt" \
        --batches "${TORCH_BATCHES:-1,64}" --out "$OUT/torch_decode.json"
      grep -E '^(\||batch|prefill|torch)' "$L/torch_decode.log" | tee -a "$S" ;;
    decodefix)  # the batched decode's two latency fixes, in order of need (a call cut short keeps the first)
      step decodefix_kernels 90 "$B/generate_inference_cuda_test" --gtest_filter='*ResidualLayerNorm*:*AttentionDecodeCuda*'
      decodefix_round() {
        local old="FLASHGPT_DECODE_LN_LOADS_FIRST=0 FLASHGPT_DECODE_KEY_GROUP=4"  # both fixes off
        for v in "old 64 $old" "ln_kg8 64" "kg8 64 FLASHGPT_DECODE_LN_LOADS_FIRST=0" \
                 "ln 64 FLASHGPT_DECODE_KEY_GROUP=4" "ln_kg16 64 FLASHGPT_DECODE_KEY_GROUP=16" "old 1 $old" \
                 "ln_kg8 1"; do
          set -- $v  # name, batch, switches (none: the defaults, the loads-first LayerNorm and 8 keys)
          step "decodefix_$1_b$2_r$r" 40 env "${@:3}" "$B/flashgpt" bench generate --device cuda --preset seed \
            --batch "$2" --prompt-tokens 128 --new-tokens 256
          grep -ohE '[0-9.]+ tokens/s \([0-9.]+ ms/step|measured [0-9.]+%' "$L/decodefix_$1_b$2_r$r.log" | tr '\n' ' ' |
            tee -a "$S"; echo | tee -a "$S"
        done
      }
      r=1 decodefix_round
      step decodefix_engine 120 "$B/generate_inference_cuda_test" --gtest_filter='InferenceCuda.*:-*Persistent*'
      r=2 decodefix_round
      step decodefix_torch 150 python3 "$R/bench/generate/torch_static_kv.py" --flashgpt "$B/flashgpt" --batches 1,64 \
        --out "$OUT/torch_decode_fix.json"
      grep -E '^(\||batch|prefill|torch)' "$L/decodefix_torch.log" | tee -a "$S" ;;
    gemvmma)  # its tests first (a call cut short keeps them), then the A/B
      step gemvmma_tests 75 env FLASHGPT_GEMV_MMA=1 "$B/generate_inference_cuda_test" \
        --gtest_filter='GemvFusedCuda.*:InferenceCuda.GemvMma*:InferenceCuda.FusedPathMatchesSeparateKernels'
      for r in 1 2; do
        for b in 1 2 8; do
          for v in 0 1; do
            step "gemvmma${v}_b${b}_r$r" 20 env FLASHGPT_GEMV_MMA=$v "$B/flashgpt" bench generate --device cuda \
              --preset seed --batch $b --prompt-tokens 128 --new-tokens 256
            { echo -n "mma=$v batch $b round $r: "
              grep -ohE '[0-9.]+ tokens/s \([0-9.]+ ms/step|measured [0-9.]+%' "$L/gemvmma${v}_b${b}_r$r.log" |
                tr '\n' ' '; echo; } | tee -a "$S"
          done
        done
      done ;;
    bwdpad)  # the tests and sanitizers first, then mma.sync and the padded wgmma backward per head dim, FA2
      step bwdpad_tests 75 env FLASHGPT_ATTN_BWD_PADDED=1 "$B/attention_cuda_test" \
        --gtest_filter='*PaddedWgmmaBackward*:*PaddedBackwardForSanitizer*:*ReportsKernels*:*SmallShapes*'
      for tool in memcheck initcheck; do
        step "bwdpad_$tool" 30 env FLASHGPT_ATTN_BWD_PADDED=1 compute-sanitizer --tool $tool --error-exitcode 9 \
          "$B/attention_cuda_test" --gtest_filter='*PaddedBackwardForSanitizer*'
      done
      for d in 96 32; do
        step "bwdpad_d$d" 35 env FLASHGPT_ATTN_BWD_PADDED=1 "$B/flashgpt" bench attention --device cuda --head-dim $d \
          --max-seqlen 4096 --min-time 0.05 --bwd-kernels mma_sync,wgmma --out "$L/bwdpad_d$d"
      done
      step bwdpad_fa2 45 python3 "$R/bench/attention_gpu/fa2_bwd.py" --out "$L/bwdpad_fa2" --head-dims 96,32 \
        --seqlens 512,1024,2048,4096 --min-time-s 0.05
      python3 - "$L" <<'PY' 2>&1 | tee "$OUT/bwdpad.md" | tee -a "$S"
import csv, os, sys
L = sys.argv[1]
key = lambda r: (int(r["head_dim"]), int(r["causal"]), int(r["seqlen"]), int(r["batch"]), int(r["heads"]))
ours = {}  # (key, kernel) -> bwd TFLOP/s
for d in (96, 32):
    path = f"{L}/bwdpad_d{d}/attention_cuda.csv"
    for r in csv.DictReader(open(path)) if os.path.exists(path) else []:
        ours[(key(r), r["bwd_kernel"])] = float(r["bwd_tflops"])
path = f"{L}/bwdpad_fa2/fa2_bwd.csv"
fa2 = {}
for r in csv.DictReader(open(path)) if os.path.exists(path) else []:
    if r["bwd_tflops"]:
        fa2[key(r)] = float(r["bwd_tflops"])
print("Backward TFLOP/s, bf16: the padded wgmma backward (FLASHGPT_ATTN_BWD_PADDED=1) against mma.sync and FA2\n")
print("| d | causal | s | b x h | padded wgmma | mma.sync | FA2 | padded / mma.sync | padded / FA2 | mma.sync / FA2 |")
print("| --- " * 10 + "|")
nan = float("nan")
for k in sorted({k for k, _ in ours}, key=lambda k: (-k[0], k[1], k[2])):
    p, m, f = ours.get((k, "wgmma"), nan), ours.get((k, "mma.sync"), nan), fa2.get(k, nan)
    print(f"| {k[0]} | {'yes' if k[1] else 'no'} | {k[2]} | {k[3]}x{k[4]} | {p:.1f} | {m:.1f} | {f:.1f} | "
          f"{p / m:.3f} | {p / f:.3f} | {m / f:.3f} |")
PY
      ;;
    *) echo "unknown part '$part' (decode, attnall, attn_tests, attn_bench, tiles128, tiles64, dqwarp, bwdpad," \
         "switches, biasones, fixes, engine, attnproj, overlap, gentests, torchdecode, decodefix, gemvmma, tma64)"; status=1 ;;
  esac
  echo "== part $part done at $((SECONDS - start)) s" | tee -a "$S"
done
tar -czf "$OUT/pending_logs.tgz" -C "$OUT" logs $(cd "$OUT" && ls -d decode ab attnproj biasones 2>/dev/null) &&
  rm -rf "$L" "$OUT/decode" "$OUT/ab" "$OUT/attnproj" "$OUT/biasones"
exit $status

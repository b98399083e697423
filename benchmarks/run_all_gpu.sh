#!/usr/bin/env bash
# The project's GPU measurements and tests on a 2-GPU host in one call, each part under a time
# limit, everything packed into one archive (for machines that return only a few files).
#
#   OUT=DIR bash benchmarks/run_all_gpu.sh SECONDS PART...
#
# Parts (durations seen on 2 H200s): multi (2-GPU training check, both GPUs, ~80 s) runs first;
# then two chains in parallel, GPU 0: kernels (benchmark + tile variants, ~250 s), tests
# (tests/pallas_kernels/test_gpu.py: 7 of 8 tests in 360 s at 4d5fb60; the window suite alone
# has since taken over 200 s); GPU 1: decode (~120-240 s), train (throughput, ~460 s for 3
# attentions x 3 lengths). A 10-minute call fits "kernels decode" or "kernels tests train" with
# the tests split over calls by TEST_ARGS.
# KERNELS_PRE_ARGS runs the kernel benchmark once more before the main run (a sweep, say);
# KERNELS_S is the kernel benchmark's time limit when tests follow it (a third of the call);
# DECODE_S is the decode benchmark's time limit (200 s), DECODE_ARGS more of its arguments; TEST_K is the GPU tests' -k expression
# and TEST_ARGS more pytest words (e.g. TEST_K="window and bfloat16" TEST_ARGS="--timeout 150":
# the suite has one test per case and dtype). Part tests1 runs the tests TEST1_K selects on
# GPU 1 before decode and train: the whole file takes over 10 minutes on one GPU, so split it,
# e.g. TEST_K="window or compressed" TEST1_K="not (window or compressed)".
# KERNELS_ARGS replaces the kernel benchmark's size/variant arguments, TRAIN_ARGS is added to
# the throughput run's (e.g. TRAIN_ARGS="--set model.num_kv_heads=1 --seq-lens 32768,65536");
# part train0 runs it on GPU 0 after the kernel parts, into TRAIN0_OUT (train.json).
# Writes DIR/results.tar.gz (result JSON/Markdown/PNG and every log) and DIR/summary.txt.
set -u
TOTAL=${1:?seconds}
shift
PARTS=" $* "
OUT=${OUT:?set OUT to a directory}
COMMIT=${NSA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NSA_COMMIT=$COMMIT XLA_PYTHON_CLIENT_PREALLOCATE=false
R=$OUT/results
mkdir -p "$R"
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) - 20 )); }
has() { [[ "$PARTS" == *" $1 "* ]]; }

nvidia-smi -L > "$R/devices.txt" 2>&1
if has multi; then
  timeout 120 python benchmarks/train.py --mode multi_gpu --check-seq-len 4096 --reps 5 \
      --out "$R/train_multi_gpu.json" > "$R/train_multi_gpu.log" 2>&1
  echo "multi_gpu rc=$?" >> "$R/train_multi_gpu.log"
fi
(
  if has kernels && [ -n "${KERNELS_PRE_ARGS:-}" ]; then  # e.g. a sweep before the main run
    mkdir -p "$R/pre"
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=0 timeout 200 python benchmarks/kernels.py --out "$R/pre" \
        $KERNELS_PRE_ARGS --commit "$COMMIT" > "$R/kernels_pre.log" 2>&1
    echo "kernels_pre rc=$?" >> "$R/kernels_pre.log"
  fi
  if has kernels; then
    lim=$(left); has tests && lim=${KERNELS_S:-$(( lim / 3 ))}
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=0 timeout "$lim" python benchmarks/kernels.py --out "$R" \
        ${KERNELS_ARGS:---seq 8192 16384 32768 65536 --dk192 16384 --reps 5 --variants} \
        --commit "$COMMIT" > "$R/kernels.log" 2>&1
    echo "kernels rc=$?" >> "$R/kernels.log"
  fi
  if has tests; then
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=0 timeout "$(left)" python -m pytest -v --tb=short --durations=15 \
        -p no:cacheprovider tests/pallas_kernels/test_gpu.py ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-} \
        > "$R/test_gpu.log" 2>&1
    echo "pytest rc=$?" >> "$R/test_gpu.log"
  fi
  if has train0; then  # the throughput run on GPU 0 instead (TRAIN0_OUT names its JSON)
    lim=$(left)
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=0 timeout "$lim" python benchmarks/train.py --mode throughput \
        --budget-s $(( lim - 60 )) --out "$R/${TRAIN0_OUT:-train.json}" ${TRAIN_ARGS:-} \
        > "$R/train0.log" 2>&1
    echo "train0 rc=$?" >> "$R/train0.log"
  fi
) &
(
  if has tests1; then  # a second share of the GPU tests on GPU 1 (TEST1_K), before decode/train
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=1 timeout "$(left)" python -m pytest -v --tb=short --durations=15 \
        -p no:cacheprovider tests/pallas_kernels/test_gpu.py ${TEST1_K:+-k "$TEST1_K"} \
        ${TEST_ARGS:-} > "$R/test_gpu1.log" 2>&1
    echo "pytest1 rc=$?" >> "$R/test_gpu1.log"
  fi
  if has decode; then
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=1 timeout "${DECODE_S:-200}" python benchmarks/decode.py --out "$R" \
        --commit "$COMMIT" --budget-s $(( ${DECODE_S:-200} - 60 )) ${DECODE_ARGS:-} \
        > "$R/decode.log" 2>&1
    echo "decode rc=$?" >> "$R/decode.log"
  fi
  if has train; then
    lim=$(left)
    CUDA_VISIBLE_DEVICES=1 timeout "$lim" python benchmarks/train.py --mode throughput \
        --seq-lens 32768,65536,8192 --budget-s $(( lim - 80 )) --out "$R/train.json" \
        ${TRAIN_ARGS:-} > "$R/train.log" 2>&1
    echo "train rc=$?" >> "$R/train.log"
  fi
) &
wait

{
  echo "commit $COMMIT, parts:$PARTS $(( $(date +%s) - START )) s"
  grep -h "rc=" "$R"/*.log
  grep -hE "^check" "$R/kernels.log"
  grep -hE "^T=.*(nsa|cudnn_dense) +(fwd|fwdbwd) " "$R/kernels.log"
  grep -hE "^variant" "$R/kernels_pre.log" "$R/kernels.log"
  grep -hE " (passed|failed)" "$R/test_gpu.log" "$R/test_gpu1.log" | tail -6
  grep -hE "^(check|stage|  sweep)" "$R/decode.log"
  tail -20 "$R/decode.log"
  grep -h '"name"' "$R/train.log" "$R/train0.log" | cut -c1-160
  grep -hE "^(1 device|data=2|fsdp=2|tensor=2)" "$R/train_multi_gpu.log"
} > "$OUT/summary.txt" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$OUT" results
rm -rf "$R"
cat "$OUT/summary.txt"

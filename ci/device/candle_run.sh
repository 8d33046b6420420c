#!/usr/bin/env bash
# The candle adapter and the sharded Llama on the GPU machine's 16 cores (CPU backend; the
# machine has no Rust): mp_llama's checks at worlds 1, 2, 4, 8 and PP 2, then the benchmarks the
# 2-core development machine cannot measure cleanly — the model's tokens/s at TP 1/2/4/8 (and
# PP 2 x TP 2/4) with the cores split evenly among the ranks, and bench_borrowed at 4 and 8 ranks.
#
# Build here:  cargo build --release -p llama --example mp_llama -p dist-candle --example bench_borrowed
#              mkdir -p .device-bin/candle && cp target/release/examples/{mp_llama,bench_borrowed} .device-bin/candle/
# Run there:   bash ci/device/candle_run.sh .device-bin/candle   (on the GPU machine, in a copy of the repository with .device-bin/ copied in)
set -u
BIN=${1:-.device-bin/candle}
. "$(dirname "$0")/common.sh"
device_log candle_run
CORES=$(nproc)
say "== $CORES cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"

status=0
# Ranks started by hand, torchrun's variables (rank 0 hosts the store).
run_world() {
  local w=$1 port=$2 prog=$3; shift 3
  local pids=() r rc=0
  for r in $(seq 0 $((w - 1))); do
    RANK=$r WORLD_SIZE=$w LOCAL_RANK=$r LOCAL_WORLD_SIZE=$w MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout "${MP_TIMEOUT:-300}" "$BIN/$prog" "$@" >"/tmp/candle_${prog}_w${w}_r${r}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  for r in $(seq 0 $((w - 1))); do sed "s/^/[w$w r$r] /" "/tmp/candle_${prog}_w${w}_r${r}.log" | tee -a "$LOG"; done
  say "== $prog world $w ${LLAMA_PP:+LLAMA_PP=$LLAMA_PP }$*: exit $rc"
  [ "$rc" = 0 ] || [ "$rc" = 77 ] || status=1
}

port=29800
for w in 1 2 4 8; do
  port=$((port + 1)); run_world "$w" "$port" mp_llama
  port=$((port + 1)); LLAMA_PP=2 run_world "$w" "$port" mp_llama
done

if [ "${BENCH:-1}" = 1 ]; then
  say "== llama bench (RAYON_NUM_THREADS = cores / ranks)"
  for w in 1 2 4 8; do
    port=$((port + 1)); RAYON_NUM_THREADS=$((CORES / w)) run_world "$w" "$port" mp_llama --bench
  done
  for w in 4 8; do
    port=$((port + 1)); LLAMA_PP=2 RAYON_NUM_THREADS=$((CORES / w)) run_world "$w" "$port" mp_llama --bench
  done
  say "== bench_borrowed"
  for w in 4 8; do
    port=$((port + 1)); run_world "$w" "$port" bench_borrowed --reps 31
  done
  port=$((port + 1)); run_world 4 "$port" bench_borrowed --reps 31 --dtype bf16
fi
say "== status $status"
exit $status

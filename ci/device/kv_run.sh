#!/usr/bin/env bash
# KV transfer on the GPU machine (which has no Rust): the prebuilt dist-kv examples with device
# caches, two processes sharing the machine's GPUs (GPU `LOCAL_RANK % count`).
#   - mp_kv_p2p --path cuda-ipc: PUT, PUT_ASYNC, GET, every block checked; a consumer dying
#     mid-transfer fails the producer's request, naming it, buffers freed;
#   - mp_kv_p2p --path nccl: the same over NCCL with two GPUs; with one GPU the example requires
#     NCCL's own refusal (ncclInvalidUsage from ncclCommInitRank on both ranks) and a clean,
#     bounded connector error, and exits 77 (skipped) printing NCCL's reason; anything else fails;
#   - mp_kv_storage --device: the shared-storage connector from and into device caches;
#   - the bench: the same bytes through the connector on cuda-ipc and on tcp (host caches), and
#     a plain TCP stream, in this run. MPS=1 runs it all under the CUDA MPS daemon.
#
# Build here:  cargo build --release -p dist-kv --features cuda --examples
#              mkdir -p .device-bin/kv && cp target/release/examples/{mp_kv_p2p,mp_kv_storage} .device-bin/kv/
# Run there:   bash ci/device/kv_run.sh .device-bin/kv   (on the GPU machine, in a copy of the repository with .device-bin/ copied in)
set -u
BIN=${1:-.device-bin/kv}
. "$(dirname "$0")/common.sh"
device_log kv_run
find_nccl
add_cuda_libs
say "== $(nvidia-smi -L 2>&1 | tr '\n' ' '); DIST_NCCL_SO_PATH=$DIST_NCCL_SO_PATH"

# MPS=1: run everything under the CUDA MPS daemon (two processes share the GPU concurrently instead
# of taking time slices); started here, stopped at the end.
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/dist-mps CUDA_MPS_LOG_DIRECTORY=/tmp/dist-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && say "== MPS daemon started"
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi

status=0
# run2 PORT LABEL PROG ARGS...: both ranks, their logs, the exit codes (77 from both = skipped).
run2() {
  local port=$1 label=$2 prog=$3; shift 3
  local pids=() r rcs=()
  local t0=$(date +%s%N)
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout "${MP_TIMEOUT:-180}" "$BIN/$prog" "$@" >"/tmp/kv_${label}_r${r}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; rcs+=($?); done
  local t1=$(date +%s%N)
  for r in 0 1; do sed "s/^/[$label r$r] /" "/tmp/kv_${label}_r${r}.log" | tee -a "$LOG"; done
  say "== $label: exit ${rcs[*]}, $(( (t1 - t0) / 1000000 )) ms"
  if [ "${rcs[0]}" = 77 ] && [ "${rcs[1]}" = 77 ]; then say "== $label: SKIPPED"; return; fi
  [ "${rcs[0]}" = 0 ] && [ "${rcs[1]}" = 0 ] || status=1
}

run2 29811 ipc mp_kv_p2p --path cuda-ipc
run2 29812 nccl mp_kv_p2p --path nccl
run2 29813 storage mp_kv_storage --device
run2 29814 tcp mp_kv_p2p --path tcp
if [ "${BENCH:-1}" = 1 ]; then
  # 1 MiB and 4 MiB per layer tensor (KV_BENCH_BLOCKS 16 and 64 blocks of 16 bf16 tokens x 8 x 128).
  for b in ${BENCH_BLOCKS:-16 64}; do
    for p in cuda-ipc tcp; do
      KV_BENCH_BLOCKS=$b run2 $((29820 + ${#p} + b)) "bench-$p-$b" mp_kv_p2p --path $p --bench "${BENCH_MIB:-1024}"
    done
  done
fi
say "== status $status"
exit $status

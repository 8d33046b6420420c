#!/usr/bin/env bash
# dist-cuda on the GPU machine (which has no Rust): runs the prebuilt `mp_cuda` device test at
# world 1 (NCCL, every op and dtype) and at worlds 2, 4, 8 (processes sharing GPU 0 through
# CUDA IPC: the custom all-reduce), then `cuda_bench` beside torch's NCCL all-reduce.
#
# Build here:  cargo build --release -p dist-cuda --examples
#              mkdir -p .device-bin/cuda && cp target/release/examples/{mp_cuda,cuda_bench,paged_check} .device-bin/cuda/
# Run there:   bash ci/device/cuda_run.sh .device-bin/cuda   (the `run` tool with carry [".device-bin"])
set -u
BIN=${1:-.device-bin/cuda}
. "$(dirname "$0")/common.sh"
device_log cuda_run
# NCCL: the wheel torch uses, unless DIST_NCCL_SO_PATH is set. NVRTC: the toolkit's.
find_nccl
add_cuda_libs
say "== $(nvidia-smi -L 2>&1 | head -1); driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)"
say "== DIST_NCCL_SO_PATH=$DIST_NCCL_SO_PATH; nvrtc: $(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)"

status=0
if [ -x "$BIN/cuda_backend_test" ]; then
  say "== cuda_backend integration test (release; --include-ignored runs the GPU conformance at world 1)"
  (set -o pipefail; "$BIN/cuda_backend_test" --include-ignored 2>&1 | tee -a "$LOG") || status=1
fi
if [ -x "$BIN/paged_check" ]; then
  say "== paged_check (device gather/scatter of paged KV cache rows against a host oracle)"
  (set -o pipefail; "$BIN/paged_check" 2>&1 | tee -a "$LOG") || status=1
fi
run_world() {
  local w=$1 port=$2 extra=${3:-} pids=() r rc=0
  rm -rf /tmp/dist-cuda-fg-"$port"-*
  local t0=$(date +%s%N)
  for r in $(seq 0 $((w - 1))); do
    RANK=$r WORLD_SIZE=$w LOCAL_RANK=$r LOCAL_WORLD_SIZE=$w MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout "${MP_TIMEOUT:-150}" "$BIN/mp_cuda" $extra >"/tmp/mp_cuda_w${w}_r${r}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  local t1=$(date +%s%N)
  for r in $(seq 0 $((w - 1))); do sed "s/^/[w$w r$r] /" "/tmp/mp_cuda_w${w}_r${r}.log" | tee -a "$LOG"; done
  say "== mp_cuda world $w $extra: exit $rc, $(( (t1 - t0) / 1000000 )) ms"
  rm -rf /tmp/dist-cuda-fg-"$port"-*
  [ "$rc" = 0 ] || status=1
}
run_world 1 29601
for w in ${WORLDS:-2 4 8}; do
  run_world "$w" $((29600 + w * 7))
  [ "$status" = 0 ] || { say "== skipping larger worlds after a failure"; break; }
done

# A rank that dies: the others' custom all-reduce must end in a Timeout naming it.
for w in ${DEAD_WORLDS:-2 4}; do run_world "$w" $((29700 + w)) --dead-peer; done

if [ "${BENCH:-1}" = 1 ]; then
  say "== bench"
  for m in in-place out-of-place graph; do
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_PORT=29650 timeout 120 "$BIN/cuda_bench" --mode $m 2>&1 | tee -a "$LOG"
  done
  PYTHONUNBUFFERED=1 timeout 150 python3 ci/device/cuda_bench_torch.py 2>&1 | grep -v Warning | tee -a "$LOG"
fi
say "== status $status"
exit $status

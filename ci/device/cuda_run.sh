#!/usr/bin/env bash
# dist-cuda on the GPU machine (which has no Rust), one call, well under 8 minutes:
#   1. cuda_backend_test --include-ignored: dist-core's conformance suite at world 1 through
#      CudaBackend (NCCL), and the error paths;
#   2. mp_cuda world 1 (NCCL): the GPU backends' shared checks (conformance, graph replay), then
#      an engine's cudarc CudaSlice on its own CudaStream (fenced and with the communicator on
#      that stream), a CUDA graph captured on the engine's stream and replayed, a non-primary
#      context's slice refused;
#   3. mp_cuda worlds 2, 4, 8 sharing GPU 0 (NCCL off): the custom all-reduce on dist tensors
#      (eager, graph, in place) and on engine-owned cudarc memory, and a graph captured on the
#      engine's stream, against the oracle;
#   4. the dead-peer case at worlds 2 and 4 (a Timeout naming the missing rank, then refusals);
#   5. paged_check (device gather/scatter of a paged KV cache against a host oracle);
#   6. cuda_bench at world 1, one process: in-place on a dist tensor, in-place on an engine's
#      CudaSlice on its CudaStream (cudarc's event tracking off, then on), out of place, graph;
#   7. `dist bench --backend cuda` (every collective, checked against the oracle: #wrong);
#   8. torch's NCCL all-reduce (ci/device/cuda_bench_torch.py) beside step 6, in the same run.
# Every step runs under `timeout`; a step that would pass the time budget (BUDGET seconds, 420)
# is not started and counts as a failure (the budget leaves room for the machine's start). The table at the end says what passed; any wrong
# element, failed check or missing step makes the exit status non-zero.
#
# Build here, then copy the binaries into .device-bin/cuda:
#   cargo build --release -p dist-cuda --examples
#   cargo test --release -p dist-cuda --test cuda_backend --no-run   # prints the test binary
#   cargo build --release -p dist --features cuda --bin dist
#   mkdir -p .device-bin/cuda && cp target/release/examples/{mp_cuda,cuda_bench,paged_check} \
#     target/release/dist .device-bin/cuda/ && cp target/release/deps/cuda_backend-<hash> .device-bin/cuda/cuda_backend_test
# Run there:   bash ci/device/cuda_run.sh .device-bin/cuda   (on the GPU machine, in a copy of the repository with .device-bin/ copied in)
set -u
BIN=${1:-.device-bin/cuda}
. "$(dirname "$0")/common.sh"
device_log cuda_run
find_nccl
add_cuda_libs
export DIST_TIMEOUT=${DIST_TIMEOUT:-120}
say "== $(nvidia-smi -L 2>&1 | head -1); driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)"
say "== DIST_NCCL_SO_PATH=$DIST_NCCL_SO_PATH; nvrtc: $(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)"

START=$(date +%s)
DEADLINE=$((START + ${BUDGET:-420}))
status=0
ROWS=()
# row NAME RESULT SECONDS
row() { ROWS+=("$(printf '%-44s %-8s %6s' "$1" "$2" "$3")"); }

# step NAME LIMIT CMD...: runs CMD (stdout+stderr into the log) under `timeout LIMIT` (a shell
# function bounds its own processes), unless that could pass the budget; records PASS,
# FAIL(rc), TIMEOUT, SKIP (77) or NOT RUN.
step() {
  local name=$1 limit=$2; shift 2
  local now=$(date +%s)
  if [ $((now + limit)) -gt "$DEADLINE" ]; then
    say "== $name: NOT RUN (time budget: $((DEADLINE - now)) s left, the step may take $limit s)"
    row "$name" "NOT RUN" "-"; status=1; return
  fi
  say "== $name"
  local t0=$(date +%s%N)
  if [ "$(type -t "$1")" = function ]; then
    (set -o pipefail; "$@" 2>&1 | tee -a "$LOG")
  else
    (set -o pipefail; timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG")
  fi
  local rc=$? t1=$(date +%s%N)
  local secs=$(( (t1 - t0) / 1000000000 ))
  case $rc in
    0) row "$name" PASS "$secs" ;;
    77) row "$name" "SKIP" "$secs" ;;
    124|137) row "$name" "TIMEOUT" "$secs"; status=1 ;;
    *) row "$name" "FAIL($rc)" "$secs"; status=1 ;;
  esac
  say "== $name: exit $rc, $secs s"
}

# ranks W PORT LIMIT ARGS...: W ranks of mp_cuda on this machine, each under `timeout LIMIT`,
# prefixed logs; the highest exit status.
ranks() {
  local w=$1 port=$2 limit=$3; shift 3
  local pids=() r rc=0
  rm -rf /tmp/dist-cuda-fg-"$port"-*
  for r in $(seq 0 $((w - 1))); do
    RANK=$r WORLD_SIZE=$w LOCAL_RANK=$r LOCAL_WORLD_SIZE=$w MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout -k 5 "$limit" "$BIN/mp_cuda" "$@" >"/tmp/mp_cuda_w${w}_r${r}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { local e=$?; [ "$e" -gt "$rc" ] && rc=$e; }; done
  for r in $(seq 0 $((w - 1))); do sed "s/^/[w$w r$r] /" "/tmp/mp_cuda_w${w}_r${r}.log"; done
  rm -rf /tmp/dist-cuda-fg-"$port"-*
  return "$rc"
}
ONE="env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1"

if [ -x "$BIN/cuda_backend_test" ]; then
  step "cuda_backend_test (conformance, world 1)" 90 "$BIN/cuda_backend_test" --include-ignored
else
  say "== cuda_backend_test missing from $BIN"; row "cuda_backend_test (conformance, world 1)" "MISSING" "-"; status=1
fi
step "mp_cuda world 1 (NCCL, engine memory)" 120 ranks 1 29601 110
for w in ${WORLDS:-2 4 8}; do
  step "mp_cuda world $w (custom AR, engine memory)" 120 ranks "$w" $((29600 + w * 7)) 110
done
for w in ${DEAD_WORLDS:-2 4}; do
  step "mp_cuda world $w --dead-peer" 40 ranks "$w" $((29700 + w)) 30 --dead-peer
done
step "paged_check" 60 "$BIN/paged_check"
step "cuda_bench (dist tensor vs engine slice)" 120 $ONE MASTER_PORT=29650 "$BIN/cuda_bench" \
  --mode in-place --mode engine --mode engine-tracked --mode out-of-place --mode graph
step "dist bench --backend cuda (oracle: #wrong)" 100 "$BIN/dist" bench --backend cuda --world 1 \
  --sizes 1K:16M --job-timeout 90
step "torch NCCL all_reduce (peer)" 90 env PYTHONUNBUFFERED=1 python3 ci/device/cuda_bench_torch.py

# Per-call cost at world 1, medians over 8 B .. 8 MiB: gpu_us (event time / calls) and host_us.
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }
table() { awk -v t="$2" '/^#/ {on = index($0, t) > 0; next} on && $1 ~ /^[0-9]+$/ && $1 <= 8388608 {print}' "$1"; }
fig() { # FILE TITLE COLUMN
  table "$1" "$2" 2>/dev/null | awk -v c="$3" '{print $c}' | median
}
say ""
say "== summary ($(( $(date +%s) - START )) s)"
say "$(printf '%-44s %-8s %6s' step result seconds)"
for r in "${ROWS[@]}"; do say "$r"; done
say ""
say "in-place all_reduce at world 1, per call, median over 8 B .. 8 MiB (same run):"
say "$(printf '  %-40s %10s %10s' 'call' 'gpu_us' 'host_us')"
for m in in-place engine engine-tracked; do
  say "$(printf '  %-40s %10s %10s' "dist ($m)" "$(fig "$LOG" "all_reduce ($m)," 2)" "$(fig "$LOG" "all_reduce ($m)," 3)")"
done
say "$(printf '  %-40s %10s %10s' "torch dist.all_reduce (NCCL)" "$(fig "$LOG" "# torch" 2)" "$(fig "$LOG" "# torch" 3)")"
say "== status $status"
exit $status

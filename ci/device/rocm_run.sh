#!/usr/bin/env bash
# dist-rocm's ABI TEST on the NVIDIA GPU machine. This is NOT a ROCm test: there is no AMD GPU
# and no HIP library there. What runs is the ROCm crate's own code (its HIP layers and runtime)
# under the GPU layer written once in dist-nccl (tensors, the RCCL communicator, HIP graphs),
# through the GPU backends' shared checks (dist-core's conformance suite at world 1, graph
# replay) and the shared bench, with
#   - the HIP runtime replaced by libcudart through `--hip-from-cudart` (HIP's NVIDIA platform is
#     exactly that mapping: each hipX is cudaX with the same signature and status values), and
#   - the crate's RCCL entry point (`dist_nccl::library(Flavor::Rccl)`) pointed at libnccl.so.2
#     with DIST_NCCL_SO_PATH (RCCL exports NCCL's C ABI unchanged).
# World 1 only: the machine has one GPU and NCCL refuses two ranks on one GPU.
#
# Build here:  cargo build --release -p dist-rocm --examples
#              mkdir -p .device-bin/rocm && cp target/release/examples/{mp_rocm,rocm_bench} .device-bin/rocm/
# Run there:   bash ci/device/rocm_run.sh .device-bin/rocm   (on the GPU machine, in a copy of the repository with .device-bin/ copied in)
set -u
BIN=${1:-.device-bin/rocm}
. "$(dirname "$0")/common.sh"
device_log rocm_run
find_nccl
# cudart matching the driver: the toolkit's first, else the one torch's wheels carry.
if [ -z "${DIST_CUDART_SO_PATH:-}" ]; then
  for c in /usr/local/cuda/lib64/libcudart.so.13 /usr/local/cuda/lib64/libcudart.so.12 \
           $(find / -path /proc -prune -o -name 'libcudart.so.1[23]' -print 2>/dev/null | head -2); do
    [ -f "$c" ] && { DIST_CUDART_SO_PATH=$c; break; }
  done
  export DIST_CUDART_SO_PATH
fi
say "== ABI TEST of dist-rocm on NVIDIA (not a ROCm test)"
say "== $(nvidia-smi -L 2>&1 | head -1); driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)"
say "== DIST_NCCL_SO_PATH=$DIST_NCCL_SO_PATH (loaded through the RCCL entry point)"
say "== DIST_CUDART_SO_PATH=$DIST_CUDART_SO_PATH (serves the HIP calls)"

status=0
t0=$(date +%s%N)
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29811 \
  timeout "${MP_TIMEOUT:-240}" "$BIN/mp_rocm" --hip-from-cudart 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
t1=$(date +%s%N)
say "== mp_rocm --hip-from-cudart world 1: exit $rc, $(( (t1 - t0) / 1000000 )) ms"
[ "$rc" = 0 ] || status=1
rm -rf /tmp/dist-rocm-fg-29811-*

if [ "${BENCH:-1}" = 1 ]; then
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_PORT=29812 timeout -k 5 120 "$BIN/rocm_bench" --hip-from-cudart \
    --max-bytes "${MAX_BYTES:-67108864}" --mode in-place --mode out-of-place --mode graph 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  rm -rf /tmp/dist-rocm-fg-29812-*
fi
say "== status $status"
exit $status

#!/usr/bin/env bash
# The CPU backend on the GPU machine's 16 cores: `dist bench` through GroupCoordinator at 4 and 8
# ranks, every result checked, with torch.distributed's gloo on the same ops, sizes and ranks in
# the same run (`--peer torch`) and the copy probe's memory bound (%bound).
#
# Build here:  cargo build --release -p dist --bin dist
#              mkdir -p .device-bin/cpu && cp target/release/dist .device-bin/cpu/
# Copy .device-bin/cpu and this folder to the GPU machine, then run there:
#              bash ci/device/cpu_run.sh .device-bin/cpu
set -u
BIN=${1:-.device-bin/cpu}
. "$(dirname "$0")/common.sh"
device_log cpu_run
say "== $(nproc) cores; $(python3 -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)"
status=0
OPS=${OPS:-all_reduce,all_gather,reduce_scatter,broadcast,all_to_all_v}
SIZES=${SIZES:-4K,64K,1M,4M,16M,64M}
for w in ${WORLDS:-4 8}; do
  say "== dist bench --world $w"
  (set -o pipefail
   timeout "${BENCH_TIMEOUT:-330}" "$BIN/dist" bench --world "$w" --ops "$OPS" --sizes "$SIZES" \
     --peer torch --peer-timeout 150 --job-timeout 150 2>&1 | tee -a "$LOG") || status=1
done
say "== status $status"
exit $status

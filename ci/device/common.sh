# Sourced by the ci/device/*.sh scripts (bash) after `set -u` and BIN:
#   device_log NAME   the log $OUTDIR/NAME.log (OUTDIR: $OUT, else /tmp/NAME-out), emptied
#   say ...           echo to stdout and the log
#   find_nccl         DIST_NCCL_SO_PATH: as set, else the NCCL wheel torch uses, else any libnccl.so.2
#   add_cuda_libs     the toolkit's lib folders (NVRTC, cudart) on LD_LIBRARY_PATH
# NVLink multicast stays off (the GPU machines' fabric does not allow it).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

device_log() {
  OUTDIR=${OUT:-/tmp/$1-out}
  mkdir -p "$OUTDIR"
  LOG="$OUTDIR/$1.log"
  : >"$LOG"
}

say() { echo "$@" | tee -a "$LOG"; }

find_nccl() {
  if [ -z "${DIST_NCCL_SO_PATH:-}" ]; then
    DIST_NCCL_SO_PATH=$(python3 -c 'import nvidia.nccl as m, os; print(os.path.join(list(m.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
    [ -f "$DIST_NCCL_SO_PATH" ] || DIST_NCCL_SO_PATH=$(find / -name 'libnccl.so.2*' -type f 2>/dev/null | head -1)
  fi
  export DIST_NCCL_SO_PATH
}

add_cuda_libs() {
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
  return 0
}

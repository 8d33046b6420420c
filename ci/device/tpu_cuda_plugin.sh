#!/usr/bin/env bash
# dist-tpu on the GPU machine (which has no TPU and no Rust): the prebuilt `pjrt_check` drives
# the CUDA PJRT plugin of the machine's JAX install (`xla_cuda_plugin.so`, package
# jax-cuda13-pjrt) through dist-tpu's own PJRT C API code: plugin load + version, client, then
# the world-1 dist-core conformance suite against the oracles and one program compiled once
# and launched 1001 times (compilations counted).
#
# Build here:  cargo build --release -p dist-tpu --examples
#              mkdir -p .device-bin/tpu && cp target/release/examples/pjrt_check .device-bin/tpu/
# Run there:   bash ci/device/tpu_cuda_plugin.sh .device-bin/tpu   (on the GPU machine, in a copy of the repository with .device-bin/ copied in)
# Exit: 0 passed, 1 failed, 77 skipped (no plugin found).
set -u
BIN=${1:-.device-bin/tpu}
. "$(dirname "$0")/common.sh"
device_log tpu_cuda_plugin
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3

if [ -z "${DIST_PJRT_PLUGIN:-}" ]; then
  dir=$($PY -c 'import jax_plugins.xla_cuda13 as m, os; print(os.path.dirname(m.__file__))' 2>/dev/null)
  [ -n "$dir" ] && [ -f "$dir/xla_cuda_plugin.so" ] && DIST_PJRT_PLUGIN="$dir/xla_cuda_plugin.so"
  if [ -z "${DIST_PJRT_PLUGIN:-}" ]; then
    DIST_PJRT_PLUGIN=$(timeout 120 find / -xdev -name 'xla_cuda_plugin.so' -type f 2>/dev/null | head -1)
  fi
fi
if [ -z "${DIST_PJRT_PLUGIN:-}" ] || [ ! -f "$DIST_PJRT_PLUGIN" ]; then
  say "SKIPPED: no xla_cuda_plugin.so found (jax-cuda13-pjrt not installed)"
  exit 77
fi
export DIST_PJRT_PLUGIN
# The plugin needs the CUDA libraries of the nvidia-* wheels (JAX preloads them; we put them on
# the loader's path) and ptxas/nvlink of nvidia-cuda-nvcc for its compiler.
site=$($PY -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null)
if [ -n "$site" ] && [ -d "$site" ]; then
  for d in "$site"/*/lib "$site"/cu13/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
  export LD_LIBRARY_PATH
  for nv in "$site/cuda_nvcc" "$site/cu13"; do
    if [ -x "$nv/bin/ptxas" ]; then
      export PATH="$nv/bin:$PATH"
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_cuda_data_dir=$nv"
      break
    fi
  done
fi
[ -x /usr/local/cuda/bin/ptxas ] && export PATH="$PATH:/usr/local/cuda/bin"
say "== $(nvidia-smi -L 2>&1 | head -1); driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)"
say "== DIST_PJRT_PLUGIN=$DIST_PJRT_PLUGIN"
say "== jax: $($PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__)' 2>&1 | tail -1); ptxas: $(command -v ptxas); XLA_FLAGS=${XLA_FLAGS:-}"

status=0
say "== pjrt_check probe"
timeout 180 "$BIN/pjrt_check" probe 2>&1 | grep -v '^WARNING: All log messages' | tail -20 | tee -a "$LOG"
say "== pjrt_check conformance"
start=$(date +%s)
timeout 420 "$BIN/pjrt_check" conformance >"$OUTDIR/conformance.out" 2>"$OUTDIR/conformance.err"
rc=$?
grep -v '^\s*$' "$OUTDIR/conformance.out" | tail -20 | tee -a "$LOG"
if [ $rc -ne 0 ]; then
  say "-- stderr (tail):"
  tail -30 "$OUTDIR/conformance.err" | cut -c1-400 | tee -a "$LOG"
  status=$rc
fi
say "== conformance rc=$rc in $(( $(date +%s) - start )) s"
if [ -f ci/device/tpu_jax_peer.py ]; then
  say "== peer: JAX through the same plugin"
  ( set -o pipefail; timeout 120 $PY ci/device/tpu_jax_peer.py 2>"$OUTDIR/peer.err" | tee -a "$LOG" ) || tail -5 "$OUTDIR/peer.err" | tee -a "$LOG"
fi
exit $status

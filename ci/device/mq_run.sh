#!/usr/bin/env bash
# The MessageQueue on the GPU machine's cores, beside vLLM's own MessageQueue, in one run:
# `dist bench mq` (every rank a process) measures the machine's floor (a raw cross-process flag
# ping-pong), then ours at 1, 3 and 7 readers and 64 B, 1 KiB, 64 KiB and 1 MiB, then runs
# ci/device/mq_vllm_peer.py (vLLM's shm_broadcast.py with the same sizes, reader counts and message
# counts) and prints both, with ratios. The machine has no Rust, no network and no vllm package:
# everything comes in .device-bin/mq.
#
# Build here:  cargo build --release -p dist
#              mkdir -p .device-bin/mq && cp target/release/dist .device-bin/mq/ && strip .device-bin/mq/dist
# vLLM's file (from a vLLM source checkout; only this file is read, never committed):
#              d=.device-bin/mq/vllm-src/vllm/distributed/device_communicators; mkdir -p $d
#              cp $VLLM_CHECKOUT/vllm/distributed/device_communicators/shm_broadcast.py $d/
# pyzmq (torch is there; pyzmq may not be):
#              for v in 3.10 3.11 3.12; do pip download pyzmq --only-binary=:all: --no-deps \
#                --platform manylinux_2_28_x86_64 --python-version $v -d .device-bin/mq/wheels; done
# Run there:   bash ci/device/mq_run.sh .device-bin/mq [more `dist bench mq` flags]
#              (on the GPU machine, in a copy of the repository with .device-bin/ copied in; about 2 minutes)
set -u
BIN=${1:-.device-bin/mq}
shift || true
. "$(dirname "$0")/common.sh"
device_log mq_run
PY=${PYTHON:-python3}

# pyzmq from the copied wheels when the machine has none: unpacked into a private folder.
if ! "$PY" -c 'import zmq' 2>/dev/null; then
  SITE=/tmp/mq-peer-site
  mkdir -p "$SITE"
  "$PY" - "$BIN/wheels" "$SITE" <<'EOF' || { say "== no usable pyzmq wheel in $BIN/wheels"; exit 1; }
import os, sys, zipfile
wheels, site = sys.argv[1], sys.argv[2]
v = sys.version_info
tags = [f"cp{v.major}{v.minor}-cp{v.major}{v.minor}-"] + (["-abi3-"] if v >= (3, 12) else [])
for w in sorted(os.listdir(wheels)):
    if w.startswith("pyzmq-") and any(t in w for t in tags):
        zipfile.ZipFile(os.path.join(wheels, w)).extractall(site)
        print(f"pyzmq from {w}")
        sys.exit(0)
sys.exit(1)
EOF
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
say "== $(nproc) cores; python, torch, pyzmq: $("$PY" -c 'import sys, torch, zmq; print(sys.version.split()[0], torch.__version__, zmq.__version__)' 2>&1)"
"$BIN/dist" bench mq --vllm-src "$BIN/vllm-src" --vllm-peer "$(dirname "$0")/mq_vllm_peer.py" \
  --python "$PY" "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
say "== status $status"
exit "$status"

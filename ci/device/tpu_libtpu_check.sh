#!/usr/bin/env bash
# dist-tpu against the real libtpu on a machine without TPUs (CI, or a development machine):
# GetPjrtApi loads and reports its PJRT API version (>= dist_tpu::MIN_API_MINOR), and client
# creation fails at once with a "no TPU" error (libtpu's own initialisation would spend minutes
# on cloud-metadata retries; dist-tpu checks for TPU chips on the PCI bus first).
#
# Needs the libtpu wheel (~137 MB): python3 -m pip install libtpu==0.0.52
# (or DIST_TEST_LIBTPU=/path/to/libtpu.so). Exit: 0 passed, 1 failed, 77 skipped (no libtpu).
set -u
lib=${DIST_TEST_LIBTPU:-}
if [ -z "$lib" ]; then
  dir=$(python3 -c 'import libtpu, os; print(os.path.dirname(libtpu.__file__))' 2>/dev/null)
  [ -n "$dir" ] && lib="$dir/libtpu.so"
fi
if [ -z "$lib" ] || [ ! -f "$lib" ]; then
  echo "SKIPPED: libtpu is not installed (python3 -m pip install libtpu==0.0.52)"
  exit 77
fi
out=$(DIST_TEST_LIBTPU="$lib" cargo test -q -p dist-tpu --test tpu_plugin libtpu -- --nocapture 2>&1)
rc=$?
echo "$out" | grep -E 'reports PJRT API|SKIPPED|test result|panicked|no TPU'
if [ $rc -ne 0 ]; then
  echo "FAIL: cargo test exited $rc"
  exit 1
fi
if ! echo "$out" | grep -q 'reports PJRT API'; then
  echo "FAIL: the libtpu test did not run"
  exit 1
fi
echo "PASS: $lib"

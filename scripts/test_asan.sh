#!/usr/bin/env bash
# The C kernels built with AddressSanitizer (TERNARY_MAMBA_SANITIZE=1), then the kernel tests and the fuzz cases
# run against that build: any out-of-bounds read or write aborts with a report.  Used by `make test-asan` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ASAN=$(gcc -print-file-name=libasan.so 2>/dev/null || true)
if [ -z "$ASAN" ] || [ ! -e "$ASAN" ]; then
  echo "test-asan: no libasan for gcc on this machine; skipped"
  exit 0
fi
# libstdc++ preloaded too: ASan must find the real __cxa_throw, or torch's first C++ exception aborts the run
export LD_PRELOAD="$ASAN $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export TERNARY_MAMBA_SANITIZE=1 TERNARY_MAMBA_CACHE="$PWD/build/asan-cache"
mkdir -p build/asan-cache && chmod 755 build build/asan-cache
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_train.py tests/test_ssd.py tests/test_losses.py \
  tests/test_decode_engine.py tests/test_decode_fast.py tests/test_decode_layouts.py tests/test_packed.py \
  tests/test_fuzz.py tests/test_fuzz_records.py

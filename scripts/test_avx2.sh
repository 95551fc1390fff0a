#!/usr/bin/env bash
# The C kernels built for an AVX2-only CPU (TERNARY_MAMBA_MARCH=haswell: no AVX-512, no VNNI, no BF16), then the
# kernel tests against that build: the AVX2 code paths (32-byte scan tiles, ymm GEMVs, the vpmaddubsw prefill GEMM)
# are checked on any machine with AVX2, also an AVX-512 one.  Used by `make test-avx2` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  echo "test-avx2: this CPU has no AVX2; skipped"
  exit 0
fi
export TERNARY_MAMBA_MARCH=haswell TERNARY_MAMBA_CACHE="$PWD/build/avx2-cache"
mkdir -p build/avx2-cache && chmod 755 build build/avx2-cache
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_train.py tests/test_ssd.py tests/test_losses.py \
  tests/test_decode_engine.py tests/test_packed.py tests/test_bf16_activations.py tests/test_fuzz.py

#!/usr/bin/env bash
# The C kernels built for other CPUs than this one, then the kernel tests against each build:
#   x86-64   the portable (scalar) paths: no AVX2, no FMA (what an old or unknown CPU runs)
#   haswell  AVX2 + FMA without AVX-512, VNNI or BF16 (32-byte scan tiles, ymm GEMVs, the vpmaddubsw prefill GEMM)
# The native build is tested by the main suite.  A build that does not compile fails (TERNARY_MAMBA_REQUIRE_KERNELS).
# Used by `make test` and CI; `KERNEL_TARGETS="haswell" bash scripts/test_kernels.sh` runs one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TESTS="tests/test_spec.py tests/test_ops_agree.py tests/test_fused_train.py tests/test_ssd.py tests/test_losses.py
  tests/test_decode_engine.py tests/test_decode_fast.py tests/test_decode_layouts.py tests/test_packed.py
  tests/test_bf16_activations.py tests/test_fuzz.py
  tests/test_tables.py"
for target in ${KERNEL_TARGETS:-x86-64 haswell}; do
  if [ "$target" = haswell ] && ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    echo "kernels for $target: this CPU cannot run AVX2 code; not tested here"
    continue
  fi
  echo "== kernels built for -march=$target"
  mkdir -p "build/kernels-$target" && chmod 755 build "build/kernels-$target"
  TERNARY_MAMBA_MARCH=$target TERNARY_MAMBA_CACHE="$PWD/build/kernels-$target" TERNARY_MAMBA_REQUIRE_KERNELS=1 \
    "$PY" -m pytest -q -p no:cacheprovider $TESTS
done

#!/usr/bin/env bash
# The project installed the way users install it: a wheel built from this tree, installed on its own (no source
# tree on the path), then its kernels built from the installed package data and used, and the CLI run.
# Used by `make test-wheel` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"   # absolute, the venv kept (no symlink resolved)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip wheel -q --no-deps --no-build-isolation . -w "$TMP/dist" 2>&1 | grep -v -i "warning\|location" || true
"$PY" -m pip install -q --no-deps --target "$TMP/site" "$TMP"/dist/ternary_mamba-*.whl 2>&1 | grep -v -i "warning\|location" || true
cd "$TMP"                                   # not the source tree: only the installed package can be imported
mkdir -p cache && chmod 755 cache
PYTHONPATH="$TMP/site" TERNARY_MAMBA_CACHE="$TMP/cache" TERNARY_MAMBA_REQUIRE_KERNELS=1 "$PY" - <<'PYEOF'
import torch
import ternary_mamba
from pathlib import Path
assert "site" in Path(ternary_mamba.__file__).parts, ternary_mamba.__file__
from ternary_mamba.ops.build import get_kernel
from ternary_mamba.ops.packing import pack
from ternary_mamba.ops.ternary_linear import ternary_linear, ternary_linear_ref
assert get_kernel() is not None, "the installed wheel could not build its kernels"
t = torch.randint(-1, 2, (32, 128), dtype=torch.int8)
codes, s, x = pack(t, "tq2").view(32, 32), torch.rand(32, 1) + 0.1, torch.randn(2, 128)
assert torch.allclose(ternary_linear(x, codes, s, 128), ternary_linear_ref(x, codes, s, 128), atol=1e-5)
print(f"wheel ok: {ternary_mamba.__version__} from {Path(ternary_mamba.__file__).parent}, kernels built")
PYEOF
PYTHONPATH="$TMP/site" "$PY" -m ternary_mamba info mamba2-130m | head -1

#!/usr/bin/env bash
# The project installed the way users install it: a wheel built from this tree, installed on its own (no source
# tree on the path), then its kernels built from the installed package data and used, and the CLI run.
# The sdist is built too and the wheel is built from it; the kernel tests of this tree then run against the
# installed package, and so does `generate`.  Used by `make test-wheel` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"   # absolute, the venv kept (no symlink resolved)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# the sdist first, then the wheel built from the unpacked sdist: what PyPI users get must be complete
"$PY" - "$TMP/sdist" <<'PYEOF'
import sys
from setuptools import build_meta
print("sdist:", build_meta.build_sdist(sys.argv[1]))
PYEOF
tar -xzf "$TMP"/sdist/ternary_mamba-*.tar.gz -C "$TMP"
SRC=$(ls -d "$TMP"/ternary_mamba-*/)
"$PY" -m pip wheel -q --no-deps --no-build-isolation "$SRC" -w "$TMP/dist" 2>&1 | grep -v -i "warning\|location" || true
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
# the kernel tests of this tree, run against the installed package (cwd is not the source tree)
PYTHONPATH="$TMP/site" TERNARY_MAMBA_CACHE="$TMP/cache" TERNARY_MAMBA_REQUIRE_KERNELS=1 "$PY" - "$OLDPWD" <<'PYEOF'
import sys
from pathlib import Path
import pytest
import ternary_mamba                        # imported first: the tests below use this installed copy
assert "site" in Path(ternary_mamba.__file__).parts, ternary_mamba.__file__
repo = Path(sys.argv[1])
rc = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(repo), str(repo / "tests" / "test_packing.py"),
                  str(repo / "tests" / "test_decode_engine.py")])
assert Path(sys.modules["ternary_mamba"].__file__) == Path(ternary_mamba.__file__)
sys.exit(int(rc))
PYEOF
PYTHONPATH="$TMP/site" TERNARY_MAMBA_CACHE="$TMP/cache" "$PY" -m ternary_mamba generate bundled --prompt "Once upon" \
  --max-new-tokens 8 --temperature 0 > "$TMP/gen.txt"
echo "installed generate: $(tr '\n' ' ' < "$TMP/gen.txt" | cut -c1-80)"

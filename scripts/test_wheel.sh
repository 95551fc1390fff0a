#!/usr/bin/env bash
# The project installed the way users install it.  The sdist is built, the wheel is built from the unpacked sdist
# (what PyPI users get must be complete), and the wheel is installed (non-editable) into a fresh virtualenv.  Its
# dependencies (torch, ...) are borrowed from .venv through a .pth line, without the editable install of this
# tree, so the only ternary_mamba it can import is the installed one.  Then, from outside the source tree: the
# kernels build from the installed package data, the tree's kernel tests run against the installed copy, and
# `info` and `generate` run.  Used by `make test-wheel` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"   # absolute, the venv kept (no symlink resolved)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" - "$TMP/sdist" > "$TMP/sdist.log" 2>&1 <<'PYEOF' || { cat "$TMP/sdist.log"; exit 1; }
import sys
from setuptools import build_meta
build_meta.build_sdist(sys.argv[1])
PYEOF
echo "sdist: $(ls "$TMP"/sdist)"
tar -xzf "$TMP"/sdist/ternary_mamba-*.tar.gz -C "$TMP"
SRC=$(ls -d "$TMP"/ternary_mamba-*/)
"$PY" -m pip wheel -q --no-deps --no-build-isolation "$SRC" -w "$TMP/dist" 2>&1 | grep -v -i "warning\|location" || true
# a fresh virtualenv; the dependencies come from .venv's site-packages (a .pth line adds the folder to sys.path
# but does not run the .pth files in it, so .venv's editable install of this tree stays out)
"$PY" -m venv "$TMP/venv"
DEPS=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NEW=$("$TMP/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$DEPS" > "$NEW/borrowed-deps.pth"
"$TMP/venv/bin/python" -m pip install -q --no-deps "$TMP"/dist/ternary_mamba-*.whl 2>&1 | grep -v -i "warning\|location\|notice" || true
VPY="$TMP/venv/bin/python"
cd "$TMP"                                   # not the source tree: only the installed package can be imported
mkdir -p cache && chmod 755 cache
export TERNARY_MAMBA_CACHE="$TMP/cache"
TERNARY_MAMBA_REQUIRE_KERNELS=1 "$VPY" - "$NEW" <<'PYEOF'
import sys
import torch
import ternary_mamba
from pathlib import Path
assert Path(ternary_mamba.__file__).is_relative_to(sys.argv[1]), ternary_mamba.__file__
from ternary_mamba.ops.build import get_kernel
from ternary_mamba.ops.packing import pack
from ternary_mamba.ops.ternary_linear import ternary_linear, ternary_linear_ref
assert get_kernel() is not None, "the installed wheel could not build its kernels"
t = torch.randint(-1, 2, (32, 128), dtype=torch.int8)
codes, s, x = pack(t, "tq2").view(32, 32), torch.rand(32, 1) + 0.1, torch.randn(2, 128)
assert torch.allclose(ternary_linear(x, codes, s, 128), ternary_linear_ref(x, codes, s, 128), atol=1e-5)
print(f"wheel ok: {ternary_mamba.__version__} from {Path(ternary_mamba.__file__).parent}, kernels built")
PYEOF
"$TMP/venv/bin/ternary-mamba" info mamba2-130m | head -1
# the kernel tests of this tree, run against the installed package
TERNARY_MAMBA_REQUIRE_KERNELS=1 "$VPY" - "$REPO" "$NEW" <<'PYEOF'
import sys
from pathlib import Path
import pytest
import ternary_mamba                        # imported first: the tests below use this installed copy
assert Path(ternary_mamba.__file__).is_relative_to(sys.argv[2]), ternary_mamba.__file__
repo = Path(sys.argv[1])
rc = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(repo), str(repo / "tests" / "test_packing.py"),
                  str(repo / "tests" / "test_decode_engine.py")])
assert Path(sys.modules["ternary_mamba"].__file__) == Path(ternary_mamba.__file__)
sys.exit(int(rc))
PYEOF
"$TMP/venv/bin/ternary-mamba" generate bundled --prompt "Once upon" --max-new-tokens 8 --temperature 0 > "$TMP/gen.txt"
echo "installed generate: $(tr '\n' ' ' < "$TMP/gen.txt" | cut -c1-80)"

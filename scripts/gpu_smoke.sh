#!/usr/bin/env bash
# One command to check the GPU path end to end on any CUDA machine (~6 minutes):
#   bash scripts/gpu_smoke.sh            # the bundled teacher (always there)
#   TEACHER=state-spaces/mamba2-130m bash scripts/gpu_smoke.sh    # a real checkpoint, where the hub is reachable
# Where python3 already has CUDA torch it installs nothing (offline machines); else it installs the project in .venv
# (CUDA torch from the default index).  Then: the CUDA tests -> plan -> quantize (bf16, a few M tokens) -> export
# (tq2) -> ppl -> generate -> bench gpu (1.3B QAT+KD steps, memory vs plan), and one summary table.  Exit code != 0 on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TEACHER=${TEACHER:-}
TOKENS=${TOKENS:-4000000}
OUT=${OUT:-runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
if $PY -c "import torch, tokenizers, safetensors, yaml, tqdm; assert torch.cuda.is_available()" 2>/dev/null; then
  TMPY=$PY                              # a machine whose python already has CUDA torch (and no network): no install
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ ! -x .venv/bin/ternary-mamba ]; then
    $PY -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch -e ".[test,gguf]"
    .venv/bin/pip install -q --no-build-isolation "mamba-ssm>=2.2" || echo "mamba-ssm did not install: the PyTorch scan runs"
  fi
  TMPY=.venv/bin/python
fi
TM="$TMPY -m ternary_mamba"
$TMPY - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible: this script checks the GPU path"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
try:
    import mamba_ssm
    print(f"mamba_ssm {mamba_ssm.__version__}: its fused chunked scan runs")
except Exception as e:  # noqa: BLE001
    print(f"mamba_ssm not importable ({type(e).__name__}): the PyTorch chunked scan runs")
PYEOF
declare -a ROWS
FAILED=0
step() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS rc
  echo "== $name: $*"
  set +e
  "$@" 2>&1 | tee "$OUT.$name.log" | tail -n 12
  rc=${PIPESTATUS[0]}
  set -e
  ROWS+=("$(printf '%-10s %6d s   rc=%s' "$name" "$((SECONDS - t0))" "$rc")")
  if [ "$rc" -ne 0 ]; then   # KEEP_GOING=1: record it and run the remaining steps (one device session, all answers)
    FAILED=$rc
    [ -n "${KEEP_GOING:-}" ] || { printf '%s\n' "${ROWS[@]}"; exit "$rc"; }
  fi
}
mkdir -p "$(dirname "$OUT")"
if $TMPY -c "import pytest" 2>/dev/null; then
  step tests timeout 180 $TMPY -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
step plan $TM plan --teacher "${TEACHER:-mamba2-130m}" --device cuda --dtype bf16 --batch-size 8 --seq-len 2048
QARGS=(--device cuda --dtype bf16 --tokens "$TOKENS" --seq-len 1024 --batch-size 8 --eval-every 100 --out "$OUT")
[ -n "$TEACHER" ] && QARGS+=(--teacher "$TEACHER" --data "hf:HuggingFaceFW/fineweb-edu/sample-10BT:train")
step quantize $TM quantize "${QARGS[@]}"
step export $TM export "$OUT" --format tq2 --out "$OUT-tq2"
HELD=$($TMPY -c "from ternary_mamba.assets import HELDOUT_BOOKS; print(HELDOUT_BOOKS)")
step ppl $TM ppl "$OUT" "$OUT-tq2" --text "$HELD" --seq-len 1024 --max-tokens 32768 --device cuda --dtype bf16
step generate $TM generate "$OUT-tq2" --prompt "Once upon a time" --max-new-tokens 40 --temperature 0
step bench timeout 240 $TM bench gpu --json "$OUT.bench.json"
echo
echo "GPU smoke summary ($OUT):"
printf '%s\n' "${ROWS[@]}"
grep -A4 "held-out ppl" "$OUT.quantize.log" || true
exit "$FAILED"

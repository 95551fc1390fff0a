#!/usr/bin/env bash
# One command to check the GPU path end to end on any CUDA machine (~5 minutes):
#   bash scripts/gpu_smoke.sh            # the bundled teacher (always there)
#   TEACHER=state-spaces/mamba2-130m bash scripts/gpu_smoke.sh    # a real checkpoint, where the hub is reachable
# It installs the project in .venv (CUDA torch from the default index), then runs: plan -> quantize (bf16, a few
# M tokens) -> export (tq2) -> ppl -> generate, and prints one summary table.  Exit code != 0 on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TEACHER=${TEACHER:-}
TOKENS=${TOKENS:-4000000}
OUT=${OUT:-runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
if [ ! -x .venv/bin/ternary-mamba ]; then
  $PY -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch -e ".[test,gguf]"
  .venv/bin/pip install -q --no-build-isolation "mamba-ssm>=2.2" || echo "mamba-ssm did not install: the PyTorch scan runs"
fi
TM=.venv/bin/ternary-mamba
.venv/bin/python - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible: this script checks the GPU path"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
declare -a ROWS
step() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS rc
  echo "== $name: $*"
  set +e
  "$@" 2>&1 | tee "$OUT.$name.log" | tail -n 12
  rc=${PIPESTATUS[0]}
  set -e
  ROWS+=("$(printf '%-10s %6d s   rc=%s' "$name" "$((SECONDS - t0))" "$rc")")
  [ "$rc" -eq 0 ] || { printf '%s\n' "${ROWS[@]}"; exit "$rc"; }
}
mkdir -p "$(dirname "$OUT")"
step plan $TM plan --teacher "${TEACHER:-mamba2-130m}" --device cuda --dtype bf16 --batch-size 8 --seq-len 2048
QARGS=(--device cuda --dtype bf16 --tokens "$TOKENS" --seq-len 1024 --batch-size 8 --eval-every 100 --out "$OUT")
[ -n "$TEACHER" ] && QARGS+=(--teacher "$TEACHER" --data "hf:HuggingFaceFW/fineweb-edu/sample-10BT:train")
step quantize $TM quantize "${QARGS[@]}"
step export $TM export "$OUT" --format tq2 --out "$OUT-tq2"
HELD=$(.venv/bin/python -c "from ternary_mamba.assets import HELDOUT_BOOKS; print(HELDOUT_BOOKS)")
step ppl $TM ppl "$OUT" "$OUT-tq2" --text "$HELD" --seq-len 1024 --max-tokens 32768 --device cuda --dtype bf16
step generate $TM generate "$OUT-tq2" --prompt "Once upon a time" --max-new-tokens 40 --temperature 0
echo
echo "GPU smoke summary ($OUT):"
printf '%s\n' "${ROWS[@]}"
grep -A4 "held-out ppl" "$OUT.quantize.log" || true

#!/usr/bin/env bash
# The GPU check: one offline script (<= 10 minutes on an H100/H200) that proves the most a lent GPU can prove.
#   bash scripts/gpu_check.sh                 # writes runs/gpu-check-DATE/{gpu_check.json, table.md, *.log}
# Steps (each recorded with its exit code; KEEP_GOING is on: one device session, every answer):
#   tests     tests/test_cuda.py (Triton kernels compiled for the GPU, CUDA forward vs CPU, a QAT+KD step, ...)
#   ops       every op's fast path against its reference at Mamba-2 1.3B shapes (impl, max error, time)
#   bench     `bench gpu`: QAT+KD steps of 130m / 370m / 780m / 1.3B (tok/s, MFU, peak memory vs plan, scan path)
#   ddp       torchrun world size 1 on NCCL: DDP, FSDP2, and a DDP run killed inside a step then --resumed
#   bf16      200 QAT+KD steps in bf16 against the same in fp32 (loss gap per step, final held-out KL)
# Where python3 already has CUDA torch it installs nothing (the GPU machines here have no network).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TERNARY_MAMBA_CACHE="${TERNARY_MAMBA_CACHE:-$PWD/build/gpu-cache}"
mkdir -p "$TERNARY_MAMBA_CACHE" && chmod 755 "$TERNARY_MAMBA_CACHE"
$PY -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA device visible"; exit 1; }
TM="$PY -m ternary_mamba"
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
declare -a ROWS
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  ROWS+=("$name $((SECONDS - t0)) $rc")
}
$PY - > "$OUT/env.log" 2>&1 <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
for m in ("triton", "mamba_ssm", "causal_conv1d"):
    try:
        mod = __import__(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: not importable ({type(e).__name__})")
PYEOF
cat "$OUT/env.log"
if $PY -c "import pytest" 2>/dev/null; then
  step tests 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
step ops 120 $TM bench ops --device cuda --model-config mamba2-1.3b --batch-size 1 --seq-len 2048 --json "$OUT/ops.json"
step bench 300 $TM bench gpu --models mamba2-130m mamba2-370m mamba2-780m mamba2-1.3b --steps 3 --json "$OUT/bench.json"
Q=(quantize --device cuda --dtype bf16 --seq-len 512 --batch-size 8 --eval-every 0 --save-every 5 --threads 4)
step ddp 150 $TORCHRUN -m ternary_mamba "${Q[@]}" --tokens 81920 --out "$OUT/ddp"
step fsdp 150 $TORCHRUN -m ternary_mamba "${Q[@]}" --tokens 81920 --fsdp --out "$OUT/fsdp"
step killed 150 env TERNARY_MAMBA_FAULT=kill@0:12 $TORCHRUN -m ternary_mamba "${Q[@]}" --tokens 81920 --out "$OUT/killed"
step resumed 150 $TORCHRUN -m ternary_mamba "${Q[@]}" --tokens 81920 --out "$OUT/killed" --resume
B=(quantize --device cuda --seq-len 512 --batch-size 8 --eval-every 50 --tokens 819200 --threads 4)
step fp32 200 $TM "${B[@]}" --dtype fp32 --out "$OUT/fp32"
step bf16 200 $TM "${B[@]}" --dtype bf16 --out "$OUT/bf16"
printf '%s\n' "${ROWS[@]}" > "$OUT/steps.txt"
$PY scripts/gpu_check_report.py "$OUT"

#!/usr/bin/env bash
# Build and run the stream probe (scripts/stream_probe.c): the shipped r32 decode GEMV, a four-stream variant of it,
# and two reads of the same 222 MB that compute nothing (one stream / four streams per thread), alternated per round.
# Usage: bash scripts/stream_probe.sh [rounds, default 12] [matrices, default 48]   (AVX512-VNNI only; THREADS=n to override the core count)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
${CC:-gcc} -O3 -march=native -fopenmp -std=c11 -Wno-psabi -Iternary_mamba/ops/csrc scripts/stream_probe.c -o "$out/stream_probe" -lm
lscpu | grep -m1 "Model name" || true
OMP_NUM_THREADS=${THREADS:-$(nproc)} "$out/stream_probe" "${1:-12}" "${2:-48}"

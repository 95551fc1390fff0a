#!/usr/bin/env bash
# Build and run the tq1 decode probe (scripts/tq1_probe.c): a cache-resident matrix on one thread (the compute
# rate per weight) and 48 matrices streamed on every core (the decode case: ~1.0 G weights, about a 1.3B model's).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
${CC:-gcc} -O3 -march=native -fopenmp -std=c11 -Wno-psabi -Iternary_mamba/ops/csrc scripts/tq1_probe.c -o "$out/tq1_probe" -lm
lscpu | grep -m1 "Model name" || true
OMP_NUM_THREADS=1 "$out/tq1_probe" 256 1 400
OMP_NUM_THREADS=${THREADS:-$(nproc)} "$out/tq1_probe" 8192 48 96

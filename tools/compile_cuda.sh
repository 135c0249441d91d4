#!/usr/bin/env bash
# Compiles every CUDA kernel file for sm_80 and sm_90 with nvcc alone (no torch
# headers), so CI checks the GPU sources on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "no CUDA sources"; exit 0; fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
    -c "$f" -o "$out/$(basename "$f").o" &
done
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
[ $fail -eq 0 ] && echo "nvcc: compiled ${#files[@]} CUDA files for sm_80 and sm_90"
exit $fail

#!/usr/bin/env bash
# Compiles every CUDA kernel file for sm_80 and sm_90 with nvcc alone (no torch
# headers), so CI checks the GPU sources on machines without a GPU. Then, if
# $PYTHON (default python3) has triton, compiles every Triton kernel to PTX
# for sm_80 and sm_90 with Triton's own compiler (no GPU needed either).
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(csrc/cuda/*.cu)
fail=0
if [ ${#files[@]} -eq 0 ]; then
  echo "no CUDA sources"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  for f in "${files[@]}"; do
    nvcc -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -c "$f" -o "$out/$(basename "$f").o" &
  done
  for job in $(jobs -p); do wait "$job" || fail=1; done
  [ $fail -eq 0 ] && echo "nvcc: compiled ${#files[@]} CUDA files for sm_80 and sm_90"
fi
python=${PYTHON:-python3}
if "$python" -c "import triton" 2>/dev/null; then
  if log=$("$python" -m sap_kernels.triton.compile_check 2>&1); then
    echo "triton: compiled $(grep -c ': ok' <<<"$log") kernel variants to PTX for sm_80 and sm_90"
  else
    grep -v ': ok' <<<"$log" >&2
    fail=1
  fi
else
  echo "triton not importable with $python: Triton kernels not compiled"
fi
exit $fail

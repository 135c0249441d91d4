#!/usr/bin/env bash
# Builds the CUDA extension against a CUDA build of torch on a machine without a
# GPU, loads it (every CUDA kernel registers against its schema at import, which
# checks the C++ signatures), compiles the Triton kernels with that torch's Triton
# and runs the test suite there (CPU and interpreter backends; CUDA tests skip).
#
# Not part of CI: it downloads torch with its CUDA packages (~5 GB). The default
# version is what the GPU machines run (torch 2.11.0+cu130, Triton 3.6).
#   bash tools/check_cuda_build.sh            # or TORCH_SPEC=torch==2.12.0 ...
set -euo pipefail

TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
VENV=${VENV:-$PWD/.venv-cuda}
WORK=${WORK:-$(mktemp -d)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy tqdm safetensors ninja pytest \
  pytest-benchmark hypothesis psutil matplotlib
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'"

git archive HEAD | tar -x -C "$WORK"
cd "$WORK"
SAP_KERNELS_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace
"$VENV/bin/python" - <<'PY'
import torch, triton
import sap_kernels
assert sap_kernels.has_cuda_kernels(), "the extension has no CUDA kernels"
ops = ["masked_power_sums", "magnitude_histogram", "rowwise_kth_key", "prune_masks", "apply_masks_"]
for op in ops:
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sap_kernels::{op}", key), (op, key)
print(f"CUDA extension loads: torch {torch.__version__}, triton {triton.__version__}")
PY
"$VENV/bin/python" -m sap_kernels.triton.compile_check > /dev/null
echo "Triton kernels compile to PTX for sm_80 and sm_90"
SAP_KERNELS_REQUIRE_EXTENSION=1 "$VENV/bin/python" -m pytest -q tests

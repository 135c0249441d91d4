#!/usr/bin/env bash
# Everything issue 4 asks of a GPU machine, in as few calls as a lease allows
# (the device tool: 10 minutes per command, 30 minutes of device time per
# session; a machine goes back 30 s after a call, so every call builds again).
#
#   bash tools/gpu_session.sh                   # build test bench (one long call)
#   bash tools/gpu_session.sh build test        # call 1: build, whole suite on cuda + triton
#   bash tools/gpu_session.sh build bench       # call 2: the 1e9-parameter benchmark
#   bash tools/gpu_session.sh build smoke       # a minute: import, one op per backend
#   bash tools/gpu_session.sh build sanitize    # call 3: compute-sanitizer on the CUDA op tests
#
# Logs and results go to $OUT: env.txt, build.log, tests.log, tests.xml,
# bench.log, gpu-bench.{json,md,png}, sanitize.log.
# Limits per step (seconds): TEST_TIMEOUT (default 330), BENCH_TIMEOUT (420),
# SANITIZE_TIMEOUT (400).
# A step that fails or times out is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 SAP_KERNELS_REQUIRE_EXTENSION=1
status=0

step_env() {
  {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
    nvcc --version | tail -2
    "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git log -1 --oneline 2>/dev/null || true
  } 2>&1 | tee "$OUT/env.txt"
}

step_build() {
  # sm_90 only: the H100/H200 (sm_80 is compiled in CI by tools/compile_cuda.sh)
  SAP_KERNELS_CUDA=1 SAP_KERNELS_CUDA_ARCHS=${SAP_KERNELS_CUDA_ARCHS:-90} MAX_JOBS=16 \
    "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tee "$OUT/build.log" || return 1
  "$PY" -c "import sap_kernels as s, torch; assert s.has_cuda_kernels(); \
print('backends on cuda:', s.available_backends(torch.device('cuda')))" 2>&1 | tee -a "$OUT/build.log"
}

step_smoke() {
  "$PY" - <<'PY' 2>&1 | tee -a "$OUT/build.log"
import torch, sap_kernels as sk
torch.manual_seed(0)
ws = [torch.randn(s, device="cuda") for s in [(1000, 37), (5,), (257, 3, 3)]]
ms = [torch.rand(w.shape, device="cuda") < 0.7 for w in ws]
for b in ("cuda", "triton"):
    ref = sk.pqi([w.cpu() for w in ws], [m.cpu() for m in ms], backend="reference")
    got = sk.pqi(ws, ms, backend=b)
    thr = sk.magnitude_threshold(ws, 1234, ms, backend=b)
    new = sk.prune(ws, ms, 1234, backend=b)
    removed = sum(int(m.sum()) for m in ms) - sum(int(m.sum()) for m in new)
    print(b, "pqi", float(got), "ref", float(ref), "threshold", float(thr), "removed", removed)
PY
}

step_test() {
  # the full Triton matrix (not the interpreter's CI subset), cuda and triton
  # cases; TEST_WORKERS pytest-xdist processes share the GPU and Triton's cache
  local workers=()
  if [ "${TEST_WORKERS:-8}" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    workers=(-n "${TEST_WORKERS:-8}")
  fi
  SAP_KERNELS_FULL_TRITON=1 timeout "${TEST_TIMEOUT:-330}" "$PY" -m pytest -q -rfE \
    -p no:cacheprovider "${workers[@]}" --durations=15 --junitxml="$OUT/tests.xml" tests 2>&1 |
    tee "$OUT/tests.log"
}

step_bench() {
  timeout "${BENCH_TIMEOUT:-420}" "$PY" benchmarks/bench_gpu.py --params "${PARAMS:-1e9}" \
    --repeats "${REPEATS:-20}" --out "$OUT/gpu-bench" 2>&1 | tee "$OUT/bench.log"
}

step_sanitize() {
  # memcheck (out-of-bounds and misaligned accesses, launch errors) over the
  # CUDA op tests, then racecheck (shared-memory hazards) over the kernels that
  # share counters between threads; small inputs, ~10-100x slower than native
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  {
    timeout "${SANITIZE_TIMEOUT:-400}" bash -c "
      '$sanitizer' --tool memcheck --error-exitcode 9 '$PY' -m pytest -q -x -p no:cacheprovider \
        tests/test_cuda_ops.py tests/test_cuda_table_cache.py &&
      '$sanitizer' --tool racecheck --error-exitcode 9 '$PY' -m pytest -q -x -p no:cacheprovider \
        tests/test_cuda_ops.py -k 'histogram or rowwise or prune'"
  } 2>&1 | tail -n 400 | tee "$OUT/sanitize.log"
}

steps=${*:-build test bench}
step_env
for step in $steps; do
  start=$(date +%s)
  "step_$step"
  rc=$?
  echo "== step $step: exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/env.txt"
  [ "$rc" -eq 0 ] || status=1
  if [ "$step" = build ] && [ "$rc" -ne 0 ]; then
    echo "build failed: later steps skipped" | tee -a "$OUT/env.txt"
    exit 1
  fi
done
exit $status

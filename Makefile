# make test  : create .venv, install what is missing, build the extension, run the tests
# make bench : same setup, then `sap-kernels bench`: every op against pure PyTorch
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BENCH_ARGS ?=

.PHONY: setup build test bench bench-pqi bench-threshold cuda-compile lint clean

# --system-site-packages: a torch that is already importable (e.g. a CUDA
# build on a GPU machine) is used as it is.
$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch==2.13.0 is the local CPU build; an unpinned torch would pull GBs of CUDA.
$(DEPS): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q numpy tqdm safetensors ninja pytest pytest-benchmark hypothesis psutil matplotlib scikit-learn
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton || echo "triton unavailable: its tests will be skipped"
	touch $@

setup: $(DEPS)

build: $(DEPS)
	SAP_KERNELS_REQUIRE_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .

# Every CUDA kernel compiles with nvcc even on machines without a GPU.
cuda-compile:
	@if command -v nvcc >/dev/null 2>&1; then PYTHON=$(PY) bash tools/compile_cuda.sh; \
	else echo "nvcc not found: CUDA kernels not compiled"; fi

test: build cuda-compile
	SAP_KERNELS_REQUIRE_EXTENSION=1 $(PY) -m pytest -q tests

bench: build
	$(PY) -m sap_kernels.cli bench --out bench-out $(BENCH_ARGS)

# The per-op benchmark scripts (issue figures in the README come from these).
bench-pqi: build
	$(PY) benchmarks/bench_pqi.py $(BENCH_ARGS)

bench-threshold: build
	$(PY) benchmarks/bench_threshold.py $(BENCH_ARGS)

lint:
	$(PY) -m ruff check sap_kernels tests benchmarks
	$(PY) -m ruff format --check sap_kernels tests benchmarks
	$(PY) -m pip install -q clang-format && $(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* tests/cpp/*

clean:
	rm -rf build *.egg-info sap_kernels/*.so

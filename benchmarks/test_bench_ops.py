"""Quick regression benchmarks at small sizes (pytest-benchmark):

    pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-compare   # against a saved run

Every op on every available kernel backend, the pure PyTorch eager baseline
(float64 reference) and the bandwidth probe, on ~4M LLM-shaped float32
weights. Ops whose kernel is not built here are skipped with the reason.
For the full comparison (GB/s, % of probe, torch.compile, errors) run
`sap-kernels bench`.
"""

from __future__ import annotations

import pytest
import torch

import sap_kernels
from sap_kernels import reference
from sap_kernels.benchmarking import llm_shaped_weights, random_masks, sum_probe

PARAMS = 4e6
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in sap_kernels.available_backends(DEVICE) if b != "reference"]


@pytest.fixture(scope="module")
def shards():
    return llm_shaped_weights(PARAMS, dtype=torch.float32, device=DEVICE, seed=0)[1]


@pytest.fixture(scope="module")
def masks(shards):
    return random_masks(shards, density=0.5, seed=1)


def _needs_kernel(op: str, backend: str) -> None:
    """Skips when the op has no kernel for this backend yet."""
    if backend == "triton":
        return
    key = "CUDA" if backend == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sap_kernels::{op}", key):
        pytest.skip(f"sap_kernels::{op} has no {key} kernel in this build")


def _k(shards, masks=None) -> int:
    total = sum(int(m.sum()) for m in masks) if masks else sum(t.numel() for t in shards)
    return max(1, total // 5)


def test_probe_sum(benchmark, shards):
    benchmark.group = "probe"
    benchmark(sum_probe(shards))


@pytest.mark.parametrize("scope", ["global", "layer", "neuron"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pqi(benchmark, shards, backend, scope):
    _needs_kernel("masked_power_sums", backend)
    benchmark.group = f"pqi-{scope}"
    benchmark(sap_kernels.pqi, shards, scope=scope, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pqi_masked(benchmark, shards, masks, backend):
    _needs_kernel("masked_power_sums", backend)
    benchmark.group = "pqi-global-masked"
    benchmark(sap_kernels.pqi, shards, masks, backend=backend)


def test_pqi_eager_reference(benchmark, shards):
    benchmark.group = "pqi-global"
    benchmark.pedantic(sap_kernels.pqi, (shards,), {"backend": "reference"}, rounds=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold(benchmark, shards, backend):
    _needs_kernel("magnitude_histogram", backend)
    benchmark.group = "threshold"
    benchmark(sap_kernels.magnitude_threshold, shards, _k(shards), backend=backend)


def test_threshold_eager_reference(benchmark, shards):
    benchmark.group = "threshold"
    benchmark.pedantic(
        reference.magnitude_threshold_by_concatenation, (shards, _k(shards)), rounds=3
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune(benchmark, shards, masks, backend):
    _needs_kernel("magnitude_histogram", backend)
    _needs_kernel("prune_masks", backend)
    benchmark.group = "prune"
    benchmark(sap_kernels.prune, shards, masks, _k(shards, masks), backend=backend)


def test_prune_eager_reference(benchmark, shards, masks):
    benchmark.group = "prune"
    benchmark.pedantic(reference.prune_by_stable_sort, (shards, masks, _k(shards, masks)), rounds=1)

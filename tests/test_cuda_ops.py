"""The five ops on the CUDA kernels (torch.ops.sap_kernels.* with CUDA tensors)
against sap_kernels.reference: the same checks as the Triton backend
(tests/test_triton_ops.py), plus run-to-run bit-identity. Skipped, with the
reason, where sap_kernels was built without CUDA kernels or no GPU exists."""

from __future__ import annotations

import pytest
import torch
from test_triton_ops import GLOBAL, LAYER, NEURON, OpChecks, make_inputs

import sap_kernels
from sap_kernels._extension import has_cuda_kernels

if not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="no CUDA device on this machine")
elif not has_cuda_kernels():
    pytestmark = pytest.mark.skip(reason="sap_kernels was built without its CUDA kernels")


class TestCudaOps(OpChecks):
    device = torch.device("cuda")

    def run(self, name, *args):
        return getattr(torch.ops.sap_kernels, name)(*args)

    @pytest.mark.parametrize("scope", [GLOBAL, LAYER, NEURON])
    def test_power_sums_bit_identical_across_runs(self, scope):
        shapes = [(512, 4096), (1,), (3, 7), (65537,)]
        weights, masks = make_inputs(shapes, torch.bfloat16, True, 70, self.device)
        first = self.run("masked_power_sums", weights, masks, 0.7, 1.3, scope)
        for _ in range(3):
            again = self.run("masked_power_sums", weights, masks, 0.7, 1.3, scope)
            assert torch.equal(again, first)

    def test_large_histogram_uses_shared_counters(self):
        # Pieces of >= 4096 elements go through the packed 16-bit shared
        # counters; 65,535 equal keys in one piece is the most a half holds.
        weights = [torch.full((65535 * 3,), 0.5, device=self.device), torch.randn(10000).cuda()]
        zeros = torch.zeros(2, dtype=torch.int64, device=self.device)
        got = self.run("magnitude_histogram", weights, [], LAYER, 32, zeros, 0)
        from sap_kernels import reference

        want = reference.magnitude_histogram(weights, [], LAYER, 32, zeros, 0)
        assert torch.equal(got.cpu(), want.cpu())


def test_cuda_backend_end_to_end():
    """sap_kernels.prune with backend='cuda' equals the stable-sort oracle."""
    from sap_kernels import reference

    weights, masks = make_inputs([(300, 70), (4097,), (5, 1)], torch.bfloat16, True, 80, "cuda")
    counts = 1000
    got = sap_kernels.prune(weights, masks, counts, scope="global", backend="cuda")
    want = reference.prune_by_stable_sort(weights, masks, counts, "global")
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu())


def test_graph_capture_is_refused_and_leaves_nothing_cached():
    """Inside torch.cuda.graph capture every op raises (its table upload would
    be recorded from a pinned block reused after the call); after the capture
    the same call runs and caches a table built outside it."""
    from sap_kernels import _extension, reference

    weights, _ = make_inputs([(64, 33), (100,)], torch.float32, False, 81, "cuda")
    zeros = torch.zeros(1, dtype=torch.int64, device="cuda")
    _extension.clear_cuda_table_cache()
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with pytest.raises(RuntimeError, match="captured into a CUDA graph"):
            with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=pool, stream=stream):
                torch.ops.sap_kernels.magnitude_histogram(weights, [], GLOBAL, 32, zeros, 0)
    assert _extension.cuda_table_cache_stats()["entries"] == 0
    got = torch.ops.sap_kernels.magnitude_histogram(weights, [], GLOBAL, 32, zeros, 0)
    want = reference.magnitude_histogram(weights, [], GLOBAL, 32, zeros, 0)
    assert torch.equal(got.cpu(), want.cpu())

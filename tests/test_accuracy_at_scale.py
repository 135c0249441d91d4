"""Accuracy at scale: 100M float32 weights, where a float32 sum drifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sap_kernels
from sap_kernels.sparsity import pqi_from_sums

N = 100_000_000


@pytest.mark.slow
@pytest.mark.skipif(not sap_kernels.has_extension(), reason="sap_kernels._C was not built")
def test_hundred_million_weights_within_1e6_of_float64():
    g = torch.Generator().manual_seed(1234)
    w = torch.empty(N)
    for start in range(0, N, 1 << 24):  # chunks keep the float64 temporaries small
        n = min(1 << 24, N - start)
        w[start : start + n] = torch.randn(n, generator=g) * torch.rand(n, generator=g)
    # float64 reference, computed chunk by chunk
    sp = sq = 0.0
    for start in range(0, N, 1 << 24):
        a = w[start : start + (1 << 24)].double().abs()
        sp += float(a.sqrt().sum())
        sq += float(a.sum())
    want = float(
        pqi_from_sums(torch.tensor(sp), torch.tensor(sq), torch.tensor(float(N)), 0.5, 1.0)
    )

    # A naive float32 accumulation drifts: a sequential float32 running sum of
    # |w| (numpy's cumsum in float32) loses ~10% once the total dwarfs each term.
    head = w[: 1 << 25].abs().numpy()
    naive_sq = float(np.cumsum(head, dtype=np.float32)[-1])
    exact_sq = float(head.astype(np.float64).sum())
    assert abs(naive_sq - exact_sq) / exact_sq > 1e-3

    got = float(sap_kernels.pqi([w], p=0.5, q=1.0, backend="cpu"))
    assert abs(got - want) < 1e-6
    sums = sap_kernels.pq_sums([w], p=0.5, q=1.0, backend="cpu")
    assert float(sums.count) == N
    assert abs(float(sums.sum_q) - sq) / sq < 1e-9

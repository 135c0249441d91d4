"""The paper's properties of the PQ Index (Theorem 1) on random vectors, on
every backend: D1 Robin Hood, D2 scaling, D3 rising tide, D4 cloning,
P2 babies, and the bounds 0 <= PQI <= 1 - d^(1/q - 1/p)."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device, kernel_backends

import sap_kernels
from sap_kernels import pqi_upper_bound

EXPONENTS = [(0.5, 1.0), (0.7, 1.3), (1.0, 2.0)]
ATOL = 1e-6  # the accuracy contract; float32 powers of a single weight are not exact
BACKENDS = [*kernel_backends(), "reference"]


def index(w, backend, p, q):
    return float(
        sap_kernels.pqi(
            [w.to(backend_device(backend) if backend != "reference" else w.device)],
            p=p,
            q=q,
            backend=backend,
        )
    )


def positive_vector(generator, n=None):
    n = n or int(torch.randint(5, 200, (1,), generator=generator))
    return torch.rand(n, generator=generator, dtype=torch.float64).float() + 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,q", EXPONENTS)
def test_d1_robin_hood(backend, p, q, generator):
    for _ in range(10):
        w = positive_vector(generator)
        i, j = int(w.argmax()), int(w.argmin())
        alpha = float((w[i] - w[j]) / 4)
        v = w.clone()
        v[i] -= alpha
        v[j] += alpha
        assert index(v, backend, p, q) < index(w, backend, p, q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,q", EXPONENTS)
def test_d2_scaling(backend, p, q, generator):
    w = positive_vector(generator)
    for alpha in (1 / 1024, 3.0, 64.0):  # powers of two and a non-power keep values exact-ish
        assert index(w * alpha, backend, p, q) == pytest.approx(index(w, backend, p, q), abs=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,q", EXPONENTS)
def test_d3_rising_tide(backend, p, q, generator):
    w = positive_vector(generator)
    assert index(w + 0.5, backend, p, q) < index(w, backend, p, q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,q", EXPONENTS)
def test_d4_cloning(backend, p, q, generator):
    w = positive_vector(generator)
    assert index(torch.cat([w, w]), backend, p, q) == pytest.approx(
        index(w, backend, p, q), abs=ATOL
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,q", EXPONENTS)
def test_p2_babies(backend, p, q, generator):
    w = positive_vector(generator)
    assert index(torch.cat([w, torch.zeros(1)]), backend, p, q) > index(w, backend, p, q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,q", EXPONENTS)
def test_bounds_equal_and_one_hot(backend, p, q, generator):
    for _ in range(10):
        w = torch.randn(int(torch.randint(1, 300, (1,), generator=generator)), generator=generator)
        value, d = index(w, backend, p, q), w.numel()
        assert -ATOL <= value <= pqi_upper_bound(d, p, q) + ATOL
    d = 37
    assert index(torch.full((d,), -0.3), backend, p, q) == pytest.approx(0.0, abs=ATOL)
    one_hot = torch.zeros(d)
    one_hot[11] = 2.5
    assert index(one_hot, backend, p, q) == pytest.approx(pqi_upper_bound(d, p, q), abs=ATOL)

"""pq_sums / pqi on every backend against the float64 reference on the same values."""

from __future__ import annotations

import math
import platform

import pytest
import torch
from conftest import backend_device, kernel_backends, random_mask, random_weights

import sap_kernels
from sap_kernels import reference

ATOL = 1e-6  # the contract: PQI within 1e-6 absolute of float64 on the same values
SCOPES = ["global", "layer", "neuron"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXPONENTS = [(0.5, 1.0), (0.7, 1.3), (1.0, 2.0), (0.5, 3.0), (2.0, 4.5), (0.25, 0.5)]


def flat(result) -> torch.Tensor:
    return torch.cat([r.reshape(-1) for r in result]) if isinstance(result, list) else result


def assert_pqi_close(actual, expected, atol=ATOL):
    actual, expected = flat(actual).cpu(), flat(expected).cpu()
    assert actual.dtype == torch.float64
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, equal_nan=True)


def mixed_shapes():
    return [(300, 257), (7,), (4097,), (33, 1), (1,), (5, 3, 4), (64, 129)]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "heavy", "zeros", "ties"])
@pytest.mark.parametrize("pruned", [None, 0.0, 0.5, 0.999])
@pytest.mark.parametrize("scope", SCOPES)
def test_pqi_matches_reference(backend, dtype, kind, pruned, scope, generator):
    device = backend_device(backend)
    weights = [random_weights(s, dtype, kind, generator).to(device) for s in mixed_shapes()]
    masks = None
    if pruned is not None:
        masks = [random_mask(w.shape, pruned, generator).to(device) for w in weights]
    for p, q in [(0.5, 1.0), (0.7, 1.3)]:
        got = sap_kernels.pqi(weights, masks, p=p, q=q, scope=scope, backend=backend)
        want = sap_kernels.pqi(weights, masks, p=p, q=q, scope=scope, backend="reference")
        assert_pqi_close(got, want)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("p,q", EXPONENTS)
@pytest.mark.parametrize("scope", SCOPES)
def test_special_and_general_exponents(backend, p, q, scope, generator):
    device = backend_device(backend)
    weights = [
        random_weights(s, torch.float32, "heavy", generator).to(device) for s in mixed_shapes()
    ]
    masks = [random_mask(w.shape, 0.3, generator).to(device) for w in weights]
    got = sap_kernels.pq_sums(weights, masks, p=p, q=q, scope=scope, backend=backend)
    want = sap_kernels.pq_sums(weights, masks, p=p, q=q, scope=scope, backend="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=2e-6, atol=1e-300)
    assert_pqi_close(
        sap_kernels.pqi(weights, masks, p=p, q=q, scope=scope, backend=backend),
        sap_kernels.pqi(weights, masks, p=p, q=q, scope=scope, backend="reference"),
    )


@pytest.mark.parametrize("backend", kernel_backends())
def test_counts_are_exact(backend, generator):
    device = backend_device(backend)
    weights = [random_weights((37, 53), torch.float32, "zeros", generator).to(device)]
    masks = [random_mask((37, 53), 0.4, generator).to(device)]
    sums = sap_kernels.pq_sums(weights, masks, scope="neuron", backend=backend)
    torch.testing.assert_close(sums.count.cpu(), masks[0].sum(1).double().cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("scope", SCOPES)
def test_thousand_tiny_tensors(backend, scope, generator):
    device = backend_device(backend)
    sizes = torch.randint(1, 40, (1000,), generator=generator).tolist()
    weights = [random_weights((n,), torch.float32, "normal", generator).to(device) for n in sizes]
    masks = [random_mask(w.shape, 0.2, generator).to(device) for w in weights]
    got = sap_kernels.pqi(weights, masks, scope=scope, backend=backend)
    want = sap_kernels.pqi(weights, masks, scope=scope, backend="reference")
    assert_pqi_close(got, want)


@pytest.mark.parametrize("backend", kernel_backends())
def test_mixed_dtypes_in_one_call(backend, generator):
    device = backend_device(backend)
    weights = [
        random_weights((50, 21), dt, "normal", generator).to(device)
        for dt in (torch.float32, torch.bfloat16, torch.float16)
    ]
    for scope in SCOPES:
        assert_pqi_close(
            sap_kernels.pqi(weights, scope=scope, backend=backend),
            sap_kernels.pqi(weights, scope=scope, backend="reference"),
        )


@pytest.mark.parametrize("p, q", [(0.5, 1.0), (1.0, 2.0), (0.3, 7.0)])
def test_pqi_from_sums_formula(p, q):
    """The formula on sums of weights from 1e-40 to 1e40 and up to 1e12 of
    them, and NaN exactly where a count or sum is zero (every combination)."""
    import math

    # (S_p, S_q, d) of k weights of magnitude a and n - k of magnitude b
    mixes = [(10, 10, 0.5, 0.0), (1e12, 1e6, 1e-40, 1e-3), (3, 1, 1e40, 1e-40), (1, 1, 7.0, 0.0)]
    cases = [(k * a**p + (n - k) * b**p, k * a**q + (n - k) * b**q, n) for n, k, a, b in mixes]
    cases += [(sp, sq, d) for sp in (0.0, 2.0) for sq in (0.0, 5.0) for d in (0.0, 4.0)]
    sp, sq, d = (torch.tensor(c, dtype=torch.float64) for c in zip(*cases))
    got = sap_kernels.pqi_from_sums(sp, sq, d, p, q)
    for (a, b, n), value in zip(cases, got.tolist()):
        if min(a, b, n) == 0:
            assert math.isnan(value), (a, b, n)
            continue
        # abs: the log terms reach ~30 and cancel to ~1e-6, a few ulps of 30
        log_ratio = (1 / q - 1 / p) * math.log(n) + math.log(a) / p - math.log(b) / q
        assert value == pytest.approx(-math.expm1(log_ratio), rel=1e-12, abs=1e-14), (a, b, n)


@pytest.mark.parametrize("backend", kernel_backends())
def test_undefined_units_are_nan(backend):
    device = backend_device(backend)
    weights = [torch.zeros(4, 5, device=device), torch.ones(3, 2, device=device)]
    masks = [
        torch.ones(4, 5, dtype=torch.bool, device=device),
        torch.zeros(3, 2, dtype=torch.bool, device=device),
    ]
    layer = sap_kernels.pqi(weights, masks, scope="layer", backend=backend)
    assert torch.isnan(layer).all()  # all-zero layer; fully pruned layer
    assert torch.isnan(sap_kernels.pqi(weights, masks, backend=backend))
    neuron = sap_kernels.pqi(weights, masks, scope="neuron", backend=backend)
    assert all(torch.isnan(n).all() for n in neuron)


@pytest.mark.parametrize("backend", kernel_backends())
def test_non_contiguous_and_empty_tensors(backend, generator):
    device = backend_device(backend)
    base = random_weights((64, 48), torch.float32, "normal", generator).to(device)
    weights = [base.t(), base[:, ::3], torch.empty(0, 5, device=device), base[::2]]
    masks = [random_mask(w.shape, 0.5, generator).to(device) for w in weights]
    for scope in SCOPES:
        assert_pqi_close(
            sap_kernels.pqi(weights, masks, scope=scope, backend=backend),
            sap_kernels.pqi(
                [w.contiguous() for w in weights], masks, scope=scope, backend="reference"
            ),
        )


@pytest.mark.parametrize("backend", kernel_backends())
def test_deterministic(backend, generator):
    device = backend_device(backend)
    weights = [
        random_weights((513, 257), torch.float32, "heavy", generator).to(device) for _ in range(3)
    ]
    first = sap_kernels.pq_sums(weights, p=0.7, q=1.3, backend=backend)
    for _ in range(3):
        again = sap_kernels.pq_sums(weights, p=0.7, q=1.3, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("backend", kernel_backends())
def test_extreme_magnitudes_stay_accurate(backend, generator):
    """Powers that overflow or underflow float32 are summed in float64."""
    device = backend_device(backend)
    base = random_weights((1000,), torch.float32, "normal", generator)
    for scale in (1e-30, 1e-12, 1e12, 1e30):
        weights = [(base * scale).to(device)]
        for p, q in [(0.5, 1.0), (1.0, 2.0), (0.7, 3.3)]:
            got = sap_kernels.pqi(weights, p=p, q=q, backend=backend)
            want = sap_kernels.pqi(weights, p=p, q=q, backend="reference")
            assert math.isfinite(float(got)), (scale, p, q)
            assert_pqi_close(got, want)


def test_module_input_uses_default_filter(generator):
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    chosen = [model[0].weight, model[2].weight]
    assert_pqi_close(
        sap_kernels.pqi(model, scope="layer"),
        sap_kernels.pqi(chosen, scope="layer", backend="reference"),
    )
    assert [n for n, _ in sap_kernels.parameters_to_prune(model)] == ["0.weight", "2.weight"]


def test_reference_matches_direct_formula(generator):
    w = random_weights((1000,), torch.float32, "heavy", generator)
    d, p, q = w.numel(), 0.5, 1.0
    a = w.double().abs()
    direct = 1 - d ** (1 / q - 1 / p) * a.pow(p).sum() ** (1 / p) / a.pow(q).sum() ** (1 / q)
    assert_pqi_close(sap_kernels.pqi([w], backend="reference"), direct, atol=1e-12)
    sums = reference.masked_power_sums([w], [None], p, q, 0)
    assert sums.shape == (1, 3) and float(sums[0, 2]) == d


CPU_ISAS = ["", "x86-64-v3", "baseline"]  # "": the widest this CPU runs


@pytest.mark.skipif(
    "cpu" not in sap_kernels.available_backends(torch.device("cpu"))
    or platform.machine() != "x86_64",
    reason="the x86-64 CPU kernels are not built",
)
@pytest.mark.parametrize("kind", ["normal", "heavy", "zeros", "ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_instruction_set_copy(kind, dtype, generator, monkeypatch):
    """The CPU block kernels are compiled for x86-64-v4, -v3 and the baseline; each copy
    meets the accuracy contract, and all three give bit-identical sums for every exponent:
    the order of additions is fixed by the code, not by the vector width, and no copy
    contracts a product and a sum into an FMA."""
    weights = [random_weights(s, dtype, kind, generator) for s in mixed_shapes()]
    masks = [random_mask(w.shape, 0.4, generator) for w in weights]
    for p, q in [*EXPONENTS, (2.0, 7.0)]:
        want = sap_kernels.pqi(weights, masks, p=p, q=q, scope="layer", backend="reference")
        sums = {}
        for isa in CPU_ISAS:
            monkeypatch.setenv("SAP_KERNELS_CPU_ISA", isa)
            sums[isa] = torch.ops.sap_kernels.masked_power_sums(weights, masks, p, q, 1)
            got = sap_kernels.pqi(weights, masks, p=p, q=q, scope="layer", backend="cpu")
            assert_pqi_close(got, want)
        for isa in CPU_ISAS[1:]:
            assert torch.equal(sums[isa], sums[""]), (isa, p, q)

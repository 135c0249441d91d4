"""Bad input to pq_sums / pqi: a clear error naming the argument, nothing modified."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_device, kernel_backends

import sap_kernels

BACKENDS = [*kernel_backends(), "reference"]


def inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=g).to(device), torch.randn(4, generator=g).to(device)]
    masks = [
        torch.rand(6, 5, generator=g).to(device) > 0.5,
        torch.ones(4, dtype=torch.bool, device=device),
    ]
    return weights, masks


def device_of(backend):
    return backend_device(backend) if backend != "reference" else "cpu"


def unchanged(before, after) -> bool:
    """Bitwise equality (NaN-safe)."""
    return all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, after))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "p,q,match",
    [
        (0.0, 1.0, "p must be > 0"),
        (-0.5, 1.0, "p must be > 0"),
        (1.0, 1.0, "q must be greater than p"),
        (2.0, 1.0, "q must be greater than p"),
        (math.nan, 1.0, "p must be finite"),
        (0.5, math.inf, "q must be finite"),
    ],
)
def test_bad_exponents(backend, p, q, match):
    weights, masks = inputs(device_of(backend))
    with pytest.raises(ValueError, match=match):
        sap_kernels.pqi(weights, masks, p=p, q=q, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_wrong_shape(backend):
    weights, masks = inputs(device_of(backend))
    masks[1] = masks[1][:3]
    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(3,\) but tensors\[1\]"):
        sap_kernels.pqi(weights, masks, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_wrong_dtype(backend):
    weights, masks = inputs(device_of(backend))
    masks[0] = masks[0].float()
    with pytest.raises(TypeError, match=r"masks\[0\] has dtype torch.float32; expected torch.bool"):
        sap_kernels.pqi(weights, masks, backend=backend)


MASK_CALLS = {
    "pqi": lambda w, m, b: sap_kernels.pqi(w, m, backend=b),
    "pqi-neuron": lambda w, m, b: sap_kernels.pqi(w, m, scope="neuron", backend=b),
    "threshold": lambda w, m, b: sap_kernels.magnitude_threshold(w, 1, m, backend=b),
    "threshold-neuron": lambda w, m, b: sap_kernels.magnitude_threshold(
        w, 1, m, scope="neuron", backend=b
    ),
    "prune": lambda w, m, b: sap_kernels.prune(w, m, 2, backend=b),
    "prune-layer": lambda w, m, b: sap_kernels.prune(w, m, 1, scope="layer", backend=b),
    "prune_": lambda w, m, b: sap_kernels.prune_(w, m, 2, backend=b),
    "apply_masks_": lambda w, m, b: sap_kernels.apply_masks_(w, m, backend=b),
}
BAD_MASKS = {
    "shape": (lambda m: m[:3], ValueError, r"masks\[1\] has shape \(3,\) but tensors\[1\]"),
    "dtype": (lambda m: m.float(), TypeError, r"masks\[1\] has dtype torch.float32; expected"),
    "meta": (lambda m: m.to("meta"), ValueError, r"masks\[1\] is on meta but tensors\[1\]"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", sorted(MASK_CALLS))
@pytest.mark.parametrize("bad", sorted(BAD_MASKS))
def test_bad_mask_named_by_every_function(backend, call, bad):
    """The kernel backends' ops check the masks (the API passes plain masks on
    the weights' device through unchecked); either way the error is the API's,
    naming the tensor, and nothing is modified."""
    weights, masks = inputs(device_of(backend))
    spoil, error, match = BAD_MASKS[bad]
    masks[1] = spoil(masks[1])
    before = [w.clone() for w in weights], [m.clone() for m in masks]
    with pytest.raises(error, match=match):
        MASK_CALLS[call](weights, masks, backend)
    assert unchanged(before[0], weights)
    assert all(
        torch.equal(a.cpu(), b.cpu()) for a, b in zip(before[1], masks) if b.device.type != "meta"
    )


def test_mask_wrong_device():
    weights, masks = inputs()
    masks[1] = masks[1].to("meta")
    with pytest.raises(ValueError, match=r"masks\[1\] is on meta but tensors\[1\] is on cpu"):
        sap_kernels.pqi(weights, masks)


def test_mixed_devices():
    weights, _ = inputs()
    weights[1] = weights[1].to("meta")
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta but tensors\[0\] is on cpu"):
        sap_kernels.pqi(weights)


def test_wrong_mask_count():
    weights, masks = inputs()
    with pytest.raises(ValueError, match="masks has 1 entries but there are 2 weight tensors"):
        sap_kernels.pqi(weights, masks[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_tensor(backend):
    weights, _ = inputs(device_of(backend))
    weights.append(torch.arange(6, device=weights[0].device))
    with pytest.raises(TypeError, match=r"tensors\[2\] has dtype torch.int64"):
        sap_kernels.pqi(weights, backend=backend)


def test_empty_list_and_wrong_types():
    with pytest.raises(ValueError, match="tensors is an empty list"):
        sap_kernels.pqi([])
    with pytest.raises(TypeError, match="not a tensor"):
        sap_kernels.pqi(torch.randn(3))
    with pytest.raises(TypeError, match=r"tensors\[0\] is a list"):
        sap_kernels.pqi([[1.0, 2.0]])
    with pytest.raises(ValueError, match="scope must be one of"):
        sap_kernels.pqi([torch.randn(3)], scope="row")
    with pytest.raises(ValueError, match="backend must be one of"):
        sap_kernels.pqi([torch.randn(3)], backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_non_finite_weights(backend, bad, dtype):
    weights, masks = inputs(device_of(backend))
    weights = [w.to(dtype) for w in weights]
    weights[1][2] = bad
    before = [w.clone() for w in weights], [m.clone() for m in masks]
    for scope in ("global", "layer", "neuron"):
        with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or infinity"):
            sap_kernels.pqi(weights, masks, scope=scope, backend=backend)
    assert unchanged(before[0], weights) and unchanged(before[1], masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_pruned_weight_is_ignored(backend):
    """Only retained weights enter the sums: a NaN under a False mask is harmless."""
    weights, masks = inputs(device_of(backend))
    weights[1][2] = math.nan
    masks[1][2] = False
    clean = [w.clone() for w in weights]
    clean[1][2] = 0.0
    assert float(sap_kernels.pqi(weights, masks, backend=backend)) == pytest.approx(
        float(sap_kernels.pqi(clean, masks, backend="reference")), abs=1e-6
    )


def test_float64_uses_reference_and_cpu_backend_refuses_it():
    weights = [torch.randn(10, 3, dtype=torch.float64)]
    assert math.isfinite(float(sap_kernels.pqi(weights)))
    if sap_kernels.has_extension():
        with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.float64"):
            sap_kernels.pqi(weights, backend="cpu")

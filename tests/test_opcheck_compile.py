"""Op registration: torch.library.opcheck on each compiled op, and the public
API under torch.compile(fullgraph=True) without graph breaks."""

from __future__ import annotations

import pytest
import torch
from conftest import random_weights

import sap_kernels

pytestmark = pytest.mark.skipif(
    not sap_kernels.has_extension(), reason="sap_kernels._C was not built"
)


def sample_inputs(generator):
    weights = [
        random_weights((17, 9), torch.float32, "normal", generator),
        random_weights((5,), torch.bfloat16, "normal", generator),
        random_weights((3, 2, 2), torch.float16, "normal", generator),
    ]
    masks = [torch.rand(w.shape, generator=generator) > 0.3 for w in weights]
    return weights, masks


@pytest.mark.parametrize("scope", [0, 1, 2])
def test_opcheck_masked_power_sums(scope, generator):
    weights, masks = sample_inputs(generator)
    for m in (masks, [None, masks[1], None]):
        torch.library.opcheck(
            torch.ops.sap_kernels.masked_power_sums.default, (weights, m, 0.5, 1.0, scope)
        )
        torch.library.opcheck(
            torch.ops.sap_kernels.masked_power_sums.default, (weights, m, 0.7, 1.3, scope)
        )


@pytest.mark.parametrize("scope", ["global", "layer", "neuron"])
def test_pqi_compiles_without_graph_break(scope, generator):
    weights, masks = sample_inputs(generator)

    def measure(ws, ms):
        return sap_kernels.pqi(ws, ms, p=0.5, q=1.0, scope=scope)

    compiled = torch.compile(measure, fullgraph=True, backend="aot_eager")
    eager = measure(weights, masks)
    got = compiled(weights, masks)
    if scope == "neuron":
        got, eager = torch.cat(got), torch.cat(eager)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-12, equal_nan=True)


def test_pqi_in_compiled_training_step(generator):
    """A compiled forward/loss and a compiled post-step (masks applied, PQI
    measured); backward and the optimizer run between them."""
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    params = [p for _, p in sap_kernels.parameters_to_prune(model)]
    masks = [torch.rand(p.shape, generator=generator) > 0.5 for p in params]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 12, generator=generator), torch.randint(0, 3, (32,), generator=generator)

    @torch.compile(fullgraph=True)
    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x), y)

    @torch.compile(fullgraph=True)
    def after_step():
        with torch.no_grad():
            for p, m in zip(params, masks):
                p.mul_(m)
        return sap_kernels.pqi(model, masks, scope="layer")

    for _ in range(3):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
        value = after_step()
    assert all(bool((p[~m] == 0).all()) for p, m in zip(params, masks))
    want = sap_kernels.pqi(model, masks, scope="layer", backend="reference")
    torch.testing.assert_close(value, want, rtol=0, atol=1e-6)


def test_ops_are_tagged_cudagraph_unsafe():
    """Each op uploads a table and most read a result back: torch.compile's
    CUDA graphs must run them outside a graph."""
    import sap_kernels

    if not sap_kernels.has_extension():
        pytest.skip("the compiled extension is not built")
    names = [
        "masked_power_sums", "magnitude_histogram", "rowwise_kth_key", "kth_key_by_sample",
        "prune_masks_by_sample", "prune_masks_by_sample_", "prune_masks", "prune_masks_",
        "prune_rows_", "apply_masks_",
    ]  # fmt: skip
    for name in names:
        tags = getattr(torch.ops.sap_kernels, name).default.tags
        assert torch.Tag.cudagraph_unsafe in tags, name

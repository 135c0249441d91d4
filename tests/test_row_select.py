"""The CPU row select's sampled path (csrc/cpu/row_select.h: rows of 512 ..
65,536 keys, AVX-512 or AVX2) against the float64 reference and against the
full 2,048-bin count it falls back to (SAP_KERNELS_CPU_ISA=baseline forces it),
on rows built to make the sample miss, to leave it too few keys, and to fill
the bracket with ties."""

from __future__ import annotations

import pytest
import torch
from conftest import random_mask, random_weights

import sap_kernels
from sap_kernels import reference

pytestmark = pytest.mark.skipif(
    not sap_kernels.has_extension(), reason="the compiled extension sap_kernels._C is not built"
)
ops = torch.ops.sap_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STRIDE = 8  # kRowSampleStride: the sample reads keys 0, 8, 16, ... of a row
# SAP_KERNELS_CPU_ISA: "" the widest this CPU runs (AVX-512 here), x86-64-v3 the
# sampled path's AVX2 copy, baseline the full 2,048-bin count without vectors
CPU_ISAS = ["", "x86-64-v3", "baseline"]


def adversarial_rows(rows: int, length: int, dtype, generator) -> torch.Tensor:
    """The sampled positions hold large magnitudes, the others small ones: the
    sample puts the k-th key far above the true one (a miss) for small k."""
    w = torch.randn(rows, length, generator=generator) * 0.01
    w[:, ::STRIDE] = 50.0 + torch.rand(rows, (length + STRIDE - 1) // STRIDE, generator=generator)
    return w.to(dtype)


def bimodal_rows(rows: int, length: int, dtype, generator) -> torch.Tensor:
    """Two clusters 2^20 apart: a bracket between them holds few keys."""
    w = torch.randn(rows, length, generator=generator)
    far = torch.rand(rows, length, generator=generator) < 0.5
    return torch.where(far, w * 2.0**10, w * 2.0**-10).to(dtype)


def row_inputs(dtype, generator):
    shapes = [(6, 512), (5, 777), (4, 1408), (3, 4099), (2, 65_536)]
    weights = [random_weights(shapes[0], dtype, "normal", generator),
               random_weights(shapes[1], dtype, "ties", generator),
               adversarial_rows(*shapes[2], dtype, generator),
               bimodal_rows(*shapes[3], dtype, generator),
               random_weights(shapes[4], dtype, "zeros", generator)]  # fmt: skip
    # dense, none, sparse enough that a 512-key row samples < 32 retained keys
    masks = [random_mask(shapes[0], 0.95, generator), None,
             random_mask(shapes[2], 0.3, generator), None,
             random_mask(shapes[4], 0.5, generator)]  # fmt: skip
    return weights, masks


def retained_per_row(weights, masks) -> torch.Tensor:
    counts = []
    for w, m in zip(weights, masks):
        shape = (w.shape[0], w.numel() // max(w.shape[0], 1))  # -1 is ambiguous for 0 rows
        rows = m.reshape(shape) if m is not None else torch.ones(shape, dtype=torch.bool)
        counts.append(rows.sum(1))
    return torch.cat(counts).long()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_sampled_rows_match_reference_and_full_count(dtype, fraction, generator, monkeypatch):
    weights, masks = row_inputs(dtype, generator)
    key_bits = 16 if dtype != torch.float32 else 32
    retained = retained_per_row(weights, masks)
    ks = (retained.double() * fraction).round().long()
    ks[1::4] = (retained[1::4] * torch.rand(ks[1::4].shape, generator=generator)).long()
    want = reference.rowwise_kth_key(weights, masks, key_bits, ks)
    got = ops.rowwise_kth_key(weights, masks, key_bits, ks)
    assert torch.equal(got, want)
    for isa in CPU_ISAS[1:]:
        monkeypatch.setenv("SAP_KERNELS_CPU_ISA", isa)
        assert torch.equal(ops.rowwise_kth_key(weights, masks, key_bits, ks), want), isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sampled_rows_with_32_bit_keys_of_16_bit_weights(dtype, generator):
    weights, masks = row_inputs(dtype, generator)
    retained = retained_per_row(weights, masks)
    ks = (retained * torch.rand(retained.shape, generator=generator)).long()
    want = reference.rowwise_kth_key(weights, masks, 32, ks)
    assert torch.equal(ops.rowwise_kth_key(weights, masks, 32, ks), want)


def test_sampled_rows_errors_name_the_row(generator):
    weights, masks = row_inputs(torch.float32, generator)
    retained = retained_per_row(weights, masks)
    with pytest.raises(ValueError, match=r"ks\[7\] = \d+ is out of range"):
        ks = retained.clone()
        ks[7] += 1  # the second tensor's second row
        ops.rowwise_kth_key(weights, masks, 32, ks)
    weights[3][2, 4000] = float("nan")
    with pytest.raises(ValueError, match=r"weights\[3\] contains NaN or infinity"):
        ops.rowwise_kth_key(weights, masks, 32, retained // 2)
    # k = 0 counts the row without selecting: the NaN is still found
    with pytest.raises(ValueError, match=r"weights\[3\] contains NaN or infinity"):
        ops.rowwise_kth_key(weights, masks, 32, torch.zeros_like(retained))


# --- prune_rows_: neuron-scope select and prune in one pass ---------------------


def prune_inputs(dtype, generator):
    weights, masks = row_inputs(dtype, generator)
    weights += [
        random_weights((7, 300), dtype, "ties", generator),  # partition path
        random_weights((2, 70_000), dtype, "ties", generator),  # 65,536-bin path
        torch.zeros((3, 0), dtype=dtype),  # rows of length 0
        random_weights((5,), dtype, "normal", generator),
    ]  # 1-D: rows of one
    masks += [random_mask((7, 300), 0.2, generator), None, None, None]  # fmt: skip
    masks = [
        torch.ones(w.shape, dtype=torch.bool) if m is None else m for w, m in zip(weights, masks)
    ]
    return weights, masks


def composed_prune(weights, masks, key_bits, counts):
    """rowwise_kth_key then prune_masks_: what prune_rows_ fuses."""
    out = [m.clone() for m in masks]
    result = ops.rowwise_kth_key(weights, out, key_bits, counts)
    keys = result[:, 0].contiguous()
    ops.prune_masks_(weights, out, 2, key_bits, keys, counts - result[:, 1])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0, None])
@pytest.mark.parametrize("isa", CPU_ISAS, ids=["widest", "avx2", "portable"])
def test_prune_rows_matches_composition_and_reference(dtype, fraction, isa, generator, monkeypatch):
    monkeypatch.setenv("SAP_KERNELS_CPU_ISA", isa)
    weights, masks = prune_inputs(dtype, generator)
    key_bits = 16 if dtype != torch.float32 else 32
    retained = retained_per_row(weights, masks)
    if fraction is None:
        counts = (retained * torch.rand(retained.shape, generator=generator)).long()
    else:
        counts = (retained.double() * fraction).round().long()
    want = reference.prune_by_stable_sort(weights, masks, counts, "neuron")
    assert all(
        torch.equal(a, b) for a, b in zip(composed_prune(weights, masks, key_bits, counts), want)
    )
    got = [m.clone() for m in masks]
    ops.prune_rows_(weights, got, key_bits, counts)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), i


@pytest.mark.parametrize("bad", ["count", "nan", "empty_row"])
def test_prune_rows_error_leaves_masks_unchanged(bad, generator):
    weights, masks = prune_inputs(torch.float32, generator)
    retained = retained_per_row(weights, masks)
    counts = retained // 3
    if bad == "count":
        row = int(retained.numel()) - 4  # a row of the 70,000-key tensor
        counts[row] = retained[row] + 1
        match = rf"counts\[{row}\] = \d+ is out of range"
    elif bad == "nan":
        weights[4][1, 60_000] = float("nan")
        masks[4][1, 60_000] = True
        match = r"weights\[4\] contains NaN or infinity"
    else:
        counts[-6] = 1  # the last row of the (3, 0) tensor
        match = rf"counts\[{int(retained.numel()) - 6}\] = 1 is out of range"
    before = [m.clone() for m in masks]
    with pytest.raises(ValueError, match=match):
        ops.prune_rows_(weights, masks, 32, counts)
    assert all(torch.equal(a, b) for a, b in zip(masks, before))


def test_prune_rows_opcheck(generator):
    weights = [random_weights((6, 600), torch.float32, "ties", generator), torch.randn(4)]
    masks = [random_mask((6, 600), 0.3, generator), torch.ones(4, dtype=torch.bool)]
    counts = torch.tensor([5, 0, 100, 7, 1, 300, 1, 0, 1, 1])
    torch.library.opcheck(ops.prune_rows_, (weights, masks, 32, counts))


@pytest.fixture
def prune_rows_calls(monkeypatch) -> list[str]:
    """The backends that ops.prune_rows_ was called with, call by call."""
    calls = []
    fused = sap_kernels.ops.prune_rows_

    def spy(*args):
        calls.append(args[0])
        return fused(*args)

    monkeypatch.setattr(sap_kernels.ops, "prune_rows_", spy)
    return calls


def test_api_prune_in_place_neuron_uses_prune_rows(generator, prune_rows_calls):

    weights, masks = prune_inputs(torch.float32, generator)
    counts = retained_per_row(weights, masks) // 4
    want = reference.prune_by_stable_sort(weights, masks, counts, "neuron")
    sap_kernels.prune_(weights, masks, counts, scope="neuron", backend="cpu")
    assert prune_rows_calls == ["cpu"]
    assert all(torch.equal(a, b) for a, b in zip(masks, want))
    with pytest.raises(ValueError, match=r"counts\[0\]"):  # the API's message, masks unchanged
        sap_kernels.prune_(weights, masks, counts + 10_000, scope="neuron", backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(masks, want))


@pytest.mark.parametrize("kind", ["copies", "no masks", "non-contiguous in place"])
def test_api_prune_new_masks_neuron_uses_prune_rows(kind, generator, prune_rows_calls):
    """`prune` (new masks), and `prune_` on masks it cannot write where they are,
    run prune_rows_ on copies: the result matches the reference and the inputs
    are untouched."""

    weights, masks = prune_inputs(torch.float32, generator)
    if kind == "no masks":
        masks = None
    elif kind == "non-contiguous in place":
        masks = [m.t().contiguous().t() if m.dim() == 2 else m for m in masks]
    counts = retained_per_row(weights, masks or [None] * len(weights)) // 3
    want = reference.prune_by_stable_sort(weights, masks, counts, "neuron")
    before = None if masks is None else [m.clone() for m in masks]
    if kind == "non-contiguous in place":
        got = sap_kernels.prune_(weights, masks, counts, scope="neuron", backend="cpu")
        assert all(g is m for g, m in zip(got, masks))
    else:
        got = sap_kernels.prune(weights, masks, counts, scope="neuron", backend="cpu")
        if masks is not None:
            assert all(torch.equal(a, b) for a, b in zip(masks, before))
    assert prune_rows_calls == ["cpu"]
    assert all(g.is_contiguous() or kind == "non-contiguous in place" for g in got)
    assert all(torch.equal(a, b) for a, b in zip(got, want))

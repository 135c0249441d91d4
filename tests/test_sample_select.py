"""kth_key_by_sample (CPU, global scope): one pass after bracketing the k-th key
with a sample. Whatever the sample size, a result other than a miss (-2) must
equal the radix select's (key, below); through the API a miss falls back to
the radix select, so thresholds and masks stay exact."""

from __future__ import annotations

import pytest
import torch
from conftest import random_mask, random_weights

import sap_kernels
from sap_kernels import reference, selection

pytestmark = pytest.mark.skipif(
    not sap_kernels.has_extension(), reason="the compiled extension sap_kernels._C is not built"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["normal", "ties", "zeros", "heavy"]
# 4 and 16: too few sampled keys to bracket anything (every retained key is a
# candidate, which overflows the budget of n/16 + 16 s: a miss); 100 and 1000:
# real brackets; 65,536: the default, larger than these inputs (no sampling).
SAMPLE_SIZES = [4, 16, 100, 1000, 65536]
SHAPES = [(97, 13), (4001,), (5, 1), (1, 1), (3, 40, 50), (2, 20_001)]
MISS = -2


def radix_key_and_below(weights, masks, k: int):
    """(key, below) of the k-th smallest retained key by the float64 reference ops."""
    key_bits = reference.key_bits_for(weights)
    ks = torch.tensor([k])
    nonfinite = selection._nonfinite_digit(key_bits, weights[0].dtype)
    keys, below = selection._select_radix(
        "reference", weights, masks, 0, key_bits, ks, None, "k", False, str, nonfinite
    )
    return int(keys[0]), int(below[0])


def make_inputs(dtype, kind, masked, generator):
    weights = [random_weights(s, dtype, kind, generator) for s in SHAPES]
    masks = [random_mask(s, 0.4, generator) if masked and i % 2 == 0 else None
             for i, s in enumerate(SHAPES)]  # fmt: skip
    retained = sum(w.numel() if m is None else int(m.sum()) for w, m in zip(weights, masks))
    return weights, masks, retained


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_sample_select_matches_radix(dtype, kind, masked, generator):
    weights, masks, retained = make_inputs(dtype, kind, masked, generator)
    key_bits = reference.key_bits_for(weights)
    ks = [1, retained, *torch.randint(1, retained + 1, (6,), generator=generator).tolist()]
    outcomes = set()
    for k in ks:
        want = radix_key_and_below(weights, masks, k)
        for sample_size in SAMPLE_SIZES:
            got = torch.ops.sap_kernels.kth_key_by_sample(
                weights, masks, key_bits, torch.tensor([k]), sample_size
            ).tolist()
            if got[0] == MISS:
                outcomes.add("miss")
                continue
            outcomes.add("found")
            assert got[2:] == [retained, 0], (k, sample_size, got)
            assert (got[0], got[1]) == want, (k, sample_size, got, want)
    assert outcomes == {"miss", "found"}  # both paths ran


def test_sample_select_edge_cases(generator):
    weights = [random_weights((300, 7), torch.float32, "normal", generator)]
    count = torch.ops.sap_kernels.kth_key_by_sample
    assert count(weights, [None], 32, torch.tensor([0]), 100).tolist() == [-1, 0, 2100, 0]
    assert count(weights, [None], 32, torch.tensor([2101]), 100).tolist()[0] == -1
    weights[0][5, 5] = float("nan")
    assert count(weights, [None], 32, torch.tensor([3]), 100).tolist()[3] == 1
    masks = [torch.ones(300, 7, dtype=torch.bool)]
    masks[0][5, 5] = False  # a pruned NaN is not counted
    assert count(weights, masks, 32, torch.tensor([3]), 100).tolist()[2:] == [2099, 0]
    with pytest.raises(ValueError, match="sample_size must be >= 1"):
        count(weights, masks, 32, torch.tensor([3]), 0)
    with pytest.raises(ValueError, match=r"k must have shape \[1\]"):
        count(weights, masks, 32, torch.tensor([3, 4]), 100)


@pytest.mark.parametrize("sample_size", [4, 100, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_api_exact_with_any_sample_size(sample_size, dtype, kind, generator, monkeypatch):
    """Thresholds and masks of the CPU backend equal the reference backend's,
    whether the sample brackets the key, misses it, or is not taken."""
    monkeypatch.setattr(selection, "SAMPLE_SIZE", sample_size)
    weights, masks, retained = make_inputs(dtype, kind, True, generator)
    for k in (1, retained // 3, retained):
        got = sap_kernels.magnitude_threshold(weights, k, masks, backend="cpu")
        want = sap_kernels.magnitude_threshold(weights, k, masks, backend="reference")
        assert torch.equal(got, want), (k, got, want)
        new = sap_kernels.prune(weights, masks, k, backend="cpu")
        expected = reference.prune_by_stable_sort(weights, masks, torch.tensor([k]), "global")
        assert all(torch.equal(a, b) for a, b in zip(new, expected))


@pytest.mark.parametrize("no_avx512", [False, True])
def test_vector_and_scalar_paths_agree(no_avx512, generator, monkeypatch):
    """SAP_KERNELS_NO_AVX512 forces the portable loop (what machines without
    AVX-512 run); both must give the radix select's answer."""
    if no_avx512:
        monkeypatch.setenv("SAP_KERNELS_NO_AVX512", "1")
    for dtype in [*DTYPES, "mixed"]:
        if dtype == "mixed":  # 32-bit keys from float16 and bfloat16 weights too
            weights, masks, retained = make_inputs(torch.float32, "zeros", True, generator)
            weights[0], weights[1] = weights[0].half(), weights[1].bfloat16()
        else:
            weights, masks, retained = make_inputs(dtype, "zeros", True, generator)
        key_bits = reference.key_bits_for(weights)
        for k in (1, retained // 2, retained):
            got = torch.ops.sap_kernels.kth_key_by_sample(
                weights, masks, key_bits, torch.tensor([k]), 100
            ).tolist()
            if got[0] != MISS:
                assert (got[0], got[1]) == radix_key_and_below(weights, masks, k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("no_avx512", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=str)
def test_prune_masks_by_sample_matches_stable_sort(
    kind, masked, no_avx512, dtype, generator, monkeypatch
):
    """Unless the sample missed, the one-pass masks equal the stable-sort oracle's
    (ties removed in flat order) and the status equals kth_key_by_sample's.
    dtype None: float32 with a float16 and a bfloat16 tensor (32-bit keys)."""
    if no_avx512:
        monkeypatch.setenv("SAP_KERNELS_NO_AVX512", "1")
    weights, masks, retained = make_inputs(dtype or torch.float32, kind, masked, generator)
    if dtype is None:
        weights[0], weights[1] = weights[0].half(), weights[1].bfloat16()
    key_bits = reference.key_bits_for(weights)
    outcomes = set()
    counts = [1, retained, *torch.randint(1, retained + 1, (4,), generator=generator).tolist()]
    for count in counts:
        expected = reference.prune_by_stable_sort(weights, masks, torch.tensor([count]), "global")
        for sample_size in SAMPLE_SIZES:
            args = (weights, masks, key_bits, torch.tensor([count]), sample_size)
            new_masks, status = torch.ops.sap_kernels.prune_masks_by_sample(*args)
            assert status.tolist() == torch.ops.sap_kernels.kth_key_by_sample(*args).tolist()
            if int(status[0]) == MISS:
                outcomes.add("miss")
                continue
            outcomes.add("found")
            for got, want in zip(new_masks, expected):
                assert got.dtype == torch.bool and got.shape == want.shape
                assert torch.equal(got, want), (count, sample_size)
    assert outcomes == {"miss", "found"}


@pytest.mark.parametrize(
    "op_name,kind", [("kth_key_by_sample", "normal"), ("prune_masks_by_sample", "ties")]
)
def test_opcheck_sampled_ops(op_name, kind, generator):
    weights, masks, retained = make_inputs(torch.float32, kind, True, generator)
    for sample_size in (4, 1000):
        torch.library.opcheck(
            getattr(torch.ops.sap_kernels, op_name).default,
            (weights, masks, 32, torch.tensor([retained // 2]), sample_size),
        )


def test_prune_after_a_miss_does_not_sample_again(generator, monkeypatch):
    """A miss of prune_masks_by_sample goes straight to the radix select: the same
    sample would miss again, so kth_key_by_sample must not run."""
    from sap_kernels import ops

    monkeypatch.setattr(selection, "SAMPLE_SIZE", 4)  # too small: always a miss
    calls = []
    real = ops.kth_key_by_sample
    monkeypatch.setattr(ops, "kth_key_by_sample", lambda *a: calls.append(1) or real(*a))
    weights, masks, retained = make_inputs(torch.float32, "normal", True, generator)
    got = sap_kernels.prune(weights, masks, retained // 2, backend="cpu")
    want = reference.prune_by_stable_sort(weights, masks, torch.tensor([retained // 2]), "global")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert calls == []
    sap_kernels.magnitude_threshold(weights, retained // 2, masks, backend="cpu")
    assert calls == [1]  # the threshold does try the sample

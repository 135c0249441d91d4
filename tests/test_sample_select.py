"""kth_key_by_sample (CPU, global and layer scope): one pass after bracketing
each unit's k-th key with a sample. Whatever the sample size, a result other
than a miss (-2) must equal the radix select's (key, below); through the API a
miss falls back to the radix select, so thresholds and masks stay exact."""

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
GLOBAL, LAYER = 0, 1


def radix_keys_and_below(weights, masks, ks: torch.Tensor, scope: int) -> torch.Tensor:
    """[units, 2]: (key, below) of each unit's k-th smallest retained key by the
    reference ops (key -1, below 0 where k = 0)."""
    key_bits = reference.key_bits_for(weights)
    nonfinite = selection._nonfinite_digit(key_bits, weights[0].dtype)
    keys, below = selection._select_radix(
        "reference", weights, masks, scope, key_bits, ks, None, "k", True, str, nonfinite
    )
    return torch.stack([keys, below], 1)


def radix_key_and_below(weights, masks, k: int):
    """(key, below) of the global k-th smallest retained key."""
    return tuple(radix_keys_and_below(weights, masks, torch.tensor([k]), GLOBAL)[0].tolist())


def make_inputs(dtype, kind, masked, generator):
    weights = [random_weights(s, dtype, kind, generator) for s in SHAPES]
    masks = [random_mask(s, 0.4, generator) if masked and i % 2 == 0 else None
             for i, s in enumerate(SHAPES)]  # fmt: skip
    retained = sum(w.numel() if m is None else int(m.sum()) for w, m in zip(weights, masks))
    return weights, masks, retained


def prune_in_place(weights, masks, scope, key_bits, ks, sample_size):
    """(masks, status) of the in-place op, run on full copies of `masks`."""
    work = [torch.ones_like(w, dtype=torch.bool) if m is None else m.clone()
            for w, m in zip(weights, masks)]  # fmt: skip
    status = torch.ops.sap_kernels.prune_masks_by_sample_(
        weights, work, scope, key_bits, ks, sample_size
    )
    return work, status


def check_in_place(weights, masks, scope, key_bits, ks, sample_size, status, expected):
    """The in-place op gives the same status, and the expected masks unless a
    unit missed, in which case the masks are as they were."""
    got, in_place_status = prune_in_place(weights, masks, scope, key_bits, ks, sample_size)
    assert torch.equal(in_place_status, status)
    missed = bool((status[:, 0] == MISS).any())
    for mask, want, weight, old in zip(got, expected, weights, masks):
        if missed:
            want = torch.ones_like(weight, dtype=torch.bool) if old is None else old
        assert torch.equal(mask, want), (ks, sample_size, missed)


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
                weights, masks, GLOBAL, key_bits, torch.tensor([k]), sample_size
            ).tolist()[0]
            if got[0] == MISS:
                outcomes.add("miss")
                continue
            outcomes.add("found")
            assert got[2:] == [retained, 0], (k, sample_size, got)
            assert (got[0], got[1]) == want, (k, sample_size, got, want)
    assert outcomes == {"miss", "found"}  # both paths ran


def test_sample_select_edge_cases(generator):
    weights = [random_weights((300, 7), torch.float32, "normal", generator)]

    def count(weights, masks, k, sample_size, scope=GLOBAL):
        status = torch.ops.sap_kernels.kth_key_by_sample(
            weights, masks, scope, 32, torch.tensor(k), sample_size
        )
        return status.tolist()[0]

    assert count(weights, [None], [0], 100) == [-1, 0, 2100, 0]
    assert count(weights, [None], [2101], 100)[0] == -1
    weights[0][5, 5] = float("nan")
    assert count(weights, [None], [3], 100)[3] == 1
    masks = [torch.ones(300, 7, dtype=torch.bool)]
    masks[0][5, 5] = False  # a pruned NaN is not counted
    assert count(weights, masks, [3], 100)[2:] == [2099, 0]
    with pytest.raises(ValueError, match="sample_size must be >= 1"):
        count(weights, masks, [3], 0)
    with pytest.raises(ValueError, match=r"k must have shape \[1\]"):
        count(weights, masks, [3, 4], 100)
    with pytest.raises(ValueError, match=r"scope must be 0 \(global\) or 1 \(layer\)"):
        count(weights, masks, [3], 100, scope=2)


@pytest.mark.parametrize("sample_size", [4, 100, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_api_exact_with_any_sample_size(sample_size, dtype, kind, scope, generator, monkeypatch):
    """Thresholds and masks of the CPU backend equal the reference backend's,
    whether the sample brackets the keys, misses one, or is not taken."""
    monkeypatch.setattr(selection, "SAMPLE_SIZE", sample_size)
    weights, masks, retained = make_inputs(dtype, kind, True, generator)
    for m in masks:
        if m is not None:  # every layer keeps a weight, so k = 1 is valid
            m.view(-1)[0] = True
    per_layer = torch.tensor([int(m.sum()) if m is not None else w.numel()
                              for w, m in zip(weights, masks)])  # fmt: skip
    total = per_layer.sum().reshape(1) if scope == "global" else per_layer
    for k in (torch.ones_like(total), (total // 3).clamp(min=1), total):
        got = sap_kernels.magnitude_threshold(weights, k, masks, scope=scope, backend="cpu")
        want = sap_kernels.magnitude_threshold(weights, k, masks, scope=scope, backend="reference")
        assert torch.equal(got, want), (k, got, want)
        counts = k
        if scope == "layer":  # some layers keep every weight
            counts = torch.where(torch.arange(len(weights)) % 3 == 1, 0, counts)
        new = sap_kernels.prune(weights, masks, counts, scope=scope, backend="cpu")
        expected = reference.prune_by_stable_sort(weights, masks, counts, scope)
        assert all(torch.equal(a, b) for a, b in zip(new, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["normal", "zeros"])
@pytest.mark.parametrize("scope", [GLOBAL, LAYER])
def test_large_brackets_select_through_the_histogram(dtype, kind, scope, generator):
    """More than 65,536 candidates in a unit: they are counted in a histogram
    before std::nth_element (the small inputs above never get there). With s =
    16,384 sampled keys a unit's bracket holds ~3% of its weights in global
    scope and ~4% in layer scope (~8,000 sampled keys each): 100K-200K
    candidates in units of 2.5M-4M weights, within the budget n / 16 + 16 s.
    With "zeros" (~30% exact zeros) k stays above the zeros: a bracket of the
    zero key would hold all of them, past the budget (a miss)."""
    shapes = [(1000, 2500), (1500, 1000), (3, 500_001)]
    weights = [random_weights(s, dtype, kind, generator) for s in shapes]
    masks = [random_mask(shapes[0], 0.3, generator), None, None]
    if scope == GLOBAL:
        retained = torch.tensor([int(masks[0].sum()) + sum(w.numel() for w in weights[1:])])
    else:
        retained = torch.tensor([int(masks[0].sum()), weights[1].numel(), weights[2].numel()])
    key_bits = reference.key_bits_for(weights)
    for fraction in (0.07, 0.5, 0.93) if kind == "normal" else (0.45, 0.93):
        ks = (retained * fraction).long()
        args = (weights, masks, scope, key_bits, ks, 16_384)
        status = torch.ops.sap_kernels.kth_key_by_sample(*args)
        assert (status[:, 0] != MISS).all(), (fraction, status)
        want = radix_keys_and_below(weights, masks, ks, scope)
        assert torch.equal(status[:, :2], want), (fraction, status, want)
        assert torch.equal(status[:, 2], retained)
        new_masks, prune_status = torch.ops.sap_kernels.prune_masks_by_sample(*args)
        assert torch.equal(prune_status, status)
        expected = reference.prune_by_stable_sort(
            weights, masks, ks, "global" if scope == GLOBAL else "layer"
        )
        assert all(torch.equal(a, b) for a, b in zip(new_masks, expected))


@pytest.mark.parametrize("no_avx512", [False, True])
def test_vector_and_scalar_paths_agree(no_avx512, generator, monkeypatch):
    """SAP_KERNELS_CPU_ISA=baseline forces the portable loop (what machines without
    AVX-512 run); both must give the radix select's answer."""
    if no_avx512:
        monkeypatch.setenv("SAP_KERNELS_CPU_ISA", "baseline")
    for dtype in [*DTYPES, "mixed"]:
        if dtype == "mixed":  # 32-bit keys from float16 and bfloat16 weights too
            weights, masks, retained = make_inputs(torch.float32, "zeros", True, generator)
            weights[0], weights[1] = weights[0].half(), weights[1].bfloat16()
        else:
            weights, masks, retained = make_inputs(dtype, "zeros", True, generator)
        key_bits = reference.key_bits_for(weights)
        for k in (1, retained // 2, retained):
            got = torch.ops.sap_kernels.kth_key_by_sample(
                weights, masks, GLOBAL, key_bits, torch.tensor([k]), 100
            ).tolist()[0]
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
        monkeypatch.setenv("SAP_KERNELS_CPU_ISA", "baseline")
    weights, masks, retained = make_inputs(dtype or torch.float32, kind, masked, generator)
    if dtype is None:
        weights[0], weights[1] = weights[0].half(), weights[1].bfloat16()
    key_bits = reference.key_bits_for(weights)
    outcomes = set()
    counts = [1, retained, *torch.randint(1, retained + 1, (4,), generator=generator).tolist()]
    for count in counts:
        expected = reference.prune_by_stable_sort(weights, masks, torch.tensor([count]), "global")
        for sample_size in SAMPLE_SIZES:
            args = (weights, masks, GLOBAL, key_bits, torch.tensor([count]), sample_size)
            new_masks, status = torch.ops.sap_kernels.prune_masks_by_sample(*args)
            assert status.tolist() == torch.ops.sap_kernels.kth_key_by_sample(*args).tolist()
            check_in_place(*args, status, expected)
            if int(status[0, 0]) == MISS:
                outcomes.add("miss")
                continue
            outcomes.add("found")
            for got, want in zip(new_masks, expected):
                assert got.dtype == torch.bool and got.shape == want.shape
                assert torch.equal(got, want), (count, sample_size)
    assert outcomes == {"miss", "found"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_layer_scope_matches_radix_and_stable_sort(dtype, kind, masked, generator):
    """Layer scope: each unit's (key, below) equals the radix select's and the
    masks the stable-sort oracle's, unless the status reports a miss; a unit
    with k = 0 gets key -1 and keeps its mask."""
    weights, masks, _ = make_inputs(dtype, kind, masked, generator)
    key_bits = reference.key_bits_for(weights)
    per_layer = torch.tensor([int(m.sum()) if m is not None else w.numel()
                              for w, m in zip(weights, masks)])  # fmt: skip
    outcomes = set()
    for _ in range(4):
        ks = (torch.rand(len(weights), generator=generator) * (per_layer + 1)).long()
        ks[int(torch.randint(len(weights), (1,), generator=generator))] = 0
        want = radix_keys_and_below(weights, masks, ks, LAYER)
        expected = reference.prune_by_stable_sort(weights, masks, ks, "layer")
        for sample_size in SAMPLE_SIZES:
            args = (weights, masks, LAYER, key_bits, ks, sample_size)
            status = torch.ops.sap_kernels.kth_key_by_sample(*args)
            new_masks, pruned_status = torch.ops.sap_kernels.prune_masks_by_sample(*args)
            assert torch.equal(status, pruned_status)
            assert torch.equal(status[:, 2], per_layer) or bool((status[:, 0] == MISS).any())
            check_in_place(*args, status, expected)
            if bool((status[:, 0] == MISS).any()):
                outcomes.add("miss")
                continue
            outcomes.add("found")
            assert torch.equal(status[:, :2], want), (ks, sample_size, status, want)
            for got, wanted in zip(new_masks, expected):
                assert torch.equal(got, wanted), (ks, sample_size)
    assert outcomes == {"miss", "found"}


@pytest.mark.parametrize(
    "op_name,kind", [("kth_key_by_sample", "normal"), ("prune_masks_by_sample", "ties")]
)
@pytest.mark.parametrize("scope", [GLOBAL, LAYER])
def test_opcheck_sampled_ops(op_name, kind, scope, generator):
    weights, masks, retained = make_inputs(torch.float32, kind, True, generator)
    k = torch.tensor([retained // 2]) if scope == GLOBAL else torch.ones(len(weights), dtype=int)
    for sample_size in (4, 1000):
        torch.library.opcheck(
            getattr(torch.ops.sap_kernels, op_name).default,
            (weights, masks, scope, 32, k, sample_size),
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


@pytest.mark.parametrize("scope", [GLOBAL, LAYER])
@pytest.mark.parametrize("sample_size", [100, 1000])
def test_in_place_prune_errors_leave_masks_as_they_were(scope, sample_size, generator):
    """With a real bracket the pass clears keys below it before the selection;
    a NaN, or a count above a unit's retained weights, must undo that."""
    weights, masks, retained = make_inputs(torch.float32, "normal", True, generator)
    masks = [
        torch.ones_like(w, dtype=torch.bool) if m is None else m for w, m in zip(weights, masks)
    ]
    units = 1 if scope == GLOBAL else len(weights)
    per_unit = (
        torch.tensor([retained]) if scope == GLOBAL else torch.stack([m.sum() for m in masks])
    )
    counts = per_unit // 2
    cases = {"nan": counts, "too many": counts.clone()}
    cases["too many"][-1] = per_unit[-1] + 1
    for case, ks in cases.items():
        work = [m.clone() for m in masks]
        tensors = [w.clone() for w in weights]
        if case == "nan":
            index = int(masks[-1].reshape(-1).nonzero()[-1, 0])
            tensors[-1].view(-1)[index] = float("nan")
        status = torch.ops.sap_kernels.prune_masks_by_sample_(
            tensors, work, scope, 32, ks, sample_size
        )
        assert status.shape == (units, 4)
        assert all(torch.equal(a, b) for a, b in zip(work, masks)), case
        with pytest.raises(
            ValueError, match="NaN or infinity" if case == "nan" else "out of range"
        ):
            sap_kernels.prune_(
                tensors, work, ks, scope="global" if scope == GLOBAL else "layer", backend="cpu"
            )
        assert all(torch.equal(a, b) for a, b in zip(work, masks)), case


def test_in_place_prune_overflow_restores_the_chunks_it_went_through(generator, monkeypatch):
    """A sample of 4 brackets nothing: the candidates overflow the budget after a
    chunk or two of 65,536 weights and the pass stops; the masks of the chunks
    it went through are put back, and the API falls back to the radix select."""
    shapes = [(300, 700), (90_001,), (5, 3), (70_000,)]
    weights = [random_weights(s, torch.float32, "ties", generator) for s in shapes]
    masks = [random_mask(s, 0.3, generator) for s in shapes]
    retained = sum(int(m.sum()) for m in masks)
    work = [m.clone() for m in masks]
    status = torch.ops.sap_kernels.prune_masks_by_sample_(
        weights, work, GLOBAL, 32, torch.tensor([retained // 3]), 4
    )
    assert int(status[0, 0]) == MISS
    assert all(torch.equal(a, b) for a, b in zip(work, masks))
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 4)
    sap_kernels.prune_(weights, work, retained // 3, backend="cpu")
    expected = reference.prune_by_stable_sort(
        weights, masks, torch.tensor([retained // 3]), "global"
    )
    assert all(torch.equal(a, b) for a, b in zip(work, expected))


def test_in_place_prune_mask_checks(generator):
    weights = [random_weights(s, torch.float32, "normal", generator) for s in [(40, 30), (50,)]]
    masks = [random_mask((40, 30), 0.3, generator), random_mask((50,), 0.3, generator)]
    expected = reference.prune_by_stable_sort(weights, masks, torch.tensor([300]), "global")
    op = torch.ops.sap_kernels.prune_masks_by_sample_
    transposed = masks[0].t().contiguous().t()  # same values, not contiguous
    with pytest.raises(ValueError, match=r"masks\[0\] must be contiguous"):
        op(weights, [transposed, masks[1].clone()], GLOBAL, 32, torch.tensor([300]), 100)
    storage = torch.ones(1250, dtype=torch.bool)
    shared = [storage[:1200].view(40, 30), storage[1190:1240]]
    with pytest.raises(ValueError, match=r"masks\[0\] and masks\[1\] share memory"):
        op(weights, shared, GLOBAL, 32, torch.tensor([300]), 100)
    assert bool(storage.all())
    with pytest.raises(ValueError, match="got 1 masks for 2 weights"):
        op(weights, [masks[0].clone()], GLOBAL, 32, torch.tensor([300]), 100)
    # the API updates non-contiguous masks too (through new masks and a copy)
    work = [transposed, masks[1].clone()]
    assert sap_kernels.prune_(weights, work, 300, backend="cpu")[0] is transposed
    assert all(torch.equal(a, b) for a, b in zip(work, expected))
    torch.library.opcheck(op.default, (weights, [m.clone() for m in masks], GLOBAL, 32,
                                       torch.tensor([300]), 100))  # fmt: skip
    torch.library.opcheck(op.default, (weights, [m.clone() for m in masks], LAYER, 32,
                                       torch.tensor([100, 3]), 4))  # fmt: skip

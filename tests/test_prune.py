"""prune, prune_, apply_masks_ and the prune_masks / apply_masks_ ops: exactly
`counts` more weights removed per unit, smallest magnitudes first, ties in flat
order, checked against a stable sort of the concatenation."""

from __future__ import annotations

import pytest
import torch
from conftest import random_mask, random_weights
from test_threshold import (
    BACKENDS,
    DTYPES,
    SCOPES,
    full_masks,
    make_masks,
    retained_counts,
    rows_of,
)

import sap_kernels
from sap_kernels import reference

ops = torch.ops.sap_kernels
SHAPES = [(7, 13), (301,), (5, 1), (1, 1), (3, 4, 5), (2, 40_001)]
needs_extension = pytest.mark.skipif(
    not sap_kernels.has_extension(), reason="the compiled extension sap_kernels._C is not built"
)


def random_counts(retained: torch.Tensor, generator) -> torch.Tensor:
    """One count per unit, uniform in [0, retained]."""
    span = (retained + 1).double()
    return (torch.rand(retained.numel(), generator=generator, dtype=torch.float64) * span).long()


def check_prune(weights, masks, counts, scope, backend):
    before = [m.clone() for m in full_masks(weights, masks)]
    weights_before = [w.clone() for w in weights]
    new = sap_kernels.prune(weights, masks, counts, scope=scope, backend=backend)
    expected = reference.prune_by_stable_sort(weights, masks, counts, scope=scope)
    assert all(n.dtype == torch.bool and n.shape == w.shape for n, w in zip(new, weights))
    assert all(torch.equal(n, e) for n, e in zip(new, expected))
    # Never resurrects a pruned weight; removes exactly `counts` per unit.
    assert all(not bool((n & ~b).any()) for n, b in zip(new, before))
    removed = retained_counts(weights, before, scope) - retained_counts(weights, new, scope)
    assert torch.equal(removed, torch.as_tensor(counts).expand(removed.numel()))
    # Inputs are untouched.
    assert all(torch.equal(m, b) for m, b in zip(full_masks(weights, masks), before))
    assert all(torch.equal(w, b) for w, b in zip(weights, weights_before))
    # prune_ gives the same masks in place (on CPU written over the old ones).
    work = [m.clone() for m in before]
    assert sap_kernels.prune_(weights, work, counts, scope=scope, backend=backend) == work
    assert all(torch.equal(m, e) for m, e in zip(work, expected))
    return new


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
@pytest.mark.parametrize("pruned", [0.0, 0.5])
def test_prune_equals_stable_sort(backend, scope, dtype, kind, pruned, generator):
    shapes = SHAPES if backend != "reference" else SHAPES[:-1]  # the big one tests kernels
    weights = [random_weights(s, dtype, kind, generator) for s in shapes]
    masks = make_masks(shapes, pruned, generator, scope)
    counts = random_counts(retained_counts(weights, masks, scope), generator)
    check_prune(weights, masks, counts, scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_prune_none_and_all(backend, scope, generator):
    shapes = [(6, 5), (11,), (2, 3, 3)]
    weights = [random_weights(s, torch.bfloat16, "ties", generator) for s in shapes]
    masks = make_masks(shapes, 0.3, generator, scope)
    retained = retained_counts(weights, masks, scope)
    check_prune(weights, masks, torch.zeros_like(retained), scope, backend)
    new = check_prune(weights, masks, retained, scope, backend)
    assert not any(bool(n.any()) for n in new)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ties_across_many_segments(backend, scope, dtype, generator):
    """A handful of distinct values over several 64K-element segments: the tie
    rank must run across segments and tensors in flat order."""
    shapes = [(3, 70_001), (90_000,), (5, 7)]
    weights = [
        (torch.randint(-3, 4, s, generator=generator).double() * 0.5).to(dtype) for s in shapes
    ]
    masks = [random_mask(s, 0.2, generator) for s in shapes]
    retained = retained_counts(weights, masks, scope)
    check_prune(weights, masks, random_counts(retained, generator), scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_thousand_tiny_tensors(backend, scope, generator):
    # The reference backend builds one 65,536-bin histogram per tensor: fewer there.
    count = 250 if backend == "reference" else 1000
    sizes = torch.randint(1, 10, (count,), generator=generator).tolist()
    weights = [random_weights((n,), torch.float16, "ties", generator) for n in sizes]
    masks = [random_mask((n,), 0.3, generator) for n in sizes]
    retained = retained_counts(weights, masks, scope)
    check_prune(weights, masks, random_counts(retained, generator), scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_mixed_dtypes_and_non_contiguous(backend, scope, generator):
    weights = [
        random_weights((9, 8), torch.float32, "zeros", generator).t(),
        random_weights((4, 6), torch.bfloat16, "ties", generator),
        random_weights((10,), torch.float16, "normal", generator),
    ]
    masks = make_masks([tuple(w.shape) for w in weights], 0.4, generator, scope)
    counts = random_counts(retained_counts(weights, masks, scope), generator)
    check_prune(weights, masks, counts, scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeatable_and_backends_agree(backend, dtype, generator):
    shapes = [(100, 257), (300,), (70, 3)]
    weights = [random_weights(s, dtype, "ties", generator) for s in shapes]
    masks = make_masks(shapes, 0.5, generator, "neuron")
    for scope in SCOPES:
        counts = random_counts(retained_counts(weights, masks, scope), generator)
        runs = [
            sap_kernels.prune(weights, masks, counts, scope=scope, backend=name)
            for name in (backend, backend, "reference")
        ]
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_in_place_and_apply_masks(backend, generator):
    shapes = [(12, 10), (33,)]
    weights = [random_weights(s, torch.float32, "normal", generator) for s in shapes]
    masks = [random_mask(s, 0.25, generator) for s in shapes]
    expected = sap_kernels.prune(weights, masks, 40, backend=backend)
    objects = [id(m) for m in masks]
    result = sap_kernels.prune_(weights, masks, 40, backend=backend)
    assert [id(m) for m in result] == objects
    assert all(torch.equal(m, e) for m, e in zip(masks, expected))
    weights[0][0, 0] = float("nan")  # a NaN that is pruned must become 0 as well
    masks[0][0, 0] = False
    originals = [w.clone() for w in weights]
    returned = sap_kernels.apply_masks_(weights, masks, backend=backend)
    assert returned is weights
    for w, m, o in zip(weights, masks, originals):
        assert torch.equal(w, torch.where(m, o, torch.zeros_like(o)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_masks_non_contiguous_and_module(backend, dtype, generator):
    base = random_weights((70, 90), dtype, "normal", generator)
    weights = [base.t(), base.new_zeros(5, 4)[:, ::2].fill_(1.5), random_weights((4097,), dtype)]
    masks = [random_mask(tuple(w.shape), 0.5, generator) for w in weights]
    originals = [w.clone() for w in weights]
    sap_kernels.apply_masks_(weights, masks, backend=backend)
    for w, m, o in zip(weights, masks, originals):
        assert torch.equal(w, torch.where(m, o, torch.zeros_like(o)))
    assert torch.equal(base.t(), weights[0])  # written through the view
    model = torch.nn.Linear(6, 4)
    mask = random_mask((4, 6), 0.5, generator)
    weight = model.weight.detach().clone()
    sap_kernels.apply_masks_(model, [mask], backend=backend)
    assert torch.equal(model.weight.detach(), torch.where(mask, weight, torch.zeros_like(weight)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_bad_counts_change_nothing(backend, scope, generator):
    shapes = [(4, 5), (6, 2)]
    weights = [random_weights(s, torch.float32, "normal", generator) for s in shapes]
    masks = make_masks(shapes, 0.5, generator, scope)
    retained = retained_counts(weights, masks, scope)
    before = [m.clone() for m in masks]
    last = retained.numel() - 1
    for unit, value in ((0, -1), (last, int(retained[last]) + 1)):
        counts = torch.zeros_like(retained)
        counts[unit] = value
        with pytest.raises(ValueError, match=rf"counts\[{unit}\] = {value} is out of range"):
            sap_kernels.prune_(weights, masks, counts, scope=scope, backend=backend)
        assert all(torch.equal(m, b) for m, b in zip(masks, before))
    with pytest.raises(TypeError, match="counts must hold integers"):
        sap_kernels.prune(weights, masks, 1.5, scope=scope, backend=backend)
    with pytest.raises(ValueError, match="masks must hold one bool tensor"):
        sap_kernels.prune_(weights, None, 1, scope=scope, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_weights_change_nothing(backend, scope, dtype, generator):
    weights = [random_weights(s, dtype, "normal", generator) for s in [(3, 4), (5, 6)]]
    weights[1][4, 5] = float("inf") if dtype == torch.float16 else float("nan")
    masks = [torch.ones(3, 4, dtype=torch.bool), torch.ones(5, 6, dtype=torch.bool)]
    before = [m.clone() for m in masks]
    with pytest.raises(ValueError, match="NaN or infinity"):
        sap_kernels.prune_(weights, masks, 1, scope=scope, backend=backend)
    assert all(torch.equal(m, b) for m, b in zip(masks, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_masks_change_nothing(backend):
    weights = [torch.randn(4, 5), torch.randn(3)]
    good = [torch.ones(4, 5, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    cases = [
        ([good[0], torch.ones(4, dtype=torch.bool)], ValueError, r"masks\[1\] has shape"),
        ([good[0], torch.zeros(3)], TypeError, r"masks\[1\] has dtype"),
        ([good[0].to("meta"), good[1]], ValueError, r"masks\[0\] is on meta"),
        ([good[0]], ValueError, "masks has 1 entries"),
        (None, ValueError, "masks must not be None"),
        ([good[0], None], ValueError, r"masks\[1\] is None"),
    ]
    originals = [w.clone() for w in weights]
    for masks, error, message in cases:
        with pytest.raises(error, match=message):
            sap_kernels.apply_masks_(weights, masks, backend=backend)
        if masks is not None and all(m is not None for m in masks):  # None: all retained
            with pytest.raises(error, match=message):
                sap_kernels.prune(weights, masks, 1, backend=backend)
    assert all(torch.equal(w, o) for w, o in zip(weights, originals))


# --- op level ----------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("scope", [0, 1, 2])
@pytest.mark.parametrize("dtype", [*DTYPES, None], ids=str)
def test_prune_masks_op_matches_reference(scope, dtype, generator):
    """Arbitrary valid (threshold, remove_equal) pairs, including thresholds of
    -1 (remove nothing) and keys that no weight has."""
    dtypes = DTYPES if dtype is None else [dtype] * 3
    shapes = [(40, 3000), (7,), (2, 3, 4)]
    weights = [random_weights(s, d, "ties", generator) for s, d in zip(shapes, dtypes)]
    masks = [random_mask(shapes[0], 0.3, generator), None, random_mask(shapes[2], 0.5, generator)]
    key_bits = reference.key_bits_for(weights)
    keys = [reference.magnitude_keys(w, key_bits).flatten() for w in weights]
    units = {0: 1, 1: 3, 2: sum(rows_of(w) for w in weights)}[scope]
    pool = torch.cat(keys)
    thresholds = pool[torch.randint(pool.numel(), (units,), generator=generator)]
    thresholds[torch.rand(units, generator=generator) < 0.2] = -1
    scope_name = ["global", "layer", "neuron"][scope]
    # Retained keys equal to the threshold: kept by threshold t, removed by t + 1.
    zeros = torch.zeros_like(thresholds)
    keep_at = reference.prune_masks(weights, masks, scope, key_bits, thresholds, zeros)
    higher = torch.where(thresholds >= 0, thresholds + 1, thresholds)
    keep_above = reference.prune_masks(weights, masks, scope, key_bits, higher, zeros)
    ties = [a & ~b for a, b in zip(keep_at, keep_above)]
    tie_counts = retained_counts(weights, ties, scope_name)
    remove = (torch.rand(units, generator=generator) * (tie_counts + 1)).long()
    got = ops.prune_masks(weights, masks, scope, key_bits, thresholds, remove)
    expected = reference.prune_masks(weights, masks, scope, key_bits, thresholds, remove)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    # in place: the same masks, written over full copies of the old ones
    full = [
        torch.ones_like(w, dtype=torch.bool) if m is None else m for w, m in zip(weights, masks)
    ]
    work = [m.clone() for m in full]
    ops.prune_masks_(weights, work, scope, key_bits, thresholds, remove)
    assert all(torch.equal(g, e) for g, e in zip(work, expected))
    bad = remove.clone()
    unit = int(tie_counts.argmax())
    if thresholds[unit] >= 0:
        bad[unit] = tie_counts[unit] + 1
        with pytest.raises(ValueError, match=rf"remove_equal\[{unit}\] = \d+ exceeds"):
            ops.prune_masks(weights, masks, scope, key_bits, thresholds, bad)
        # found after the masks were written: they are put back
        work = [m.clone() for m in full]
        with pytest.raises(ValueError, match=rf"remove_equal\[{unit}\] = \d+ exceeds"):
            ops.prune_masks_(weights, work, scope, key_bits, thresholds, bad)
        assert all(torch.equal(w, m) for w, m in zip(work, full))
    with pytest.raises(ValueError, match=r"remove_equal\[0\] = -1 is negative"):
        ops.prune_masks(weights, masks, scope, key_bits, thresholds, torch.full_like(remove, -1))


@needs_extension
def test_apply_masks_op_rejects_bad_masks():
    weights = [torch.randn(3, 4), torch.randn(5)]
    originals = [w.clone() for w in weights]
    with pytest.raises(ValueError, match=r"masks\[1\] has shape"):
        ops.apply_masks_(weights, [torch.zeros(3, 4, dtype=torch.bool), torch.zeros(4).bool()])
    with pytest.raises(TypeError, match=r"masks\[0\] has dtype"):
        ops.apply_masks_(weights, [torch.zeros(3, 4), torch.zeros(5, dtype=torch.bool)])
    with pytest.raises(ValueError, match="got 1 masks for 2 weights"):
        ops.apply_masks_(weights, [torch.zeros(3, 4, dtype=torch.bool)])
    assert all(torch.equal(w, o) for w, o in zip(weights, originals))


@needs_extension
def test_opcheck_prune_ops(generator):
    weights = [
        random_weights((5, 7), torch.bfloat16, "ties", generator),
        random_weights((4,), torch.bfloat16, "ties", generator),
        random_weights((6, 3), torch.bfloat16, "ties", generator).t(),  # permuted strides
    ]
    masks = [random_mask((5, 7), 0.5, generator), None, random_mask((3, 6), 0.5, generator)]
    keys = reference.magnitude_keys(weights[0], 16).flatten()
    for scope, units in ((0, 1), (1, 3), (2, 12)):
        thresholds = torch.full((units,), int(keys.median()), dtype=torch.int64)
        torch.library.opcheck(
            ops.prune_masks,
            (weights, masks, scope, 16, thresholds, torch.zeros(units, dtype=torch.int64)),
        )
    masks = [random_mask(tuple(w.shape), 0.5, generator) for w in weights]
    torch.library.opcheck(ops.apply_masks_, ([w.clone() for w in weights], masks))
    for scope, units in ((0, 1), (2, 12)):
        thresholds = torch.full((units,), int(keys.median()), dtype=torch.int64)
        remove = torch.zeros(units, dtype=torch.int64)
        args = (weights, [m.clone() for m in masks], scope, 16, thresholds, remove)
        torch.library.opcheck(ops.prune_masks_, args)


@needs_extension
def test_compile_fullgraph_without_graph_breaks(generator):
    shapes = [(20, 30), (50,)]
    weights = [random_weights(s, torch.float32, "normal", generator) for s in shapes]
    masks = [random_mask(s, 0.3, generator) for s in shapes]

    def step(weights, masks):
        threshold = sap_kernels.magnitude_threshold(weights, 10, masks, backend="cpu")
        layer = sap_kernels.magnitude_threshold(weights, 3, masks, scope="layer", backend="cpu")
        new = sap_kernels.prune(weights, masks, 25, backend="cpu")
        rows = sap_kernels.prune(weights, masks, 0, scope="neuron", backend="cpu")
        sap_kernels.prune_(weights, masks, 25, backend="cpu")
        sap_kernels.apply_masks_(weights, masks, backend="cpu")
        return threshold, layer, new, rows

    eager_weights, eager_masks = [w.clone() for w in weights], [m.clone() for m in masks]
    expected = step(eager_weights, eager_masks)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(weights, masks)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2]))
    assert all(torch.equal(a, b) for a, b in zip(got[3], expected[3]))
    assert all(torch.equal(a, b) for a, b in zip(masks, eager_masks))
    assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights))


@needs_extension
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize(
    "call",
    [
        lambda w, m: sap_kernels.magnitude_threshold(w, 10_000, m, backend="cpu"),
        lambda w, m: sap_kernels.magnitude_threshold(w, 0, m, backend="cpu"),
        lambda w, m: sap_kernels.magnitude_threshold(w, [3, 999], m, scope="layer", backend="cpu"),
        lambda w, m: sap_kernels.magnitude_threshold(w, 0, m, scope="neuron", backend="cpu"),
        lambda w, m: sap_kernels.prune(w, m, -1, backend="cpu"),
        lambda w, m: sap_kernels.prune(w, m, [0, 51], scope="layer", backend="cpu"),
        lambda w, m: sap_kernels.prune(w, m, 31, scope="neuron", backend="cpu"),
    ],
    ids=["global-k-high", "global-k-0", "layer-k-high", "neuron-k-0", "global-negative",
         "layer-count-high", "neuron-count-high"],
)  # fmt: skip
def test_compiled_calls_reject_out_of_range_counts(call, compiler, generator):
    """Inside a compiled graph the range checks cannot copy to the host: they
    are asynchronous assertions (eager calls raise ValueError naming the unit),
    so an out-of-range k or count stops the call instead of giving an
    undefined threshold."""
    shapes = [(20, 30), (50,)]
    weights = [random_weights(s, torch.float32, "normal", generator) for s in shapes]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    with pytest.raises(ValueError, match="out of range"):
        call(weights, masks)
    torch._dynamo.reset()
    with pytest.raises((RuntimeError, ValueError), match="out of range"):
        torch.compile(call, fullgraph=True, backend=compiler)(weights, masks)


@needs_extension
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_compiled_threshold_rejects_nan(scope, generator):
    weights = [random_weights((20, 30), torch.float32, "normal", generator)]
    weights[0][3, 4] = float("nan")

    def threshold(ws):
        return sap_kernels.magnitude_threshold(ws, 5, scope=scope, backend="cpu")

    with pytest.raises(ValueError, match="NaN"):
        threshold(weights)
    with pytest.raises(RuntimeError, match="NaN"):
        torch.compile(threshold, fullgraph=True, backend="aot_eager")(weights)

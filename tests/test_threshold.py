"""magnitude_threshold and the selection ops: exact k-th smallest retained |w| per
unit, checked against torch.kthvalue of the concatenated magnitudes (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_backends, random_mask, random_weights

import sap_kernels
from sap_kernels import reference, selection

BACKENDS = [*kernel_backends(), pytest.param("reference", id="reference")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCOPES = ["global", "layer", "neuron"]
# Odd sizes: a 1-d tensor (rows of length 1 in neuron scope), a column, a
# single element, a 3-d tensor and a matrix spanning two 64K-element segments.
SHAPES = [(7, 13), (301,), (5, 1), (1, 1), (3, 4, 5), (2, 40_001)]
ops = torch.ops.sap_kernels


def rows_of(t: torch.Tensor) -> int:
    return 1 if t.dim() == 0 else t.shape[0]


def full_masks(weights, masks):
    if masks is None:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights]
    return [
        torch.ones_like(w, dtype=torch.bool) if m is None else m for w, m in zip(weights, masks)
    ]


def make_masks(shapes, pruned: float, generator, scope: str):
    """Random masks (None when nothing is pruned); in neuron scope every row keeps
    one weight so that k >= 1 is valid."""
    if pruned == 0:
        return None
    masks = [random_mask(s, pruned, generator) for s in shapes]
    for m in masks:
        if scope == "neuron":
            rows = m.reshape(rows_of(m), -1)
            rows[:, int(torch.randint(rows.shape[1], (1,), generator=generator))] = True
        elif not bool(m.any()):
            m.view(-1)[0] = True
    return masks


def unit_magnitudes(weights, masks, scope: str) -> list[torch.Tensor]:
    """float64 retained magnitudes of each unit in flat order (the concatenation)."""
    masks = full_masks(weights, masks)
    if scope == "global":
        return [
            torch.cat([w.double().abs().flatten()[m.flatten()] for w, m in zip(weights, masks)])
        ]
    if scope == "layer":
        return [w.double().abs().flatten()[m.flatten()] for w, m in zip(weights, masks)]
    units = []
    for w, m in zip(weights, masks):
        shape = (rows_of(w), w.numel() // max(rows_of(w), 1))  # -1 is ambiguous for 0 rows
        a, keep = w.double().abs().reshape(shape), m.reshape(shape)
        units.extend(a[r][keep[r]] for r in range(a.shape[0]))
    return units


def retained_counts(weights, masks, scope: str) -> torch.Tensor:
    return torch.tensor([u.numel() for u in unit_magnitudes(weights, masks, scope)])


def random_ks(retained: torch.Tensor, generator, low: int = 1) -> torch.Tensor:
    """One k per unit, uniform in [low, retained]."""
    span = (retained - low + 1).clamp(min=1).double()
    return (
        torch.rand(retained.numel(), generator=generator, dtype=torch.float64) * span
    ).long() + low


def flat(result) -> torch.Tensor:
    if isinstance(result, list):
        return torch.cat([r.reshape(-1) for r in result])
    return result.reshape(-1)


def expected_thresholds(weights, masks, ks, scope: str) -> torch.Tensor:
    units = unit_magnitudes(weights, masks, scope)
    return torch.stack([u.kthvalue(int(k)).values for u, k in zip(units, ks)])


def check_threshold(weights, masks, ks, scope, backend):
    result = sap_kernels.magnitude_threshold(weights, ks, masks, scope=scope, backend=backend)
    dtypes = {w.dtype for w in weights}
    expected_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    got = flat(result)
    assert got.dtype == expected_dtype
    expected = expected_thresholds(weights, masks, ks, scope)
    assert torch.equal(got.double(), expected), (got, expected)
    return result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "heavy"])
@pytest.mark.parametrize("pruned", [0.0, 0.5])
def test_threshold_equals_kthvalue(backend, scope, dtype, kind, pruned, generator):
    shapes = SHAPES if backend != "reference" else SHAPES[:-1]  # the big one tests kernels
    weights = [random_weights(s, dtype, kind, generator) for s in shapes]
    masks = make_masks(shapes, pruned, generator, scope)
    ks = random_ks(retained_counts(weights, masks, scope), generator)
    check_threshold(weights, masks, ks, scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_and_last(backend, scope, dtype, generator):
    """k = 1 (the smallest) and k = d (the largest) in every unit."""
    shapes = [(9, 11), (17,), (4, 1)]
    weights = [random_weights(s, dtype, "heavy", generator) for s in shapes]
    masks = make_masks(shapes, 0.3, generator, scope)
    retained = retained_counts(weights, masks, scope)
    check_threshold(weights, masks, torch.ones_like(retained), scope, backend)
    check_threshold(weights, masks, retained, scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zeros_negative_zeros_and_subnormals(backend, dtype, generator):
    tiny = torch.finfo(dtype).tiny
    base = torch.tensor([0.0, -0.0, tiny / 2, -tiny / 2, tiny / 8, tiny, -tiny, 1.0, -0.0, 0.0])
    weights = []
    for n in (1, 7, 4099):
        picks = torch.randint(base.numel(), (n,), generator=generator)
        weights.append(base[picks].to(dtype))
    assert any(bool((w != 0).any() & (w.abs() < tiny).any()) for w in weights)
    for scope in ("global", "layer"):
        retained = retained_counts(weights, None, scope)
        for ks in (torch.ones_like(retained), retained, random_ks(retained, generator)):
            check_threshold(weights, None, ks, scope, backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["zeros", "ties", "heavy"])
def test_radix_select_path(backend, scope, dtype, kind, generator, monkeypatch):
    """The radix select that compiled graphs, distributed calls and sample misses
    take, forced here: eager calls sample first on the backends that can, so the
    other tests reach it only through misses. k = 1 lands on zero keys (digit 0
    of the histograms) in the 'zeros' and 'ties' weights. A wrong count of keys
    below the k-th one leaves the threshold right, so `prune` (whose tie quota
    is k - below) is checked too."""
    monkeypatch.setattr(selection, "_uses_sample_select", lambda *args: False)
    shapes = SHAPES[:-1] + [(3, 5_001)]
    weights = [random_weights(s, dtype, kind, generator) for s in shapes]
    masks = make_masks(shapes, 0.3, generator, scope)
    retained = retained_counts(weights, masks, scope)
    for ks in (torch.ones_like(retained), retained, random_ks(retained, generator)):
        check_threshold(weights, masks, ks, scope, backend)
        got = sap_kernels.prune(weights, masks, ks, scope=scope, backend=backend)
        want = reference.prune_by_stable_sort(weights, masks, ks, scope=scope)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_nearly_all_pruned(backend, scope, generator):
    """99.9% of the weights pruned: only a handful remain per unit."""
    shapes = [(50, 40), (3000,)]
    weights = [random_weights(s, torch.float32, "normal", generator) for s in shapes]
    masks = make_masks(shapes, 0.999, generator, scope)
    retained = retained_counts(weights, masks, scope)
    check_threshold(weights, masks, random_ks(retained, generator), scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_of_length_one(backend, dtype, generator):
    weights = [
        random_weights((37, 1), dtype, "normal", generator),
        random_weights((5,), dtype, "normal", generator),
    ]
    ks = torch.ones(42, dtype=torch.int64)
    check_threshold(weights, None, ks, "neuron", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thousand_tiny_tensors(backend, scope, dtype, generator):
    sizes = torch.randint(1, 12, (1000,), generator=generator).tolist()
    weights = [random_weights((n,), dtype, "ties", generator) for n in sizes]
    masks = [random_mask((n,), 0.3, generator) for n in sizes]
    for m in masks:
        m[0] = True
    retained = retained_counts(weights, masks, scope)
    check_threshold(weights, masks, random_ks(retained, generator), scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_mixed_dtypes(backend, scope, generator):
    shapes = [(6, 7), (3, 9), (13,)]
    weights = [
        random_weights(s, dtype, "zeros", generator)
        for s, dtype in zip(shapes, DTYPES, strict=True)
    ]
    masks = make_masks(shapes, 0.4, generator, scope)
    ks = random_ks(retained_counts(weights, masks, scope), generator)
    check_threshold(weights, masks, ks, scope, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_module(backend, generator):
    weight = random_weights((12, 9), torch.float32, "normal", generator).t()
    assert not weight.is_contiguous()
    check_threshold([weight], None, torch.tensor([17]), "global", backend)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    got = sap_kernels.magnitude_threshold(model, 7, backend=backend)
    weights = [model[0].weight.detach(), model[2].weight.detach()]
    assert torch.equal(got.double(), expected_thresholds(weights, None, [7], "global")[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_bad_k(backend, scope, generator):
    shapes = [(4, 5), (6, 2)]
    weights = [random_weights(s, torch.float32, "normal", generator) for s in shapes]
    masks = make_masks(shapes, 0.5, generator, scope)
    retained = retained_counts(weights, masks, scope)
    before = [m.clone() for m in masks]
    for bad, unit in ((0, 0), (-3, retained.numel() - 1), (None, retained.numel() - 1)):
        ks = retained.clone() if bad is None else torch.ones_like(retained)
        ks[unit] = retained[unit] + 1 if bad is None else bad
        with pytest.raises(ValueError, match=rf"k\[{unit}\] = -?\d+ is out of range"):
            sap_kernels.magnitude_threshold(weights, ks, masks, scope=scope, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(masks, before))
    with pytest.raises(TypeError, match="k must hold integers"):
        sap_kernels.magnitude_threshold(weights, torch.ones(1), masks, scope=scope, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_nonfinite_weights_rejected(backend, scope, dtype, bad_value, generator):
    weights = [random_weights(s, dtype, "normal", generator) for s in [(3, 4), (5, 6)]]
    weights[1][2, 3] = bad_value
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        sap_kernels.magnitude_threshold(weights, 1, scope=scope, backend=backend)
    # A pruned NaN is not a retained weight: no error.
    masks = [torch.ones(3, 4, dtype=torch.bool), torch.ones(5, 6, dtype=torch.bool)]
    masks[1][2, 3] = False
    check_threshold(
        weights, masks, torch.ones_like(retained_counts(weights, masks, scope)), scope, backend
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_masks(backend):
    weights = [torch.randn(4, 5), torch.randn(3)]
    cases = [
        (
            [torch.ones(4, 5, dtype=torch.bool), torch.ones(4, dtype=torch.bool)],
            ValueError,
            r"masks\[1\] has shape",
        ),
        ([torch.ones(4, 5, dtype=torch.bool), torch.ones(3)], TypeError, r"masks\[1\] has dtype"),
        (
            [torch.ones(4, 5, dtype=torch.bool, device="meta"), torch.ones(3, dtype=torch.bool)],
            ValueError,
            r"masks\[0\] is on meta",
        ),
        ([torch.ones(4, 5, dtype=torch.bool)], ValueError, "masks has 1 entries"),
    ]
    for masks, error, message in cases:
        with pytest.raises(error, match=message):
            sap_kernels.magnitude_threshold(weights, 1, masks, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeatable_and_backends_agree(backend, dtype, generator):
    shapes = [(300, 257), (1000,), (70, 3)]
    weights = [random_weights(s, dtype, "ties", generator) for s in shapes]
    masks = make_masks(shapes, 0.5, generator, "layer")
    for scope in ("global", "layer"):
        ks = random_ks(retained_counts(weights, masks, scope), generator)
        runs = [
            sap_kernels.magnitude_threshold(weights, ks, masks, scope=scope, backend=name)
            for name in (backend, backend, "reference")
        ]
        assert all(torch.equal(runs[0], r) for r in runs[1:])


# --- op level ----------------------------------------------------------------

needs_extension = pytest.mark.skipif(
    not sap_kernels.has_extension(), reason="the compiled extension sap_kernels._C is not built"
)


@needs_extension
@pytest.mark.parametrize("dtype", [*DTYPES, None], ids=str)
@pytest.mark.parametrize("scope", [0, 1])
def test_histogram_op_matches_reference(dtype, scope, generator):
    dtypes = DTYPES if dtype is None else [dtype] * 3
    shapes = [(130, 517), (7,), (3, 2, 2)]
    weights = [random_weights(s, d, "heavy", generator) for s, d in zip(shapes, dtypes)]
    masks = [random_mask(shapes[0], 0.3, generator), None, random_mask(shapes[2], 0.5, generator)]
    key_bits = reference.key_bits_for(weights)
    units = 1 if scope == 0 else 3
    zeros = torch.zeros(units, dtype=torch.int64)
    hist = ops.magnitude_histogram(weights, masks, scope, key_bits, zeros, 0)
    assert torch.equal(
        hist, reference.magnitude_histogram(weights, masks, scope, key_bits, zeros, 0)
    )
    if key_bits == 32:
        nonzero = [row.nonzero().flatten() for row in hist]
        picks = [torch.randint(n.numel(), (1,), generator=generator) for n in nonzero]
        prefixes = torch.cat([n[p] for n, p in zip(nonzero, picks)])
        low = ops.magnitude_histogram(weights, masks, scope, key_bits, prefixes, 1)
        assert torch.equal(
            low, reference.magnitude_histogram(weights, masks, scope, key_bits, prefixes, 1)
        )
        assert torch.equal(low.sum(1), hist.gather(1, prefixes[:, None]).squeeze(1))


@needs_extension
@pytest.mark.parametrize("dtype", [*DTYPES, None], ids=str)
def test_rowwise_kth_key_op_matches_reference(dtype, generator):
    dtypes = DTYPES if dtype is None else [dtype] * 4
    shapes = [(9, 33), (5,), (2, 3, 4), (2, 66_000)]  # the last rows use the histogram path
    weights = [
        random_weights(s, d, "ties", generator) for s, d in zip(shapes, [*dtypes, dtypes[0]])
    ]
    masks = [random_mask(s, 0.4, generator) for s in shapes]
    masks[1] = None
    key_bits = reference.key_bits_for(weights)
    retained = retained_counts(weights, masks, "neuron")
    ks = random_ks(retained, generator, low=0)
    got = ops.rowwise_kth_key(weights, masks, key_bits, ks)
    assert torch.equal(got, reference.rowwise_kth_key(weights, masks, key_bits, ks))
    with pytest.raises(ValueError, match=r"ks\[\d+\] = \d+ is out of range"):
        ops.rowwise_kth_key(weights, masks, key_bits, retained + 1)
    weights[3][1, 65_999] = float("nan")
    masks[3][1, 65_999] = True
    with pytest.raises(ValueError, match=r"weights\[3\] contains NaN or infinity"):
        ops.rowwise_kth_key(weights, masks, key_bits, ks)


@needs_extension
@pytest.mark.parametrize("dtype", [*DTYPES, None], ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "heavy"])
def test_rowwise_kth_key_every_row_length(dtype, kind, generator):
    """Rows on both sides of each path's bound: partition (< 512), 2,048 bins
    (512 .. 65,536) and the 65,536-bin histogram (longer); k = 0, 1, retained and
    random; masked and unmasked rows; then a NaN found by the binned path."""
    dtypes = DTYPES if dtype is None else [dtype] * 3
    shapes = [(3, 511), (4, 512), (3, 4099), (2, 65_536), (1, 65_537)]
    weights = [random_weights(s, dtypes[i % 3], kind, generator) for i, s in enumerate(shapes)]
    masks = [random_mask(s, 0.3, generator) if i % 2 else None for i, s in enumerate(shapes)]
    key_bits = reference.key_bits_for(weights)
    retained = retained_counts(weights, masks, "neuron")
    for ks in (random_ks(retained, generator, low=0), torch.zeros_like(retained), retained):
        ks[::3] = ks[::3].clamp(max=1)
        got = ops.rowwise_kth_key(weights, masks, key_bits, ks)
        assert torch.equal(got, reference.rowwise_kth_key(weights, masks, key_bits, ks))
    weights[2][1, 4000] = float("inf")
    with pytest.raises(ValueError, match=r"weights\[2\] contains NaN or infinity"):
        ops.rowwise_kth_key(weights, masks, key_bits, retained)


@needs_extension
def test_ops_reject_bad_arguments():
    w = [torch.randn(3, 4)]
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="key_bits=16 needs"):
        ops.magnitude_histogram(w, [], 0, 16, one, 0)
    with pytest.raises(ValueError, match="scope must be 0"):
        ops.magnitude_histogram(w, [], 2, 32, one, 0)
    with pytest.raises(ValueError, match="prefixes must have shape"):
        ops.magnitude_histogram(w, [], 1, 32, torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"masks\[0\] has shape"):
        ops.magnitude_histogram(w, [torch.ones(4, 3, dtype=torch.bool)], 0, 32, one, 0)
    with pytest.raises(TypeError, match="ks must hold integers"):
        ops.rowwise_kth_key(w, [], 32, torch.ones(3))


@needs_extension
def test_opcheck_selection_ops(generator):
    weights = [random_weights((5, 7), torch.float32, "ties", generator), torch.randn(4)]
    masks = [*make_masks([(5, 7)], 0.5, generator, "neuron"), None]
    prefixes = torch.tensor([0x3E80], dtype=torch.int64)
    torch.library.opcheck(
        ops.magnitude_histogram, (weights, masks, 0, 32, torch.zeros(1, dtype=torch.int64), 0)
    )
    torch.library.opcheck(ops.magnitude_histogram, (weights, masks, 0, 32, prefixes, 1))
    ks = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.int64)
    torch.library.opcheck(ops.rowwise_kth_key, (weights, masks, 32, ks))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neuron_scope_with_masked_tensors_of_no_rows(backend, generator):
    """Masked (0, 4) and (0,) weights add no rows (counting the rows' retained
    weights once failed on them: reshape(0, -1) is ambiguous)."""
    shapes = [(0, 4), (3, 5), (0,), (2, 1)]
    weights = [random_weights(s, torch.float32, "ties", generator) for s in shapes]
    masks = [random_mask(s, 0.5, generator) for s in shapes]
    masks[1][:, 2] = True  # every row keeps a weight: k >= 1 is valid
    masks[3][:] = True
    retained = retained_counts(weights, masks, "neuron")
    assert retained.numel() == 5
    check_threshold(weights, masks, random_ks(retained, generator), "neuron", backend)
    got = sap_kernels.prune(weights, masks, retained // 2, scope="neuron", backend=backend)
    want = reference.prune_by_stable_sort(weights, masks, retained // 2, "neuron")
    assert all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_neuron_scope_rows_of_length_zero(backend, generator):
    """A (3, 0) weight has 3 rows with nothing retained: k = 0 there prunes
    nothing, k = 1 is out of range (the ops used to leave those rows' keys
    unset, and the CPU op's output uninitialised)."""
    shapes = [(4, 6), (3, 0), (2, 5)]
    weights = [random_weights(s, torch.float32, "ties", generator) for s in shapes]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    retained = retained_counts(weights, masks, "neuron")
    assert retained.tolist() == [6] * 4 + [0] * 3 + [5] * 2
    counts = retained // 2
    got = sap_kernels.prune(weights, masks, counts, scope="neuron", backend=backend)
    want = reference.prune_by_stable_sort(weights, masks, counts, "neuron")
    assert all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want))
    ks = retained.clamp(min=1)  # 1 for the empty rows
    with pytest.raises(ValueError, match=r"(k|counts)\[4\] = 1 is out of range"):
        sap_kernels.magnitude_threshold(weights, ks, masks, scope="neuron", backend=backend)
    with pytest.raises(ValueError, match=r"counts\[5\] = 1 is out of range"):
        sap_kernels.prune(weights, masks, counts + (torch.arange(9) == 5), scope="neuron",
                          backend=backend)  # fmt: skip
    if backend == "cpu":
        keys = ops.rowwise_kth_key(weights, masks, 32, counts)
        assert keys[4:7].tolist() == [[-1, 0]] * 3
        with pytest.raises(ValueError, match=r"ks\[5\] = 2 is out of range: .*weights\[1\]"):
            ops.rowwise_kth_key(weights, masks, 32, counts + 2 * (torch.arange(9) == 5))


@pytest.mark.parametrize("isa", ["", "x86-64-v3", "baseline"], ids=["widest", "avx2", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_neuron_rows_by_bins_on_each_path(isa, dtype, kind, generator, monkeypatch):
    """Rows of 512..65,536 weights take the sampled bracket (AVX-512 or AVX2
    compress) or the 2,048-bin select, whose bin's keys are gathered by AVX-512
    compress where the CPU has it, else by a portable loop
    (SAP_KERNELS_CPU_ISA=baseline); odd lengths leave a scalar tail."""
    if "cpu" not in sap_kernels.available_backends(torch.device("cpu")):
        pytest.skip("the CPU extension is not built")
    monkeypatch.setenv("SAP_KERNELS_CPU_ISA", isa)
    shapes = [(3, 517), (2, 4096), (1, 70_001), (4, 1000)]
    weights = [random_weights(s, dtype, kind, generator) for s in shapes]
    masks = make_masks(shapes, 0.4, generator, "neuron")
    retained = retained_counts(weights, masks, "neuron")
    check_threshold(weights, masks, random_ks(retained, generator), "neuron", "cpu")
    check_threshold(weights, None, random_ks(retained_counts(weights, None, "neuron"), generator),
                    "neuron", "cpu")  # fmt: skip

"""The five ops on the Triton backend against sap_kernels.reference (the
float64 / pure-torch oracle with the same signatures).

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported), so the inputs are
small: the interpreter runs one program at a time in numpy. `OpChecks` holds
the checks; tests/test_cuda_ops.py runs the same checks on the CUDA kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import random_weights  # noqa: E402

from sap_kernels import reference  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GLOBAL, LAYER, NEURON = 0, 1, 2
# Odd sizes, a scalar-like tensor, rows of length 1, a row longer than one tile.
SHAPES = [(7, 3), (4097,), (1,), (5, 1), (3, 40), (2, 1500)]
# Neuron scope makes one unit per row: (4097,) would be 4097 rows of length 1,
# which the interpreter walks one by one, so it is left out there.
NEURON_SHAPES = [(7, 3), (1,), (5, 1), (3, 40), (2, 1500), (0, 4)]
KINDS = ["normal", "heavy", "zeros", "ties"]


make_tensor = random_weights  # the shared test-weight factory (conftest)


def make_inputs(shapes, dtype, masked: bool, seed: int, device):
    generator = torch.Generator().manual_seed(seed)
    weights, masks = [], []
    for i, shape in enumerate(shapes):
        weights.append(make_tensor(shape, dtype, KINDS[i % len(KINDS)], generator).to(device))
        use_mask = masked and i % 3 != 1  # some tensors keep mask=None
        masks.append(
            (torch.rand(shape, generator=generator) >= 0.4).to(device) if use_mask else None
        )
    return weights, masks


def retained_counts(weights, masks, scope) -> torch.Tensor:
    return reference.masked_power_sums(weights, masks, 1.0, 2.0, scope)[:, 2].long().cpu()


class OpChecks:
    """Checks shared by every GPU-style backend. Subclasses set `device` and
    `run(name, *args)` (calls op `name` of the backend)."""

    device = torch.device("cpu")

    def run(self, name, *args):
        raise NotImplementedError

    # --- masked_power_sums -------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("scope", [GLOBAL, LAYER, NEURON])
    @pytest.mark.parametrize("masked", [False, True])
    def test_power_sums(self, dtype, scope, masked):
        shapes = NEURON_SHAPES if scope == NEURON else SHAPES
        weights, masks = make_inputs(shapes, dtype, masked, 10 + scope, self.device)
        got = self.run("masked_power_sums", weights, masks, 0.5, 1.0, scope).cpu()
        want = reference.masked_power_sums(weights, masks, 0.5, 1.0, scope).cpu()
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
        assert torch.equal(got[:, 2], want[:, 2])

    @pytest.mark.parametrize("p,q", [(0.7, 1.3), (1.0, 2.0), (2.0, 3.0), (0.25, 4.5), (0.05, 0.09)])
    def test_power_sums_exponents(self, p, q):
        weights, masks = make_inputs(SHAPES, torch.float32, True, 3, self.device)
        weights.append(make_inputs([(300,)], torch.bfloat16, False, 4, self.device)[0][0])
        masks.append(None)
        got = self.run("masked_power_sums", weights, masks, p, q, LAYER).cpu()
        want = reference.masked_power_sums(weights, masks, p, q, LAYER).cpu()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)

    def test_power_sums_extreme_magnitudes(self):
        # Powers that overflow or underflow float32 take the float64 path.
        big = torch.tensor([3e30, -1e25, 2.0, 0.0], device=self.device)
        tiny = torch.tensor([1e-30, -3e-35, 1e-44, 0.0], device=self.device)
        got = self.run("masked_power_sums", [big, tiny], [], 0.5, 2.0, LAYER).cpu()
        want = reference.masked_power_sums([big, tiny], [], 0.5, 2.0, LAYER).cpu()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)

    def test_power_sums_rejects_retained_nan(self):
        nan = torch.tensor([1.0, float("nan")], device=self.device)
        w = [torch.ones(5, device=self.device), nan]
        with pytest.raises(ValueError, match=r"weights\[1\]"):
            self.run("masked_power_sums", w, [], 0.5, 1.0, GLOBAL)
        pruned = [None, torch.tensor([True, False], device=self.device)]
        got = self.run("masked_power_sums", w, pruned, 0.5, 1.0, GLOBAL).cpu()
        assert got[0, 2].item() == 6

    def test_power_sums_rejects_bad_arguments(self):
        w = [torch.ones(3, device=self.device)]
        with pytest.raises(ValueError, match="empty"):
            self.run("masked_power_sums", [], [], 0.5, 1.0, GLOBAL)
        with pytest.raises(ValueError, match="shape"):
            self.run("masked_power_sums", w, [torch.ones(4, dtype=torch.bool)], 0.5, 1.0, 0)
        with pytest.raises(TypeError, match="dtype"):
            self.run("masked_power_sums", [torch.ones(3, dtype=torch.int32)], [], 0.5, 1.0, 0)
        with pytest.raises(ValueError, match="q"):
            self.run("masked_power_sums", w, [], 1.0, 0.5, GLOBAL)

    # --- magnitude_histogram -----------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("scope", [GLOBAL, LAYER])
    @pytest.mark.parametrize("key_bits", [32, 16])
    def test_histogram(self, dtype, scope, key_bits):
        if key_bits == 16 and dtype == torch.float32:
            pytest.skip("16-bit keys need 16-bit weights")
        weights, masks = make_inputs(SHAPES, dtype, True, 20 + scope, self.device)
        units = 1 if scope == GLOBAL else len(weights)
        zeros = torch.zeros(units, dtype=torch.int64, device=self.device)
        got = self.run("magnitude_histogram", weights, masks, scope, key_bits, zeros, 0)
        want = reference.magnitude_histogram(weights, masks, scope, key_bits, zeros, 0)
        assert got.shape == (units, 65536) and torch.equal(got.cpu(), want.cpu())
        if key_bits == 32:
            prefixes = want.argmax(1).to(self.device)  # the fullest high-16-bit bucket
            got = self.run("magnitude_histogram", weights, masks, scope, 32, prefixes, 1)
            want = reference.magnitude_histogram(weights, masks, scope, 32, prefixes, 1)
            assert int(want.sum()) > 0 and torch.equal(got.cpu(), want.cpu())

    def test_histogram_prefix_outside_16_bits_matches_nothing(self):
        # as on the CPU: never the prefix's low bits (2^32 + b wrapped to b)
        weights, masks = make_inputs(SHAPES, torch.float32, True, 29, self.device)
        zeros = torch.zeros(len(weights), dtype=torch.int64, device=self.device)
        high = reference.magnitude_histogram(weights, masks, LAYER, 32, zeros, 0).argmax(1)
        for offset in (1 << 32, 1 << 31, -(1 << 32), 1 << 16):
            prefixes = (high + offset).to(self.device)
            got = self.run("magnitude_histogram", weights, masks, LAYER, 32, prefixes, 1)
            assert int(got.sum()) == 0, offset

    # --- rowwise_kth_key ---------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("key_bits", [32, 16])
    @pytest.mark.parametrize("masked", [False, True])
    def test_rowwise_kth(self, dtype, key_bits, masked):
        if key_bits == 16 and dtype == torch.float32:
            pytest.skip("16-bit keys need 16-bit weights")
        weights, masks = make_inputs(NEURON_SHAPES, dtype, masked, 30, self.device)
        retained = retained_counts(weights, masks, NEURON)
        generator = torch.Generator().manual_seed(31)
        ks = (torch.rand(retained.shape, generator=generator) * (retained + 1)).long()
        ks = torch.minimum(ks, retained)
        ks[0], ks[-2] = retained[0], min(1, int(retained[-2]))  # the largest key; the smallest
        ks = ks.to(self.device)
        got = self.run("rowwise_kth_key", weights, masks, key_bits, ks)
        want = reference.rowwise_kth_key(weights, masks, key_bits, ks)
        assert torch.equal(got.cpu(), want.cpu())

    def test_rowwise_kth_rejects_k_out_of_range(self):
        """As the CPU op (the Python API checks first, but not while compiling)."""
        shapes = [(4, 9), (3,), (3, 0)]  # rows of length 0 have no piece to check them
        weights, masks = make_inputs(shapes, torch.float32, True, 33, self.device)
        retained = retained_counts(weights, masks, NEURON)
        for row, shard, k in ((2, 0, int(retained[2]) + 1), (5, 1, -1), (8, 2, 1)):
            ks = retained.clone()
            ks[row] = k
            message = (
                rf"ks\[{row}\] = {k} is out of range: that row \(in weights\[{shard}\]\) "
                rf"has {int(retained[row])} retained weights"
            )
            with pytest.raises(ValueError, match=message):
                self.run("rowwise_kth_key", weights, masks, 32, ks.to(self.device))

    # --- prune_masks ---------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("scope", [GLOBAL, LAYER, NEURON])
    def test_prune_masks(self, dtype, scope):
        shapes = NEURON_SHAPES if scope == NEURON else SHAPES
        weights, masks = make_inputs(shapes, dtype, True, 40 + scope, self.device)
        key_bits = 16 if dtype != torch.float32 else 32
        units = reference.masked_power_sums(weights, masks, 1.0, 2.0, scope).shape[0]
        # Thresholds at existing keys (ties weights make many equal ones), one
        # unit with threshold -1 (prunes nothing), random quotas of equal keys.
        keys = torch.cat([reference.magnitude_keys(w, key_bits).flatten().cpu() for w in weights])
        generator = torch.Generator().manual_seed(41)
        thresholds = keys[torch.randint(0, keys.numel(), (units,), generator=generator)]
        thresholds[0] = -1
        # quotas up to each unit's ties (more raises, as on the CPU)
        zeros = torch.zeros(units, dtype=torch.int64)
        keep_at = reference.prune_masks(weights, masks, scope, key_bits, thresholds, zeros)
        higher = torch.where(thresholds >= 0, thresholds + 1, thresholds)
        keep_above = reference.prune_masks(weights, masks, scope, key_bits, higher, zeros)
        ties = retained_counts(weights, [a & ~b for a, b in zip(keep_at, keep_above)], scope)
        remove_equal = (torch.rand(units, generator=generator) * (ties + 1)).long()
        args = (scope, key_bits, thresholds.to(self.device), remove_equal.to(self.device))
        got = self.run("prune_masks", weights, masks, *args)
        want = reference.prune_masks(weights, masks, *args)
        assert len(got) == len(want)
        for g, w, weight in zip(got, want, weights):
            assert g.dtype == torch.bool and g.shape == weight.shape
            assert torch.equal(g.cpu(), w.cpu())
        # prune_masks_: the same masks, written over full copies of the old ones
        work = [
            torch.ones_like(w, dtype=torch.bool) if m is None else m.clone()
            for w, m in zip(weights, masks)
        ]
        pointers = [m.data_ptr() for m in work]
        assert self.run("prune_masks_", weights, work, *args) is None
        assert [m.data_ptr() for m in work] == pointers
        for g, w in zip(work, want):
            assert torch.equal(g.cpu(), w.cpu())

    @pytest.mark.parametrize("scope", [GLOBAL, LAYER, NEURON])
    def test_prune_masks_rejects_bad_thresholds_and_quotas(self, scope):
        """As the CPU op: a threshold above 32 bits, a negative quota or one above
        the unit's ties raise, and prune_masks_ writes nothing then."""
        weights, masks = make_inputs([(6, 5), (7,), (2, 9)], torch.float32, True, 45, self.device)
        units = reference.masked_power_sums(weights, masks, 1.0, 2.0, scope).shape[0]
        first = weights[0].reshape(-1)[0:1]
        key = reference.magnitude_keys(first.cpu(), 32).expand(units).clone()
        ties = reference.prune_masks(weights, masks, scope, 32, key, torch.zeros(units).long())
        keep_above = reference.prune_masks(weights, masks, scope, 32, key + 1, key * 0)
        tie_counts = retained_counts(weights, [a & ~b for a, b in zip(ties, keep_above)], scope)
        unit = int(tie_counts.argmax())
        assert int(tie_counts[unit]) > 0
        quota = torch.zeros(units, dtype=torch.int64)
        cases = []
        bad = quota.clone()
        bad[unit] = tie_counts[unit] + 1
        cases.append(
            (key, bad, rf"remove_equal\[{unit}\] = \d+ exceeds the {int(tie_counts[unit])}")
        )
        bad = quota.clone()
        bad[-1] = -1
        cases.append((key, bad, rf"remove_equal\[{units - 1}\] = -1 is negative"))
        huge = key.clone()
        huge[0] = 1 << 33
        cases.append((huge, quota, r"threshold_keys\[0\] = 8589934592 is not a valid key"))
        full = [
            torch.ones_like(w, dtype=torch.bool) if m is None else m for w, m in zip(weights, masks)
        ]
        for thresholds, quotas, message in cases:
            args = (scope, 32, thresholds.to(self.device), quotas.to(self.device))
            with pytest.raises(ValueError, match=message):
                self.run("prune_masks", weights, masks, *args)
            work = [m.clone() for m in full]
            with pytest.raises(ValueError, match=message):
                self.run("prune_masks_", weights, work, *args)
            assert all(torch.equal(w.cpu(), m.cpu()) for w, m in zip(work, full))

    def test_prune_masks_in_place_rejects_bad_masks(self):
        weights = [torch.randn(4, 6, device=self.device), torch.randn(6, device=self.device)]
        everything = reference.magnitude_keys(torch.tensor([1e30]), 32).to(self.device)
        args = (GLOBAL, 32, everything, torch.zeros(1, dtype=torch.int64, device=self.device))
        storage = torch.ones(30, dtype=torch.bool, device=self.device)
        transposed = torch.ones(6, 4, dtype=torch.bool, device=self.device).t()
        cases = [
            ([storage[:24].view(4, 6), storage[20:26]], r"masks\[0\] and masks\[1\] share memory"),
            ([transposed, storage[24:]], r"masks\[0\] must be contiguous"),
            ([storage[:24].view(4, 6)], "got 1 masks for 2 weights"),
        ]
        for masks, message in cases:
            with pytest.raises(ValueError, match=message):
                self.run("prune_masks_", weights, masks, *args)
            assert bool(storage.all()) and bool(transposed.all())  # nothing written

    # --- apply_masks_ ----------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_apply_masks(self, dtype):
        weights, _ = make_inputs(SHAPES, dtype, False, 50, self.device)
        generator = torch.Generator().manual_seed(51)
        masks = [(torch.rand(w.shape, generator=generator) >= 0.5).to(self.device) for w in weights]
        weights[0][0, 0] = float("nan")
        masks[0][0, 0] = False  # a pruned NaN must become 0
        base = torch.randn(40, 3, generator=generator).to(dtype).to(self.device)
        weights.append(base.t())  # non-contiguous: zeroed through a copy, copied back
        masks.append((torch.rand(3, 40, generator=generator) >= 0.5).to(self.device))
        want = [w.clone() for w in weights]
        reference.apply_masks_(want, masks)
        self.run("apply_masks_", weights, masks)
        for got, expected in zip(weights, want):
            assert torch.equal(got.cpu(), expected.cpu())
        assert torch.equal(base.t().cpu(), want[-1].cpu())


def _require_triton() -> None:
    pytest.importorskip("triton")
    from sap_kernels.triton.interpreter import interpreter_runs_kernels

    if not torch.cuda.is_available() and not interpreter_runs_kernels():
        pytest.skip("this Triton's interpreter cannot run the kernels (3.6 fails, 3.9 works)")


class TestTritonOps(OpChecks):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @pytest.fixture(autouse=True)
    def _triton(self):
        _require_triton()

    def run(self, name, *args):
        from sap_kernels.triton import ops as triton_ops

        return getattr(triton_ops, name)(*args)


def test_exponents_reach_the_kernels_as_float64():
    """Triton passes a Python float argument as float32 unless annotated; on the
    GPU p = 0.7 would become 0.699999988 (the interpreter keeps the double)."""
    pytest.importorskip("triton")
    import inspect

    from sap_kernels.triton import kernels

    for kernel in (kernels.power_sums_kernel, kernels.short_rows_power_sums_kernel):
        parameters = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        for name in ("p", "q"):
            assert "float64" in str(parameters[name].annotation), (kernel, name)


def test_triton_backend_on_cpu_tensors_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    import sap_kernels
    from sap_kernels import ops

    monkeypatch.setattr(ops, "available_backends", lambda device: ["cpu", "reference"])
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        sap_kernels.pqi([torch.randn(10)], backend="triton")


@pytest.mark.parametrize("scope", ["global", "layer", "neuron"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_end_to_end(scope, dtype):
    """sap_kernels.prune / magnitude_threshold with backend='triton' equal the
    stable-sort and torch.kthvalue oracles (ties broken in flat order)."""
    _require_triton()
    import sap_kernels

    device = TestTritonOps.device
    shapes = NEURON_SHAPES if scope == "neuron" else SHAPES
    weights, masks = make_inputs(shapes, dtype, True, 60, device)
    code = {"global": GLOBAL, "layer": LAYER, "neuron": NEURON}[scope]
    retained = retained_counts(weights, masks, code)
    counts = retained // 3
    got = sap_kernels.prune(weights, masks, counts, scope=scope, backend="triton")
    want = reference.prune_by_stable_sort(weights, masks, counts, scope)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu())
    ks = retained.clamp(min=1) // 2 + 1
    if scope == "global":
        threshold = sap_kernels.magnitude_threshold(weights, int(ks[0]), masks, backend="triton")
        oracle = reference.magnitude_threshold_by_concatenation(weights, ks, masks, scope)
        assert threshold.item() == oracle[0].item()

"""General exponents in the CPU masked_power_sums kernel (csrc/cpu/power_sums.cpp).

|w|^r for r outside {0.5, 1, 2, 3..15} comes from tables (PowerTable): a block of
weights whose nonzero magnitudes span at most 32 binades, none subnormal, takes
the table form; any other block, and exponents too large for the series, take the
exp2/log2 form. Both are checked against float64 per weight, and every
instruction-set copy must give the same bits.
"""

from __future__ import annotations

import math
import platform

import pytest
import torch
from conftest import random_mask

import sap_kernels

pytestmark = pytest.mark.skipif(
    not sap_kernels.has_extension() or platform.machine() != "x86_64",
    reason="the x86-64 CPU kernels are not built",
)

GENERAL_PAIRS = [(0.7, 1.3), (0.3, 2.5), (1.5, 3.7), (0.25, 0.5), (0.5, 1.7), (2.0, 4.5)]
CPU_ISAS = ["", "x86-64-v3", "baseline"]  # "": the widest this CPU runs


def power_sums(weights, masks, p, q, scope):
    return torch.ops.sap_kernels.masked_power_sums(weights, masks, p, q, scope)


def per_weight_powers(w: torch.Tensor, p: float, q: float, mask=None) -> torch.Tensor:
    """(|w_i|^p, |w_i|^q) as the kernel computes them: neuron scope over rows of one
    weight, so each row's float32 block sum is one power."""
    masks = [None if mask is None else mask.reshape(-1, 1)]
    return power_sums([w.reshape(-1, 1)], masks, p, q, 2)[:, :2]


def ulp_errors(got: torch.Tensor, w: torch.Tensor, r: float) -> torch.Tensor:
    """(got - |w|^r) in units of the last place of |w|^r rounded to float32: a correctly
    rounded power is within 0.5, a faithfully rounded one within 1."""
    exact = w.double().abs().reshape(-1).pow(r)
    nonzero = exact != 0
    assert torch.all(got[~nonzero] == 0)
    exact, got = exact[nonzero], got[nonzero]
    rounded = exact.float()
    ulp = torch.nextafter(rounded, torch.tensor(float("inf"))).double() - rounded.double()
    # Powers beyond float32's normal range (summed in float64): a float32 ulp's worth.
    in_range = (exact >= torch.finfo(torch.float32).tiny) & torch.isfinite(rounded)
    ulp = torch.where(in_range, ulp, exact * 2.0**-23)
    return (got - exact) / ulp


def assert_rounded_about_once(got: torch.Tensor, w: torch.Tensor, r: float) -> None:
    """Faithful everywhere, correctly rounded nearly everywhere. (The exp2/log2 form
    is off by up to ~5 ulps.) Large exponents amplify the float32 rounding of the
    series, (1 + delta)^r - 1 grows to r/64: up to ~2 ulps at r = 40 (the exp2/log2
    form: ~17)."""
    errors = ulp_errors(got, w, r).abs()
    if r > 8:
        assert float(errors.max()) < 3, (r, float(errors.max()))
        return
    assert float(errors.max()) < 1, (r, float(errors.max()))
    assert float((errors <= 0.5).double().mean()) > 0.95, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p, q", GENERAL_PAIRS)
def test_table_form_rounds_each_power_about_once(p, q, dtype, generator):
    """The table form rounds each power about once: the tables' own rounding errors
    are carried as corrections."""
    n = (1 << 17) + 3
    w = (torch.randn(n, generator=generator, dtype=torch.float64) * 0.05).to(dtype)
    w[::97] = 0  # zeros give 0, not 0^r's garbage from the tables
    got = per_weight_powers(w, p, q)
    for column, r in ((0, p), (1, q)):
        assert_rounded_about_once(got[:, column], w, r)


def test_masked_weights_count_as_zero(generator):
    w = torch.randn(4099, generator=generator) * 3
    mask = random_mask(w.shape, 0.5, generator)
    got = per_weight_powers(w, 0.7, 1.3, mask)
    assert torch.all(got[~mask] == 0)
    assert_rounded_about_once(got[mask, 0], w[mask], 0.7)


def block_case(name: str, generator) -> tuple[torch.Tensor, float, float]:
    """Weights (blocks of 1024 in one flat tensor) and exponents for one block form."""
    w = torch.randn(5 * 1024 + 77, generator=generator) * 0.1
    # Blocks the window does not cover take the exp2/log2 form. Were they tabled,
    # the out-of-window weight's row (mod 32) would be the top one: its power would
    # be near the largest's.
    if name == "wide span":  # 33 binades in every block
        w[::300] = 1.5
        w[1::300] = 1.5 * 2.0**-32
        return w, 0.7, 1.3
    if name == "just past 32 binades":  # the smallest is one ulp below the window
        w[::300] = 1.5
        w[1::300] = torch.nextafter(torch.tensor(2.0**-31), torch.tensor(0.0))
        return w, 0.7, 1.3
    if name == "subnormal":  # a subnormal in every block
        w[::300] = 3.0
        w[1::300] = 1e-40
        return w, 0.7, 1.3
    if name == "low window":  # largest exponent field < 32: the window starts at 1
        return w * 2.0**-100, 0.3, 0.9
    if name == "just 32 binades":  # the smallest magnitude is the window's lowest binade
        w = w.abs().clamp(min=2.0**-20, max=1.9) * torch.where(w < 0, -1.0, 1.0)
        w[::300] = 1.0
        w[1::300] = 2.0**-31
        return w, 0.7, 1.3
    if name == "large exponent":  # the series needs 12 terms
        return w.clamp(-1, 1), 0.7, 40.0
    if name == "huge exponent":  # the series does not converge fast: exp2/log2 form
        return w.clamp(-1, 1), 0.7, 150.0
    if name.startswith("tiny scales"):  # q = 40, 100: rows whose 2^(q (e-127)) underflows
        q = float(name.split()[-1])
        w = torch.zeros(1024, dtype=torch.float64)
        w[0] = 2 ** (-100 / q) * 1.01  # the block's largest is just inside the safe range
        top = math.floor(-126 / q)  # the others' powers straddle float32's smallest normal
        w[1:] = 1.99 * 2.0 ** (top - 1) * torch.linspace(0.55, 1, 1023, dtype=torch.float64)
        return w.float(), 0.7, q
    raise ValueError(name)


BLOCK_CASES = [
    "wide span",
    "just past 32 binades",
    "subnormal",
    "low window",
    "just 32 binades",
    "large exponent",
    "huge exponent",
    "tiny scales 40",
    "tiny scales 100",
]


@pytest.mark.parametrize("name", BLOCK_CASES)
def test_every_block_form_matches_float64(name, generator, monkeypatch):
    """Each block form's sums are within float32 accumulation of float64, and all
    three instruction-set copies give the same bits."""
    w, p, q = block_case(name, generator)
    a = w.double().abs()
    want = torch.tensor([float(a.pow(p).sum()), float(a.pow(q).sum())], dtype=torch.float64)
    sums = {}
    for isa in CPU_ISAS:
        monkeypatch.setenv("SAP_KERNELS_CPU_ISA", isa)
        sums[isa] = power_sums([w], [None], p, q, 0)
    got = sums[""][0, :2]
    # The exp2/log2 form's error grows with the exponent (up to ~2e-8 q relative).
    torch.testing.assert_close(got, want, rtol=max(3e-7, 5e-8 * q), atol=0)
    for isa in CPU_ISAS[1:]:
        assert torch.equal(sums[isa], sums[""]), isa


@pytest.mark.parametrize("name", ["low window", "just 32 binades"])
def test_window_edges_round_each_power_about_once(name, generator):
    """Blocks at the window's edges still take the table form (each power rounded
    about once): a weight alone in its block is its own window's top binade, so
    this checks the clamped base and the per-binade scales over the whole range."""
    w, p, q = block_case(name, generator)
    got = per_weight_powers(w, p, q)
    for column, r in ((0, p), (1, q)):
        assert_rounded_about_once(got[:, column], w, r)


def test_every_binade_of_float32(generator):
    """One weight per float32 binade that stays within float32 range when raised:
    each scale entry of the table is used and checked."""
    exponents = torch.arange(-126, 128, dtype=torch.float64)
    mantissas = 1 + torch.rand(exponents.shape, generator=generator, dtype=torch.float64)
    w = (mantissas * torch.exp2(exponents)).float()
    for p, q in [(0.3, 0.7), (0.7, 1.3)]:  # (0.3, 0.7): float64 summing for no binade
        got = per_weight_powers(w, p, q)
        for column, r in ((0, p), (1, q)):
            assert_rounded_about_once(got[:, column], w, r)


def test_large_exponent_tabled(generator):
    """r = 40 takes the table form down to 2^-2 (below, its scales would be tiny)."""
    w = torch.rand(4096, generator=generator) * 0.75 + 0.25
    got = per_weight_powers(w, 0.7, 40.0)
    assert_rounded_about_once(got[:, 1], w, 40.0)


def test_large_exponent_near_underflow(generator):
    """At r = 80 the scale rows below 2^-1.3 would be subnormal: those weights take
    the exp2/log2 form (the table form returned 0 for 0.4679^80 = 4.1e-27)."""
    w = torch.rand(4096, generator=generator) * 0.6 + 0.4
    got = per_weight_powers(w, 0.7, 80.0)
    want = w.double().pow(80.0)
    torch.testing.assert_close(got[:, 1], want, rtol=5e-8 * 80, atol=0)


def test_a_block_whose_smallest_is_the_window_bottom_is_tabled(generator):
    """Rows of [a, b] with a in [1, 2) and b = 2^-31, the window's lowest magnitude:
    the table form runs and each row's sum, dominated by a^r, is faithful. (Falling
    back here, as an off-by-one in the window check would, gives up to ~5 ulps.)"""
    n = 1 << 14
    rows = torch.full((n, 2), 2.0**-31)
    rows[:, 0] = 1 + torch.rand(n, generator=generator)
    sums = power_sums([rows], [None], 1.3, 2.5, 2)
    for column, r in ((0, 1.3), (1, 2.5)):  # b^r < 2^-40 a^r: below a^r's rounding
        assert_rounded_about_once(sums[:, column], rows[:, 0], r)


def test_pruned_weights_do_not_shape_the_window(generator):
    """Pruned weights, huge or tiny, share blocks with retained ones and change
    nothing: the sums equal float64 over the retained weights alone."""
    w = torch.randn(3 * 1024 + 5, generator=generator)
    mask = random_mask(w.shape, 0.3, generator)
    w[~mask] = torch.where(torch.rand(int((~mask).sum()), generator=generator) < 0.5, 1e30, 1e-30)
    a = w[mask].double().abs()
    for p, q in [(0.7, 1.3), (0.3, 2.5)]:
        got = power_sums([w], [mask], p, q, 0)[0]
        want = torch.tensor([float(a.pow(p).sum()), float(a.pow(q).sum()), float(mask.sum())])
        torch.testing.assert_close(got, want.double(), rtol=3e-7, atol=0)

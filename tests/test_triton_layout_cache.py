"""The Triton ops' layout cache (sap_kernels/triton/_pieces.py): a call whose
tensors have the addresses, sizes, rows and dtypes of an earlier call reuses
its piece tables; anything that changes the tables must miss; the cache holds
no tensor. Without a GPU the kernels run in Triton's interpreter on CPU
tensors."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import DEVICE, random_mask, random_weights  # noqa: E402

from sap_kernels import ops, reference  # noqa: E402

pytestmark = pytest.mark.skipif(
    "triton" not in ops.available_backends(DEVICE), reason="Triton is not available"
)
GLOBAL, LAYER, NEURON = 0, 1, 2


@pytest.fixture
def cache():
    from sap_kernels.triton import _pieces

    _pieces.layout_cache.clear()
    yield _pieces.layout_cache
    _pieces.layout_cache.clear()


def triton_ops():
    from sap_kernels.triton import ops as module

    return module


def check_power_sums(weights, masks, scope):
    got = triton_ops().masked_power_sums(weights, masks, 0.5, 1.0, scope).cpu()
    cpu_masks = [None if m is None else m.cpu() for m in masks]
    want = reference.masked_power_sums([w.cpu() for w in weights], cpu_masks, 0.5, 1.0, scope)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    assert torch.equal(got[:, 2], want[:, 2])  # the retained counts, exactly


@pytest.mark.parametrize("scope", [GLOBAL, LAYER, NEURON])
def test_repeated_calls_hit_and_see_new_values(cache, scope, generator):
    """The tables depend on addresses, not values: weights and masks changed in
    place between calls reuse them and the sums follow the new values."""
    shapes = [(33, 70), (2, 1500), (5,)]
    weights = [random_weights(s, torch.float32, "normal", generator).to(DEVICE) for s in shapes]
    masks = [random_mask(s, 0.4, generator).to(DEVICE) for s in shapes]
    check_power_sums(weights, masks, scope)
    assert (cache.hits, cache.misses) == (0, 1)
    for w, m in zip(weights, masks):
        w.mul_(-3.0).add_(0.25)
        m.copy_(random_mask(m.shape, 0.7, generator))
    check_power_sums(weights, masks, scope)
    assert (cache.hits, cache.misses) == (1, 1)


def test_what_changes_the_tables_misses(cache, generator):
    """Same storage viewed with other rows (neuron scope: other units), a mask
    given or dropped, another scope, another dtype at the same address: each
    must build its own tables (a hit would mis-address or mis-split)."""
    # bfloat16 storage read as float32 too: finite either way (the high half
    # of each float32 is a finite bfloat16)
    storage = random_weights((24_000,), torch.bfloat16, "heavy", generator).to(DEVICE)
    single = storage.view(torch.float32)
    mask = random_mask((12_000,), 0.5, generator).to(DEVICE)
    views = [(single.view(40, 300), mask.view(40, 300)), (single.view(300, 40), mask.view(300, 40))]
    for w, m in views:
        check_power_sums([w], [m], NEURON)
        check_power_sums([w], [None], NEURON)
        check_power_sums([w], [m], LAYER)
    assert cache.hits == 0 and cache.misses == 6
    half = storage[:12_000].view(40, 300)  # the address and size of views[0], other dtype
    assert half.data_ptr() == views[0][0].data_ptr()
    check_power_sums([half], [views[0][1]], NEURON)
    assert cache.hits == 0 and cache.misses == 7


def test_prune_reuses_the_power_sums_tables(cache, generator):
    """prune_masks_ after masked_power_sums on the same tensors reuses the tables
    (one layout per scope, addresses and mask set) and matches the reference."""
    shapes = [(64, 33), (4097,)]
    weights = [random_weights(s, torch.bfloat16, "ties", generator).to(DEVICE) for s in shapes]
    masks = [random_mask(s, 0.3, generator).to(DEVICE) for s in shapes]
    check_power_sums(weights, masks, LAYER)
    keys = torch.tensor([0x3E80, 0x3F00])  # 0.25 and 0.5 in bfloat16
    quotas = torch.zeros(2, dtype=torch.int64)
    expected = reference.prune_masks([w.cpu() for w in weights], [m.cpu() for m in masks],
                                     LAYER, 16, keys, quotas)  # fmt: skip
    triton_ops().prune_masks_(weights, masks, LAYER, 16, keys.to(DEVICE), quotas.to(DEVICE))
    assert all(torch.equal(m.cpu(), e) for m, e in zip(masks, expected))
    assert (cache.hits, cache.misses) == (1, 1)


def equal_retained(weights, masks, scope, value):
    """Retained weights with |w| == value per unit."""
    hits = [((w.abs() == value) & m).cpu() for w, m in zip(weights, masks)]
    if scope == GLOBAL:
        return torch.stack([sum(h.sum() for h in hits)])
    if scope == LAYER:
        return torch.stack([h.sum() for h in hits])
    return torch.cat([h.reshape(h.shape[0] if h.dim() else 1, -1).sum(1) for h in hits])


@pytest.mark.parametrize("scope", [GLOBAL, LAYER, NEURON])
def test_in_place_prune_repeated_on_cached_tables(cache, scope, generator):
    """prune_masks_ called again and again on the same masks (a pruning loop):
    every call after the first hits, writes through the tables' mask column
    and reuses the derived arrays it uploaded once, and stays exact."""
    shapes = [(40, 33), (3, 4097), (7,)]
    weights = [random_weights(s, torch.float32, "ties", generator).to(DEVICE) for s in shapes]
    masks = [random_mask(s, 0.2, generator).to(DEVICE) for s in shapes]
    units = {GLOBAL: 1, LAYER: 3, NEURON: 50}[scope]
    for step, value in enumerate([0.25, 0.5, 0.75]):
        keys = torch.full((units,), torch.tensor(value).view(torch.int32).item())
        quotas = equal_retained(weights, masks, scope, value).clamp(max=step)  # 0, <= 1, <= 2
        expected = reference.prune_masks([w.cpu() for w in weights], [m.cpu() for m in masks],
                                         scope, 32, keys, quotas)  # fmt: skip
        triton_ops().prune_masks_(weights, masks, scope, 32, keys.to(DEVICE), quotas.to(DEVICE))
        assert all(torch.equal(m.cpu(), e) for m, e in zip(masks, expected)), step
    assert (cache.hits, cache.misses) == (2, 1)
    (pieces, _, _), _ = next(iter(cache.entries.values()))
    assert "unit_first_piece" in pieces.uploaded and "unit_starts" in pieces.uploaded
    first = pieces.uploaded["unit_first_piece"]
    triton_ops().prune_masks_(weights, masks, scope, 32, keys.to(DEVICE), quotas.to(DEVICE) * 0)
    assert pieces.uploaded["unit_first_piece"] is first


def test_cache_holds_no_tensor(cache, generator):
    weight = random_weights((300, 7), torch.float32, "normal", generator).to(DEVICE)
    mask = random_mask((300, 7), 0.5, generator).to(DEVICE)
    check_power_sums([weight], [mask], NEURON)
    refs = [weakref.ref(weight), weakref.ref(mask)]
    del weight, mask
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(cache.entries) == 1


def test_least_recently_used_tables_go_first(cache, monkeypatch, generator):
    monkeypatch.setattr(cache, "MAX_BYTES", 1)  # every new entry evicts the others
    weights = [random_weights((50, n), torch.float32, "normal", generator).to(DEVICE)
               for n in (3, 4, 5)]  # fmt: skip
    for w in weights:
        check_power_sums([w], [None], LAYER)
    assert len(cache.entries) == 1 and cache.misses == 3
    check_power_sums([weights[-1]], [None], LAYER)
    assert cache.hits == 1


def test_host_time_benchmark_runs(tmp_path):
    """benchmarks/bench_triton_host.py at a small size: every op row written, and
    the real launcher is back afterwards."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_triton_host

    launcher = triton_ops().launcher
    out = tmp_path / "host"
    assert bench_triton_host.main(["--params", "3e5", "--repeats", "1", "--out", str(out)]) == 0
    assert triton_ops().launcher is launcher
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 7 and all(r["warm_ms"] > 0 and r["cold_ms"] > 0 for r in rows)


def test_each_cuda_stream_has_its_own_tables(monkeypatch):
    """Tables uploaded on one stream are not ordered before another stream's
    kernels, so the stream is part of the key (the stream lookup is faked here:
    it needs no GPU to show that the key follows it)."""
    from types import SimpleNamespace

    from sap_kernels.triton import _pieces

    weight = torch.zeros(4, 5)
    args = ([weight], [weight.view(torch.int32)], [None], LAYER, 64, 64, "cuda:0", frozenset())
    stream = SimpleNamespace(stream_id=3)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    first = _pieces._layout_key(*args)
    assert _pieces._layout_key(*args) == first
    stream = SimpleNamespace(stream_id=4)
    assert _pieces._layout_key(*args) != first

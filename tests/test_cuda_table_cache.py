"""The CUDA ops' cache of device piece tables (csrc/cuda/piece_tables.h, used by
csrc/cuda/binding.cpp): a call on tensors with the addresses, sizes, rows and
dtypes of an earlier call, on the same stream, reuses its tables; anything that
changes the tables must miss. The host half (piece builder, key, LRU) is checked
without a GPU in tests/test_piece_tables.py; these need a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import random_mask, random_weights

from sap_kernels import reference
from sap_kernels._extension import (
    clear_cuda_table_cache,
    cuda_table_cache_stats,
    has_cuda_kernels,
)

if not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="no CUDA device on this machine")
elif not has_cuda_kernels():
    pytestmark = pytest.mark.skip(reason="sap_kernels was built without its CUDA kernels")

GLOBAL, LAYER, NEURON = 0, 1, 2
ops = torch.ops.sap_kernels


class Counter:
    """Hits and misses since the fixture cleared the cache."""

    def __init__(self):
        clear_cuda_table_cache()
        self.start = cuda_table_cache_stats()

    def __call__(self):
        now = cuda_table_cache_stats()
        return now["hits"] - self.start["hits"], now["misses"] - self.start["misses"]

    @property
    def entries(self):
        return cuda_table_cache_stats()["entries"]


@pytest.fixture
def cache():
    counter = Counter()
    yield counter
    clear_cuda_table_cache()


def check_power_sums(weights, masks, scope):
    got = ops.masked_power_sums(weights, masks, 0.5, 1.0, scope).cpu()
    cpu_masks = [None if m is None else m.cpu() for m in masks]
    want = reference.masked_power_sums([w.cpu() for w in weights], cpu_masks, 0.5, 1.0, scope)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    assert torch.equal(got[:, 2], want[:, 2])


def cuda_inputs(shapes, generator, dtype=torch.float32, pruned=0.4):
    weights = [random_weights(s, dtype, "normal", generator).cuda() for s in shapes]
    masks = [random_mask(s, pruned, generator).cuda() for s in shapes]
    return weights, masks


@pytest.mark.parametrize("scope", [GLOBAL, LAYER, NEURON])
def test_repeated_calls_hit_and_see_new_values(cache, scope, generator):
    weights, masks = cuda_inputs([(33, 70), (2, 70_000), (5,)], generator)
    check_power_sums(weights, masks, scope)
    assert cache() == (0, 1)
    for w, m in zip(weights, masks):
        w.mul_(-3.0).add_(0.25)
        m.copy_(random_mask(m.shape, 0.7, generator))
    check_power_sums(weights, masks, scope)
    assert cache() == (1, 1)


def test_what_changes_the_tables_misses(cache, generator):
    storage = random_weights((24_000,), torch.bfloat16, "heavy", generator).cuda()
    single = storage.view(torch.float32)
    mask = random_mask((12_000,), 0.5, generator).cuda()
    views = [(single.view(40, 300), mask.view(40, 300)), (single.view(300, 40), mask.view(300, 40))]
    for w, m in views:
        check_power_sums([w], [m], NEURON)
        check_power_sums([w], [None], NEURON)
        check_power_sums([w], [m], LAYER)
    assert cache() == (0, 6)
    half = storage[:12_000].view(40, 300)  # views[0]'s address and size, another dtype
    check_power_sums([half], [views[0][1]], NEURON)
    assert cache() == (0, 7)


def test_prune_reuses_the_power_sums_tables(cache, generator):
    weights = [
        random_weights(s, torch.bfloat16, "ties", generator).cuda() for s in [(64, 33), (4097,)]
    ]
    masks = [random_mask(w.shape, 0.3, generator).cuda() for w in weights]
    check_power_sums(weights, masks, LAYER)
    keys = torch.tensor([0x3E80, 0x3F00])  # 0.25 and 0.5 in bfloat16
    quotas = torch.tensor([1, 0])
    expected = reference.prune_masks([w.cpu() for w in weights], [m.cpu() for m in masks],
                                     LAYER, 16, keys, quotas)  # fmt: skip
    ops.prune_masks_(weights, masks, LAYER, 16, keys.cuda(), quotas.cuda())
    assert all(torch.equal(m.cpu(), e) for m, e in zip(masks, expected))
    assert cache() == (1, 1)


def test_non_contiguous_inputs_are_not_kept(cache, generator):
    weight = random_weights((70, 50), torch.float32, "normal", generator).cuda().t()
    check_power_sums([weight], [None], NEURON)
    check_power_sums([weight], [None], NEURON)
    assert cache() == (0, 0) and cache.entries == 0  # built per call, never looked up


def test_each_stream_has_its_own_tables(cache, generator):
    weights, masks = cuda_inputs([(100, 30), (7,)], generator)
    check_power_sums(weights, masks, GLOBAL)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        check_power_sums(weights, masks, GLOBAL)
    torch.cuda.current_stream().wait_stream(side)
    assert cache() == (0, 2)
    check_power_sums(weights, masks, GLOBAL)
    assert cache() == (1, 2)


def test_error_after_a_hit_names_the_tensor(cache, generator):
    weights, masks = cuda_inputs([(10, 10), (300,)], generator, pruned=0.0)
    check_power_sums(weights, masks, GLOBAL)
    weights[1][123] = float("nan")
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN"):
        ops.masked_power_sums(weights, masks, 0.5, 1.0, GLOBAL)
    assert cache() == (1, 1)


def test_clear_drops_every_table(cache, generator):
    weights, masks = cuda_inputs([(10, 10)], generator)
    check_power_sums(weights, masks, LAYER)
    assert cache.entries == 1 and cuda_table_cache_stats()["bytes"] > 0
    clear_cuda_table_cache()
    assert cache.entries == 0 and cuda_table_cache_stats()["bytes"] == 0

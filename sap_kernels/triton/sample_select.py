"""kth_key_by_sample on Triton: the exact k-th smallest retained key of each
unit (global or layer scope), bracketed by a sample first, with the result of
the CPU op (csrc/cpu/sample_select.cpp):

1. Sample s keys at stratified positions of the flat order (one per stratum
   of n / s weights, jittered by a Weyl sequence; a unit gets its share).
   Among the s' retained ones of unit u, the keys of ranks f s' -+ delta
   (f = k / r, r estimated from the sample; delta ~ 4 standard deviations)
   bracket the k-th key: [lo, hi]. Fewer than 64 of them: the whole key range.
2. One pass (bracket_histogram_kernel): below = #{retained key < lo}, the
   retained and non-finite counts, and a histogram of (key - lo) >> shift over
   the keys in [lo, hi], with shift the smallest that fits the bins.
3. If below < k <= below + #{keys in [lo, hi]}, the bin holding the
   (k - below)-th is the key when shift = 0; otherwise the bin becomes the
   bracket of another pass (at most one more with the default bins).
   Otherwise the sample missed (rare): key -2, and the caller runs the radix
   select.

Against the radix select (magnitude_histogram, two passes for float32, each
retained weight one global atomic in the first), only the bracketed few
percent of the weights touch the histogram. Result int64 [units, 4]: (key,
below, retained, nonfinite) per unit; key = -1 when k == 0, when k is outside
[0, retained] or when a retained weight is NaN or infinite (the caller
raises), -2 on a miss. Eager only: the refinement and the miss are decided on
the host, so the caller uses the radix select under torch.compile.
"""

from __future__ import annotations

import numpy as np
import torch
from torch._library.triton import set_wrap_triton_enabled

from ..reference import bin_of_rank
from ._launch import BLOCK, CHUNK_ELEMENTS, PIECE_ELEMENTS, launcher
from ._pieces import (
    GLOBAL,
    LAYER,
    bit_views,
    byte_views,
    check_inputs,
    check_key_bits,
    make_layout,
)
from .kernels import FLOAT32_INF_BITS
from .sample_kernels import bracket_histogram_kernel, sample_keys_kernel

MISS = -2
# A unit brackets with fewer sampled retained keys than this: the whole range.
MIN_SAMPLED = 64
# delta = SIGMAS standard deviations of the k-th key's sample rank + SLACK.
SIGMAS = 4.0
SLACK = 8.0
# Histogram bins per unit (int64 counts): 2^21 (16 MiB) for the one unit of
# global scope, so a float32 bracket from 65,536 sampled keys takes one pass
# for k above ~5% of the weights (brackets of 16.8M normal or uniform weights
# spanned 2^22.2 keys at 1%, 2^20.6 at 5%, 2^18.9 at 50%); 2^16 per unit in
# layer scope, whose units are batched UNITS_PER_CALL at a time (32 MiB).
GLOBAL_BINS_LOG2 = 21
LAYER_BINS_LOG2 = 16
UNITS_PER_CALL = 64
SAMPLE_BLOCK = 1024
_WEYL = 0.6180339887498949  # the golden ratio's fractional part
# bracket_histogram_kernel packs a lane's counts of one piece in 10-bit fields
assert PIECE_ELEMENTS // BLOCK < 1 << 10


def kth_key_by_sample(weights, masks, scope: int, key_bits: int, k, sample_size: int):
    """int64 [units, 4]: (key, below, retained, nonfinite) per unit (see above).
    Eager only, so its kernels launch directly: through wrap_triton's dispatch
    (which lets torch.compile trace a launch; the registered ops get the direct
    path from torch.library.triton_op) an eager launch costs host time (~1 ms,
    says torch's set_wrap_triton_enabled) and leaves its constant arguments in
    a global side table for good."""
    with set_wrap_triton_enabled(False):
        return _kth_key_by_sample(weights, masks, scope, key_bits, k, sample_size)


def _kth_key_by_sample(weights, masks, scope: int, key_bits: int, k, sample_size: int):
    op = "kth_key_by_sample"
    weights = list(weights)
    masks = check_inputs(op, weights, masks, scope)
    if scope not in (GLOBAL, LAYER):
        raise ValueError(f"{op}: scope must be 0 (global) or 1 (layer), got {scope}")
    check_key_bits(op, weights, key_bits)
    if sample_size < 1:
        raise ValueError(f"{op}: sample_size must be >= 1, got {sample_size}")
    units = 1 if scope == GLOBAL else len(weights)
    k = torch.as_tensor(k)
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise TypeError(f"{op}: k must hold integers, got {k.dtype}")
    if k.dim() != 1 or k.numel() != units:
        raise ValueError(
            f"{op}: k must have shape [{units}] (one entry per unit), got {list(k.shape)}"
        )
    device = weights[0].device
    k = k.to(device=device, dtype=torch.int64)
    if units <= UNITS_PER_CALL or scope == GLOBAL:
        return _select(weights, masks, scope, key_bits, k, sample_size)
    # layer scope in batches of units, each with its share of the sample
    total = max(1, sum(w.numel() for w in weights))
    parts = []
    for start in range(0, units, UNITS_PER_CALL):
        stop = min(start + UNITS_PER_CALL, units)
        share = sum(w.numel() for w in weights[start:stop])
        size = max(1, -(-sample_size * share // total))
        parts.append(
            _select(weights[start:stop], masks[start:stop], scope, key_bits, k[start:stop], size)
        )
    return torch.cat(parts)


def _select(weights, masks, scope, key_bits, k, sample_size):
    device = weights[0].device
    bits, mask_bytes = bit_views(weights), byte_views(masks)
    pieces, groups = make_layout(
        weights, bits, mask_bytes, scope, PIECE_ELEMENTS, CHUNK_ELEMENTS, device
    )
    units = pieces.num_units
    key_max = (1 << (key_bits - 1)) - 1  # the sign bit is never set
    bins_log2 = min(GLOBAL_BINS_LOG2 if units == 1 else LAYER_BINS_LOG2, key_bits - 1)
    low, high = _sample_brackets(groups, pieces, key_bits, k, sample_size, device, key_max)
    shift = _shift_for(high - low, bins_log2)
    inf_key = _inf_key(key_bits, weights[0].dtype)
    counters, hist = _bracket_pass(groups, units, low, high, shift, key_bits, bins_log2, inf_key)
    below, retained, nonfinite = counters.unbind(1)
    found = (k > 0) & (k <= retained) & (nonfinite == 0)
    rank = k - below
    digit, before, inside = bin_of_rank(hist, rank)
    hit = found & (rank >= 1) & (rank <= inside)
    key = low + (digit << shift)
    below = below + before
    refine = hit & (shift > 0)
    while bool(refine.any()):
        # the bin holding the k-th key is the next bracket, read at full resolution
        todo = refine.nonzero().squeeze(1)
        low_next = key[todo]
        high_next = torch.minimum(low_next + (1 << shift[todo]) - 1, high[todo])
        shift_next = _shift_for(high_next - low_next, bins_log2)
        if scope == GLOBAL:
            sub_groups, sub_units = groups, units
        else:
            chosen = todo.tolist()
            sub_weights = [weights[u] for u in chosen]
            sub_masks = [mask_bytes[u] for u in chosen]
            sub_bits = [bits[u] for u in chosen]
            _, sub_groups = make_layout(
                sub_weights, sub_bits, sub_masks, scope, PIECE_ELEMENTS, CHUNK_ELEMENTS, device
            )
            sub_units = len(chosen)
        counters_next, hist_next = _bracket_pass(
            sub_groups, sub_units, low_next, high_next, shift_next, key_bits, bins_log2, inf_key
        )
        below_next = counters_next[:, 0]
        digit_next, before_next, _ = bin_of_rank(hist_next, k[todo] - below_next)
        key[todo] = low_next + (digit_next << shift_next)
        below[todo] = below_next + before_next
        high[todo], shift[todo] = high_next, shift_next
        refine = torch.zeros_like(refine)
        refine[todo] = shift_next > 0
    key = torch.where(hit, key, torch.full_like(key, MISS))
    key = torch.where(found, key, torch.full_like(key, -1))
    below = torch.where(found & hit, below, torch.zeros_like(below))
    return torch.stack([key, below, retained, nonfinite], 1)


def _inf_key(key_bits: int, dtype: torch.dtype) -> int:
    """The key of infinity: keys at or above it are NaN or infinite."""
    if key_bits == 32:
        return FLOAT32_INF_BITS
    return 0x7F80 if dtype == torch.bfloat16 else 0x7C00


def _shift_for(width: torch.Tensor, bins_log2: int) -> torch.Tensor:
    """The smallest shift with width >> shift < 2^bins_log2 (width >= 0)."""
    bit_length = torch.where(
        width > 0, torch.floor(torch.log2(width.clamp(min=1).double())).long() + 1, 0
    )
    return (bit_length - bins_log2).clamp(min=0)


def _bracket_pass(groups, units, low, high, shift, key_bits, bins_log2, inf_key):
    """(counters [units, 3], histogram [units, 2^bins_log2]) of one bracket_histogram_kernel
    pass over every group."""
    device = low.device
    counters = torch.zeros((units, 3), dtype=torch.int64, device=device)
    hist = torch.zeros((units, 1 << bins_log2), dtype=torch.int64, device=device)
    for group in groups:
        launcher(bracket_histogram_kernel)[(group.num_chunks,)](
            group.weight_base, group.mask_base, group.table, group.chunk_starts,
            low.contiguous(), high.contiguous(), shift.contiguous(), counters, hist,
            hist.shape[1],
            WEIGHT_TYPE=group.weight_type, KEY_BITS=key_bits, INF_KEY=inf_key,
            ALIGNED=group.aligned, BLOCK=BLOCK,
        )  # fmt: skip
    return counters, hist


def _group_rows(pieces, group) -> np.ndarray:
    """Each piece's row in the group's table, -1 for pieces of other groups."""
    rows = np.full(pieces.count, -1, dtype=np.int64)
    rows[group.selected] = np.arange(group.selected.size, dtype=np.int64)
    return rows


def _sample_brackets(groups, pieces, key_bits, k, sample_size, device, key_max):
    """[lo, hi] per unit from the keys at stratified sample positions."""
    units = pieces.num_units
    low = torch.zeros(units, dtype=torch.int64, device=device)
    high = torch.full((units,), key_max, dtype=torch.int64, device=device)
    n = int(pieces.length.sum())
    if n == 0:
        return low, high
    s = min(sample_size, n)
    j = torch.arange(s, dtype=torch.float64, device=device)
    positions = ((j + torch.frac(j * _WEYL)) * (n / s)).long().clamp(max=n - 1)
    # Derived tables uploaded once per cached layout (Pieces.on_device).
    ends = pieces.on_device("piece_ends", device, False, lambda: np.cumsum(pieces.length))
    piece_starts = pieces.on_device(
        "piece_starts", device, False, lambda: np.cumsum(pieces.length) - pieces.length
    )
    piece = torch.searchsorted(ends, positions, right=True)
    offsets = positions - piece_starts[piece]
    unit = pieces.on_device("unit", device, False)[piece]
    keys = torch.full((s,), -1, dtype=torch.int64, device=device)
    for index, group in enumerate(groups):
        rows = pieces.on_device(
            ("row_of_piece", index), device, False, lambda g=group: _group_rows(pieces, g)
        )[piece]
        launcher(sample_keys_kernel)[(-(-s // SAMPLE_BLOCK),)](
            group.weight_base, group.mask_base, group.table, rows, offsets, keys, s,
            WEIGHT_TYPE=group.weight_type, KEY_BITS=key_bits, BLOCK=SAMPLE_BLOCK,
        )  # fmt: skip
    kept = keys >= 0
    positions_per_unit = torch.bincount(unit, minlength=units)
    taken = torch.zeros(units, dtype=torch.int64, device=device).index_add_(0, unit, kept.long())
    # each unit's retained sampled keys, sorted, then its pruned ones
    composite = (unit << 32) | torch.where(kept, keys, torch.full_like(keys, 0xFFFFFFFF))
    ordered = composite.sort().values & 0xFFFFFFFF
    starts = positions_per_unit.cumsum(0) - positions_per_unit
    unit_sizes = pieces.on_device(
        "unit_sizes", device, False,
        lambda: np.bincount(pieces.unit, pieces.length, units).astype(np.int64),
    ).double()  # fmt: skip
    taken_f = taken.double()
    kept_fraction = taken_f / positions_per_unit.clamp(min=1).double()
    estimated = (kept_fraction * unit_sizes).clamp(min=1.0)
    f = (k.double() / estimated).clamp(max=1.0)
    # the k-th key's sample rank varies, and so does the retained fraction's
    # estimate (which moves the target rank when masks are given)
    variance = taken_f * (f * (1.0 - f) + f * f * (1.0 - kept_fraction))
    delta = SIGMAS * variance.sqrt() + SLACK
    center = f * taken_f
    # (a rank past the retained sampled keys would read a pruned one's sentinel)
    rank_low = torch.minimum(torch.floor(center - delta).long(), taken - 1)
    rank_high = torch.ceil(center + delta).long()
    enough = taken >= MIN_SAMPLED

    def key_at(rank):
        return ordered[(starts + rank.clamp(min=0)).clamp(max=s - 1)]

    low = torch.where(enough & (rank_low >= 0), key_at(rank_low), low)
    high = torch.where(enough & (rank_high < taken), key_at(rank_high), high)
    return low, high

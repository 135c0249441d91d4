"""Triton kernels of the sampled selection (sample_select.py): gathering the
keys at sampled positions, and one pass that counts each unit's retained keys
below a bracket [lo, hi] and histograms the keys inside it. Same piece table
and addressing as kernels.py (see its docstring)."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _full_tile, _key, _piece_span, _tail_tile


@triton.jit
def sample_keys_kernel(
    weight_bits,
    mask_bytes,
    pieces,
    sample_rows,
    sample_offsets,
    keys,
    num_samples,
    WEIGHT_TYPE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """keys[j] = key(|w|) of the weight at offset sample_offsets[j] of piece
    row sample_rows[j] of this group's table, or -1 when that weight is pruned.
    Samples with sample_rows[j] < 0 lie in another dtype group: not written."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = j < num_samples
    row = tl.load(sample_rows + j, mask=valid, other=-1)
    mine = valid & (row >= 0)
    row = tl.where(mine, row, 0)
    begin = tl.load(pieces + row * 5, mask=mine, other=0)
    mask_begin = tl.load(pieces + row * 5 + 2, mask=mine, other=-16)
    offset = tl.load(sample_offsets + j, mask=mine, other=0)
    bits = tl.load(weight_bits + begin + offset, mask=mine, other=0)
    has_mask = mine & (mask_begin >= 0)
    kept = tl.load(mask_bytes + tl.where(has_mask, mask_begin + offset, 0), mask=has_mask, other=1)
    key = _key(bits, WEIGHT_TYPE, KEY_BITS).to(tl.int64)
    tl.store(keys + j, tl.where(kept != 0, key, -1), mask=mine)


# Per-lane counts of one piece are packed in one int32 (a register, not three):
# retained in bits 0-9, below the bracket in 10-19, non-finite in 20-29. A lane
# sees at most PIECE_ELEMENTS / BLOCK = 32 weights of a piece (< 2^10; the
# host asserts it).


@triton.jit
def _bracket_tile(bits, keep, low, high, shift, bins, counts, WEIGHT_TYPE, KEY_BITS, INF_KEY):
    """Adds one tile's retained keys to the packed per-lane counts (returned)
    and its keys in [low, high] to bins[(key - low) >> shift]."""
    key = _key(bits, WEIGHT_TYPE, KEY_BITS)
    counts += keep.to(tl.int32)
    counts += (keep & (key < low)).to(tl.int32) << 10
    counts += (keep & (key >= INF_KEY)).to(tl.int32) << 20
    inside = keep & (key >= low) & (key <= high)
    ones = tl.full(key.shape, 1, tl.int64)
    # relaxed: the counts are read only by later launches on the stream
    tl.atomic_add(bins + ((key - low) >> shift), ones, mask=inside, sem="relaxed")
    return counts


@triton.jit
def bracket_histogram_kernel(
    weight_bits,
    mask_bytes,
    pieces,
    chunk_starts,
    lows,
    highs,
    shifts,
    counters,
    histogram,
    bins_per_unit,
    WEIGHT_TYPE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    INF_KEY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """For each unit u, with lo = lows[u], hi = highs[u], s = shifts[u]:
    counters[u] += (#{retained key < lo}, #retained, #{retained key >= INF_KEY})
    and histogram[u, (key - lo) >> s] += 1 for every retained key in [lo, hi].
    Integer atomics only: the counts are exact and order-independent. Only
    keys inside the bracket (a few percent of the weights when a sample chose
    it) touch the histogram; the counts stay in registers until a piece ends."""
    chunk = tl.program_id(0)
    first = tl.load(chunk_starts + chunk)
    last = tl.load(chunk_starts + chunk + 1)
    lanes = tl.arange(0, BLOCK)
    for index in range(first, last):
        begin, length, mask_begin = _piece_span(pieces, index, WEIGHT_TYPE, ALIGNED)
        row = pieces + index * 5
        unit = tl.load(row + 3)
        low = tl.load(lows + unit).to(tl.int32)  # keys are < 2^31
        high = tl.load(highs + unit).to(tl.int32)
        shift = tl.load(shifts + unit).to(tl.int32)
        bins = histogram + unit * bins_per_unit
        counts = tl.zeros([BLOCK], tl.int32)
        full_end = length // BLOCK * BLOCK
        for start in range(0, full_end, BLOCK):
            bits, keep = _full_tile(weight_bits, mask_bytes, begin, mask_begin, start + lanes)
            counts = _bracket_tile(
                bits, keep, low, high, shift, bins, counts, WEIGHT_TYPE, KEY_BITS, INF_KEY
            )
        if full_end < length:
            bits, keep = _tail_tile(
                weight_bits, mask_bytes, begin, mask_begin, full_end + lanes, length
            )
            counts = _bracket_tile(
                bits, keep, low, high, shift, bins, counts, WEIGHT_TYPE, KEY_BITS, INF_KEY
            )
        below = tl.sum((counts >> 10) & 0x3FF, axis=0).to(tl.int64)
        retained = tl.sum(counts & 0x3FF, axis=0).to(tl.int64)
        nonfinite = tl.sum(counts >> 20, axis=0).to(tl.int64)
        out = counters + unit * 3
        tl.atomic_add(out, below, sem="relaxed")
        tl.atomic_add(out + 1, retained, sem="relaxed")
        tl.atomic_add(out + 2, nonfinite, sem="relaxed")

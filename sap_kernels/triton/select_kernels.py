"""Triton kernels for radix select and pruning: digit histograms, the
row-wise k-th key, the tie-aware mask update and apply_masks_. Same piece
table and addressing as kernels.py (see its docstring)."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _full_tile, _key, _piece_span, _retained, _tail_tile


@triton.jit
def _add_digits(bits, keep, prefix, bins, ones, WEIGHT_TYPE, KEY_BITS, PASS_INDEX):
    """bins[digit] += 1 for each retained key of the tile (pass 1: only keys
    whose high 16 bits equal prefix)."""
    key = _key(bits, WEIGHT_TYPE, KEY_BITS)
    if PASS_INDEX == 0:
        if KEY_BITS == 32:
            digit = key >> 16
        else:
            digit = key
    else:
        keep = keep & ((key >> 16) == prefix)
        digit = key & 0xFFFF
    # relaxed: the counts are read only by later launches on the stream
    tl.atomic_add(bins + digit, ones, mask=keep, sem="relaxed")


@triton.jit
def histogram_kernel(
    weight_bits,
    mask_bytes,
    pieces,
    chunk_starts,
    prefixes,
    histogram,
    WEIGHT_TYPE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    PASS_INDEX: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """histogram[u, digit] += #{retained i in unit u with that digit}, where
    digit = key >> 16 (pass 0, 32-bit keys), key (pass 0, 16-bit keys) or
    key & 0xFFFF for keys with key >> 16 == prefixes[u] (pass 1).
    Integer atomics: the counts are exact and order-independent."""
    chunk = tl.program_id(0)
    first = tl.load(chunk_starts + chunk)
    last = tl.load(chunk_starts + chunk + 1)
    lanes = tl.arange(0, BLOCK)
    ones = tl.full([BLOCK], 1, tl.int64)
    for index in range(first, last):
        begin, length, mask_begin = _piece_span(pieces, index, WEIGHT_TYPE, ALIGNED)
        row = pieces + index * 5
        unit = tl.load(row + 3)
        # a prefix outside 16 bits matches no key (as on the CPU), never its low bits
        raw_prefix = tl.load(prefixes + unit)
        prefix = tl.where((raw_prefix >= 0) & (raw_prefix <= 0xFFFF), raw_prefix, 0x10000)
        prefix = prefix.to(tl.int32)
        bins = histogram + unit * 65536
        full_end = length // BLOCK * BLOCK
        for start in range(0, full_end, BLOCK):
            bits, keep = _full_tile(weight_bits, mask_bytes, begin, mask_begin, start + lanes)
            _add_digits(bits, keep, prefix, bins, ones, WEIGHT_TYPE, KEY_BITS, PASS_INDEX)
        if full_end < length:
            bits, keep = _tail_tile(
                weight_bits, mask_bytes, begin, mask_begin, full_end + lanes, length
            )
            _add_digits(bits, keep, prefix, bins, ones, WEIGHT_TYPE, KEY_BITS, PASS_INDEX)


@triton.jit
def rowwise_kth_kernel(
    weight_bits,
    mask_bytes,
    pieces,
    ks,
    result,
    nonfinite,
    WEIGHT_TYPE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """result[row] = (key of the k-th smallest retained key of the row,
    #retained keys below it), k = ks[row]; (-1, 0) when k = 0. One program per
    row (a piece is a whole row here): radix select on 8-bit digits, most
    significant first. Pass j histograms digit j of the retained keys whose
    higher digits equal the prefix chosen so far; the digit where the
    cumulative count reaches the remaining rank is appended to the prefix and
    the counts of smaller digits are added to `below`. nonfinite[row] counts
    retained NaN/inf keys (found in the first pass, which runs even when k = 0),
    or is -1 when k lies outside 0..retained (the CPU op's check; result[row]
    is then (-1, retained))."""
    index = tl.program_id(0).to(tl.int64)  # one program per row: may pass 2^31 / 5
    row = pieces + index * 5
    begin = tl.load(row)
    length = tl.load(row + 1)
    mask_begin = tl.load(row + 2)
    unit = tl.load(row + 3)
    k = tl.load(ks + unit)
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    if KEY_BITS == 32:
        inf_key = 0x7F800000
    elif WEIGHT_TYPE == 1:
        inf_key = 0x7F80
    else:
        inf_key = 0x7C00
    prefix = tl.full([], 0, tl.int32)
    below = tl.full([], 0, tl.int64)
    remaining = k
    bad = tl.zeros([BLOCK], tl.int32)
    retained = tl.full([], 0, tl.int64)
    out_of_range = k < 0
    for level in tl.static_range(KEY_BITS // 8):
        if (level == 0) | ((k > 0) & ~out_of_range):
            shift = KEY_BITS - 8 * (level + 1)
            counts = tl.zeros([256], tl.int32)
            for start in range(0, length, BLOCK):
                offsets = start + lanes
                valid = offsets < length
                bits = tl.load(weight_bits + begin + offsets, mask=valid, other=0)
                keep = _retained(mask_bytes, mask_begin, offsets, valid)
                key = _key(bits, WEIGHT_TYPE, KEY_BITS)
                if level == 0:
                    bad += (keep & (key >= inf_key)).to(tl.int32)
                else:
                    keep = keep & ((key >> (shift + 8)) == prefix)
                counts += tl.histogram((key >> shift) & 0xFF, 256, mask=keep).to(tl.int32)
            if level == 0:
                retained = tl.sum(counts, axis=0).to(tl.int64)
                out_of_range = (k < 0) | (k > retained)
            cumulative = tl.cumsum(counts, axis=0)
            digit = tl.sum((cumulative < remaining).to(tl.int32), axis=0)
            smaller = tl.sum(tl.where(bins < digit, counts, 0), axis=0).to(tl.int64)
            below += smaller
            remaining -= smaller
            prefix = (prefix << 8) | digit
    found = (k > 0) & ~out_of_range
    tl.store(result + unit * 2, tl.where(found, prefix.to(tl.int64), -1))
    tl.store(result + unit * 2 + 1, tl.where(out_of_range, retained, tl.where(found, below, 0)))
    nonfinite_count = tl.sum(bad, axis=0)
    tl.store(
        nonfinite + unit, tl.where(nonfinite_count > 0, nonfinite_count, -out_of_range.to(tl.int32))
    )


@triton.jit
def count_equal_kernel(
    weight_bits,
    mask_bytes,
    pieces,
    chunk_starts,
    threshold_keys,
    remove_equal,
    equal_counts,
    WEIGHT_TYPE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """equal_counts[piece] = #{retained i in piece : key_i == threshold_keys[unit]},
    the per-piece counts whose scan ranks the equal keys in flat order. Pieces of
    units that remove no equal key are skipped (count 0, nothing read)."""
    chunk = tl.program_id(0)
    first = tl.load(chunk_starts + chunk)
    last = tl.load(chunk_starts + chunk + 1)
    lanes = tl.arange(0, BLOCK)
    for index in range(first, last):
        begin, length, mask_begin = _piece_span(pieces, index, WEIGHT_TYPE, ALIGNED)
        row = pieces + index * 5
        unit = tl.load(row + 3)
        piece = tl.load(row + 4)
        threshold = tl.load(threshold_keys + unit)
        equal = tl.zeros([BLOCK], tl.int32)
        if (threshold >= 0) & (tl.load(remove_equal + unit) > 0):
            full_end = length // BLOCK * BLOCK
            for start in range(0, full_end, BLOCK):
                bits, keep = _full_tile(weight_bits, mask_bytes, begin, mask_begin, start + lanes)
                key = _key(bits, WEIGHT_TYPE, KEY_BITS).to(tl.int64)
                equal += (keep & (key == threshold)).to(tl.int32)
            if full_end < length:
                bits, keep = _tail_tile(
                    weight_bits, mask_bytes, begin, mask_begin, full_end + lanes, length
                )
                key = _key(bits, WEIGHT_TYPE, KEY_BITS).to(tl.int64)
                equal += (keep & (key == threshold)).to(tl.int32)
        tl.store(equal_counts + piece, tl.sum(equal, axis=0).to(tl.int64))


@triton.jit
def _pruned_tile(bits, keep, threshold, quota, seen, WEIGHT_TYPE, KEY_BITS):
    """(new retained flags, seen') of one tile of a unit with threshold t >= 0:
    keep_i and not (key_i < t or (key_i == t and rank_i < quota)), rank_i =
    seen + the in-tile inclusive count of retained keys equal to t - 1. Once
    seen >= quota no equal key is removed, so the scan is skipped: with
    real-valued weights that is every tile but the few holding the tie."""
    key = _key(bits, WEIGHT_TYPE, KEY_BITS).to(tl.int64)
    removed = key < threshold
    if seen < quota:
        equal = keep & (key == threshold)
        rank = seen + tl.cumsum(equal.to(tl.int64), axis=0) - 1
        removed = removed | (equal & (rank < quota))
        seen += tl.sum(equal.to(tl.int64), axis=0)
    return keep & ~removed, seen


@triton.jit
def prune_kernel(
    weight_bits,
    mask_bytes,
    out_bytes,
    pieces,
    out_begins,
    chunk_starts,
    threshold_keys,
    remove_equal,
    equal_before,
    WEIGHT_TYPE: tl.constexpr,
    KEY_BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """New mask of one piece: keep_i and not (key_i < t or (key_i == t and
    rank_i < remove_equal[unit])), t = threshold_keys[unit] (t < 0: the old
    mask is copied), rank_i = number of retained keys equal to t before i in
    the unit's flat order = equal_before[piece] + an in-piece inclusive scan -
    1. out_begins[index] is the piece's byte offset from the output masks'
    base; with ALIGNED it is a multiple of 16 too."""
    chunk = tl.program_id(0)
    first = tl.load(chunk_starts + chunk)
    last = tl.load(chunk_starts + chunk + 1)
    lanes = tl.arange(0, BLOCK)
    for index in range(first, last):
        begin, length, mask_begin = _piece_span(pieces, index, WEIGHT_TYPE, ALIGNED)
        row = pieces + index * 5
        unit = tl.load(row + 3)
        piece = tl.load(row + 4)
        out_begin = tl.load(out_begins + index)
        if ALIGNED:
            out_begin = tl.multiple_of(out_begin, 16)
        threshold = tl.load(threshold_keys + unit)
        # A unit that prunes nothing gets quota 0 and a threshold below every key.
        quota = tl.where(threshold >= 0, tl.load(remove_equal + unit), 0)
        threshold = tl.maximum(threshold, 0)
        seen = tl.load(equal_before + piece)
        full_end = length // BLOCK * BLOCK
        for start in range(0, full_end, BLOCK):
            bits, keep = _full_tile(weight_bits, mask_bytes, begin, mask_begin, start + lanes)
            kept, seen = _pruned_tile(bits, keep, threshold, quota, seen, WEIGHT_TYPE, KEY_BITS)
            tl.store(out_bytes + out_begin + start + lanes, kept.to(tl.uint8))
        if full_end < length:
            offsets = full_end + lanes
            bits, keep = _tail_tile(weight_bits, mask_bytes, begin, mask_begin, offsets, length)
            kept, seen = _pruned_tile(bits, keep, threshold, quota, seen, WEIGHT_TYPE, KEY_BITS)
            tl.store(out_bytes + out_begin + offsets, kept.to(tl.uint8), mask=offsets < length)


@triton.jit
def apply_masks_kernel(
    weight_bits, mask_bytes, pieces, chunk_starts, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):
    """w_i = +0 where m_i is False (the weight bits are overwritten, so a NaN
    that was pruned cannot survive as it would with w * m). Reads only masks."""
    chunk = tl.program_id(0)
    first = tl.load(chunk_starts + chunk)
    last = tl.load(chunk_starts + chunk + 1)
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], weight_bits.dtype.element_ty)
    for index in range(first, last):
        row = pieces + index * 5
        begin = tl.load(row)
        length = tl.load(row + 1)
        mask_begin = tl.load(row + 2)
        if ALIGNED:
            mask_begin = tl.multiple_of(mask_begin, 16)
        full_end = length // BLOCK * BLOCK
        for start in range(0, full_end, BLOCK):
            offsets = start + lanes
            keep = tl.load(mask_bytes + mask_begin + offsets)
            tl.store(weight_bits + begin + offsets, zero, mask=keep == 0)
        if full_end < length:
            offsets = full_end + lanes
            valid = offsets < length
            keep = tl.load(mask_bytes + mask_begin + offsets, mask=valid, other=1)
            tl.store(weight_bits + begin + offsets, zero, mask=valid & (keep == 0))

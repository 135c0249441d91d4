"""Triton kernels for the sap_kernels ops (DESIGN.md §5).

Every kernel walks a *piece table*: int64 rows of `PIECE_COLUMNS` entries

    (begin, length, mask_begin, unit, piece)

where `begin` is the element offset of the piece from the one base pointer of
its dtype group, `mask_begin` the byte offset from the masks' base pointer (or
-16 when the tensor has no mask: all retained), `unit` the pruning unit the
whole piece belongs to and `piece` its index in the op's global piece order
(tensor order, then flat order). Program `c` handles the pieces
`chunk_starts[c] .. chunk_starts[c + 1]`, so thousands of tiny tensors share
programs. Addressing by int64 offsets from one base pointer, instead of
pointers loaded from memory, is what lets the same kernels run under
`TRITON_INTERPRET=1` on CPU tensors.

Weights are read as raw bits (int32 for float32, int16 for bfloat16/float16):
the magnitude and the radix key are formed with integer ops and bitcasts, so
no bfloat16 arithmetic happens (the interpreter has no bfloat16 type).
"""

from __future__ import annotations

import triton
import triton.language as tl

PIECE_COLUMNS = 5
# WeightType codes, as in csrc/kernel_types.h.
FLOAT32, BFLOAT16, FLOAT16 = 0, 1, 2
# PowerKind codes, as in csrc/kernel_types.h.
POW_HALF, POW_ONE, POW_TWO, POW_INT, POW_GENERAL = 0, 1, 2, 3, 4
FLOAT32_INF_BITS = 0x7F800000


@triton.jit
def _magnitude(bits, WEIGHT_TYPE: tl.constexpr):
    """|w| as float32 from the raw bits of a float32, bfloat16 or float16 weight
    (exact: every bfloat16/float16 value is a float32 value)."""
    if WEIGHT_TYPE == 0:
        magnitude = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    elif WEIGHT_TYPE == 1:
        magnitude = ((bits.to(tl.int32) & 0x7FFF) << 16).to(tl.float32, bitcast=True)
    else:
        magnitude = (bits & 0x7FFF).to(tl.float16, bitcast=True).to(tl.float32)
    return magnitude


@triton.jit
def _key(bits, WEIGHT_TYPE: tl.constexpr, KEY_BITS: tl.constexpr):
    """Radix key of |w| as int32: the float32 bits of |w| (KEY_BITS 32) or the
    16-bit magnitude bits (KEY_BITS 16). Keys order exactly like magnitudes."""
    if KEY_BITS == 16:
        key = bits.to(tl.int32) & 0x7FFF
    else:
        key = _magnitude(bits, WEIGHT_TYPE).to(tl.int32, bitcast=True)
    return key


@triton.jit
def _retained(mask_bytes, mask_begin, offsets, valid):
    """Whether each weight at `offsets` (< length where `valid`) is retained:
    its mask byte, or True when the tensor has no mask (mask_begin < 0). The
    scalar test is broadcast first: the interpreter rejects load masks formed
    from a vector and a scalar."""
    has_mask = (tl.zeros(offsets.shape, tl.int64) + mask_begin) >= 0
    keep = tl.load(mask_bytes + mask_begin + offsets, mask=valid & has_mask, other=1)
    return valid & (keep != 0)


@triton.jit
def _full_tile(weight_bits, mask_bytes, begin, mask_begin, offsets):
    """Raw bits and retained flags of a whole tile (no bounds test, so with the
    callers' alignment hints the loads can become 16-byte vector loads)."""
    bits = tl.load(weight_bits + begin + offsets)
    if mask_begin >= 0:
        keep = tl.load(mask_bytes + mask_begin + offsets) != 0
    else:
        keep = tl.full(offsets.shape, 1, tl.int1)
    return bits, keep


@triton.jit
def _piece_span(pieces, index, WEIGHT_TYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """(begin, length, mask_begin) of piece-table row `index`. With ALIGNED (the
    host checked that every piece's weights and mask bytes start 16 bytes from
    16-byte aligned bases) they carry the divisibility hints that let the tile
    loads become 16-byte vector loads; a hint must sit where the value is
    loaded (on a kernel argument it is lost)."""
    row = pieces + index * 5
    begin = tl.load(row)
    length = tl.load(row + 1)
    mask_begin = tl.load(row + 2)
    if ALIGNED:
        if WEIGHT_TYPE == 0:
            begin = tl.multiple_of(begin, 4)
        else:
            begin = tl.multiple_of(begin, 8)
        mask_begin = tl.multiple_of(mask_begin, 16)
    return begin, length, mask_begin


@triton.jit
def _tail_tile(weight_bits, mask_bytes, begin, mask_begin, offsets, length):
    """Raw bits and retained flags of the last, partial tile of a piece."""
    valid = offsets < length
    bits = tl.load(weight_bits + begin + offsets, mask=valid, other=0)
    return bits, _retained(mask_bytes, mask_begin, offsets, valid)


@triton.jit
def _power(x, r, KIND: tl.constexpr, INT_EXPONENT: tl.constexpr):
    """x^r for x >= 0 in float32, with x = 0 giving 0.

    The common exponents are exact or one rounding (sqrt, x, x*x, square and
    multiply for integers 3..15). Any other r: x = 2^e * m with m in [1, 2),
    y = r * (e + log2 m) in float64 so the exponent's integer part costs no
    precision, then 2^y = 2^frac(y) * 2^n1 * 2^n2 (two float32 scale factors
    reach subnormals and overflow to inf like the CPU kernel). r arrives as a
    float64 scalar (the kernels annotate p and q as tl.float64: as float32 they
    would put an error of |dr * ln|w|| ~ 1e-7 relative on every power).
    INT_EXPONENT is r for KIND == POW_INT (a compile-time constant)."""
    if KIND == 0:
        result = tl.sqrt_rn(x)  # tl.sqrt is sqrt.approx.ftz on the GPU
    elif KIND == 1:
        result = x
    elif KIND == 2:
        result = x * x
    elif KIND == 3:
        result = tl.full(x.shape, 1.0, tl.float32)
        base = x
        for step in tl.static_range(4):
            if (INT_EXPONENT >> step) & 1:
                result = result * base
            base = base * base
    else:
        bits = x.to(tl.int32, bitcast=True)
        subnormal = bits < 0x00800000
        scaled_bits = tl.where(subnormal, x * 8388608.0, x).to(tl.int32, bitcast=True)
        exponent = (scaled_bits >> 23) - 127 - tl.where(subnormal, 23, 0)
        mantissa = ((scaled_bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
        y = (exponent.to(tl.float64) + tl.log2(mantissa).to(tl.float64)) * r
        y = tl.minimum(tl.maximum(y, -600.0), 600.0)
        whole = tl.floor(y)
        fraction = tl.exp2((y - whole).to(tl.float32))
        n = tl.minimum(tl.maximum(whole.to(tl.int32), -252), 254)
        n1 = n >> 1
        n2 = n - n1
        scale1 = ((n1 + 127) << 23).to(tl.float32, bitcast=True)
        scale2 = ((n2 + 127) << 23).to(tl.float32, bitcast=True)
        result = tl.where(x == 0.0, 0.0, fraction * scale1 * scale2)
    return result


@triton.jit
def _power_f64(x, r):
    """x^r in float64 (x = 0 gives 0): the fallback for tiles whose float32
    powers could overflow or underflow."""
    x64 = x.to(tl.float64)
    safe = tl.where(x64 > 0.0, x64, 1.0)
    return tl.where(x64 > 0.0, tl.exp2(tl.log2(safe) * r), 0.0)


@triton.jit
def _add_power_tile(bits, keep, sums, p, q, WEIGHT_TYPE, P_KIND, Q_KIND, P_INT, Q_INT):
    """Adds one tile to the per-lane sums = (acc_p, acc_q, largest, retained,
    nonfinite): float32 powers, the largest retained finite magnitude, counts.
    No reduction across lanes and no float64 here: the hot loop stays light
    (113-118 registers on sm_90 for p = 0.5, q = 1, was 145-148). In a piece that
    needs float64 the float32 powers may overflow to inf; they are discarded."""
    acc_p, acc_q, largest, retained, nonfinite = sums
    magnitude = _magnitude(bits, WEIGHT_TYPE)
    bad = keep & (magnitude.to(tl.int32, bitcast=True) >= 0x7F800000)
    retained += keep.to(tl.int32)
    nonfinite += bad.to(tl.int32)
    magnitude = tl.where(keep & ~bad, magnitude, 0.0)
    largest = tl.maximum(largest, magnitude)
    acc_p += _power(magnitude, p, P_KIND, P_INT)
    acc_q += _power(magnitude, q, Q_KIND, Q_INT)
    return acc_p, acc_q, largest, retained, nonfinite


@triton.jit
def _wide_piece_sums(
    weight_bits, mask_bytes, begin, mask_begin, length, p, q, WEIGHT_TYPE, BLOCK: tl.constexpr
):
    """(S_p, S_q) of one piece with float64 powers: the rare second pass over a
    piece whose float32 powers could overflow or underflow."""
    lanes = tl.arange(0, BLOCK)
    wide_p = tl.zeros([BLOCK], tl.float64)
    wide_q = tl.zeros([BLOCK], tl.float64)
    for start in range(0, length, BLOCK):
        bits, keep = _tail_tile(weight_bits, mask_bytes, begin, mask_begin, start + lanes, length)
        magnitude = _magnitude(bits, WEIGHT_TYPE)
        finite = keep & (magnitude.to(tl.int32, bitcast=True) < 0x7F800000)
        magnitude = tl.where(finite, magnitude, 0.0)
        wide_p += _power_f64(magnitude, p)
        wide_q += _power_f64(magnitude, q)
    return tl.sum(wide_p, axis=0), tl.sum(wide_q, axis=0)


@triton.jit
def power_sums_kernel(
    weight_bits,
    mask_bytes,
    pieces,
    chunk_starts,
    partials,
    p: tl.float64,
    q: tl.float64,
    safe_min,
    safe_max,
    WEIGHT_TYPE: tl.constexpr,
    P_KIND: tl.constexpr,
    Q_KIND: tl.constexpr,
    P_INT: tl.constexpr,
    Q_INT: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partials[piece] = (S_p, S_q, d, nonfinite) over one piece:

        S_r = sum_{i in piece, m_i, |w_i| finite} |w_i|^r,  d = #{i : m_i},
        nonfinite = #{i : m_i, w_i NaN or inf}.

    Each lane accumulates its |w|^r in float32 over the piece's tiles (at most
    pieces/BLOCK terms per lane), and the lanes are summed in float64. A piece
    whose largest magnitude lies outside [safe_min, safe_max] (where float32
    powers could overflow or lose everything to underflow) is summed again with
    float64 powers in a second pass. No atomics: the same result run after run.
    """
    chunk = tl.program_id(0)
    first = tl.load(chunk_starts + chunk)
    last = tl.load(chunk_starts + chunk + 1)
    lanes = tl.arange(0, BLOCK)
    for index in range(first, last):
        begin, length, mask_begin = _piece_span(pieces, index, WEIGHT_TYPE, ALIGNED)
        row = pieces + index * 5
        piece = tl.load(row + 4)
        sums = (
            tl.zeros([BLOCK], tl.float32),
            tl.zeros([BLOCK], tl.float32),
            tl.zeros([BLOCK], tl.float32),
            tl.zeros([BLOCK], tl.int32),
            tl.zeros([BLOCK], tl.int32),
        )
        full_end = length // BLOCK * BLOCK
        for start in range(0, full_end, BLOCK):
            bits, keep = _full_tile(weight_bits, mask_bytes, begin, mask_begin, start + lanes)
            sums = _add_power_tile(
                bits, keep, sums, p, q, WEIGHT_TYPE, P_KIND, Q_KIND, P_INT, Q_INT
            )
        if full_end < length:
            bits, keep = _tail_tile(
                weight_bits, mask_bytes, begin, mask_begin, full_end + lanes, length
            )
            sums = _add_power_tile(
                bits, keep, sums, p, q, WEIGHT_TYPE, P_KIND, Q_KIND, P_INT, Q_INT
            )
        acc_p, acc_q, largest_per_lane, retained, nonfinite = sums
        largest = tl.max(largest_per_lane, axis=0)
        if (largest > safe_max) | ((largest > 0.0) & (largest < safe_min)):
            # few weights per thread: the float64 powers need many registers
            sum_p, sum_q = _wide_piece_sums(
                weight_bits, mask_bytes, begin, mask_begin, length, p, q, WEIGHT_TYPE, BLOCK // 8
            )
        else:
            sum_p = tl.sum(acc_p.to(tl.float64), axis=0)
            sum_q = tl.sum(acc_q.to(tl.float64), axis=0)
        out = partials + piece * 4
        tl.store(out, sum_p)
        tl.store(out + 1, sum_q)
        tl.store(out + 2, tl.sum(retained, axis=0).to(tl.float64))
        tl.store(out + 3, tl.sum(nonfinite, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["mask_begin", "num_rows", "row_length", "first_piece"])
def short_rows_power_sums_kernel(
    weight_bits,
    mask_bytes,
    mask_begin,
    num_rows,
    row_length,
    first_piece,
    partials,
    p: tl.float64,
    q: tl.float64,
    safe_min,
    safe_max,
    WEIGHT_TYPE: tl.constexpr,
    P_KIND: tl.constexpr,
    Q_KIND: tl.constexpr,
    P_INT: tl.constexpr,
    Q_INT: tl.constexpr,
    ROWS: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    """Neuron scope, one tensor with rows of row_length <= COLUMNS weights:
    partials[first_piece + r] = (S_p, S_q, d, nonfinite) of row r, for ROWS rows
    per program as a [ROWS, COLUMNS] tile (one piece per row would cost a loop
    iteration per row). Each row's powers are summed in float64; a tile whose
    largest magnitude is outside [safe_min, safe_max] takes float64 powers.
    mask_begin is 0, or -16 when the tensor has no mask."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    columns = tl.arange(0, COLUMNS)
    valid = (rows[:, None] < num_rows) & (columns[None, :] < row_length)
    offsets = rows[:, None].to(tl.int64) * row_length + columns[None, :]
    bits = tl.load(weight_bits + offsets, mask=valid, other=0)
    keep = _retained(mask_bytes, mask_begin, offsets, valid)
    magnitude = _magnitude(bits, WEIGHT_TYPE)
    bad = keep & (magnitude.to(tl.int32, bitcast=True) >= 0x7F800000)
    magnitude = tl.where(keep & ~bad, magnitude, 0.0)
    largest = tl.max(tl.max(magnitude, axis=1), axis=0)
    if (largest > safe_max) | ((largest > 0.0) & (largest < safe_min)):
        sum_p = tl.sum(_power_f64(magnitude, p), axis=1)
        sum_q = tl.sum(_power_f64(magnitude, q), axis=1)
    else:
        sum_p = tl.sum(_power(magnitude, p, P_KIND, P_INT).to(tl.float64), axis=1)
        sum_q = tl.sum(_power(magnitude, q, Q_KIND, Q_INT).to(tl.float64), axis=1)
    out = partials + (first_piece + rows.to(tl.int64)) * 4
    in_range = rows < num_rows
    tl.store(out, sum_p, mask=in_range)
    tl.store(out + 1, sum_q, mask=in_range)
    tl.store(out + 2, tl.sum(keep.to(tl.int32), axis=1).to(tl.float64), mask=in_range)
    tl.store(out + 3, tl.sum(bad.to(tl.int32), axis=1).to(tl.float64), mask=in_range)


@triton.jit
def reduce_partials_kernel(partials, unit_starts, out, BLOCK: tl.constexpr):
    """out[u] = sum of partials[j, 0:3] over the pieces j of unit u
    (unit_starts[u] <= j < unit_starts[u + 1]), in a fixed order: lane l adds
    pieces l, l + BLOCK, ... in float64, then the lanes are tree-summed."""
    unit = tl.program_id(0)
    first = tl.load(unit_starts + unit)
    last = tl.load(unit_starts + unit + 1)
    lanes = tl.arange(0, BLOCK)
    acc_p = tl.zeros([BLOCK], tl.float64)
    acc_q = tl.zeros([BLOCK], tl.float64)
    acc_d = tl.zeros([BLOCK], tl.float64)
    for start in range(first, last, BLOCK):
        index = start + lanes
        valid = index < last
        acc_p += tl.load(partials + index * 4, mask=valid, other=0.0)
        acc_q += tl.load(partials + index * 4 + 1, mask=valid, other=0.0)
        acc_d += tl.load(partials + index * 4 + 2, mask=valid, other=0.0)
    tl.store(out + unit * 3, tl.sum(acc_p, axis=0))
    tl.store(out + unit * 3 + 1, tl.sum(acc_q, axis=0))
    tl.store(out + unit * 3 + 2, tl.sum(acc_d, axis=0))


@triton.jit(do_not_specialize=["num_units"])
def reduce_many_units_kernel(partials, unit_starts, out, num_units, UNITS: tl.constexpr):
    """As reduce_partials_kernel for UNITS units per program (neuron scope: most
    units are one piece): unit u adds its pieces one after another in order."""
    units = tl.program_id(0).to(tl.int64) * UNITS + tl.arange(0, UNITS)
    in_range = units < num_units
    first = tl.load(unit_starts + units, mask=in_range, other=0)
    count = tl.load(unit_starts + units + 1, mask=in_range, other=0) - first
    acc_p = tl.zeros([UNITS], tl.float64)
    acc_q = tl.zeros([UNITS], tl.float64)
    acc_d = tl.zeros([UNITS], tl.float64)
    for j in range(0, tl.max(count, axis=0)):
        take = in_range & (j < count)
        index = first + j
        acc_p += tl.load(partials + index * 4, mask=take, other=0.0)
        acc_q += tl.load(partials + index * 4 + 1, mask=take, other=0.0)
        acc_d += tl.load(partials + index * 4 + 2, mask=take, other=0.0)
    tl.store(out + units * 3, acc_p, mask=in_range)
    tl.store(out + units * 3 + 1, acc_q, mask=in_range)
    tl.store(out + units * 3 + 2, acc_d, mask=in_range)

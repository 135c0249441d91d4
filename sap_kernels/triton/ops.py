"""The sap_kernels ops on Triton, registered with `torch.library.triton_op`
(namespace sap_kernels, names `triton_<op>`) and launched through
`torch.library.wrap_triton`. Same arguments and results as the schemas in
csrc/ops.cpp; sap_kernels.reference defines the semantics.

Each op launches one kernel per dtype group present (at most three), over a
chunk table of all that group's pieces; tensors are addressed by int64
element offsets from the group's base pointer (see kernels.py), so the ops
also run on CPU tensors under TRITON_INTERPRET=1.

Under torch.compile the op bodies are traced with fake tensors, which have no
data pointer to take offsets from; each tensor then gets its own launch (see
_pieces.make_layout). Untested: compiling a Triton op needs CUDA tensors.
"""

import numpy as np
import torch
import triton
from torch.library import triton_op

from . import kernels, sample_select, select_kernels
from ._launch import BLOCK, CHUNK_ELEMENTS, PIECE_ELEMENTS, launcher
from ._pieces import (
    GLOBAL,
    LAYER,
    NEURON,
    TYPE_CODES,
    _base_and_offsets,
    bit_views,
    byte_views,
    check_inputs,
    check_key_bits,
    check_masks_in_place,
    first_bad_tensor,
    make_layout,
    rows_of,
    to_device,
    tracing,
)

REDUCE_BLOCK = 256
# Neuron-scope rows this short are summed many rows per program (2-D tiles).
SHORT_ROW = 1024
SHORT_TILE = 4096  # weights per 2-D tile of short rows
KTH_BLOCK = 1024
FLOAT32_MAX = 3.0e38
FLOAT32_TINY = 1.2e-38


def _power_kind(r: float) -> int:
    """As classify_power in csrc/kernel_types.h."""
    if r == 0.5:
        return kernels.POW_HALF
    if r == 1.0:
        return kernels.POW_ONE
    if r == 2.0:
        return kernels.POW_TWO
    if 3.0 <= r <= 15.0 and r == int(r):
        return kernels.POW_INT
    return kernels.POW_GENERAL


def _nonfinite_error(op: str, index: int) -> ValueError:
    return ValueError(f"{op}: weights[{index}] contains NaN or infinity among its retained weights")


def _assert_in_graph(condition: torch.Tensor, op: str, message: str) -> None:
    """While tracing (torch.compile) no check can copy to the host: a device-side
    assertion instead of an undefined result. Eager calls raise ValueError."""
    torch._assert_async(condition, f"sap_kernels {op}: {message} (call eagerly for details)")


@triton_op("sap_kernels::triton_masked_power_sums", mutates_args=())
def _masked_power_sums(
    weights: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    p: float,
    q: float,
    scope: int,
) -> torch.Tensor:
    op = "masked_power_sums"
    if not (p > 0 and p < float("inf")):
        raise ValueError(f"{op}: p must be a finite number > 0, got {p}")
    if not (q > p and q < float("inf")):
        raise ValueError(f"{op}: q must be finite and > p, got q={q} with p={p}")
    masks = check_inputs(op, weights, masks, scope)
    device = weights[0].device
    trace = tracing(list(weights))
    bits, mask_bytes = bit_views(weights), byte_views(masks)
    # Neuron scope, rows of at most SHORT_ROW weights: many rows per program.
    short = {}
    if scope == NEURON:
        short = {i: n // rows_of(w) for i, w in enumerate(weights)
                 if (n := w.numel()) > 0 and n // rows_of(w) <= SHORT_ROW}  # fmt: skip
    pieces, groups = make_layout(
        weights, bits, mask_bytes, scope, PIECE_ELEMENTS, CHUNK_ELEMENTS, device, frozenset(short)
    )
    # Tiles whose largest |w| lies outside [2^(-100/q), 2^(100/q)] are summed
    # in float64 (their float32 powers could overflow or underflow).
    # (the exponents are capped first: 2.0 ** 1024 overflows for q < 0.0977)
    safe_max = min(2.0 ** min(100.0 / q, 128.0), FLOAT32_MAX)
    safe_min = max(2.0 ** max(-100.0 / q, -126.0), FLOAT32_TINY)
    partials = torch.zeros((pieces.count, 4), dtype=torch.float64, device=device)
    kinds = dict(
        P_KIND=_power_kind(p), Q_KIND=_power_kind(q),
        P_INT=int(p) if _power_kind(p) == kernels.POW_INT else 0,
        Q_INT=int(q) if _power_kind(q) == kernels.POW_INT else 0,
    )  # fmt: skip
    no_mask = torch.ones(16, dtype=torch.uint8, device=device)
    for i, row_length in short.items():
        # One piece per row here, in row order from the tensor's first piece.
        columns = triton.next_power_of_2(row_length)
        rows = rows_of(weights[i])
        grid = (triton.cdiv(rows, SHORT_TILE // columns),)
        launcher(kernels.short_rows_power_sums_kernel)[grid](
            bits[i], mask_bytes[i] if mask_bytes[i] is not None else no_mask,
            0 if mask_bytes[i] is not None else -16, rows, row_length,
            int(np.searchsorted(pieces.tensor, i)), partials, p, q, safe_min, safe_max,
            WEIGHT_TYPE=TYPE_CODES[weights[i].dtype], **kinds, ROWS=SHORT_TILE // columns,
            COLUMNS=columns,
        )  # fmt: skip
    for group in groups:
        launcher(kernels.power_sums_kernel)[(group.num_chunks,)](
            group.weight_base, group.mask_base, group.table, group.chunk_starts, partials,
            p, q, safe_min, safe_max,
            WEIGHT_TYPE=group.weight_type, **kinds, ALIGNED=group.aligned, BLOCK=BLOCK,
        )  # fmt: skip
    if trace:
        _assert_in_graph((partials[:, 3] == 0).all(), op, "NaN or infinity among retained weights")
    elif (bad := first_bad_tensor(partials[:, 3], pieces)) is not None:
        raise _nonfinite_error(op, bad)
    out = torch.empty((pieces.num_units, 3), dtype=torch.float64, device=device)
    unit_starts = pieces.on_device("unit_starts", device, trace)
    if scope == NEURON and pieces.num_units > 0:
        launcher(kernels.reduce_many_units_kernel)[(triton.cdiv(pieces.num_units, 1024),)](
            partials, unit_starts, out, pieces.num_units, UNITS=1024
        )
    elif pieces.num_units > 0:
        launcher(kernels.reduce_partials_kernel)[(pieces.num_units,)](
            partials, unit_starts, out, BLOCK=REDUCE_BLOCK
        )
    return out


@triton_op("sap_kernels::triton_magnitude_histogram", mutates_args=())
def _magnitude_histogram(
    weights: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    scope: int,
    key_bits: int,
    prefixes: torch.Tensor,
    pass_index: int,
) -> torch.Tensor:
    op = "magnitude_histogram"
    masks = check_inputs(op, weights, masks, scope)
    if scope not in (GLOBAL, LAYER):
        raise ValueError(f"{op}: scope must be 0 (global) or 1 (layer), got {scope}")
    check_key_bits(op, weights, key_bits)
    if pass_index not in (0, 1) or (pass_index == 1 and key_bits != 32):
        raise ValueError(f"{op}: pass_index must be 0, or 1 with 32-bit keys, got {pass_index}")
    device = weights[0].device
    bits, mask_bytes = bit_views(weights), byte_views(masks)
    pieces, groups = make_layout(
        weights, bits, mask_bytes, scope, PIECE_ELEMENTS, CHUNK_ELEMENTS, device
    )
    if prefixes.numel() < pieces.num_units:
        raise ValueError(
            f"{op}: prefixes has {prefixes.numel()} entries for {pieces.num_units} units"
        )
    histogram = torch.zeros((pieces.num_units, 65536), dtype=torch.int64, device=device)
    prefixes = prefixes.to(device=device, dtype=torch.int64).contiguous()
    for group in groups:
        launcher(select_kernels.histogram_kernel)[(group.num_chunks,)](
            group.weight_base, group.mask_base, group.table, group.chunk_starts, prefixes,
            histogram,
            WEIGHT_TYPE=group.weight_type, KEY_BITS=key_bits, PASS_INDEX=pass_index,
            ALIGNED=group.aligned, BLOCK=BLOCK,
        )  # fmt: skip
    return histogram


@triton_op("sap_kernels::triton_rowwise_kth_key", mutates_args=())
def _rowwise_kth_key(
    weights: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    key_bits: int,
    ks: torch.Tensor,
) -> torch.Tensor:
    op = "rowwise_kth_key"
    masks = check_inputs(op, weights, masks, NEURON)
    check_key_bits(op, weights, key_bits)
    device = weights[0].device
    trace = tracing(list(weights))
    bits, mask_bytes = bit_views(weights), byte_views(masks)
    longest_row = max(max(w.numel() // max(rows_of(w), 1), 1) for w in weights)
    # one piece per non-empty row
    pieces, groups = make_layout(weights, bits, mask_bytes, NEURON, longest_row, 1, device)
    if ks.numel() != pieces.num_units:
        raise ValueError(f"{op}: ks has {ks.numel()} entries for {pieces.num_units} rows")
    result = torch.tensor([-1, 0], dtype=torch.int64, device=device).repeat(pieces.num_units, 1)
    nonfinite = torch.zeros(pieces.num_units, dtype=torch.int32, device=device)
    ks = ks.to(device=device, dtype=torch.int64).contiguous()
    for group in groups:
        launcher(select_kernels.rowwise_kth_kernel)[(int(group.table.shape[0]),)](
            group.weight_base, group.mask_base, group.table, ks, result, nonfinite,
            WEIGHT_TYPE=group.weight_type, KEY_BITS=key_bits, BLOCK=KTH_BLOCK,
        )  # fmt: skip
    empty_rows = np.flatnonzero(np.diff(pieces.unit_starts) == 0)
    if empty_rows.size > 0:  # no piece, so no kernel check: only k = 0 is valid there
        rows = to_device(empty_rows, device, trace)
        nonfinite[rows] = torch.where(ks[rows] != 0, -1, 0).to(nonfinite.dtype)
    if trace:  # > 0: retained NaN/inf; -1: ks[row] outside 0..retained
        _assert_in_graph((nonfinite == 0).all(), op, "NaN or infinity, or ks out of range")
    else:
        status = nonfinite.cpu()
        bad_rows = (status != 0).nonzero()
        if bad_rows.numel() > 0:
            row = int(bad_rows[0, 0])
            row_ends = np.cumsum([rows_of(w) for w in weights])
            shard = int(np.searchsorted(row_ends, row, side="right"))
            if int(status[row]) > 0:
                raise _nonfinite_error(op, shard)
            retained = int(result[row, 1])
            raise ValueError(
                f"{op}: ks[{row}] = {int(ks[row])} is out of range: that row (in "
                f"weights[{shard}]) has {retained} retained weights (allowed: 0..{retained})"
            )
    return result


@triton_op("sap_kernels::triton_prune_masks", mutates_args=())
def _prune_masks(
    weights: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    scope: int,
    key_bits: int,
    threshold_keys: torch.Tensor,
    remove_equal: torch.Tensor,
) -> list[torch.Tensor]:
    op = "prune_masks"
    masks = check_inputs(op, weights, masks, scope)
    outputs = [torch.empty(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    _prune_into(op, weights, masks, scope, key_bits, threshold_keys, remove_equal, outputs)
    return outputs


@triton_op("sap_kernels::triton_prune_masks_", mutates_args={"masks"})
def _prune_masks_in_place(
    weights: list[torch.Tensor],
    masks: list[torch.Tensor],
    scope: int,
    key_bits: int,
    threshold_keys: torch.Tensor,
    remove_equal: torch.Tensor,
) -> None:
    """prune_masks written over the masks. Every check runs before the first
    write, and a piece's mask bytes are loaded before its block is stored."""
    op = "prune_masks_"
    if len(masks) != len(weights):
        raise ValueError(f"{op}: got {len(masks)} masks for {len(weights)} weights")
    checked = check_inputs(op, weights, masks, scope)
    check_masks_in_place(op, masks)
    _prune_into(op, weights, checked, scope, key_bits, threshold_keys, remove_equal, None)


def _check_prune_arguments(op, thresholds, quotas, equal_counts, pieces, device, trace):
    """The CPU op's checks before any mask is written (one copy to the host; an
    assertion in the graph when tracing): thresholds are keys (<= 32 bits),
    quotas >= 0 and at most the unit's ties (counted where the quota is positive)."""
    inclusive = torch.cat([equal_counts.new_zeros(1), torch.cumsum(equal_counts, 0)])
    starts = pieces.on_device("unit_starts", device, trace)
    ties = inclusive[starts[1:]] - inclusive[starts[:-1]]
    bad_key = thresholds > 0xFFFFFFFF
    negative = quotas < 0
    too_many = (thresholds >= 0) & ~bad_key & (quotas > ties)
    flags = torch.stack([bad_key.any(), negative.any(), too_many.any()])
    if trace:
        _assert_in_graph(~flags.any(), op, "a threshold key or remove_equal quota is invalid")
        return
    flags = flags.tolist()
    if flags[0]:
        u = int(bad_key.nonzero()[0, 0])
        raise ValueError(f"{op}: threshold_keys[{u}] = {int(thresholds[u])} is not a valid key")
    if flags[1]:
        u = int(negative.nonzero()[0, 0])
        raise ValueError(f"{op}: remove_equal[{u}] = {int(quotas[u])} is negative")
    if flags[2]:
        u = int(too_many.nonzero()[0, 0])
        raise ValueError(
            f"{op}: remove_equal[{u}] = {int(quotas[u])} exceeds the {int(ties[u])} retained "
            f"weights equal to threshold_keys[{u}]"
        )


def _prune_into(op, weights, masks, scope, key_bits, threshold_keys, remove_equal, outputs):
    """Writes the pruned masks into `outputs` (contiguous bool tensors, one per
    weight), or over the masks themselves where outputs is None."""
    check_key_bits(op, weights, key_bits)
    device = weights[0].device
    trace = tracing(list(weights))
    bits, mask_bytes = bit_views(weights), byte_views(masks)
    pieces, groups = make_layout(
        weights, bits, mask_bytes, scope, PIECE_ELEMENTS, CHUNK_ELEMENTS, device
    )
    for name, values in (("threshold_keys", threshold_keys), ("remove_equal", remove_equal)):
        if values.numel() != pieces.num_units:
            raise ValueError(
                f"{op}: {name} has {values.numel()} entries for {pieces.num_units} units"
            )
    # Everything the host prepares comes before the argument check's copy to
    # the host, which waits for the count pass: after it only launches remain.
    if outputs is None:
        # In place: the outputs are the masks, addressed as the tables' mask column.
        out_plans = [(g.mask_base, g.table[:, 2].contiguous(), g.aligned) for g in groups]
    else:
        out_plans = _output_plans(weights, outputs, pieces, groups, device, trace)
    unit_first_piece = pieces.on_device(
        "unit_first_piece", device, trace, lambda: pieces.unit_starts[pieces.unit]
    )
    threshold_keys = threshold_keys.to(device=device, dtype=torch.int64).contiguous()
    remove_equal = remove_equal.to(device=device, dtype=torch.int64).contiguous()
    equal_counts = torch.zeros(pieces.count, dtype=torch.int64, device=device)
    for group in groups:
        launcher(select_kernels.count_equal_kernel)[(group.num_chunks,)](
            group.weight_base, group.mask_base, group.table, group.chunk_starts, threshold_keys,
            remove_equal, equal_counts,
            WEIGHT_TYPE=group.weight_type, KEY_BITS=key_bits, ALIGNED=group.aligned, BLOCK=BLOCK,
        )  # fmt: skip
    _check_prune_arguments(op, threshold_keys, remove_equal, equal_counts, pieces, device, trace)
    # Equal keys before each piece within its unit: an exclusive scan over the
    # pieces in global order, restarted at each unit's first piece.
    before = torch.cumsum(equal_counts, 0) - equal_counts
    equal_before = before - before[unit_first_piece]
    for group, (out_base, out_begins, aligned) in zip(groups, out_plans):
        launcher(select_kernels.prune_kernel)[(group.num_chunks,)](
            group.weight_base, group.mask_base, out_base, group.table, out_begins,
            group.chunk_starts, threshold_keys, remove_equal, equal_before,
            WEIGHT_TYPE=group.weight_type, KEY_BITS=key_bits, ALIGNED=aligned, BLOCK=BLOCK,
        )  # fmt: skip


def _output_plans(weights, outputs, pieces, groups, device, trace) -> list:
    """(base, piece byte offsets on the device, aligned) of each group's output
    masks, addressed like its weights: from the group's lowest-addressed
    output (or the one output when tracing). 16-byte stores need what the
    group's loads need, for the outputs too."""
    out_views = [o.view(torch.uint8) for o in outputs]
    plans = []
    for group in groups:
        if trace:
            out_base, out_offsets = out_views[group.members[0]], np.zeros(len(weights), np.int64)
        else:
            members = set(group.members)
            base, out_offsets = _base_and_offsets(
                [v if i in members else None for i, v in enumerate(out_views)]
            )
            out_base = out_views[base]
        out_begins = out_offsets[pieces.tensor[group.selected]] + pieces.begin[group.selected]
        aligned = (
            group.aligned and out_base.data_ptr() % 16 == 0 and bool((out_begins % 16 == 0).all())
        )
        plans.append((out_base, to_device(out_begins, device, trace), aligned))
    return plans


@triton_op("sap_kernels::triton_apply_masks_", mutates_args={"weights"})
def _apply_masks_(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    op = "apply_masks_"
    checked = check_inputs(op, weights, masks)
    missing = [i for i, m in enumerate(checked) if m is None]
    if missing or len(masks) != len(weights):
        raise ValueError(f"{op}: masks[{missing[0] if missing else 0}] is missing")
    device = weights[0].device
    # Non-contiguous weights are zeroed in a contiguous copy that is copied back.
    targets = [w if w.is_contiguous() else w.contiguous() for w in weights]
    bits = bit_views(targets)
    mask_bytes = byte_views(masks)
    pieces, groups = make_layout(
        targets, bits, mask_bytes, GLOBAL, PIECE_ELEMENTS, CHUNK_ELEMENTS, device
    )
    for group in groups:
        launcher(select_kernels.apply_masks_kernel)[(group.num_chunks,)](
            group.weight_base, group.mask_base, group.table, group.chunk_starts,
            ALIGNED=group.aligned, BLOCK=BLOCK,
        )  # fmt: skip
    for w, t in zip(weights, targets):
        if t is not w:
            w.copy_(t)


def _mask_list(weights, masks) -> list:
    return list(masks) if masks is not None and len(masks) > 0 else [None] * len(weights)


def masked_power_sums(weights, masks, p: float, q: float, scope: int) -> torch.Tensor:
    """float64 [units, 3]: (S_p, S_q, d) per unit (see csrc/ops.cpp)."""
    weights = list(weights)
    return _masked_power_sums(weights, _mask_list(weights, masks), float(p), float(q), int(scope))


def magnitude_histogram(weights, masks, scope, key_bits, prefixes, pass_index) -> torch.Tensor:
    """int64 [units, 65536] histogram of a 16-bit digit of the retained keys."""
    weights = list(weights)
    return _magnitude_histogram(
        weights, _mask_list(weights, masks), int(scope), int(key_bits), prefixes, int(pass_index)
    )


def kth_key_by_sample(weights, masks, scope, key_bits, k, sample_size) -> torch.Tensor:
    """int64 [units, 4]: (k-th smallest retained key, keys below it, retained,
    non-finite) per unit, key -2 when the sample missed (sample_select.py). Not
    a registered op: it decides on the host (eager calls only)."""
    weights = list(weights)
    return sample_select.kth_key_by_sample(
        weights, _mask_list(weights, masks), int(scope), int(key_bits), k, int(sample_size)
    )


def rowwise_kth_key(weights, masks, key_bits, ks) -> torch.Tensor:
    """int64 [rows, 2]: (k-th smallest retained key of each row, keys below it)."""
    weights = list(weights)
    return _rowwise_kth_key(weights, _mask_list(weights, masks), int(key_bits), ks)


def prune_masks(weights, masks, scope, key_bits, threshold_keys, remove_equal):
    """New bool masks with the keys below the threshold and the first
    remove_equal[unit] keys equal to it removed."""
    weights = list(weights)
    return _prune_masks(
        weights, _mask_list(weights, masks), int(scope), int(key_bits), threshold_keys,
        remove_equal,
    )  # fmt: skip


def prune_masks_(weights, masks, scope, key_bits, threshold_keys, remove_equal) -> None:
    """prune_masks written over `masks` (contiguous, not sharing memory)."""
    _prune_masks_in_place(
        list(weights), list(masks), int(scope), int(key_bits), threshold_keys, remove_equal
    )


def apply_masks_(weights, masks) -> None:
    """weights[i][~masks[i]] = 0 for every shard, in place."""
    _apply_masks_(list(weights), list(masks))

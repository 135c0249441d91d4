"""Exact magnitude thresholds and pruning across shards (DESIGN.md §3, §5).

Radix select on the bit patterns of |w| (its "keys"): a 65,536-bin histogram
of the high 16 bits per unit picks the bucket holding the k-th key; for
float32 a second histogram of the low 16 bits inside that bucket finishes the
job. The histograms are the only extra memory and the only thing ranks
exchange. Pruning then removes every retained key below the threshold and the
first (count - below) keys equal to it in flat order.
"""

from __future__ import annotations

import math

import torch

from . import ops
from ._inputs import (
    MASK_ERRORS,
    all_contiguous,
    collect_masks,
    collect_weights,
    explain_bad_masks,
    num_rows,
    num_units,
    scope_code,
    split_neuron,
    uses_distribution,
)
from .reference import bin_of_rank, key_bits_for, keys_to_values

# Units per histogram call in layer scope: 64 x 65,536 int64 = 32 MiB.
_UNITS_PER_HISTOGRAM = 64
# Keys sampled to bracket the global or each layer's k-th key
# (kth_key_by_sample): a global bracket then holds about 1.6% of the weights.
SAMPLE_SIZE = 65536
# Layer scope samples up to this many times more keys: a unit's bracket widens
# as 1/sqrt(its share of the sample), and the candidates must fit the budget.
_LAYER_SAMPLE_FACTOR = 4
# The CPU scales its sample with sqrt(n / _CPU_SAMPLE_NUMEL), between 1/8 and
# 4 times and rounded to a power of two: a sample costs about the same per key
# whatever n (its reads overlap in batches of prefetches) while each candidate
# it spares (a compress, a histogram count, a mask fix-up) is a share of n.
# kth_key_by_sample / prune_masks_by_sample_ alone, global, k = 30%, medians of
# 9, fastest size: 2M weights 16,384 keys (0.40 / 0.56 ms; 65,536: 1.04 /
# 1.19), 20M 32,768 (2.83 / 4.22; 65,536: 3.18 / 4.57), 270M 131,072-262,144
# (35.3 / 51.7; 65,536: 40.6 / 58.3). The Triton ops keep SAMPLE_SIZE (tuned
# to their bracket histograms).
_CPU_SAMPLE_NUMEL = 1 << 26


def _sample_size(units: int, backend: str, tensors) -> int:
    size = SAMPLE_SIZE * min(units, _LAYER_SAMPLE_FACTOR)
    if backend != "cpu":
        return size
    numel = sum(map(torch.Tensor.numel, tensors))
    # a power of two: the sizes measured above (and their allocations; a size
    # 1.4% off 524,288 in layer scope ran prune_ at 120-330 ms instead of 73-100)
    doublings = round(0.5 * math.log2(max(numel, 1) / _CPU_SAMPLE_NUMEL))
    return max(1, int(size * 2.0 ** min(max(doublings, -3), 2)))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _per_unit(values, units: int, argument: str, weights, scope: str) -> torch.Tensor:
    """An int, a 1-d tensor of `units` ints, or (neuron scope) one 1-d tensor per
    weight tensor, as an int64 CPU tensor [units]."""
    if isinstance(values, bool):
        raise TypeError(f"{argument} must be an int or a tensor of ints, not a bool")
    if isinstance(values, int):
        return torch.full((units,), values, dtype=torch.int64)
    if scope == "neuron" and isinstance(values, (list, tuple)):
        values = torch.cat([torch.as_tensor(v).reshape(-1) for v in values])
    values = torch.as_tensor(values)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{argument} must hold integers, got dtype {values.dtype}")
    values = values.reshape(-1).to(torch.int64)
    if values.numel() == 1 and units != 1:
        values = values.expand(units)
    if values.numel() != units:
        raise ValueError(f"{argument} has {values.numel()} entries but scope has {units} units")
    return values.cpu() if not _compiling() else values


def _nonfinite_digit(key_bits: int, dtype: torch.dtype) -> int:
    if key_bits == 32:
        return 0x7F80
    return 0x7F80 if dtype == torch.bfloat16 else 0x7C00


def _assert_in_graph(condition: torch.Tensor, message: str) -> None:
    """Inside a compiled graph a data-dependent check cannot raise on the host
    without breaking the graph: an asynchronous assertion instead (a
    RuntimeError on CPU, a device-side assert on CUDA), so bad input stops the
    program rather than giving an undefined threshold. Eager calls raise the
    ValueError naming the unit."""
    torch._assert_async(condition, f"sap_kernels: {message} (call eagerly to see which unit)")


def _check_counts(ks, retained, argument: str, allow_zero: bool, labels) -> None:
    low = 0 if allow_zero else 1
    if _compiling():
        ok = ks >= low if retained is None else (ks >= low) & (ks <= retained.to(ks.device))
        _assert_in_graph(ok.all(), f"{argument} is out of range ({low}..the unit's retained)")
        return
    bad = (ks < low) | (ks > retained.to(ks.device))
    if bool(bad.any()):
        u = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{argument}[{u}] = {int(ks[u])} is out of range: {labels(u)} has "
            f"{int(retained[u])} retained weights (allowed: {low}..{int(retained[u])})"
        )


def _select_radix(
    backend,
    tensors,
    masks,
    code,
    key_bits,
    ks,
    group,
    argument,
    allow_zero,
    labels,
    nonfinite_digit,
    tie_counts=None,
):
    """(keys, below) per unit for scopes global/layer; keys -1 where ks == 0.

    With `tie_counts` (a list, distributed pruning), appends (local, total): the
    retained keys equal to the threshold on this rank and on all ranks, per unit."""
    device = tensors[0].device
    units = ks.numel()
    ks = ks.to(device)
    zeros = torch.zeros(units, dtype=torch.int64, device=device)
    hist = ops.magnitude_histogram(backend, tensors, masks, code, key_bits, zeros, 0)
    local_hist = hist
    if group is not None:
        from .distributed import all_reduce_histogram

        hist = all_reduce_histogram(hist, group)
    _check_finite_histogram(hist, nonfinite_digit, labels)
    digit, below, retained = bin_of_rank(hist, ks)
    _check_counts(ks, retained, argument, allow_zero, labels)
    keys, final_digit = digit, digit
    if key_bits == 32:
        hist_low = ops.magnitude_histogram(backend, tensors, masks, code, key_bits, digit, 1)
        local_hist = hist_low
        if group is not None:
            hist_low = all_reduce_histogram(hist_low, group)
        digit_low, below_in_bin, _ = bin_of_rank(hist_low, ks.clamp(min=1) - below)
        below = below + below_in_bin
        keys, final_digit, hist = (digit << 16) | digit_low, digit_low, hist_low
    if tie_counts is not None:
        final = final_digit[:, None]
        local_equal, total_equal = (h.gather(1, final).squeeze(1) for h in (local_hist, hist))
        tie_counts.append(
            (torch.where(ks > 0, local_equal, zeros), torch.where(ks > 0, total_equal, zeros))
        )
    keys = torch.where(ks > 0, keys, torch.full_like(keys, -1))
    below = torch.where(ks > 0, below, zeros)
    return keys, below


def _check_finite_histogram(hist, nonfinite_digit: int, labels) -> None:
    nonfinite = hist[:, nonfinite_digit:]
    if _compiling():
        _assert_in_graph(~nonfinite.any(), "the weights contain NaN or infinity")
    elif bool(nonfinite.any()):
        u = int(nonfinite.sum(1).nonzero()[0, 0])
        raise ValueError(f"{labels(u)} contains NaN or infinity among its retained weights")


def _uses_sample_select(backend, scope: str, group) -> bool:
    """The one-pass global or layer selection applies: one process, eager mode (a
    miss is data-dependent, so compiled graphs use the radix select). With 16-bit
    keys the radix select is a single pass too, but its scattered histogram
    increments are slower than the sampled pass's vectorised compares: bf16,
    layer scope, 261M weights, k = 30%, magnitude_threshold 51-53 -> 34 ms and
    prune_ 87-105 -> 64-100 ms (this machine swung between runs) once the CPU
    sample got cheaper and its candidates' selection lighter (until then 16-bit
    keys kept the radix select in layer scope on CPU). On Triton the sampled
    pass spares every scope the radix histogram's global atomic per retained
    weight."""
    return (
        scope in ("global", "layer")
        and group is None
        and ops.has_sample_select(backend)
        and not _compiling()
    )


def _sample_result(status, ks, argument, allow_zero, labels):
    """(keys, below) per unit from a kth_key_by_sample status [units, 4], raising
    the radix select's errors; None when the sample missed any unit."""
    if bool((status[:, 0] == -2).any()):
        return None
    bad = status[:, 3].nonzero()
    if bad.numel() > 0:
        u = int(bad[0, 0])
        raise ValueError(f"{labels(u)} contains NaN or infinity among its retained weights")
    _check_counts(ks, status[:, 2], argument, allow_zero, labels)
    found = ks > 0
    return (
        torch.where(found, status[:, 0], torch.full_like(ks, -1)),
        torch.where(found, status[:, 1], torch.zeros_like(ks)),
    )


def _select_by_sample(backend, tensors, masks, code, key_bits, ks, argument, allow_zero, labels):
    """(keys, below) per unit in one pass (kth_key_by_sample), or None when the
    sample missed a k-th key and the radix select must run."""
    size = _sample_size(ks.numel(), backend, tensors)
    status = ops.kth_key_by_sample(backend, tensors, masks, code, key_bits, ks, size)
    found = _sample_result(status, ks, argument, allow_zero, labels)
    if found is None:
        return None
    device = tensors[0].device
    return tuple(values.to(device) for values in found)


def _retained_per_unit(tensors, masks, scope: str) -> torch.Tensor:
    """Retained weights per unit, int64 on the CPU (one copy from the device)."""
    device = tensors[0].device
    rows = [num_rows(w) for w in tensors]
    per_row = []
    for w, m, n in zip(tensors, masks, rows):
        row_length = w.numel() // max(n, 1)
        if m is None:  # every weight retained: no need to count
            per_row.append(torch.full((n,), row_length, device=device))
        else:  # reshape(n, row_length): -1 is ambiguous when n == 0
            per_row.append(m.reshape(n, row_length).sum(1))
    per_row = torch.cat(per_row).cpu()
    if scope == "neuron":
        return per_row
    per_tensor = torch.stack([r.sum() for r in per_row.split(rows)])
    return per_tensor.sum().reshape(1) if scope == "global" else per_tensor


def _unit_labels(weights, scope: str):
    if scope == "global":
        return lambda u: "the retained weights"
    if scope == "layer":
        return weights.label
    return lambda u: f"row {u}"


def _kth_keys(
    backend, weights, masks, scope, ks, group, argument, allow_zero, tie_counts=None, sample=True
):
    """(keys, below) per unit: the key of the ks[u]-th smallest retained |w| and the
    number of retained keys below it. sample=False skips the one-pass sampled select
    (a caller whose own sampled pass just missed would miss again)."""
    tensors = weights.tensors
    key_bits = key_bits_for(tensors, weights.dtypes)
    code = scope_code(scope)
    if scope == "neuron":
        if group is not None:
            raise NotImplementedError("group= is not supported with scope='neuron'")

        # The CPU op checks 0 <= k <= retained per row and that the retained
        # weights are finite, so there the API's own messages (and its k >= 1
        # rule) are produced only on the error path: counting every row's
        # retained weights costs more than the selection. Other backends' ops
        # cannot raise from the device, so they are checked first.
        def check_counts():
            retained = _retained_per_unit(tensors, masks, scope)
            _check_counts(ks, retained, argument, allow_zero, _unit_labels(weights, scope))

        op_checks = backend == "cpu"
        eager = not _compiling()
        if not eager:  # the ops check ks <= retained (CPU, CUDA; Triton asserts)
            _check_counts(ks, None, argument, allow_zero, None)
        if eager and (not op_checks or (not allow_zero and bool((ks == 0).any()))):
            check_counts()
        try:
            result = ops.rowwise_kth_key(
                backend, tensors, masks, key_bits, ks.to(tensors[0].device)
            )
        except ValueError:
            if eager and op_checks:
                check_counts()
            raise
        return result[:, 0], result[:, 1], key_bits
    nonfinite_digit = _nonfinite_digit(key_bits, tensors[0].dtype)
    labels = _unit_labels(weights, scope)
    if sample and _uses_sample_select(backend, scope, group):
        found = _select_by_sample(
            backend, tensors, masks, code, key_bits, ks, argument, allow_zero, labels
        )
        if found is not None:
            return (*found, key_bits)
    # Global scope is one unit over every tensor; layer scope batches its units
    # so that the [units, 65536] histograms stay small.
    step = len(tensors) if scope == "global" else _UNITS_PER_HISTOGRAM
    key_parts, below_parts = [], []
    for start in range(0, len(tensors), step):
        stop = min(start + step, len(tensors))
        keys, below = _select_radix(
            backend,
            tensors[start:stop],
            masks[start:stop],
            code,
            key_bits,
            ks if scope == "global" else ks[start:stop],
            group,
            argument,
            allow_zero,
            lambda u, start=start: labels(start + u),
            nonfinite_digit,
            tie_counts,
        )
        key_parts.append(keys)
        below_parts.append(below)
    return torch.cat(key_parts), torch.cat(below_parts), key_bits


def _result_dtype(tensors, dtypes=None) -> torch.dtype:
    dtypes = dtypes if dtypes is not None else {t.dtype for t in tensors}
    return next(iter(dtypes)) if len(dtypes) == 1 else torch.float32


def magnitude_threshold(
    tensors, k, masks=None, *, scope: str = "global", backend: str = "auto", group=None
):
    """The exact k-th smallest |w| among retained weights, per unit (k is 1-based).

    Equal to `torch.kthvalue` of the concatenated retained magnitudes, computed
    without concatenating. `k` is an int, or for 'layer'/'neuron' scope a tensor
    with one k per unit (for 'neuron' also a list of per-tensor tensors).
    Returns a 0-d tensor (global), a 1-d tensor per tensor (layer) or a list of
    per-row tensors (neuron), in the weights' dtype (float32 if they differ).
    """
    if uses_distribution(group, tensors):
        from .distributed import magnitude_threshold as distributed_threshold

        return distributed_threshold(tensors, k, masks, scope, backend, group)
    weights = collect_weights(tensors)
    chosen = ops.resolve_backend(backend, weights.tensors, weights.dtypes)
    mask_list = collect_masks(masks, weights, op_checks=ops.checks_masks(chosen))
    scope_code(scope)
    ks = _per_unit(k, num_units(weights, scope), "k", weights, scope)
    if chosen == "reference" and group is None:
        from .reference import magnitude_threshold_by_concatenation

        _check_finite_reference(weights, mask_list)
        retained = _retained_per_unit(weights.tensors, mask_list, scope)
        _check_counts(ks, retained, "k", False, _unit_labels(weights, scope))
        values = magnitude_threshold_by_concatenation(weights.tensors, ks, mask_list, scope).to(
            _result_dtype(weights.tensors, weights.dtypes)
        )
    else:
        try:
            keys, _, key_bits = _kth_keys(chosen, weights, mask_list, scope, ks, group, "k", False)
        except MASK_ERRORS:
            explain_bad_masks(masks, weights)
            raise
        source = weights.tensors[0].dtype if key_bits == 16 else torch.float32
        values = keys_to_values(keys, key_bits, source).to(
            _result_dtype(weights.tensors, weights.dtypes)
        )
    if scope == "global":
        return values[0]
    if scope == "layer":
        return values
    return split_neuron(values, weights)


def _check_finite_reference(weights, masks) -> None:
    from .reference import check_finite

    check_finite(weights.tensors, masks, "magnitude_threshold")


def prune(tensors, masks, counts, *, scope: str = "global", backend: str = "auto", group=None):
    """New bool masks with exactly `counts` more weights removed per unit.

    The removed weights are the `counts[u]` retained weights of smallest
    magnitude in each unit; among equal magnitudes, earlier ones in flat order
    (tensor order as given, then row-major) go first, so every backend gives
    the same masks. `masks=None` means all retained. `counts` is an int or one
    int per unit (see `magnitude_threshold`). Inputs are not modified.
    """
    return _prune(tensors, masks, counts, scope, backend, group, in_place=False)


def prune_(tensors, masks, counts, *, scope: str = "global", backend: str = "auto", group=None):
    """In-place `prune`: updates every mask tensor and returns the list of masks.

    On CPU, contiguous masks are updated where they are, in the one pass that
    finds the thresholds (no new masks, no copy); on an error every mask is
    left as it was.
    """
    if masks is None or any(m is None for m in masks):
        raise ValueError("prune_: masks must hold one bool tensor per weight (got None)")
    return _prune(tensors, masks, counts, scope, backend, group, in_place=True)


def _copy_into(masks, new_masks):
    with torch.no_grad():
        for mask, new in zip(masks, new_masks):
            mask.copy_(new)
    return list(masks)


def _prune(tensors, masks, counts, scope, backend, group, in_place: bool):
    if uses_distribution(group, tensors):
        from .distributed import prune as distributed_prune

        new_masks = distributed_prune(tensors, masks, counts, scope, backend, group)
        return _copy_into(masks, new_masks) if in_place else new_masks
    weights = collect_weights(tensors)
    chosen = ops.resolve_backend(backend, weights.tensors, weights.dtypes)
    mask_list = collect_masks(masks, weights, op_checks=ops.checks_masks(chosen))
    code = scope_code(scope)
    counts = _per_unit(counts, num_units(weights, scope), "counts", weights, scope)
    try:
        return _prune_collected(weights, masks, mask_list, counts, code, scope, chosen, in_place)
    except MASK_ERRORS:
        explain_bad_masks(masks, weights)
        raise


def _prune_collected(weights, masks, mask_list, counts, code, scope, chosen, in_place: bool):
    tensors = weights.tensors
    key_bits = key_bits_for(tensors, weights.dtypes)
    # masks written where they are: no new masks (no page faults) and no copy;
    # an error or a sample's miss leaves them as they were
    write_over = (
        in_place
        and ops.has_in_place_prune(chosen)
        and all_contiguous(mask_list)
        and not _compiling()
    )

    def finish(new_masks):
        if write_over:
            return list(masks)
        return _copy_into(masks, new_masks) if in_place else new_masks

    if scope == "neuron" and ops.has_row_prune(chosen) and not _compiling():
        # each row's threshold found and applied in one pass over the weights,
        # on the masks themselves or on copies of them
        targets = mask_list if write_over else _mask_copies(tensors, mask_list)
        _prune_rows_(chosen, weights, targets, counts, key_bits)
        return finish(None if write_over else targets)
    sampled = (
        ops.has_sample_prune(chosen)
        and _uses_sample_select(chosen, scope, None)
        and bool((counts > 0).any())
        and all_contiguous(tensors)  # its masks are contiguous
    )
    if sampled:
        # thresholds and masks in one pass; the radix select only after a miss
        size = _sample_size(counts.numel(), chosen, tensors)
        args = (chosen, tensors, mask_list, code, key_bits, counts, size)
        if write_over:
            new_masks, status = None, ops.prune_masks_by_sample_(*args)
        else:
            new_masks, status = ops.prune_masks_by_sample(*args)
        labels = _unit_labels(weights, scope)
        if _sample_result(status, counts, "counts", True, labels) is not None:
            return finish(new_masks)
    keys, below, key_bits = _kth_keys(
        chosen, weights, mask_list, scope, counts, None, "counts", True, sample=not sampled
    )
    args = (chosen, tensors, mask_list, code, key_bits, keys, counts.to(keys.device) - below)
    if write_over:
        ops.prune_masks_(*args)
        return finish(None)
    return finish(ops.prune_masks(*args))


def _mask_copies(tensors, mask_list) -> list[torch.Tensor]:
    """Contiguous copies of the masks (all True where a mask is None)."""
    return [
        torch.ones(w.shape, dtype=torch.bool, device=w.device)
        if m is None
        else m.clone(memory_format=torch.contiguous_format)
        for w, m in zip(tensors, mask_list)
    ]


def _prune_rows_(backend, weights, mask_list, counts, key_bits) -> None:
    """prune_rows_ on the masks; its errors (counts out of a row's range, NaN
    or infinity) come back with the API's message when it has one."""
    tensors = weights.tensors
    try:
        ops.prune_rows_(backend, tensors, mask_list, key_bits, counts.to(tensors[0].device))
    except ValueError:
        retained = _retained_per_unit(tensors, mask_list, "neuron")
        _check_counts(counts, retained, "counts", True, _unit_labels(weights, "neuron"))
        raise


def apply_masks_(tensors, masks, *, backend: str = "auto"):
    """Zeroes the pruned weights of every shard in place, in one fused pass."""
    weights = collect_weights(tensors)
    if masks is None:
        raise ValueError("apply_masks_: masks must not be None")
    chosen = ops.resolve_backend(backend, weights.tensors, weights.dtypes)
    mask_list = collect_masks(masks, weights, op_checks=ops.checks_masks(chosen))
    missing = [i for i, m in enumerate(mask_list) if m is None]
    if missing:
        raise ValueError(f"apply_masks_: masks[{missing[0]}] is None")
    try:
        with torch.no_grad():
            ops.apply_masks_(chosen, weights.tensors, mask_list)
    except MASK_ERRORS:
        explain_bad_masks(masks, weights)
        raise
    return tensors

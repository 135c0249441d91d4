"""Public sparsity measures: pq_sums and pqi (DESIGN.md §3)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import ops
from ._inputs import (
    MASK_ERRORS,
    check_exponents,
    collect_masks,
    collect_weights,
    explain_bad_masks,
    scope_code,
    split_neuron,
    uses_distribution,
)
from .sparsity import pqi_from_sums


class PQSums(NamedTuple):
    """Raw, composable form of the PQ Index: sums add across shards and ranks.

    Each field is float64 with one entry per unit: 0-d for scope='global',
    [num_tensors] for 'layer', [total rows] for 'neuron' (rows of all tensors
    in order)."""

    sum_p: torch.Tensor
    sum_q: torch.Tensor
    count: torch.Tensor


def _power_sums(tensors, masks, p, q, scope, backend, group):
    if uses_distribution(group, tensors):
        from .distributed import power_sums

        return power_sums(tensors, masks, p, q, scope, backend, group)
    weights = collect_weights(tensors)
    chosen = ops.resolve_backend(backend, weights.tensors, weights.dtypes)
    mask_list = collect_masks(masks, weights, op_checks=ops.checks_masks(chosen))
    p, q = check_exponents(p, q)
    code = scope_code(scope)
    try:
        sums = ops.masked_power_sums(chosen, weights.tensors, mask_list, p, q, code)
    except MASK_ERRORS:
        explain_bad_masks(masks, weights)
        raise
    return weights, sums


def pq_sums(
    tensors,
    masks=None,
    *,
    p: float = 0.5,
    q: float = 1.0,
    scope: str = "global",
    backend: str = "auto",
    group=None,
) -> PQSums:
    """S_p = Σ|w|^p, S_q = Σ|w|^q and the retained count d per unit, in float64.

    Args:
        tensors: a list of floating tensors (any shapes, one device) or an
            nn.Module (its parameters named `*weight` with dim > 1).
        masks: optional list of bool tensors, True = retained (None entries
            or masks=None mean all retained).
        p, q: exponents, 0 < p < q.
        scope: 'global', 'layer' or 'neuron'.
        backend: 'auto', 'cpu', 'cuda', 'triton' or 'reference'.
        group: a torch.distributed process group to sum over, or None.
    """
    _, sums = _power_sums(tensors, masks, p, q, scope, backend, group)
    if scope == "global":
        sums = sums[0]
        return PQSums(sums[0], sums[1], sums[2])
    return PQSums(sums[:, 0], sums[:, 1], sums[:, 2])


def pqi(
    tensors,
    masks=None,
    *,
    p: float = 0.5,
    q: float = 1.0,
    scope: str = "global",
    backend: str = "auto",
    group=None,
):
    """PQ Index  1 - d^(1/q-1/p) ||w||_p / ||w||_q  of the retained weights, in float64.

    Returns a 0-d tensor (scope='global'), a 1-d tensor with one value per
    tensor ('layer'), or a list with one 1-d tensor of per-row values per
    tensor ('neuron'). A unit with no retained weight, or only zeros, is NaN.
    Arguments as for `pq_sums`.
    """
    weights, sums = _power_sums(tensors, masks, p, q, scope, backend, group)
    values = pqi_from_sums(sums[:, 0], sums[:, 1], sums[:, 2], p, q)
    if scope == "global":
        return values[0]
    if scope == "layer":
        return values
    return split_neuron(values, weights)

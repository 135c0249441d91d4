"""PQI, thresholds and pruning over sharded models with torch.distributed.

Each rank passes its local shards (plain tensors with `group=`, or DTensors as
made by FSDP2 `fully_shard` / `distribute_tensor`, whose mesh gives the group
when `group=None`). Only small reductions cross ranks, all through
torch.distributed collectives:

- pq_sums / pqi: one all-reduce of the float64 [units, 3] sums (S_p, S_q, d).
- magnitude_threshold: one all-reduce of the int64 [units, 65536] radix
  histogram per pass (one pass for bfloat16/float16, two for float32).
- prune: the threshold's passes, then, only where the cut falls inside a run
  of equal magnitudes, an all-gather of one int64 per unit (per tensor when
  replicated tensors are present) giving each rank its share of the ties.
- every call starts with an all-gather of a 10-int64 status vector (the
  local validation outcome and a signature of the arguments), so bad input
  on one rank raises on every rank instead of leaving the others waiting in
  a collective; see `RemoteRankError`.

`last_exchange()` reports what this rank sent in the last call. Per call and
rank, in bytes (units: 1 for 'global', one per tensor for 'layer'):

    pq_sums / pqi        80 + 24 * units
    magnitude_threshold  80 + 524,288 * units * passes   (passes: 1 for 16-bit, 2 for float32)
    prune                the threshold's bytes, + 8 * units when ties straddle
                         the cut (+ 16 * tensors instead, with replicated tensors)

Never the weights or masks. Calls are eager only (no torch.compile), and with
group=None a rank that passes no DTensor takes the local path: pass group=
explicitly so malformed input on one rank cannot leave the others waiting.

Order of ties across ranks: the distributed flat order is rank order (group
rank), then each rank's own flat order (tensor order, then row-major). The
masks are therefore identical to pruning, on one process, the concatenation
of every rank's contributed local shards in rank order. For scope='layer'
and tensors sharded by rows (Shard(0), FSDP2) that is exactly the full
tensor. For scope='global' over several sharded tensors, ties between
different tensors break by rank first.

Replicated placements (Replicate on some mesh dimension) are counted once:
only the ranks with coordinate 0 on every replicated mesh dimension
contribute; the other replicas still get masks, identical to their source's.
Partial placements are refused.

scope='neuron' never communicates: a row is whole on one rank (true for
Shard(0) DTensors and assumed for plain tensors), so every rank computes its
own rows; DTensors sharded along another dimension are refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from . import ops
from ._inputs import (
    SCOPES,
    check_exponents,
    num_units,
    scope_code,
)
from ._sharding import LocalShards, as_dtensors, infer_group, local_shards
from .reference import key_bits_for, keys_to_values

_LAYER = SCOPES["layer"]
_TENSORS_PER_HISTOGRAM = 64
_STATUS_FIELDS = "failed has_replicas num_tensors scope units key_bits dtype p q k_checksum".split()
# fields every rank must agree on (the first three are combined instead)
_MATCHING_FIELDS = _STATUS_FIELDS[3:]
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


class RemoteRankError(RuntimeError):
    """Raised on the ranks whose own input was fine when another rank's was not."""


@dataclass(frozen=True)
class Exchange:
    """What this rank sent through collectives in the last distributed call.

    payload_bytes is the size of the tensors handed to the collectives (for an
    all-gather, this rank's contribution); a ring all-reduce moves about
    2 (n - 1) / n times that over each rank's link.
    """

    operation: str = ""
    collectives: int = 0
    payload_bytes: int = 0


_last_exchange = Exchange()


def last_exchange() -> Exchange:
    """Collectives and payload bytes of this rank's last distributed call."""
    return _last_exchange


def _begin(operation: str) -> None:
    global _last_exchange
    _last_exchange = Exchange(operation)


def _record(tensor: torch.Tensor) -> None:
    global _last_exchange
    _last_exchange = replace(
        _last_exchange,
        collectives=_last_exchange.collectives + 1,
        payload_bytes=_last_exchange.payload_bytes + tensor.numel() * tensor.element_size(),
    )


# --- collectives -------------------------------------------------------------


def all_reduce_sums(sums: torch.Tensor, group) -> torch.Tensor:
    """Sum of the float64 [units, 3] power sums over the ranks of `group` (a new tensor)."""
    reduced = sums.to(torch.float64).contiguous().clone()
    _record(reduced)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced


def all_reduce_histogram(hist: torch.Tensor, group) -> torch.Tensor:
    """Sum of the int64 [units, 65536] radix histograms over `group`; `hist` is kept
    (the caller still needs its local counts for the tie shares)."""
    reduced = hist.to(torch.int64).contiguous().clone()
    _record(reduced)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced


def _all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """[world, *tensor.shape]: every rank's tensor, in group rank order."""
    tensor = tensor.contiguous()
    _record(tensor)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.stack(parts)


def _collective_device(group, fallback: torch.device) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type == "cpu" else torch.device("cpu")


# --- agreeing on the inputs ---------------------------------------------------


def _float_bits(value) -> int:
    try:
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    except (TypeError, ValueError, OverflowError):
        return 0


def _agree(group, operation: str, error: BaseException | None, fields: dict) -> torch.Tensor:
    """All-gathers the status vector; raises on every rank if any rank failed or the
    ranks disagree on the arguments. Returns the [world, fields] status table."""
    values = [1 if error is not None else 0] + [int(fields.get(f, 0)) for f in _STATUS_FIELDS[1:]]
    status = torch.tensor(values, dtype=torch.int64, device=_collective_device(group, _CPU))
    table = _all_gather(status, group).cpu()
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        messages = [None] * dist.get_world_size(group)
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine, group=group)
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RemoteRankError(f"sap_kernels.{operation} failed on another rank ({detail})")
    for column, name in enumerate(_MATCHING_FIELDS, start=3):
        if name in ("units", "k_checksum") and int(table[0, 3]) == SCOPES["neuron"]:
            continue  # rows are local to each rank; the scope column already matched
        if bool((table[:, column] != table[0, column]).any()):
            per_rank = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(table[:, column]))
            raise ValueError(
                f"sap_kernels.{operation}: the ranks passed different {name} ({per_rank}); "
                "every rank must pass the same scope, number of units, dtype, exponents and k"
            )
    return table


_CPU = torch.device("cpu")


def _status_fields(shards: LocalShards, scope: str, units: int) -> dict:
    dtypes = {t.dtype for t in shards.weights.tensors}
    return {
        "has_replicas": int(shards.has_replicas),
        "num_tensors": len(shards.weights.tensors),
        "scope": SCOPES[scope],
        "units": units,
        "dtype": _DTYPE_CODES.get(dtypes.pop(), 9) if len(dtypes) == 1 else 0,
    }


def _k_checksum(ks: torch.Tensor) -> int:
    weights = torch.arange(1, ks.numel() + 1, dtype=torch.int64)
    return int((ks.cpu() * weights).sum())


# --- pq_sums / pqi -------------------------------------------------------------


def power_sums(tensors, masks, p, q, scope, backend, group):
    """(local Weights, float64 [units, 3] sums over every rank) for pq_sums/pqi."""
    group_given = group is not None
    group = infer_group(group, tensors)
    _begin("pq_sums")
    error, fields, shards, sums = None, {}, None, None
    try:
        p, q = check_exponents(p, q)
        code = scope_code(scope)
        shards = local_shards(tensors, masks, group, scope, group_given)
        chosen = ops.resolve_backend(backend, shards.weights.tensors)
        fields = _status_fields(shards, scope, num_units(shards.weights, scope))
        fields.update(p=_float_bits(p), q=_float_bits(q))
        if scope == "neuron":  # rows are local: every rank computes its own
            sums = ops.masked_power_sums(chosen, shards.weights.tensors, shards.masks, p, q, code)
        else:
            sums = ops.masked_power_sums(
                chosen, shards.counted.tensors, shards.counted_masks, p, q, code
            )
    except Exception as caught:  # noqa: BLE001 - re-raised on every rank by _agree
        error = caught
    _agree(group, "pq_sums", error, fields)
    if scope != "neuron":
        sums = all_reduce_sums(sums, group)
    return shards.weights, sums


# --- thresholds and pruning ------------------------------------------------------


def _prepare_selection(operation, tensors, masks, k, scope, backend, group, local_neuron):
    """Validates and agrees on a threshold/prune call: (group, shards, backend, ks,
    table, neuron result). scope='neuron' runs `local_neuron` here (rows are local)."""
    group_given = group is not None
    group = infer_group(group, tensors)
    _begin(operation)
    error, fields, shards, chosen, ks, result = None, {}, None, None, None, None
    try:
        from .selection import _per_unit

        code = scope_code(scope)
        shards = local_shards(tensors, masks, group, scope, group_given)
        chosen = ops.resolve_backend(backend, shards.weights.tensors)
        units = num_units(shards.weights, scope)
        ks = _per_unit(
            k, units, "k" if operation == "magnitude_threshold" else "counts", shards.weights, scope
        )
        fields = _status_fields(shards, scope, units)
        fields.update(key_bits=key_bits_for(shards.weights.tensors), k_checksum=_k_checksum(ks))
        if code == SCOPES["neuron"]:
            result = _neuron_on_own_rows(
                operation, local_neuron, shards.weights.tensors, ks, shards.masks, chosen
            )
    except Exception as caught:  # noqa: BLE001 - re-raised on every rank by _agree
        error = caught
    table = _agree(group, operation, error, fields)
    return group, shards, chosen, ks, table, result


def _neuron_on_own_rows(operation, local_neuron, tensors, ks, masks, backend) -> list:
    """scope='neuron' on this rank's rows (no communication). Shards without rows (an
    FSDP2 rank may hold none of a small tensor) are set aside: they have no units."""
    from .selection import _result_dtype

    has_rows = [w.dim() == 0 or w.shape[0] > 0 for w in tensors]
    kept = [i for i, keep in enumerate(has_rows) if keep]
    results = iter([])
    if kept:
        results = iter(
            local_neuron(
                [tensors[i] for i in kept],
                ks,
                [masks[i] for i in kept],
                scope="neuron",
                backend=backend,
            )
        )
    value_dtype = _result_dtype(tensors)
    out = []
    for w, keep in zip(tensors, has_rows):
        if keep:
            out.append(next(results))
        elif operation == "prune":
            out.append(torch.zeros_like(w, dtype=torch.bool))
        else:
            out.append(torch.empty(0, dtype=value_dtype, device=w.device))
    return out


def magnitude_threshold(tensors, k, masks, scope, backend, group):
    from . import selection

    group, shards, chosen, ks, _, result = _prepare_selection(
        "magnitude_threshold",
        tensors,
        masks,
        k,
        scope,
        backend,
        group,
        lambda w, ks, m, **kw: selection.magnitude_threshold(w, ks, m, **kw),
    )
    if result is not None:
        return result
    keys, _, key_bits = selection._kth_keys(
        chosen, shards.counted, shards.counted_masks, scope, ks, group, "k", False
    )
    source = shards.weights.tensors[0].dtype if key_bits == 16 else torch.float32
    values = keys_to_values(keys, key_bits, source).to(
        selection._result_dtype(shards.weights.tensors)
    )
    return values[0] if scope == "global" else values


def prune(tensors, masks, counts, scope, backend, group):
    from . import selection

    group, shards, chosen, counts, table, result = _prepare_selection(
        "prune",
        tensors,
        masks,
        counts,
        scope,
        backend,
        group,
        lambda w, ks, m, **kw: selection.prune(w, m, ks, **kw),
    )
    code = SCOPES[scope]
    if result is None:
        tie_counts: list = []
        keys, below, key_bits = selection._kth_keys(
            chosen,
            shards.counted,
            shards.counted_masks,
            scope,
            counts,
            group,
            "counts",
            True,
            tie_counts=tie_counts,
        )
        local_equal = torch.cat([local for local, _ in tie_counts]).cpu()
        total_equal = torch.cat([total for _, total in tie_counts]).cpu()
        remove_equal = counts - below.cpu()
        if bool(table[:, 1].any()):
            result = _prune_with_replicas(
                chosen, shards, scope, key_bits, keys, remove_equal, total_equal, table, group
            )
        else:
            share = _rank_share(remove_equal, local_equal, total_equal, group)
            result = ops.prune_masks(
                chosen,
                shards.weights.tensors,
                shards.masks,
                code,
                key_bits,
                keys,
                share.to(keys.device),
            )
    return as_dtensors(result, shards) if any(d is not None for d in shards.dtensors) else result


def _splits(remove_equal: torch.Tensor, total_equal: torch.Tensor) -> torch.Tensor:
    """Units whose cut falls strictly inside their run of equal threshold keys."""
    return (remove_equal > 0) & (remove_equal < total_equal)


def _rank_share(remove_equal, local_equal, total_equal, group) -> torch.Tensor:
    """How many of this rank's equal keys it removes, per unit: the first
    `remove_equal` equal keys in rank order, then local flat order."""
    if not bool(_splits(remove_equal, total_equal).any()):
        return torch.where(remove_equal > 0, local_equal, torch.zeros_like(local_equal))
    device = _collective_device(group, _CPU)
    gathered = _all_gather(local_equal.to(device), group).cpu()  # [world, units]
    before = gathered[: dist.get_rank(group)].sum(0)
    return torch.minimum((remove_equal - before).clamp(min=0), local_equal)


def _equal_counts_per_tensor(backend, tensors, masks, key_bits, keys) -> torch.Tensor:
    """Retained keys equal to keys[i] in each tensor i (one histogram pass, no communication)."""
    counts = []
    for start in range(0, len(tensors), _TENSORS_PER_HISTOGRAM):
        stop = min(start + _TENSORS_PER_HISTOGRAM, len(tensors))
        chunk_keys = keys[start:stop].clamp(min=0)
        if key_bits == 16:
            prefixes, pass_index, digits = torch.zeros_like(chunk_keys), 0, chunk_keys
        else:
            prefixes, pass_index, digits = chunk_keys >> 16, 1, chunk_keys & 0xFFFF
        hist = ops.magnitude_histogram(
            backend,
            tensors[start:stop],
            masks[start:stop],
            _LAYER,
            key_bits,
            prefixes.to(tensors[0].device),
            pass_index,
        )
        counts.append(hist.gather(1, digits.to(hist.device)[:, None]).squeeze(1).cpu())
    equal = torch.cat(counts)
    return torch.where(keys >= 0, equal, torch.zeros_like(equal))


def _prune_with_replicas(
    backend, shards, scope, key_bits, keys, remove_equal, total_equal, table, group
):
    """Pruning when some tensors are replicated: ties are shared per tensor, and a
    replica removes exactly what its source copy removes."""
    tensors = shards.weights.tensors
    num_tensors = len(tensors)
    padded = int(table[:, 2].max())
    unit_of = torch.zeros(num_tensors, dtype=torch.long)
    if scope == "layer":
        unit_of = torch.arange(num_tensors)
    keys = keys.cpu()
    tensor_keys, tensor_remove = keys[unit_of], remove_equal[unit_of]
    split = _splits(remove_equal, total_equal)
    # where every equal key goes, prune below the next key instead (a kernel removes at
    # most the equal keys it holds, and a replica's count is not known here)
    take_all = (tensor_remove > 0) & ~split[unit_of]
    thresholds = torch.where(take_all, tensor_keys + 1, tensor_keys)
    removal = torch.zeros_like(tensor_remove)
    if bool(split.any()):
        equal = _equal_counts_per_tensor(backend, tensors, shards.masks, key_bits, tensor_keys)
        rank = dist.get_rank(group)
        contributes = torch.tensor([int(s == rank) for s in shards.sources], dtype=torch.int64)
        row = torch.zeros(2 * padded, dtype=torch.int64)
        row[:num_tensors], row[padded : padded + num_tensors] = equal, contributes
        device = _collective_device(group, _CPU)
        gathered = _all_gather(row.to(device), group).cpu()
        counted = gathered[:, :padded] * gathered[:, padded:]  # [world, tensors]
        if scope == "global":  # rank order, then tensor order within a rank
            flat = counted.flatten()
            before = (flat.cumsum(0) - flat).reshape(counted.shape)
        else:  # one unit per tensor: rank order
            before = counted.cumsum(0) - counted
        source_before = before[torch.tensor(shards.sources), torch.arange(num_tensors)]
        share = torch.minimum((tensor_remove - source_before).clamp(min=0), equal)
        removal = torch.where(split[unit_of], share, removal)
    return ops.prune_masks(
        backend,
        tensors,
        shards.masks,
        _LAYER,
        key_bits,
        thresholds.to(tensors[0].device),
        removal.to(tensors[0].device),
    )

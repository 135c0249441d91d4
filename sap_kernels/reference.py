"""Pure-PyTorch float64 references: the test oracle and the benchmarks'
"pure PyTorch" baseline.

The op-level functions mirror the schemas in csrc/ops.cpp argument for
argument; the `*_by_concatenation` / `*_by_stable_sort` functions are how a
user would write the whole operation today, and serve as end-to-end oracles.
"""

from __future__ import annotations

import torch

from ._inputs import SCOPES, num_rows

_SENTINEL_KEY = 1 << 40  # sorts after every real key


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    rows = num_rows(t)
    return t.reshape(rows, t.numel() // rows if rows else 0)


def _retained(w: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(w, dtype=torch.bool) if m is None else m


def check_finite(weights, masks, op: str) -> None:
    for i, (w, m) in enumerate(zip(weights, masks)):
        bad = ~torch.isfinite(w) & _retained(w, m)
        if bool(bad.any()):
            raise ValueError(
                f"{op}: weights[{i}] contains NaN or infinity among its retained weights"
            )


def magnitude_keys(w: torch.Tensor, key_bits: int) -> torch.Tensor:
    """Keys of |w| as int64: float32 bits (32) or the 16-bit magnitude bits (16)."""
    if key_bits == 32:
        return w.float().abs().view(torch.int32).long()
    if w.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"16-bit keys need bfloat16 or float16 weights, got {w.dtype}")
    return w.view(torch.int16).long() & 0x7FFF


def keys_to_values(keys: torch.Tensor, key_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of magnitude_keys for non-negative keys."""
    if key_bits == 32:
        return keys.to(torch.int32).view(torch.float32).to(dtype)
    return keys.to(torch.int16).view(dtype)


def bin_of_rank(hist: torch.Tensor, rank: torch.Tensor):
    """Per unit (row of `hist`): the bin holding the rank-th counted key (ranks
    below 1 count as 1; past the total, the last bin), the count in the bins
    before it, and the total count. The step shared by every radix select."""
    cumulative = hist.cumsum(1)
    digit = torch.searchsorted(cumulative, rank.clamp(min=1)[:, None]).squeeze(1)
    digit = digit.clamp(max=hist.shape[1] - 1)
    previous = cumulative.gather(1, (digit - 1).clamp(min=0)[:, None]).squeeze(1)
    before = torch.where(digit > 0, previous, torch.zeros_like(previous))
    return digit, before, cumulative[:, -1]


def key_bits_for(weights, dtypes=None) -> int:
    """16 when all weights share a 16-bit dtype (one radix pass), else 32.
    `dtypes`: the weights' distinct dtypes, if the caller has them."""
    dtypes = dtypes if dtypes is not None else {w.dtype for w in weights}
    return 16 if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} else 32


def _unit_reduce(per_row: list[torch.Tensor], scope: int) -> torch.Tensor:
    if scope == SCOPES["neuron"]:
        return torch.cat(per_row)
    per_tensor = torch.stack([r.sum(0) for r in per_row])
    return per_tensor.sum(0, keepdim=True) if scope == SCOPES["global"] else per_tensor


def masked_power_sums(weights, masks, p: float, q: float, scope: int) -> torch.Tensor:
    """float64 [units, 3]: (sum |w|^p, sum |w|^q, retained count) per unit."""
    masks = list(masks) if masks else [None] * len(weights)
    check_finite(weights, masks, "masked_power_sums")
    per_row = []
    for w, m in zip(weights, masks):
        a = _as_rows(w.detach().double().abs())
        keep = _as_rows(_retained(w, m))
        a = torch.where(keep, a, torch.zeros_like(a))
        per_row.append(torch.stack([a.pow(p).sum(1), a.pow(q).sum(1), keep.sum(1).double()], dim=1))
    return _unit_reduce(per_row, scope)


def magnitude_histogram(weights, masks, scope: int, key_bits: int, prefixes, pass_index: int):
    """int64 [units, 65536] histogram of a 16-bit digit of the retained keys."""
    masks = list(masks) if masks else [None] * len(weights)
    per_tensor = []
    for i, (w, m) in enumerate(zip(weights, masks)):
        keys = magnitude_keys(w.detach(), key_bits).flatten()[_retained(w, m).flatten()]
        unit = 0 if scope == SCOPES["global"] else i
        if pass_index == 0:
            digit = keys >> 16 if key_bits == 32 else keys
        else:
            digit = (keys & 0xFFFF)[(keys >> 16) == int(prefixes[unit])]
        per_tensor.append(torch.bincount(digit, minlength=65536))
    hist = torch.stack(per_tensor)
    return hist.sum(0, keepdim=True) if scope == SCOPES["global"] else hist


def rowwise_kth_key(weights, masks, key_bits: int, ks: torch.Tensor) -> torch.Tensor:
    """int64 [rows, 2]: (key of the ks[row]-th smallest retained magnitude of each
    row, retained keys below it); (-1, 0) where ks[row] == 0."""
    masks = list(masks) if masks else [None] * len(weights)
    check_finite(weights, masks, "rowwise_kth_key")
    ks = ks.long().cpu()
    result, row = [], 0
    for w, m in zip(weights, masks):
        keys = _as_rows(magnitude_keys(w.detach(), key_bits)).cpu()
        keep = _as_rows(_retained(w, m)).cpu()
        keys = torch.where(keep, keys, torch.full_like(keys, _SENTINEL_KEY))
        for r in range(keys.shape[0]):
            k = int(ks[row])
            row += 1
            if k <= 0:
                result.append((-1, 0))
                continue
            kth = int(keys[r].sort().values[k - 1])
            result.append((kth, int((keys[r] < kth).sum())))
    return torch.tensor(result, dtype=torch.long, device=weights[0].device).reshape(-1, 2)


def prune_masks(weights, masks, scope: int, key_bits: int, threshold_keys, remove_equal):
    """New masks without keys < threshold and the first `remove_equal` keys == threshold."""
    masks = list(masks) if masks else [None] * len(weights)
    threshold_keys = threshold_keys.long().cpu()
    remove_equal = remove_equal.long().cpu()
    equal_seen = torch.zeros_like(remove_equal)  # per unit, in flat order
    out, unit = [], 0
    for i, (w, m) in enumerate(zip(weights, masks)):
        keep = _as_rows(_retained(w, m))
        keys = _as_rows(magnitude_keys(w.detach(), key_bits)).cpu()
        keep_cpu = keep.cpu()
        rows = keys.shape[0]
        if scope == SCOPES["neuron"]:
            units = torch.arange(unit, unit + rows)
            unit += rows
        else:
            units = torch.full((rows,), 0 if scope == SCOPES["global"] else i)
        thr = threshold_keys[units][:, None]
        active = thr >= 0
        below = keep_cpu & (keys < thr) & active
        equal = keep_cpu & (keys == thr) & active
        if scope == SCOPES["neuron"]:
            rank = equal.long().cumsum(1) - 1
            drop_equal = equal & (rank < remove_equal[units][:, None])
        else:
            u = int(units[0]) if rows else 0
            rank = equal.flatten().long().cumsum(0).reshape(equal.shape) - 1 + equal_seen[u]
            drop_equal = equal & (rank < remove_equal[u])
            equal_seen[u] += int(equal.sum())
        new = keep_cpu & ~below & ~drop_equal
        out.append(new.reshape(w.shape).to(w.device))
    return out


def apply_masks_(weights, masks) -> None:
    """Zeroes pruned weights in place (masked_fill, so NaN * 0 cannot survive)."""
    for w, m in zip(weights, masks):
        w.masked_fill_(~m, 0)


# --- end-to-end oracles, written the way users write them today -------------


def _unit_magnitudes(weights, masks, scope: str) -> list[torch.Tensor]:
    """Retained magnitudes (float64) per unit, concatenated in flat order."""
    masks = list(masks) if masks else [None] * len(weights)
    flat = [
        w.detach().double().abs().flatten()[_retained(w, m).flatten()]
        for w, m in zip(weights, masks)
    ]
    if scope == "global":
        return [torch.cat(flat)]
    if scope == "layer":
        return flat
    units = []
    for w, m in zip(weights, masks):
        a, keep = _as_rows(w.detach().double().abs()), _as_rows(_retained(w, m))
        units.extend(a[r][keep[r]] for r in range(a.shape[0]))
    return units


def magnitude_threshold_by_concatenation(weights, ks, masks=None, scope: str = "global"):
    """k-th smallest retained |w| per unit via torch.cat + torch.kthvalue (float64)."""
    units = _unit_magnitudes(weights, masks, scope)
    ks = [int(k) for k in torch.as_tensor(ks).flatten().expand(len(units))]
    return torch.stack([u.kthvalue(k).values for u, k in zip(units, ks)])


def prune_by_stable_sort(weights, masks, counts, scope: str = "global"):
    """Masks with the `counts[u]` smallest retained |w| of each unit removed,
    ties in flat order: a stable argsort of the concatenated magnitudes."""
    masks = list(masks) if masks else [None] * len(weights)
    retained = [_retained(w, m).clone() for w, m in zip(weights, masks)]
    flat_keep = [r.flatten() for r in retained]
    sizes = [w.numel() for w in weights]
    mags = [w.detach().double().abs().flatten() for w in weights]
    if scope == "global":
        groups = [[(i, slice(0, sizes[i])) for i in range(len(weights))]]
    elif scope == "layer":
        groups = [[(i, slice(0, sizes[i]))] for i in range(len(weights))]
    else:
        groups = []
        for i, w in enumerate(weights):
            rows = num_rows(w)
            length = sizes[i] // rows if rows else 0
            groups.extend([(i, slice(r * length, (r + 1) * length))] for r in range(rows))
    counts = [int(c) for c in torch.as_tensor(counts).flatten().expand(len(groups))]
    for group, c in zip(groups, counts):
        if c == 0:
            continue
        values = torch.cat([torch.where(flat_keep[i][s], mags[i][s], torch.inf) for i, s in group])
        order = torch.sort(values, stable=True).indices[:c]
        offsets, start = [], 0
        for i, s in group:
            offsets.append((i, s, start))
            start += s.stop - s.start
        for i, s, begin in offsets:
            local = order[(order >= begin) & (order < begin + s.stop - s.start)] - begin
            flat_keep[i][s.start + local] = False
    return [k.reshape(w.shape) for k, w in zip(flat_keep, weights)]

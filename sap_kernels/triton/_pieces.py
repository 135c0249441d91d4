"""Host-side bookkeeping for the Triton kernels: argument checks, the piece
table, dtype groups with one base pointer each, and chunks of pieces.

Only small int64 index tables are built here (one row per piece of up to
`piece_elements` weights, or per row in neuron scope); the weights are never
concatenated or copied (except non-contiguous ones, which `.contiguous()`
copies so they are never mis-read).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from . import kernels

GLOBAL, LAYER, NEURON = 0, 1, 2
TYPE_CODES = {
    torch.float32: kernels.FLOAT32,
    torch.bfloat16: kernels.BFLOAT16,
    torch.float16: kernels.FLOAT16,
}
BITS_DTYPES = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def rows_of(t: torch.Tensor) -> int:
    return 1 if t.dim() == 0 else t.shape[0]


def check_inputs(op: str, weights, masks, scope: int | None = None) -> list:
    """The checks of csrc/shards.h, with the same messages; returns one mask
    (or None) per weight."""
    if len(weights) == 0:
        raise ValueError(f"{op}: weights is an empty list")
    masks = list(masks) if masks is not None and len(masks) > 0 else [None] * len(weights)
    if len(masks) != len(weights):
        raise ValueError(f"{op}: got {len(masks)} masks for {len(weights)} weights")
    if scope is not None and scope not in (GLOBAL, LAYER, NEURON):
        raise ValueError(f"{op}: scope must be 0, 1 or 2, got {scope}")
    device = weights[0].device
    for i, (w, m) in enumerate(zip(weights, masks)):
        if w.device != device:
            raise ValueError(f"{op}: weights[{i}] is on {w.device} but weights[0] is on {device}")
        if w.dtype not in TYPE_CODES:
            raise TypeError(
                f"{op}: weights[{i}] has dtype {w.dtype}; expected float32, bfloat16 or float16"
            )
        if m is None:
            continue
        if m.dtype != torch.bool:
            raise TypeError(f"{op}: masks[{i}] has dtype {m.dtype}; expected bool")
        if m.shape != w.shape:
            raise ValueError(
                f"{op}: masks[{i}] has shape {list(m.shape)} but weights[{i}] has shape "
                f"{list(w.shape)}"
            )
        if m.device != device:
            raise ValueError(f"{op}: masks[{i}] is on {m.device} but weights[{i}] is on {device}")
    return masks


def check_key_bits(op: str, weights, key_bits: int) -> None:
    if key_bits == 32:
        return
    dtypes = {w.dtype for w in weights}
    if key_bits != 16 or len(dtypes) != 1 or not dtypes <= {torch.bfloat16, torch.float16}:
        raise ValueError(
            f"{op}: key_bits must be 32, or 16 when every weight is bfloat16 or every weight "
            f"is float16; got key_bits={key_bits} for dtypes {sorted(map(str, dtypes))}"
        )


def tracing(tensors) -> bool:
    """Whether the op runs on fake tensors (torch.compile, opcheck): there are no
    data pointers then, so every tensor gets its own launch (offsets 0). The
    first tensor tells: one op's inputs are all fake or all real, and scanning
    every tensor of a billion-weight model cost 0.3 ms per call."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode(tensors[:1]) is not None


def to_device(values: np.ndarray, device, trace: bool) -> torch.Tensor:
    """An int64 host table on `device` (a constant of the graph when tracing)."""
    if trace:
        return torch.tensor(values.tolist(), dtype=torch.int64, device=device)
    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if torch.device(device).type != "cuda":
        return host.to(device)
    # from pinned memory without blocking (a pageable copy waits for the stream
    # to drain); the host allocator keeps the pinned block until the copy ran
    return host.pin_memory().to(device, non_blocking=True)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


@dataclass
class Pieces:
    """Every piece in global order (tensor order, then flat order). Each piece
    lies inside one unit; units are non-decreasing along the table. Host
    (numpy) arrays: built from shapes only, so they trace as constants."""

    begin: np.ndarray  # element offset inside its tensor
    length: np.ndarray
    unit: np.ndarray
    tensor: np.ndarray  # index of the tensor holding the piece
    num_units: int
    unit_starts: np.ndarray  # [num_units + 1]: first piece of each unit
    uploaded: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def count(self) -> int:
        return int(self.begin.size)

    def on_device(self, name, device, trace: bool, build=None) -> torch.Tensor:
        """The int64 array `name` derived from the pieces (the attribute of that
        name, or build()) on `device`, uploaded once: the layout cache keys the
        device and stream, so a cached Pieces is only used where its uploads
        are. Read-only for callers. When tracing: a graph constant per call."""
        if trace:
            return to_device(build() if build else getattr(self, name), device, True)
        if name not in self.uploaded:
            self.uploaded[name] = to_device(
                build() if build else getattr(self, name), device, False
            )
        return self.uploaded[name]


def make_pieces(weights, scope: int, piece_elements: int) -> Pieces:
    """Splits each unit (the whole tensor in global/layer scope, each row of
    the tensor viewed as (size(0), -1) in neuron scope) into pieces of at most
    `piece_elements` elements. Vectorised: no Python loop over rows."""
    numels = np.array([w.numel() for w in weights], dtype=np.int64)
    rows = np.array([rows_of(w) for w in weights], dtype=np.int64)
    if scope == NEURON:
        units_per_tensor = rows
        unit_length = np.where(rows > 0, numels // np.maximum(rows, 1), 0)
        first_unit = _exclusive_cumsum(units_per_tensor)
        num_units = int(rows.sum())
    else:
        units_per_tensor = np.ones_like(numels)
        unit_length = numels
        if scope == LAYER:
            first_unit = np.arange(len(weights), dtype=np.int64)
        else:
            first_unit = np.zeros_like(numels)
        num_units = len(weights) if scope == LAYER else 1
    pieces_per_unit = (unit_length + piece_elements - 1) // piece_elements
    counts = units_per_tensor * pieces_per_unit
    tensor = np.repeat(np.arange(len(weights), dtype=np.int64), counts)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
        _exclusive_cumsum(counts), counts
    )
    per_unit = pieces_per_unit[tensor]
    local_unit, part = within // per_unit, within % per_unit
    length_of_unit = unit_length[tensor]
    begin = local_unit * length_of_unit + part * piece_elements
    length = np.minimum(length_of_unit - part * piece_elements, piece_elements)
    unit = first_unit[tensor] + local_unit
    unit_starts = np.searchsorted(unit, np.arange(num_units + 1), side="left").astype(np.int64)
    return Pieces(begin, length, unit, tensor, num_units, unit_starts)


def _base_and_offsets(views: list[torch.Tensor | None]):
    """The index of the view with the lowest address among non-empty ones (-1
    if none), and each view's element offset from it (-1 for None). Offsets
    are exact: every view is element-aligned."""
    offsets = np.full(len(views), -1, dtype=np.int64)
    present = [i for i, v in enumerate(views) if v is not None and v.numel() > 0]
    if not present:
        return -1, offsets
    base = min(present, key=lambda i: views[i].data_ptr())
    base_address = views[base].data_ptr()
    for i in present:
        distance = views[i].data_ptr() - base_address
        assert distance % views[i].element_size() == 0, "tensor is not element-aligned"
        offsets[i] = distance // views[i].element_size()
    return base, offsets


def check_masks_in_place(op: str, masks) -> None:
    """Masks written where they are must be contiguous and must not share
    memory (a weight would be pruned twice); the messages of csrc/shards.h."""
    for i, m in enumerate(masks):
        if m is None:
            raise ValueError(f"{op}: masks[{i}] is None")
        if not m.is_contiguous():
            raise ValueError(f"{op}: masks[{i}] must be contiguous (it is updated in place)")
    if tracing(masks):  # fake tensors have no addresses to compare
        return
    spans = sorted((m.data_ptr(), m.numel(), i) for i, m in enumerate(masks) if m.numel() > 0)
    for (start, length, i), (next_start, _, j) in zip(spans, spans[1:]):
        if start + length > next_start:
            raise ValueError(f"{op}: masks[{i}] and masks[{j}] share memory")


def bit_views(weights) -> list[torch.Tensor]:
    """Each weight as raw bits (int32 / int16), contiguous. Not flattened: the
    kernels take only the address, and every torch call over a billion-weight
    model's 300 tensors costs ~0.1 ms of host time per op call."""
    return [w.contiguous().view(BITS_DTYPES[w.dtype]) for w in weights]


def byte_views(masks) -> list[torch.Tensor | None]:
    """Each mask as bytes (0 or 1), contiguous; None stays None."""
    return [None if m is None else m.contiguous().view(torch.uint8) for m in masks]


@dataclass
class Group:
    """The pieces of some tensors addressed from one weight base pointer and one
    mask base pointer: all tensors of one dtype, or (when tracing) one tensor."""

    weight_type: int
    weight_base: torch.Tensor
    mask_base: torch.Tensor
    members: list[int]  # tensors in the group
    table: torch.Tensor  # int64 [pieces, 5] on the device, see kernels.PIECE_COLUMNS
    chunk_starts: torch.Tensor  # int64 [chunks + 1] on the device
    selected: np.ndarray  # indices (into the global piece order) of this group's pieces
    # Every piece's weights and mask bytes start 16 bytes from 16-byte aligned
    # bases: the kernels may then use 16-byte vector loads.
    aligned: bool

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_starts.shape[0]) - 1

    @property
    def num_pieces(self) -> int:
        return int(self.table.shape[0])


@dataclass
class _GroupTables:
    """What a Group is built from, without references to the tensors: which
    views are the bases (an index, -1 for the dummy mask base) and the tables."""

    weight_type: int
    weight_base: int
    mask_base: int
    members: list[int]
    table: torch.Tensor
    chunk_starts: torch.Tensor
    selected: np.ndarray
    aligned: bool


def _group_tables(weights, bits, mask_bytes, pieces, chunk_elements, device, skip, trace):
    kept = [i for i, w in enumerate(weights) if w.numel() > 0 and i not in skip]
    if trace:
        member_lists = [[i] for i in kept]
    else:
        member_lists = [[i for i in kept if weights[i].dtype == d] for d in TYPE_CODES]
        member_lists = [m for m in member_lists if m]
        mask_base, mask_offsets = _base_and_offsets(mask_bytes)
    groups = []
    for members in member_lists:
        if trace:
            i = members[0]
            weight_base, offsets = i, np.zeros(len(weights), dtype=np.int64)
            mask_base = i if mask_bytes[i] is not None else -1
            mask_offsets = np.full(len(weights), -1 if mask_bytes[i] is None else 0, np.int64)
        else:
            member_set = set(members)
            weight_base, offsets = _base_and_offsets(
                [b if i in member_set else None for i, b in enumerate(bits)]
            )
        in_group = np.zeros(len(weights), dtype=bool)
        in_group[members] = True
        selected = np.nonzero(in_group[pieces.tensor])[0].astype(np.int64)
        tensor = pieces.tensor[selected]
        begin = pieces.begin[selected]
        mask_offset = mask_offsets[tensor]
        # -16 (< 0, and a multiple of 16 like every aligned offset): no mask.
        mask_begin = np.where(mask_offset >= 0, mask_offset + begin, -16)
        table = np.stack(
            [offsets[tensor] + begin, pieces.length[selected], mask_begin,
             pieces.unit[selected], selected],
            axis=1,
        ).reshape(-1, 5)  # fmt: skip
        base_bits = bits[weight_base]
        aligned = (
            not trace
            and base_bits.data_ptr() % 16 == 0
            and (mask_base < 0 or mask_bytes[mask_base].data_ptr() % 16 == 0)
            and bool((table[:, 0] % (16 // base_bits.element_size()) == 0).all())
            and bool(((table[:, 2] < 0) | (table[:, 2] % 16 == 0)).all())
        )
        chunk_of_piece = _exclusive_cumsum(pieces.length[selected]) // chunk_elements
        boundaries = np.nonzero(np.diff(chunk_of_piece))[0] + 1
        chunk_starts = np.concatenate([[0], boundaries, [selected.size]]).astype(np.int64)
        code = TYPE_CODES[weights[members[0]].dtype]
        groups.append(
            _GroupTables(code, weight_base, mask_base, members, to_device(table, device, trace),
                         to_device(chunk_starts, device, trace), selected, aligned)
        )  # fmt: skip
    return groups


class _LayoutCache:
    """The last layouts built, keyed by everything they depend on: each view's
    address, size, rows and dtype, the scope, the piece and chunk sizes, the
    skipped tensors, and the device and current stream. A training loop calls
    the ops on the same parameters and masks every step, and rebuilding the
    tables costs milliseconds of host time at a billion weights
    (benchmarks/bench_triton_host.py), as much as a pass over 4 GB should take
    on a GPU. Only host arrays and the small device tables are kept, never the
    tensors: a tensor allocated later at a cached address with the same size
    gets the same (still right) tables. Least recently used entries go once
    the device tables pass MAX_BYTES."""

    MAX_BYTES = 64 << 20

    def __init__(self):
        self.entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            found = self.entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return found[0]  # (entry, nbytes)

    def put(self, key, entry, nbytes: int) -> None:
        with self.lock:
            self.entries[key] = (entry, nbytes)
            total = sum(size for _, size in self.entries.values())
            while total > self.MAX_BYTES and len(self.entries) > 1:
                _, (_, size) = self.entries.popitem(last=False)
                total -= size

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.hits = self.misses = 0


layout_cache = _LayoutCache()


def _layout_key(weights, bits, mask_bytes, scope, piece_elements, chunk_elements, device, skip):
    views = tuple(
        (b.data_ptr(), b.numel(), rows_of(w), w.dtype, -1 if m is None else m.data_ptr())
        for w, b, m in zip(weights, bits, mask_bytes)
    )
    # The stream too: tables uploaded on one stream are not known to be there
    # (or safe to free) for another's kernels, so each stream builds its own.
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
    return (views, scope, piece_elements, chunk_elements, str(device), stream, frozenset(skip))


def make_layout(
    weights, bits, mask_bytes, scope: int, piece_elements: int, chunk_elements: int, device,
    skip=frozenset(),
):  # fmt: skip
    """(pieces, groups) of the weights: the piece table (make_pieces) and the
    launch groups, one per dtype present (addresses are offsets from the
    group's lowest-addressed tensor), or one per tensor when tracing (no data
    pointers to take offsets from). A dummy 16-byte mask base stands in where
    no mask is given; every mask_begin is then -16. Tensors in `skip` are left
    out (another kernel handles them). Eager calls reuse the tables of an
    identical earlier call (layout_cache)."""
    trace = tracing(list(weights))
    key = None if trace else _layout_key(
        weights, bits, mask_bytes, scope, piece_elements, chunk_elements, device, skip
    )  # fmt: skip
    entry = None if key is None else layout_cache.get(key)
    if entry is None:
        pieces = make_pieces(weights, scope, piece_elements)
        tables = _group_tables(
            weights, bits, mask_bytes, pieces, chunk_elements, device, skip, trace
        )
        entry = (pieces, tables, torch.ones(16, dtype=torch.uint8, device=device))
        if key is not None:
            nbytes = sum(t.table.nbytes + t.chunk_starts.nbytes for t in tables)
            # Pieces.on_device's int64 arrays: per piece its ends, starts, unit,
            # unit's first piece and a row per group (<= 3); per unit two
            nbytes += 8 * (7 * pieces.count + 2 * (pieces.num_units + 1))
            layout_cache.put(key, entry, nbytes)
    pieces, tables, dummy = entry
    groups = [
        Group(t.weight_type, bits[t.weight_base],
              mask_bytes[t.mask_base] if t.mask_base >= 0 else dummy,
              t.members, t.table, t.chunk_starts, t.selected, t.aligned)
        for t in tables
    ]  # fmt: skip
    return pieces, groups


def first_bad_tensor(bad_per_piece: torch.Tensor, pieces: Pieces) -> int | None:
    """Index of the first tensor with a nonzero count, or None (one host sync;
    skipped when tracing, where data-dependent errors cannot be raised)."""
    if tracing([bad_per_piece]):
        return None
    bad = (bad_per_piece.cpu() > 0).nonzero()
    return None if bad.numel() == 0 else int(pieces.tensor[int(bad[0, 0])])

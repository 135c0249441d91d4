"""Host-side bookkeeping for the Triton kernels: argument checks, the piece
table, dtype groups with one base pointer each, and chunks of pieces.

Only small int64 index tables are built here (one row per piece of up to
`piece_elements` weights, or per row in neuron scope); the weights are never
concatenated or copied (except non-contiguous ones, which `.contiguous()`
copies so they are never mis-read).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


@dataclass
class Pieces:
    """Every piece in global order (tensor order, then flat order). Each piece
    lies inside one unit; units are non-decreasing along the table."""

    begin: torch.Tensor  # element offset inside its tensor
    length: torch.Tensor
    unit: torch.Tensor
    tensor: torch.Tensor  # index of the tensor holding the piece
    num_units: int
    unit_starts: torch.Tensor  # [num_units + 1]: first piece of each unit

    @property
    def count(self) -> int:
        return int(self.begin.numel())


def make_pieces(weights, scope: int, piece_elements: int) -> Pieces:
    """Splits each unit (the whole tensor in global/layer scope, each row of
    the tensor viewed as (size(0), -1) in neuron scope) into pieces of at most
    `piece_elements` elements. Vectorised: no Python loop over rows."""
    numels = torch.tensor([w.numel() for w in weights], dtype=torch.int64)
    rows = torch.tensor([rows_of(w) for w in weights], dtype=torch.int64)
    if scope == NEURON:
        units_per_tensor = rows
        unit_length = torch.where(rows > 0, numels // rows.clamp(min=1), 0)
        first_unit = _exclusive_cumsum(units_per_tensor)
        num_units = int(rows.sum())
    else:
        units_per_tensor = torch.ones_like(numels)
        unit_length = numels
        if scope == LAYER:
            first_unit = torch.arange(len(weights), dtype=torch.int64)
        else:
            first_unit = torch.zeros_like(numels)
        num_units = len(weights) if scope == LAYER else 1
    pieces_per_unit = (unit_length + piece_elements - 1) // piece_elements
    counts = units_per_tensor * pieces_per_unit
    tensor = torch.repeat_interleave(torch.arange(len(weights)), counts)
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(
        _exclusive_cumsum(counts), counts
    )
    per_unit = pieces_per_unit[tensor]
    local_unit, part = within // per_unit, within % per_unit
    length_of_unit = unit_length[tensor]
    begin = local_unit * length_of_unit + part * piece_elements
    length = torch.clamp(length_of_unit - part * piece_elements, max=piece_elements)
    unit = first_unit[tensor] + local_unit
    unit_starts = torch.searchsorted(unit, torch.arange(num_units + 1))
    return Pieces(begin, length, unit, tensor, num_units, unit_starts)


def _base_and_offsets(views: list[torch.Tensor | None]):
    """The view with the lowest address among non-empty ones, and each view's
    element offset from it (-1 for None). Offsets are exact: every view is
    element-aligned."""
    present = [i for i, v in enumerate(views) if v is not None and v.numel() > 0]
    if not present:
        return None, torch.full((len(views),), -1, dtype=torch.int64)
    base = min(present, key=lambda i: views[i].data_ptr())
    base_address = views[base].data_ptr()
    offsets = torch.full((len(views),), -1, dtype=torch.int64)
    for i in present:
        distance = views[i].data_ptr() - base_address
        assert distance % views[i].element_size() == 0, "tensor is not element-aligned"
        offsets[i] = distance // views[i].element_size()
    return views[base], offsets


def bit_views(weights) -> list[torch.Tensor]:
    """Each weight as flat raw bits (int32 / int16), contiguous."""
    return [w.detach().contiguous().view(BITS_DTYPES[w.dtype]).reshape(-1) for w in weights]


def byte_views(masks) -> list[torch.Tensor | None]:
    """Each mask as flat bytes (0 or 1), contiguous; None stays None."""
    return [None if m is None else m.contiguous().view(torch.uint8).reshape(-1) for m in masks]


@dataclass
class Group:
    """The pieces of the tensors of one dtype, addressed from one base pointer."""

    weight_type: int
    weight_base: torch.Tensor
    table: torch.Tensor  # int64 [pieces, 5] on the device, see kernels.PIECE_COLUMNS
    chunk_starts: torch.Tensor  # int64 [chunks + 1] on the device
    selected: torch.Tensor  # indices (into the global piece order) of this group's pieces
    # Every piece's weights and mask bytes start 16 bytes from 16-byte aligned
    # bases: the kernels may then use 16-byte vector loads.
    aligned: bool

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_starts.numel()) - 1


def make_groups(
    weights, bits, mask_bytes, pieces: Pieces, chunk_elements: int, device
) -> tuple[list[Group], torch.Tensor]:
    """One Group per dtype present, and the masks' base tensor (a 1-byte dummy
    when no mask is given; then every mask_begin is -1)."""
    mask_base, mask_offsets = _base_and_offsets(mask_bytes)
    if mask_base is None:
        mask_base = torch.ones(1, dtype=torch.uint8, device=device)
    groups = []
    for dtype, code in TYPE_CODES.items():
        members = [i for i, w in enumerate(weights) if w.dtype == dtype]
        if not members:
            continue
        weight_base, offsets = _base_and_offsets(
            [bits[i] if i in members else None for i in range(len(weights))]
        )
        if weight_base is None:
            continue  # only empty tensors: no pieces
        in_group = torch.zeros(len(weights), dtype=torch.bool)
        in_group[members] = True
        selected = in_group[pieces.tensor].nonzero().flatten()
        tensor = pieces.tensor[selected]
        begin = pieces.begin[selected]
        mask_offset = mask_offsets[tensor]
        # -16 (< 0, and a multiple of 16 like every aligned offset): no mask.
        mask_begin = torch.where(mask_offset >= 0, mask_offset + begin, -16)
        table = torch.stack(
            [
                offsets[tensor] + begin,
                pieces.length[selected],
                mask_begin,
                pieces.unit[selected],
                selected,
            ],
            dim=1,
        )
        weights_per_16_bytes = 16 // weight_base.element_size()
        aligned = (
            weight_base.data_ptr() % 16 == 0
            and mask_base.data_ptr() % 16 == 0
            and bool((table[:, 0] % weights_per_16_bytes == 0).all())
            and bool(((table[:, 2] < 0) | (table[:, 2] % 16 == 0)).all())
        )
        chunk_of_piece = _exclusive_cumsum(pieces.length[selected]) // chunk_elements
        _, per_chunk = torch.unique_consecutive(chunk_of_piece, return_counts=True)
        chunk_starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_chunk, 0)])
        groups.append(
            Group(code, weight_base, table.to(device), chunk_starts.to(device), selected, aligned)
        )
    return groups, mask_base


def first_bad_tensor(bad_per_piece: torch.Tensor, pieces: Pieces) -> int | None:
    """Index of the first tensor with a nonzero count, or None (one host sync)."""
    bad = (bad_per_piece.cpu() > 0).nonzero()
    return None if bad.numel() == 0 else int(pieces.tensor[int(bad[0, 0])])

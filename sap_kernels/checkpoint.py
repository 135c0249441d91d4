"""PQ Index of a checkpoint on disk, streamed tensor by tensor.

    from sap_kernels.checkpoint import pqi_of_checkpoint
    result = pqi_of_checkpoint("model.safetensors.index.json", scope="layer")
    print(result.global_pqi, result.layers[0].pqi)

Formats: a `.safetensors` file, a sharded safetensors checkpoint (its
`*.safetensors.index.json`, or a directory holding one), or a PyTorch
state-dict file (`torch.load(..., weights_only=True, mmap=True)`), sharded
too (`pytorch_model.bin.index.json`).

Memory: safetensors tensors are read in row blocks of at most
`block_bytes` (64 MiB by default), each through its own short-lived
`safe_open`, so the memory map of a block is released before the next block
is read; peak memory is a few blocks, whatever the checkpoint's size. The
power sums S_p, S_q and the count d of each block add (DESIGN.md §3), so the
per-tensor and global PQI are exact. A PyTorch state-dict file is memory-mapped
by `torch.load`; its pages are file-backed (the kernel can drop them under
pressure) but they stay mapped until the whole file has been read.

Which tensors: by default the same rule as the API (`default_parameter_filter`:
names ending in 'weight' with more than one dimension). `filter=REGEX` replaces
that rule by `re.search(REGEX, name)`; `filter=ALL_TENSORS` takes every tensor.
Selected tensors that are not floating point are skipped and listed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

ALL_TENSORS = ".*"
DEFAULT_FILTER_DESCRIPTION = "names ending in 'weight' with more than one dimension"
DEFAULT_BLOCK_BYTES = 64 << 20

# safetensors dtype codes -> torch dtype names (as `str(dtype)` without 'torch.').
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
# Read as they are; other floating dtypes (float8) are upcast to float32, exactly.
_READ_AS_IS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message is one line for the user."""


@dataclass
class TensorPQI:
    """One measured tensor. `pqi` is NaN when every weight is zero; `row_pqi`
    holds one value per row (scope='neuron') or is None."""

    name: str
    shape: list[int]
    dtype: str
    numel: int
    pqi: float
    zero_fraction: float
    sum_p: float
    sum_q: float
    row_pqi: list[float] | None = None
    shard: str | None = None


@dataclass
class SkippedTensor:
    name: str
    shape: list[int]
    dtype: str
    reason: str


@dataclass
class CheckpointPQI:
    """Result of `pqi_of_checkpoint`: the global PQI over every measured tensor
    (float64), one `TensorPQI` per measured tensor, the selected tensors that
    were skipped (not floating, NaN/inf), and the names the filter left out."""

    path: str
    format: str
    p: float
    q: float
    scope: str
    filter: str | None
    global_pqi: float
    total_weights: int
    layers: list[TensorPQI] = field(default_factory=list)
    skipped: list[SkippedTensor] = field(default_factory=list)
    not_selected: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        return _json_safe(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _json_safe(value):
    """NaN/inf become None so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --- reading ---------------------------------------------------------------


@dataclass
class _Entry:
    """A tensor in a checkpoint, described without reading its data."""

    name: str
    shape: list[int]
    dtype: str  # a torch dtype name: 'float32', 'bfloat16', 'int8', ...
    floating: bool
    read_rows: Callable[[int, int], torch.Tensor]  # rows [start, stop) of a (rows, -1) view
    shard: str | None = None
    mapped: bool = False  # read_rows returns views of a file mapping (torch.load mmap=True)


def _open_safetensors(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as error:  # SafetensorError, OSError: one line for the user
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({message})") from None


def _safetensors_entries(path: str, shard_label: str | None = None) -> Iterator[_Entry]:
    with _open_safetensors(path) as handle:
        names = list(handle.keys())
        described = []
        for name in names:
            piece = handle.get_slice(name)
            described.append((name, list(piece.get_shape()), piece.get_dtype()))
    for name, shape, dtype in described:

        def read_rows(start, stop, name=name, shape=shape):
            with _open_safetensors(path) as handle:
                piece = handle.get_slice(name)
                if len(shape) == 0:
                    return handle.get_tensor(name).reshape(1, 1)
                block = piece[start:stop]
            return block.reshape(stop - start, -1)

        dtype_name = _SAFETENSORS_DTYPES.get(dtype, dtype.lower())
        yield _Entry(name, shape, dtype_name, dtype_name in _FLOATING, read_rows, shard_label)


def _index_entries(index_path: str) -> Iterator[_Entry]:
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{index_path}: not a checkpoint index ({reason})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index_path}: not a checkpoint index (no 'weight_map' object of tensor -> shard)"
        )
    folder = os.path.dirname(os.path.abspath(index_path))
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard} listed in the index is missing")
    for shard in shards:
        wanted = {name for name, s in weight_map.items() if s == shard}
        shard_path = os.path.join(folder, shard)
        if shard.endswith(".safetensors"):
            entries = _safetensors_entries(shard_path, shard)
        else:  # e.g. pytorch_model-00001-of-00002.bin of a pytorch_model.bin.index.json
            entries = _torch_entries(shard_path, shard)
        for entry in entries:
            if entry.name in wanted:
                wanted.discard(entry.name)
                yield entry
        if wanted:
            raise CheckpointError(
                f"{index_path}: {sorted(wanted)[0]} is listed in the index but not in {shard}"
            )


def _flatten_state(obj, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten_state(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _flatten_state(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def _drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Drops the resident pages of a memory-mapped (file-backed) tensor: they are
    clean, so the kernel re-reads them from the file if they are touched again.
    Only for tensors that `torch.load(mmap=True)` returned (never anonymous
    memory, where MADV_DONTNEED would discard the data)."""
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_DONTNEED") or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    stop = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, stop // page * page  # whole pages inside
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _torch_entries(path: str, shard_label: str | None = None) -> Iterator[_Entry]:
    mapped = True
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise CheckpointError(_torch_load_message(path, error)) from None
        mapped = False
        # legacy (non-zip) format: cannot be memory-mapped, so it is read whole
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as inner:
            raise CheckpointError(_torch_load_message(path, inner)) from None
    except Exception as error:
        raise CheckpointError(_torch_load_message(path, error)) from None
    for name, value in _flatten_state(state):
        if not isinstance(value, torch.Tensor):
            continue
        shape = list(value.shape)

        def read_rows(start, stop, value=value):
            rows = value.reshape(1, -1) if value.dim() == 0 else value.reshape(value.shape[0], -1)
            return rows[start:stop]

        dtype_name = str(value.dtype).removeprefix("torch.")
        floating = value.is_floating_point()
        yield _Entry(name, shape, dtype_name, floating, read_rows, shard_label, mapped)


def _torch_load_message(path: str, error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{path}: not a checkpoint (neither safetensors nor a PyTorch state dict: {first_line})"


def _detect_format(path: str) -> tuple[str, str]:
    """(format, path to open): 'safetensors', 'sharded' (an index of shards) or 'torch'."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        # a safetensors index first, then any other (pytorch_model.bin.index.json)
        indices = sorted(
            (not n.endswith(".safetensors.index.json"), n)
            for n in os.listdir(path)
            if n.endswith(".index.json")
        )
        indices = [n for _, n in indices]
        singles = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        pickles = [
            n for n in ("pytorch_model.bin", "model.pt", "model.pth") if n in os.listdir(path)
        ]
        if indices:
            return "sharded", os.path.join(path, indices[0])
        if len(singles) == 1:
            return "safetensors", os.path.join(path, singles[0])
        if len(singles) > 1:
            raise CheckpointError(
                f"{path}: several .safetensors files and no *.safetensors.index.json; "
                "pass one file or the index"
            )
        if pickles:
            return "torch", os.path.join(path, pickles[0])
        raise CheckpointError(f"{path}: directory holds no .safetensors or PyTorch checkpoint")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied")
    if path.endswith(".json"):
        return "sharded", path
    if path.endswith(".safetensors"):
        return "safetensors", path
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":  # zip (torch.save) or a legacy pickle
        return "torch", path
    return "unknown", path  # safetensors (any name) or not a checkpoint


def iter_checkpoint(path: str) -> tuple[str, Iterator[_Entry]]:
    """(format, entries) of a checkpoint; raises CheckpointError if unreadable."""
    kind, target = _detect_format(str(path))
    if kind == "sharded":
        return kind, _index_entries(target)
    if kind == "safetensors":
        return kind, _safetensors_entries(target)
    if kind == "unknown":
        try:
            _open_safetensors(target).__exit__(None, None, None)
        except CheckpointError as error:
            reason = str(error).split("(", 1)[-1].rstrip(")")
            raise CheckpointError(
                f"{path}: not a checkpoint (expected a .safetensors file, a "
                f"*.safetensors.index.json or a torch.save file; as safetensors: {reason})"
            ) from None
        return "safetensors", _safetensors_entries(target)
    return kind, _torch_entries(target)


# --- measuring -------------------------------------------------------------


def _selector(filter: str | None) -> Callable[[str, list[int]], bool]:
    if filter is None:
        return lambda name, shape: name.endswith("weight") and len(shape) > 1
    try:
        pattern = re.compile(filter)
    except re.error as error:
        message = f"filter {filter!r} is not a valid regular expression: {error}"
        raise CheckpointError(message) from None
    return lambda name, shape: pattern.search(name) is not None


def _rows_per_block(shape: list[int], element_size: int, block_bytes: int) -> int:
    rows = shape[0] if shape else 1
    row_bytes = max(1, math.prod(shape[1:]) * element_size)
    return max(1, min(rows, block_bytes // row_bytes))


def _measure(entry: _Entry, p, q, scope, backend, block_bytes):
    """(sum_p, sum_q, count, zeros, per-row sums or None) of one tensor, in blocks."""
    from .api import pq_sums

    rows = entry.shape[0] if entry.shape else 1
    numel = math.prod(entry.shape)
    element_size = torch.empty((), dtype=_torch_dtype(entry)).element_size()
    step = _rows_per_block(entry.shape, element_size, block_bytes)
    sums = torch.zeros(3, dtype=torch.float64)
    zeros = 0
    row_sums = [] if scope == "neuron" else None
    if numel == 0:
        return (
            sums,
            zeros,
            (torch.zeros(rows, 3, dtype=torch.float64) if row_sums is not None else None),
        )
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = source = entry.read_rows(start, stop)
        if block.dtype not in _READ_AS_IS:
            block = block.float()  # float8: exact in float32
        if scope == "neuron":
            part = pq_sums([block], p=p, q=q, scope="neuron", backend=backend)
            part = torch.stack([part.sum_p, part.sum_q, part.count], dim=1)
            row_sums.append(part)
            sums += part.sum(0)
        else:
            part = pq_sums([block], p=p, q=q, scope="layer", backend=backend)
            sums += torch.stack([part.sum_p[0], part.sum_q[0], part.count[0]])
        zeros += block.numel() - int(torch.count_nonzero(block))  # no temporary mask
        if entry.mapped:
            _drop_mapped_pages(source)
        del block, source
    return sums, zeros, (torch.cat(row_sums) if row_sums is not None else None)


def _torch_dtype(entry: _Entry) -> torch.dtype:
    dtype = getattr(torch, entry.dtype, torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def pqi_of_checkpoint(
    path: str | os.PathLike,
    *,
    p: float = 0.5,
    q: float = 1.0,
    scope: str = "layer",
    filter: str | None = None,
    backend: str = "auto",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
) -> CheckpointPQI:
    """PQ Index of the tensors of a checkpoint, read one block at a time.

    Args:
        path: a .safetensors file, a *.safetensors.index.json, a directory with
            either, or a PyTorch state-dict file.
        p, q: exponents, 0 < p < q.
        scope: 'global' (the global value only), 'layer' (also one value per
            tensor) or 'neuron' (also one value per row of each tensor).
        filter: None for the API's default rule (names ending in 'weight', more
            than one dimension), or a regular expression searched in each name
            (ALL_TENSORS takes every tensor).
        backend: as in `sap_kernels.pqi`.
        block_bytes: the most bytes of one tensor held in memory at once.
        progress: show a tqdm progress bar on stderr.

    Raises CheckpointError (one-line message) for a missing or unreadable file,
    and when no floating tensor is selected. A tensor with NaN or infinity is
    skipped and listed rather than failing the whole checkpoint.
    """
    from ._inputs import check_exponents, scope_code
    from .sparsity import pqi_from_sums

    try:
        p, q = check_exponents(p, q)
        scope_code(scope)
    except (TypeError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    selected = _selector(filter)
    kind, entries = iter_checkpoint(str(path))
    result = CheckpointPQI(str(path), kind, p, q, scope, filter, math.nan, 0)
    total = torch.zeros(3, dtype=torch.float64)
    entries = list(entries)  # metadata only
    bar = _progress(entries, progress)
    for entry in bar:
        if not selected(entry.name, entry.shape):
            result.not_selected.append(entry.name)
            continue
        if not entry.floating:
            result.skipped.append(
                SkippedTensor(entry.name, entry.shape, entry.dtype, "not a floating-point tensor")
            )
            continue
        try:
            sums, zeros, row_sums = _measure(entry, p, q, scope, backend, block_bytes)
        except ValueError as error:
            if "NaN or infinity" not in str(error):
                raise CheckpointError(f"{entry.name}: {error}") from None
            reason = "contains NaN or infinity"
            result.skipped.append(SkippedTensor(entry.name, entry.shape, entry.dtype, reason))
            continue
        except (TypeError, RuntimeError) as error:
            message = (str(error).splitlines() or [type(error).__name__])[0]
            raise CheckpointError(f"{entry.name}: could not be measured: {message}") from None
        total += sums
        numel = math.prod(entry.shape)
        layer = TensorPQI(
            name=entry.name,
            shape=entry.shape,
            dtype=entry.dtype,
            numel=numel,
            pqi=float(pqi_from_sums(sums[0], sums[1], sums[2], p, q)),
            zero_fraction=zeros / numel if numel else math.nan,
            sum_p=float(sums[0]),
            sum_q=float(sums[1]),
            shard=entry.shard,
        )
        if row_sums is not None:
            rows = pqi_from_sums(row_sums[:, 0], row_sums[:, 1], row_sums[:, 2], p, q)
            layer.row_pqi = rows.tolist()
        result.layers.append(layer)
    if not result.layers:
        rule = DEFAULT_FILTER_DESCRIPTION if filter is None else f"--filter {filter!r}"
        found = len(entries)
        if result.skipped:
            raise CheckpointError(
                f"{path}: no floating-point tensor to measure ({len(result.skipped)} selected "
                f"tensors skipped: {', '.join(s.name for s in result.skipped[:5])})"
            )
        raise CheckpointError(f"{path}: no tensor matches {rule} (the checkpoint has {found})")
    result.global_pqi = float(pqi_from_sums(total[0], total[1], total[2], p, q))
    result.total_weights = int(total[2])
    return result


def _progress(entries, enabled: bool):
    if not enabled:
        return entries
    from tqdm import tqdm

    return tqdm(entries, desc="tensors", unit="tensor", leave=False, disable=None)  # None: tty only

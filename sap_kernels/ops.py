"""Op layer: fake (meta) implementations of the compiled ops, and the choice
of backend. Each op has one schema (csrc/ops.cpp); the CPU and CUDA kernels
are registered from C++, the Triton ones in sap_kernels/triton, and the
float64 reference in sap_kernels/reference.py has the same signature."""

from __future__ import annotations

import functools
import os

import torch

from . import reference
from ._extension import has_cuda_kernels, has_extension
from ._inputs import SCOPES, num_rows

_GLOBAL, _LAYER, _NEURON = SCOPES["global"], SCOPES["layer"], SCOPES["neuron"]


def _fake_units(weights, scope: int) -> int:
    if scope == _GLOBAL:
        return 1
    if scope == _LAYER:
        return len(weights)
    return sum(num_rows(w) for w in weights)


if has_extension():

    @torch.library.register_fake("sap_kernels::masked_power_sums")
    def _masked_power_sums_fake(weights, masks, p, q, scope):
        return weights[0].new_empty((_fake_units(weights, scope), 3), dtype=torch.float64)

    @torch.library.register_fake("sap_kernels::magnitude_histogram")
    def _magnitude_histogram_fake(weights, masks, scope, key_bits, prefixes, pass_index):
        return weights[0].new_empty((_fake_units(weights, scope), 65536), dtype=torch.int64)

    @torch.library.register_fake("sap_kernels::rowwise_kth_key")
    def _rowwise_kth_key_fake(weights, masks, key_bits, ks):
        return weights[0].new_empty((_fake_units(weights, _NEURON), 2), dtype=torch.int64)

    @torch.library.register_fake("sap_kernels::kth_key_by_sample")
    def _kth_key_by_sample_fake(weights, masks, scope, key_bits, k, sample_size):
        return weights[0].new_empty((_fake_units(weights, scope), 4), dtype=torch.int64)

    @torch.library.register_fake("sap_kernels::prune_masks_by_sample")
    def _prune_masks_by_sample_fake(weights, masks, scope, key_bits, count, sample_size):
        new_masks = [w.new_empty(w.shape, dtype=torch.bool) for w in weights]
        return new_masks, weights[0].new_empty((_fake_units(weights, scope), 4), dtype=torch.int64)

    @torch.library.register_fake("sap_kernels::prune_masks_by_sample_")
    def _prune_masks_by_sample_in_place_fake(weights, masks, scope, key_bits, count, sample_size):
        return weights[0].new_empty((_fake_units(weights, scope), 4), dtype=torch.int64)

    @torch.library.register_fake("sap_kernels::prune_masks")
    def _prune_masks_fake(weights, masks, scope, key_bits, threshold_keys, remove_equal):
        return [torch.empty_like(w, dtype=torch.bool) for w in weights]

    @torch.library.register_fake("sap_kernels::prune_masks_")
    def _prune_masks_in_place_fake(weights, masks, scope, key_bits, threshold_keys, remove_equal):
        return None

    @torch.library.register_fake("sap_kernels::prune_rows_")
    def _prune_rows_in_place_fake(weights, masks, key_bits, counts):
        return None

    @torch.library.register_fake("sap_kernels::apply_masks_")
    def _apply_masks_fake(weights, masks):
        return None


def _triton_ops():
    from .triton import ops as triton_ops  # imported lazily: triton is optional

    return triton_ops


def _triton_interpreter_runs_kernels() -> bool:
    from .triton.interpreter import interpreter_runs_kernels

    return interpreter_runs_kernels()


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on tensors of `device`, fastest first."""
    return list(_backends_for_device_type(torch.device(device).type))


@functools.cache
def _backends_for_device_type(device_type: str) -> tuple[str, ...]:
    names = []
    if device_type == "cuda" and not torch.cuda.is_available():
        return ("reference",)  # a CUDA build of torch on a machine without a GPU
    if device_type == "cpu" and has_extension():
        names.append("cpu")
    if device_type == "cuda" and has_cuda_kernels():
        names.append("cuda")
    # On CPU tensors Triton runs only through its interpreter (TRITON_INTERPRET=1).
    if device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            _triton_ops()
            if device_type == "cuda" or _triton_interpreter_runs_kernels():
                names.append("triton")
        except ImportError:
            pass
    names.append("reference")
    return tuple(names)


# Evaluated once at trace time, so torch.compile sees a constant backend name.
@torch.compiler.assume_constant_result
def _fastest_backend(device_type: str) -> str:
    return _backends_for_device_type(device_type)[0]


def resolve_backend(backend: str, weights: list[torch.Tensor], dtypes=None) -> str:
    """The backend that will run: `auto` picks the fastest available one.
    `dtypes`: the weights' distinct dtypes, if the caller has them."""
    from ._inputs import BACKENDS, KERNEL_DTYPES

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = weights[0].device
    if backend == "reference":
        return backend
    supported = (dtypes if dtypes is not None else {w.dtype for w in weights}) <= set(KERNEL_DTYPES)
    if backend == "auto":
        # e.g. float64: only the reference evaluates it
        return _fastest_backend(device.type) if supported else "reference"
    if not supported:
        i, w = next((i, w) for i, w in enumerate(weights) if w.dtype not in KERNEL_DTYPES)
        raise TypeError(
            f"tensors[{i}] has dtype {w.dtype}; backend={backend!r} supports float32, "
            "bfloat16 and float16 (use backend='reference' for others)"
        )
    if backend == "cpu":
        if not has_extension():
            raise RuntimeError(f"backend='cpu' needs the compiled extension: {_extension_error()}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    elif backend == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError("backend='cuda': sap_kernels was built without CUDA kernels")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    elif backend == "triton":
        try:
            _triton_ops()
        except ImportError as error:
            raise RuntimeError(f"backend='triton' is unavailable: {error}") from error
        if device.type != "cuda" and "triton" not in available_backends(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 with a Triton "
                f"whose interpreter runs the kernels), got tensors on {device}"
            )
    return backend


def _extension_error() -> str:
    from ._extension import EXTENSION_ERROR

    return EXTENSION_ERROR or "unknown error"


def masked_power_sums(backend: str, weights, masks, p: float, q: float, scope: int):
    if backend == "reference":
        return reference.masked_power_sums(weights, masks, p, q, scope)
    if backend == "triton":
        return _triton_ops().masked_power_sums(weights, masks, p, q, scope)
    return torch.ops.sap_kernels.masked_power_sums(weights, masks, p, q, scope)


def magnitude_histogram(backend: str, weights, masks, scope, key_bits, prefixes, pass_index):
    if backend == "reference":
        return reference.magnitude_histogram(weights, masks, scope, key_bits, prefixes, pass_index)
    if backend == "triton":
        return _triton_ops().magnitude_histogram(
            weights, masks, scope, key_bits, prefixes, pass_index
        )
    return torch.ops.sap_kernels.magnitude_histogram(
        weights, masks, scope, key_bits, prefixes, pass_index
    )


def rowwise_kth_key(backend: str, weights, masks, key_bits, ks):
    if backend == "reference":
        return reference.rowwise_kth_key(weights, masks, key_bits, ks)
    if backend == "triton":
        return _triton_ops().rowwise_kth_key(weights, masks, key_bits, ks)
    return torch.ops.sap_kernels.rowwise_kth_key(weights, masks, key_bits, ks)


def has_sample_select(backend: str) -> bool:
    """Whether `backend` has kth_key_by_sample (the one-pass global and layer
    selection; eager calls only)."""
    return backend in ("cpu", "triton")


def has_sample_prune(backend: str) -> bool:
    """Whether `backend` selects and prunes in one sampled pass
    (prune_masks_by_sample and its in-place form)."""
    return backend == "cpu"


def kth_key_by_sample(backend: str, weights, masks, scope, key_bits, k, sample_size):
    if not has_sample_select(backend):
        raise NotImplementedError(f"kth_key_by_sample has no {backend!r} kernel")
    if backend == "triton":
        return _triton_ops().kth_key_by_sample(weights, masks, scope, key_bits, k, sample_size)
    return torch.ops.sap_kernels.kth_key_by_sample(weights, masks, scope, key_bits, k, sample_size)


def prune_masks_by_sample(backend: str, weights, masks, scope, key_bits, count, sample_size):
    if not has_sample_prune(backend):
        raise NotImplementedError(f"prune_masks_by_sample has no {backend!r} kernel")
    return torch.ops.sap_kernels.prune_masks_by_sample(
        weights, masks, scope, key_bits, count, sample_size
    )


def prune_masks_by_sample_(backend: str, weights, masks, scope, key_bits, count, sample_size):
    if not has_sample_prune(backend):
        raise NotImplementedError(f"prune_masks_by_sample_ has no {backend!r} kernel")
    return torch.ops.sap_kernels.prune_masks_by_sample_(
        weights, masks, scope, key_bits, count, sample_size
    )


def checks_masks(backend: str) -> bool:
    """Whether the backend's ops check every mask's dtype, shape and device
    before any work or write (csrc/shards.h; the Triton ops' check_inputs)."""
    return backend in ("cpu", "cuda", "triton")


def has_in_place_prune(backend: str) -> bool:
    """Whether `backend` writes pruned masks over the old ones (prune_masks_;
    on CPU also prune_masks_by_sample_); the reference backend builds new masks
    that prune_ copies back."""
    return backend in ("cpu", "cuda", "triton")


def prune_masks_(backend: str, weights, masks, scope, key_bits, threshold_keys, remove_equal):
    if not has_in_place_prune(backend):
        raise NotImplementedError(f"prune_masks_ has no {backend!r} kernel")
    if backend == "triton":
        return _triton_ops().prune_masks_(
            weights, masks, scope, key_bits, threshold_keys, remove_equal
        )
    torch.ops.sap_kernels.prune_masks_(
        weights, masks, scope, key_bits, threshold_keys, remove_equal
    )


def has_row_prune(backend: str) -> bool:
    """Whether `backend` selects and prunes neuron-scope rows in one pass over
    the masks (prune_rows_)."""
    return backend == "cpu"


def prune_rows_(backend: str, weights, masks, key_bits, counts) -> None:
    if not has_row_prune(backend):
        raise NotImplementedError(f"prune_rows_ has no {backend!r} kernel")
    torch.ops.sap_kernels.prune_rows_(weights, masks, key_bits, counts)


def prune_masks(backend: str, weights, masks, scope, key_bits, threshold_keys, remove_equal):
    if backend == "reference":
        return reference.prune_masks(weights, masks, scope, key_bits, threshold_keys, remove_equal)
    if backend == "triton":
        return _triton_ops().prune_masks(
            weights, masks, scope, key_bits, threshold_keys, remove_equal
        )
    return torch.ops.sap_kernels.prune_masks(
        weights, masks, scope, key_bits, threshold_keys, remove_equal
    )


def apply_masks_(backend: str, weights, masks) -> None:
    if backend == "reference":
        return reference.apply_masks_(weights, masks)
    if backend == "triton":
        return _triton_ops().apply_masks_(weights, masks)
    return torch.ops.sap_kernels.apply_masks_(weights, masks)

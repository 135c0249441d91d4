"""Loads the compiled extension, if it was built, and says so if it was not."""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from sap_kernels import _C  # noqa: F401  (registers torch.ops.sap_kernels.*)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # the build is optional; the reference backend still works
    EXTENSION_ERROR = str(error)
    warnings.warn(
        "sap_kernels: the compiled extension sap_kernels._C is not available "
        f"({error}); only backend='reference' (and 'triton', if installed) will work. "
        "Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_extension() -> bool:
    """Whether sap_kernels._C (the C++ CPU kernels) was built and loaded."""
    return EXTENSION_ERROR is None


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return has_extension() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "sap_kernels::masked_power_sums", "CUDA"
    )


def cuda_table_cache_stats() -> dict[str, int] | None:
    """The CUDA ops' cache of device piece tables (csrc/cuda/piece_tables.h):
    hits, misses, entries and device bytes since start; None without CUDA kernels."""
    if not has_cuda_kernels():
        return None
    from sap_kernels import _C

    return dict(zip(("hits", "misses", "entries", "bytes"), _C.cuda_table_cache_stats()))


def clear_cuda_table_cache() -> None:
    """Drops the CUDA ops' cached piece tables (their device memory returns to
    torch's allocator); a no-op without CUDA kernels."""
    if has_cuda_kernels():
        from sap_kernels import _C

        _C.clear_cuda_table_cache()

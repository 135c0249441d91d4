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

"""Whether Triton's interpreter (TRITON_INTERPRET=1) can run the sap_kernels kernels.

Every kernel walks a chunk table with `range(first, last)` over bounds loaded
from memory. Triton 3.6's interpreter fails on such a loop ("only
0-dimensional arrays can be converted to Python scalars"); 3.9's runs it. The
compiled (GPU) path is unaffected, so only the CPU interpreter backend depends
on this probe.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_of_loaded_range_kernel(bounds, out):
    """out[c] = sum of i over bounds[c] <= i < bounds[c + 1]."""
    chunk = tl.program_id(0)
    first = tl.load(bounds + chunk)
    last = tl.load(bounds + chunk + 1)
    total = 0
    for i in range(first, last):
        total += i
    tl.store(out + chunk, total)


@functools.cache
def interpreter_runs_kernels() -> bool:
    """True when the interpreter runs a loop over loaded bounds correctly."""
    bounds = torch.tensor([0, 3, 7], dtype=torch.int64)
    out = torch.zeros(2, dtype=torch.int64)
    try:
        _sum_of_loaded_range_kernel[(2,)](bounds, out)
    except Exception:  # noqa: BLE001 - any failure means "cannot run our kernels"
        return False
    return out.tolist() == [3, 18]

"""Launching the Triton kernels: the wrapper that lets torch.compile trace a
launch and puts it on the tensors' device, and the tile sizes the ops share."""

from __future__ import annotations

import torch
from torch.library import wrap_triton

# A piece holds at most PIECE_ELEMENTS weights (so a lane sums at most
# PIECE_ELEMENTS / BLOCK float32 terms); a program walks about CHUNK_ELEMENTS.
PIECE_ELEMENTS = 1 << 15
CHUNK_ELEMENTS = 1 << 16
BLOCK = 1024


def launcher(kernel):
    """`wrap_triton(kernel)`, so torch.compile can trace the launch. Under
    TRITON_INTERPRET=1 a kernel is an InterpretedFunction, which torch 2.11's
    wrap_triton rejects (2.13's accepts); the eager launch then goes unwrapped."""
    try:
        return _OnTensorsDevice(wrap_triton(kernel))
    except RuntimeError:
        return kernel


class _OnTensorsDevice:
    """Launches on the device (and its current stream) of the first tensor
    argument: Triton launches on the current CUDA device, which need not be the
    tensors' (cuda:1 with device 0 current). Compiled graphs set their own guard."""

    def __init__(self, launcher):
        self.launcher = launcher

    def __getitem__(self, grid):
        launch = self.launcher[grid]

        def run(*args, **kwargs):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type != "cuda" or torch.compiler.is_compiling():
                return launch(*args, **kwargs)
            with torch.cuda.device(device):
                return launch(*args, **kwargs)

        return run

"""On a GPU: torch.library.opcheck of the CUDA and Triton ops on CUDA tensors,
and the public API under torch.compile(fullgraph=True) with Inductor on each
GPU backend. Skipped without CUDA: opcheck of a Triton op traces it with fake
tensors, which Triton's CPU interpreter cannot run."""

from __future__ import annotations

import pytest
import torch
from conftest import random_weights

import sap_kernels
from sap_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def gpu_backends() -> list[str]:
    return [b for b in sap_kernels.available_backends(CUDA) if b in ("cuda", "triton")]


def sample_inputs(generator, dtype=torch.bfloat16):
    weights = [
        random_weights((17, 9), dtype, "ties", generator),
        random_weights((5,), dtype, "ties", generator),
        random_weights((6, 4), dtype, "ties", generator).t(),  # permuted strides
    ]
    masks = [torch.rand(w.shape, generator=generator) > 0.3 for w in weights]
    return [w.to(CUDA) for w in weights], [m.to(CUDA) for m in masks]


def op_calls(prefix: str, weights, masks):
    """(op, args) for every op of one GPU backend ('' for CUDA, 'triton_')."""
    ops = torch.ops.sap_kernels
    key = reference.magnitude_keys(weights[0].cpu(), 16).flatten().median()
    key = key.reshape(1).to(CUDA)
    zero = torch.zeros(1, dtype=torch.int64, device=CUDA)
    # k = 1 where a row retains a weight, else 0
    ks = torch.cat([m.reshape(m.shape[0], -1).sum(1).clamp(max=1) for m in masks])
    calls = [
        (getattr(ops, f"{prefix}masked_power_sums"), (weights, masks, 0.5, 1.0, 2)),
        (getattr(ops, f"{prefix}masked_power_sums"), (weights, masks, 0.7, 1.3, 0)),
        (
            getattr(ops, f"{prefix}magnitude_histogram"),
            (weights, masks, 0, 16, torch.zeros(1, dtype=torch.int64, device=CUDA), 0),
        ),
        (
            getattr(ops, f"{prefix}rowwise_kth_key"),
            (weights, masks, 16, ks),
        ),
        (getattr(ops, f"{prefix}prune_masks"), (weights, masks, 0, 16, key, zero)),
        (
            getattr(ops, f"{prefix}prune_masks_"),
            (weights, [m.clone().contiguous() for m in masks], 0, 16, key, zero),
        ),
        (getattr(ops, f"{prefix}apply_masks_"), ([w.clone() for w in weights], masks)),
    ]
    return calls


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_opcheck_gpu_ops(backend, generator):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend!r} is not available")
    weights, masks = sample_inputs(generator)
    for op, args in op_calls("" if backend == "cuda" else "triton_", weights, masks):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("scope", ["global", "layer", "neuron"])
def test_compiled_api_on_gpu_matches_eager(backend, scope, generator):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend!r} is not available")
    weights, masks = sample_inputs(generator, torch.float32)
    weights = [w.contiguous() for w in weights]
    masks = [m.contiguous() for m in masks]
    for m in masks:
        m.reshape(m.shape[0], -1)[:, 0] = True  # every row keeps a weight: k = 1 is valid
    code = {"global": 0, "layer": 1, "neuron": 2}[scope]
    counts = reference.masked_power_sums(weights, masks, 1.0, 2.0, code)[:, 2].long().cpu() // 2

    def step(ws, ms):
        value = sap_kernels.pqi(ws, ms, scope=scope, backend=backend)
        new = sap_kernels.prune(ws, ms, counts, scope=scope, backend=backend)
        threshold = sap_kernels.magnitude_threshold(ws, 1, ms, scope=scope, backend=backend)
        return value, new, threshold

    compiled = torch.compile(step, fullgraph=True)
    eager = step(weights, masks)
    got = compiled(weights, masks)

    def flat(x):
        if isinstance(x, (list, tuple)):
            return torch.cat([t.reshape(-1).double() for t in x])
        return x.reshape(-1).double()

    torch.testing.assert_close(flat(got[0]), flat(eager[0]), rtol=0, atol=1e-12, equal_nan=True)
    assert all(torch.equal(a, b) for a, b in zip(got[1], eager[1]))
    assert torch.equal(flat(got[2]), flat(eager[2]))


BAD_COMPILED_CALLS = {
    "pqi-nan": "sap_kernels.pqi(ws, None, backend=B)",
    "threshold-k-too-large": "sap_kernels.magnitude_threshold(ws, 10**6, backend=B)",
    "layer-k-0": "sap_kernels.magnitude_threshold(ws, 0, scope='layer', backend=B)",
    "neuron-k-too-large": "sap_kernels.magnitude_threshold(ws, 99, scope='neuron', backend=B)",
    "prune-negative": "sap_kernels.prune(ws, None, -1, backend=B)",
}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", sorted(BAD_COMPILED_CALLS))
def test_compiled_api_on_gpu_stops_on_bad_input(backend, case, tmp_path):
    """Inside a compiled graph the checks that need a host copy become
    assertions (a device-side assert on CUDA, which ends the process: hence a
    subprocess). A compiled call with bad input must not return a value."""
    import subprocess
    import sys

    if backend not in gpu_backends():
        pytest.skip(f"backend {backend!r} is not available")
    script = tmp_path / "bad_call.py"
    script.write_text(
        "import torch, sap_kernels\n"
        f"B = {backend!r}\n"
        "ws = [torch.randn(40, 30, device='cuda'), torch.randn(25, device='cuda')]\n"
        + ("ws[0][3, 4] = float('nan')\n" if case == "pqi-nan" else "")
        + f"f = torch.compile(lambda ws: {BAD_COMPILED_CALLS[case]}, fullgraph=True)\n"
        "out = f(ws)\n"
        "torch.cuda.synchronize()\n"
        "print('RETURNED', out)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0 and "RETURNED" not in done.stdout, done.stdout + done.stderr
    assert "sap_kernels" in done.stderr or "device-side assert" in done.stderr, done.stderr[-2000:]

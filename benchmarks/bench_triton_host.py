"""Host time of the Triton ops: the Python bookkeeping around the launches.

A billion float32 weights are 4 GB: at an H100's nominal 3.35 TB/s (datasheet
arithmetic, not a measurement) a pass takes about 1.2 ms, so host work of a
millisecond decides the call's time: the launch waits for it. This
times each Triton op's Python side on LLM-shaped tensors with the kernel
launches replaced by no-ops, so it runs on any machine (CPU tensors, no GPU):
"cold" builds the piece tables, "warm" finds them in the layout cache, as a
training loop does from its second step on. The tensors are never written, so
their values do not matter (torch.empty).

    python benchmarks/bench_triton_host.py                 # 1e9 parameters
    python benchmarks/bench_triton_host.py --params 7e9 --out benchmarks/results/triton-host-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors (nothing is launched)

import torch  # noqa: E402

from sap_kernels import benchmarking  # noqa: E402

GLOBAL, LAYER, NEURON = 0, 1, 2


class _NoLaunch:
    """Stands in for launcher(kernel)[grid]: the call returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _median_ms(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    try:
        from sap_kernels.triton import _pieces
        from sap_kernels.triton import ops as triton_ops
    except ImportError as error:
        print(f"Triton is not available: {error}")
        return 1
    launcher = triton_ops.launcher
    triton_ops.launcher = lambda kernel: _NoLaunch()
    try:
        return _run(args, triton_ops, _pieces)
    finally:
        triton_ops.launcher = launcher


def _run(args, triton_ops, _pieces) -> int:

    dtype = getattr(torch, args.dtype)
    key_bits = 32 if dtype == torch.float32 else 16
    shape = benchmarking.shape_for_params(args.params)
    shapes = [dims for _, dims in shape.tensor_shapes()]
    weights = [torch.empty(dims, dtype=dtype) for dims in shapes]
    masks = [torch.ones(dims, dtype=torch.bool) for dims in shapes]
    params = sum(w.numel() for w in weights)
    nones = [None] * len(weights)
    zero = torch.zeros(1, dtype=torch.int64)  # prefixes, threshold keys, quotas
    sums, histogram = triton_ops.masked_power_sums, triton_ops.magnitude_histogram
    calls = {
        "masked_power_sums global": lambda: sums(weights, nones, 0.5, 1.0, GLOBAL),
        "masked_power_sums global, masked": lambda: sums(weights, masks, 0.5, 1.0, GLOBAL),
        "masked_power_sums layer": lambda: sums(weights, nones, 0.5, 1.0, LAYER),
        "masked_power_sums neuron": lambda: sums(weights, nones, 0.5, 1.0, NEURON),
        "magnitude_histogram global": lambda: histogram(weights, masks, GLOBAL, key_bits, zero, 0),
        "prune_masks_ global": lambda: triton_ops.prune_masks_(
            weights, masks, GLOBAL, key_bits, zero, zero
        ),
        "apply_masks_": lambda: triton_ops.apply_masks_(weights, masks),
    }
    rows = []
    print(f"{params / 1e9:.2f}B {args.dtype} parameters in {len(weights)} tensors; "
          f"Triton ops with launches stubbed, median of {args.repeats}")  # fmt: skip
    print("| op | cold ms | warm ms |")
    print("|---|---:|---:|")
    for name, call in calls.items():
        cold = _median_ms(call, args.repeats, before=_pieces.layout_cache.clear)
        call()
        warm = _median_ms(call, args.repeats)
        rows.append({"op": name, "cold_ms": cold, "warm_ms": warm})
        print(f"| {name} | {cold:.2f} | {warm:.2f} |")
    if args.out:
        meta = {
            "date": date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "params": params,
            "tensors": len(weights),
            "dtype": args.dtype,
            "repeats": args.repeats,
        }
        with open(f"{args.out}.json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(f"{args.out}.md", "w") as f:
            f.write(f"# Triton host time per call ({meta['date']})\n\n")
            f.write(f"{params / 1e9:.2f}B {args.dtype} parameters in {len(weights)} tensors, "
                    f"kernel launches stubbed (CPU tensors), torch {meta['torch']}, median of "
                    f"{args.repeats}.\nCommand: `python benchmarks/bench_triton_host.py "
                    f"--params {args.params:g} --out {args.out}`\n\n")  # fmt: skip
            f.write("| op | cold ms (tables built) | warm ms (layout cache) |\n|---|---:|---:|\n")
            for row in rows:
                f.write(f"| {row['op']} | {row['cold_ms']:.2f} | {row['warm_ms']:.2f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-tensor overhead: the same weights as one tensor and as many tiny ones.

DESIGN.md asks that thousands of tiny tensors cost no more per weight than one
big tensor; this measures how far the public API is from that.

    python benchmarks/bench_many_tensors.py                       # 20M weights, 20,000 x 1,000
    python benchmarks/bench_many_tensors.py --tensors 100000 --size 200
"""

from __future__ import annotations

import argparse

import torch

import sap_kernels
from sap_kernels.benchmarking import median_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1_000, help="weights per tiny tensor")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(args.tensors * args.size, generator=generator)
    flat_mask = torch.rand(flat.shape, generator=generator) >= 0.5
    layouts = {
        "one tensor": ([flat], [flat_mask]),
        f"{args.tensors:,} tensors": (
            list(flat.split(args.size)),
            list(flat_mask.split(args.size)),
        ),
    }
    k = flat.numel() // 4  # at most the retained half
    ops = {
        "pqi": lambda ws, ms: sap_kernels.pqi(ws),
        "magnitude_threshold": lambda ws, ms: sap_kernels.magnitude_threshold(ws, k),
        "prune": lambda ws, ms: sap_kernels.prune(ws, None, k),
        "pqi, 50% masked": lambda ws, ms: sap_kernels.pqi(ws, ms),
        "magnitude_threshold, masked": lambda ws, ms: sap_kernels.magnitude_threshold(ws, k, ms),
        "prune, masked": lambda ws, ms: sap_kernels.prune(ws, ms, k),
    }
    print(f"{flat.numel():,} float32 weights, {torch.get_num_threads()} threads")
    print("| op | " + " | ".join(f"{name} ms" for name in layouts) + " | ratio |")
    print("|---|" + "---:|" * (len(layouts) + 1))
    for op, call in ops.items():
        times = [
            median_time(lambda ws=ws, ms=ms: call(ws, ms), args.repeats)[0] * 1e3
            for ws, ms in layouts.values()
        ]
        cells = " | ".join(f"{t:.1f}" for t in times)
        print(f"| {op} | {cells} | {times[-1] / times[0]:.1f}× |")


if __name__ == "__main__":
    main()

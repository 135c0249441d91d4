"""Global float32 selection on CPU: the radix select (two histogram passes, then
a mask pass for pruning) against the one-pass sampled select
(kth_key_by_sample / prune_masks_by_sample), interleaved in one run so that
machine drift hits both alike.

    python benchmarks/bench_select_paths.py                 # 2.7e8 params (~1 GB)
    python benchmarks/bench_select_paths.py --params 3e7 --rounds 5
"""

from __future__ import annotations

import argparse
import time

import torch

import sap_kernels
from sap_kernels import ops, selection
from sap_kernels.benchmarking import llm_shaped_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2.7e8)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved timed rounds")
    parser.add_argument("--fraction", type=float, default=0.2, help="k as a fraction of n")
    args = parser.parse_args()

    _, weights = llm_shaped_weights(args.params, dtype=torch.float32)
    masks = [None] * len(weights)
    n = sum(w.numel() for w in weights)
    k = torch.tensor([max(1, int(n * args.fraction))])
    sample = selection._sample_size(1, "cpu", weights)  # what the API samples on CPU

    def radix_threshold():
        return selection._select_radix(
            "cpu", weights, masks, 0, 32, k, None, "k", False, str, 0x7F80
        )

    def radix_prune():
        keys, below = radix_threshold()
        return ops.prune_masks("cpu", weights, masks, 0, 32, keys, k - below)

    methods = {
        "probe (torch.sum)": lambda: [w.sum() for w in weights],
        "threshold, radix (2 passes)": radix_threshold,
        "threshold, sampled (1 pass)": lambda: ops.kth_key_by_sample(
            "cpu", weights, masks, 0, 32, k, sample
        ),
        "prune, radix + mask pass": radix_prune,
        "prune, sampled (1 pass)": lambda: ops.prune_masks_by_sample(
            "cpu", weights, masks, 0, 32, k, sample
        ),
        "sap_kernels.prune (API)": lambda: sap_kernels.prune(weights, None, int(k)),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        method()  # warm-up
    for _ in range(args.rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            result = method()
            times[name].append(time.perf_counter() - start)
            del result
    probe = sorted(times["probe (torch.sum)"])[args.rounds // 2]
    print(f"{n:,} float32 weights, k = {int(k):,}, {torch.get_num_threads()} threads")
    print("| method | median ms | min ms | × probe |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        values.sort()
        median = values[args.rounds // 2]
        print(f"| {name} | {median * 1e3:.1f} | {values[0] * 1e3:.1f} | {median / probe:.2f} |")


if __name__ == "__main__":
    main()

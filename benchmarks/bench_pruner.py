"""Pruner.prune and the training-loop mask calls on LLM-shaped weights (CPU).

For each scope: `Pruner.prune()` with SAP (gamma=0.1, so that every iteration
still prunes) on a module holding the weights with dim > 1 of
`llm_shaped_weights(params)`; median over --repeats iterations after one
warm-up, each pruning what the previous one left, as in training. Then the
eager `Pruner.apply_masks_()` and `mask_gradients_()` against the
`masked_fill_(~mask, 0)` loop they replace, and the torch.sum probe, all in
the same process.

    python benchmarks/bench_pruner.py                  # 2.7e8 params (~1 GB float32)
    python benchmarks/bench_pruner.py --params 3e7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from sap_kernels.benchmarking import llm_shaped_weights, median_time, sum_probe
from sap_kernels.sap import Pruner, SAPPolicy

SCOPES = ("global", "layer", "neuron")


def _module(weights) -> nn.Module:
    module = nn.Module()
    for i, w in enumerate(weights):
        module.register_parameter(f"layer{i}_weight", nn.Parameter(w.clone()))
    return module


def _pruner_rows(weights, repeats: int, progress) -> list[dict]:
    rows = []
    for scope in SCOPES:
        pruner = Pruner(_module(weights), SAPPolicy(scope=scope, gamma=0.1), backend="cpu")
        pruner.prune()  # warm-up: the first iteration prunes dense weights
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pruner.prune()
            times.append(time.perf_counter() - start)
        rows.append(_row(f"Pruner.prune() ({scope})", sorted(times), pruner.density()))
        progress.update()
    return rows


def _mask_rows(weights, repeats: int, progress) -> list[dict]:
    pruner = Pruner(_module(weights), SAPPolicy(gamma=0.5), backend="cpu")
    pruner.prune()
    params, masks = pruner.parameters, pruner.masks
    for p in params:
        p.grad = torch.randn_like(p)

    def masked_fill_loop():
        with torch.no_grad():
            for p, m in zip(params, masks):
                p.masked_fill_(~m, 0)

    rows = []
    for name, fn in (
        ("Pruner.apply_masks_() (fused kernel)", pruner.apply_masks_),
        ("masked_fill_(~mask, 0) loop", masked_fill_loop),
        ("Pruner.mask_gradients_() (fused kernel)", pruner.mask_gradients_),
        ("torch.sum probe", sum_probe(params)),
    ):
        _, times = median_time(fn, repeats=repeats, warmup=1)
        rows.append(_row(name, sorted(times), pruner.density()))
        progress.update()
    return rows


def _row(name: str, times: list[float], density: float) -> dict:
    return {
        "method": name,
        "median_ms": 1e3 * times[len(times) // 2],
        "times_ms": [1e3 * t for t in times],
        "density_after": density,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2.7e8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    _, tensors = llm_shaped_weights(args.params)
    weights = [t for t in tensors if t.dim() > 1]  # Pruner's default filter
    del tensors
    count = sum(w.numel() for w in weights)
    print(f"{len(weights)} weights, {count / 1e6:.1f}M params, float32", file=sys.stderr)
    with tqdm(total=len(SCOPES) + 4, desc="bench_pruner", file=sys.stderr) as progress:
        rows = _pruner_rows(weights, args.repeats, progress)
        rows += _mask_rows(weights, args.repeats, progress)
    probe = rows[-1]["median_ms"]
    print("| method | median ms | × probe |\n|---|---:|---:|")
    for row in rows:
        row["x_probe"] = row["median_ms"] / probe
        print(f"| {row['method']} | {row['median_ms']:.1f} | {row['x_probe']:.2f} |")
    if args.json:
        result = {
            "benchmark": "Pruner.prune per scope and the eager mask calls",
            "params": count,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "repeats": args.repeats,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

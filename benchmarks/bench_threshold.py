"""Global magnitude threshold and pruning: sap_kernels against what users write
today, on LLM-shaped shards, with the torch.sum bandwidth probe in the same run.

    python benchmarks/bench_threshold.py                      # 2.7e8 params (>= 1 GB float32)
    python benchmarks/bench_threshold.py --params 3e7 --repeats 3 --json out.json

Methods (k = 20% of the weights, the smallest magnitudes):
  probe            [t.sum() for t in shards]: reads every byte once
  sap threshold    sap_kernels.magnitude_threshold(shards, k)
  sap prune        sap_kernels.prune(shards, None, k) -> new bool masks
  sap prune_       sap_kernels.prune_(shards, masks, k) on all-True masks, in place
                   (timed with the masks' reset, which is timed alone as well)
  sap prune_masks  the mask pass alone (torch.ops.sap_kernels.prune_masks)
  sap apply_masks_ sap_kernels.apply_masks_(shards, masks)
  kthvalue         torch.cat of |w| + torch.kthvalue
  topk             torch.cat of |w| + torch.topk(k, largest=False)
  global_unstructured  torch.nn.utils.prune.global_unstructured(L1Unstructured, amount=k),
                   at --baseline-params (it is slow and needs ~10x the weights in memory),
                   compared with sap prune at that same size.
Times are medians of --repeats runs after one warm-up (the concatenating
baselines use fewer runs and no warm-up: see the "runs" column). Memory is the
peak growth of resident memory during one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import sap_kernels
from sap_kernels.benchmarking import (
    bytes_of,
    llm_shaped_weights,
    median_time,
    peak_rss_growth,
    sum_probe,
)

MB = 1 << 20


def measure(rows, name, dtype, params, fn, repeats, warmup, weight_bytes, output_bytes=0):
    gc.collect()
    seconds, _ = median_time(fn, repeats=repeats, warmup=warmup)
    growth = peak_rss_growth(fn)
    row = {
        "method": name,
        "dtype": str(dtype).removeprefix("torch."),
        "params": params,
        "ms": seconds * 1e3,
        "runs": repeats,
        "rss_mb": growth / MB,
        "rss_pct_weights": 100.0 * growth / weight_bytes,
        "output_mb": output_bytes / MB,
    }
    rows.append(row)
    print(f"  {name:24s} {row['ms']:10.1f} ms   +{row['rss_mb']:8.1f} MB", flush=True)
    return row


def concatenated_magnitudes(shards):
    flat = torch.cat([t.reshape(-1) for t in shards])
    return flat.abs_()


def run_dtype(rows, dtype, params, repeats, slow_repeats):
    _, shards = llm_shaped_weights(params, dtype=dtype)
    n = sum(t.numel() for t in shards)
    k = int(0.2 * n)
    weight_bytes = bytes_of(shards)
    print(
        f"{dtype}: {len(shards)} shards, {n / 1e6:.1f}M params, {weight_bytes / MB:.0f} MB, k={k}"
    )
    common = dict(dtype=dtype, params=n, weight_bytes=weight_bytes)

    threshold = sap_kernels.magnitude_threshold(shards, k, backend="cpu")
    expected = concatenated_magnitudes(shards).kthvalue(k).values
    assert torch.equal(threshold, expected), (threshold, expected)
    masks = sap_kernels.prune(shards, None, k, backend="cpu")
    assert sum(int((~m).sum()) for m in masks) == k
    mask_bytes = bytes_of(masks)

    measure(rows, "probe (torch.sum)", fn=sum_probe(shards), repeats=repeats, warmup=1, **common)
    measure(
        rows,
        "sap threshold",
        fn=lambda: sap_kernels.magnitude_threshold(shards, k, backend="cpu"),
        repeats=repeats,
        warmup=1,
        **common,
    )
    measure(
        rows,
        "sap prune",
        fn=lambda: sap_kernels.prune(shards, None, k, backend="cpu"),
        repeats=repeats,
        warmup=1,
        output_bytes=mask_bytes,
        **common,
    )
    # in place on all-True masks, as Pruner does; each run first resets them
    in_place = [torch.ones_like(t, dtype=torch.bool) for t in shards]

    def reset_masks():
        for m in in_place:
            m.fill_(True)

    def reset_and_prune_():
        reset_masks()
        sap_kernels.prune_(shards, in_place, k, backend="cpu")

    measure(rows, "masks.fill_(True)", fn=reset_masks, repeats=repeats, warmup=1, **common)
    measure(
        rows,
        "sap prune_ + fill_(True)",
        fn=reset_and_prune_,
        repeats=repeats,
        warmup=1,
        **common,
    )
    in_place = None
    key_bits = 16 if dtype != torch.float32 else 32
    keys = threshold.reshape(1).view(torch.int16 if key_bits == 16 else torch.int32).long()
    below = sum(int((t.abs() < threshold).sum()) for t in shards)
    remove = torch.tensor([k - below])
    measure(
        rows,
        "sap prune_masks (pass)",
        fn=lambda: torch.ops.sap_kernels.prune_masks(shards, [], 0, key_bits, keys, remove),
        repeats=repeats,
        warmup=1,
        output_bytes=mask_bytes,
        **common,
    )
    work = [t.clone() for t in shards]
    measure(
        rows,
        "sap apply_masks_",
        fn=lambda: sap_kernels.apply_masks_(work, masks, backend="cpu"),
        repeats=repeats,
        warmup=1,
        **common,
    )
    work = masks = None  # freed before the concatenating baselines
    measure(
        rows,
        "kthvalue (cat)",
        fn=lambda: concatenated_magnitudes(shards).kthvalue(k),
        repeats=slow_repeats,
        warmup=0,
        **common,
    )
    measure(
        rows,
        "topk (cat)",
        fn=lambda: torch.topk(concatenated_magnitudes(shards), k, largest=False, sorted=False),
        repeats=max(1, slow_repeats - 1),
        warmup=0,
        **common,
    )


class _Holder(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


def run_global_unstructured(rows, params, repeats, slow_repeats):
    _, shards = llm_shaped_weights(params, dtype=torch.float32)
    n = sum(t.numel() for t in shards)
    k = int(0.2 * n)
    weight_bytes = bytes_of(shards)
    print(f"global_unstructured size: {n / 1e6:.1f}M params, {weight_bytes / MB:.0f} MB")
    common = dict(dtype=torch.float32, params=n, weight_bytes=weight_bytes)

    def torch_global_unstructured():
        holders = [_Holder(t) for t in shards]
        torch_prune.global_unstructured(
            [(h, "weight") for h in holders], pruning_method=torch_prune.L1Unstructured, amount=k
        )
        return [h.weight_mask for h in holders]

    ours = sap_kernels.prune(shards, None, k, backend="cpu")
    theirs = torch_global_unstructured()
    # Same count removed; which of several equal magnitudes goes is not specified by torch.
    assert sum(int((m == 0).sum()) for m in theirs) == k
    assert sum(int((~m).sum()) for m in ours) == k
    del ours, theirs
    measure(rows, "probe (torch.sum)", fn=sum_probe(shards), repeats=repeats, warmup=1, **common)
    measure(
        rows,
        "sap prune",
        fn=lambda: sap_kernels.prune(shards, None, k, backend="cpu"),
        repeats=repeats,
        warmup=1,
        output_bytes=n,
        **common,
    )
    measure(
        rows,
        "global_unstructured",
        fn=torch_global_unstructured,
        repeats=slow_repeats,
        warmup=0,
        **common,
    )


def speedups(rows):
    """Adds x_probe (time / probe time) and speedup (baseline time / sap time of
    the same kind) to each row."""
    for row in rows:
        same = [r for r in rows if r["dtype"] == row["dtype"] and r["params"] == row["params"]]
        probe = next(r for r in same if r["method"].startswith("probe"))
        row["x_probe"] = row["ms"] / probe["ms"]
        ours = "sap prune" if row["method"] in ("topk (cat)", "global_unstructured") else None
        if row["method"] == "kthvalue (cat)":
            ours = "sap threshold"
        row["speedup"] = None
        if ours:
            sap = next(r for r in same if r["method"] == ours)
            row["speedup"] = row["ms"] / sap["ms"]
            row["speedup_vs"] = ours


def markdown(rows) -> str:
    lines = [
        "| dtype | params | method | runs | median ms | × probe | sap speed-up | peak RSS growth "
        "(MB) | % of weights | of which output (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r['speedup']:.1f}× (vs {r['speedup_vs']})" if r["speedup"] else ""
        lines.append(
            f"| {r['dtype']} | {r['params'] / 1e6:.0f}M | {r['method']} | {r['runs']} | "
            f"{r['ms']:.1f} | {r['x_probe']:.2f} | {speedup} | {r['rss_mb']:.1f} | "
            f"{r['rss_pct_weights']:.1f}% | {r['output_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2.7e8, help="model size (2.7e8 ~ 1 GB)")
    parser.add_argument(
        "--baseline-params",
        type=float,
        default=3e7,
        help="size for torch.nn.utils.prune.global_unstructured",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per sap/probe method")
    parser.add_argument(
        "--slow-repeats", type=int, default=3, help="timed runs for the concatenating baselines"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not sap_kernels.has_extension():
        print("sap_kernels._C is not built: nothing to benchmark", file=sys.stderr)
        return 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}")
    rows = []
    for name in args.dtypes.split(","):
        run_dtype(rows, getattr(torch, name), args.params, args.repeats, args.slow_repeats)
        gc.collect()
    if args.baseline_params > 0:
        run_global_unstructured(rows, args.baseline_params, args.repeats, args.slow_repeats)
    speedups(rows)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "load_average_start": load,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

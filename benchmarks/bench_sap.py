"""One SAP iteration on LLM-shaped shards: sap_kernels vs the paper's code.

The step: PQI of the retained weights -> r_t, c_t -> remove the c_t smallest
retained magnitudes -> zero the pruned weights in place (global scope, the
paper's defaults p=0.5, q=1, eta_r=0, gamma=1, beta=0.9).

* sap_kernels: `pq_sums` (fused masked power sums, float64) -> `sap_counts` ->
  `prune_` (exact selection, ties in flat order, masks written in place, as
  `Pruner` does) -> `apply_masks_`.
* paper: as in the authors' `Compression.compress` (global scope):
  `torch.cat([w[mask].abs()])`, norms of the concatenation, `torch.sort`,
  pivot = sorted[c_t], new mask = mask & ~(|w| < pivot) (a strict `<`
  threshold), then `torch.where` for the weights.

Both start from the same weights and random masks of density 0.8 (an
iteration after the first); every timed run starts from that state again.

    python benchmarks/bench_sap.py --params 2.7e8            # >= 1 GB of float32
    python benchmarks/bench_sap.py --params 3e7 --backend reference
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import sap_kernels
from sap_kernels.benchmarking import (
    bytes_of,
    llm_shaped_weights,
    peak_rss_growth,
    random_masks,
    sum_probe,
)
from sap_kernels.sap import sap_counts

P, Q, ETA_R, GAMMA, BETA = 0.5, 1.0, 0.0, 1.0, 0.9


def sap_kernels_step(weights, masks, pqi_backend: str, select_backend: str):
    """PQI -> counts -> exact prune (in place, as Pruner does) -> apply masks;
    returns (pqi, c_t, the updated masks)."""
    sums = sap_kernels.pq_sums(weights, masks, p=P, q=Q, backend=pqi_backend)
    unit_pqi = sap_kernels.pqi_from_sums(sums.sum_p, sums.sum_q, sums.count, P, Q).reshape(1)
    _, counts = sap_counts(
        unit_pqi, sums.count.reshape(1).long(), p=P, q=Q, eta_r=ETA_R, gamma=GAMMA, beta=BETA
    )
    new_masks = sap_kernels.prune_(weights, masks, counts, scope="global", backend=select_backend)
    sap_kernels.apply_masks_(weights, new_masks, backend=select_backend)
    return float(unit_pqi[0]), int(counts[0]), new_masks


def paper_step(weights, masks):
    """The authors' global-scope code path, written out."""
    magnitudes = torch.cat([w[m].abs().view(-1) for w, m in zip(weights, masks)])
    d = magnitudes.numel()
    norm_p = torch.linalg.vector_norm(magnitudes, P)
    norm_q = torch.linalg.vector_norm(magnitudes, Q)
    pqi = 1 - d ** (1 / Q - 1 / P) * norm_p / norm_q
    bound = d * (1 + ETA_R) ** (Q / (P - Q)) * (1 - pqi) ** ((Q * P) / (Q - P))
    bound = torch.ceil(bound).long()
    prune_ratio = torch.clamp(GAMMA * (1 - bound / d), 0, BETA)
    count = torch.floor(d * prune_ratio).long()
    pivot = torch.sort(magnitudes)[0][count]
    del magnitudes
    new_masks = []
    for w, m in zip(weights, masks):
        new = torch.where(w.abs() < pivot, False, m)
        w.data = torch.where(new, w, torch.tensor(0, dtype=w.dtype))
        new_masks.append(new)
    return float(pqi), int(count), new_masks


METHODS = {
    "sap_kernels": lambda w, m, pb, sb: lambda: sap_kernels_step(w, m, pb, sb),
    "paper (cat + sort + '<')": lambda w, m, pb, sb: lambda: paper_step(w, m),
    "torch.sum probe": lambda w, m, pb, sb: sum_probe(w),
}


def _setup(args):
    names, tensors = llm_shaped_weights(params=args.params)
    weights = [t for n, t in zip(names, tensors) if t.dim() > 1]  # the default filter
    del tensors
    masks = random_masks(weights, density=0.8)
    sap_kernels.apply_masks_(weights, masks, backend="reference")
    select_backend = args.backend
    has_cpu_prune = torch._C._dispatch_has_kernel_for_dispatch_key(
        "sap_kernels::prune_masks", "CPU"
    )
    if select_backend == "auto" and not has_cpu_prune:
        select_backend = "reference"
    return weights, masks, select_backend


def _peak_in_fresh_process(label: str, args) -> int:
    command = [sys.executable, __file__, "--params", str(args.params), "--backend", args.backend]
    out = subprocess.run(command + ["--peak-of", label], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_bytes"]


def _restore(tensors, saved) -> None:
    for t, s in zip(tensors, saved):
        t.copy_(s)


def _median_from_state(fn, weights, masks, saved, saved_masks, repeats: int):
    """Median over `repeats` timed runs (after one warm-up), each from the same
    weights and masks: a step prunes the masks and zeroes pruned weights in
    place, and the next step would otherwise find them retained-and-zero under
    the unchanged masks (ties)."""
    times = []
    for _ in range(repeats + 1):
        _restore(weights, saved)
        _restore(masks, saved_masks)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2], times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=2.7e8)
    parser.add_argument("--backend", default="auto", help="selection backend (prune, apply)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write machine-readable results here")
    parser.add_argument("--peak-of", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    weights, masks, select_backend = _setup(args)
    pqi_backend = "auto"
    if args.peak_of:  # a fresh process: the allocator has cached nothing yet
        fn = METHODS[args.peak_of](weights, masks, pqi_backend, select_backend)
        print(json.dumps({"peak_rss_growth_bytes": peak_rss_growth(fn)}))
        return 0
    size = bytes_of(weights)
    print(
        f"{len(weights)} shards, {sum(w.numel() for w in weights):,} weights, "
        f"{size / 2**30:.2f} GiB float32; selection backend: {select_backend}"
    )

    # agreement on the first step, from the same state
    saved, saved_masks = [w.clone() for w in weights], [m.clone() for m in masks]
    ours_pqi, ours_count, ours_masks = sap_kernels_step(weights, masks, pqi_backend, select_backend)
    ours_masks = [m.clone() for m in ours_masks]
    _restore(weights, saved)
    _restore(masks, saved_masks)
    paper_pqi, paper_count, paper_masks = paper_step(weights, masks)
    removed_ours = sum(int((m & ~n).sum()) for m, n in zip(masks, ours_masks))
    removed_paper = sum(int((m & ~n).sum()) for m, n in zip(masks, paper_masks))
    same_masks = all(torch.equal(a, b) for a, b in zip(ours_masks, paper_masks))
    del ours_masks, paper_masks

    rows = {}
    for label, make in METHODS.items():
        fn = make(weights, masks, pqi_backend, select_backend)
        seconds, times = _median_from_state(fn, weights, masks, saved, saved_masks, args.repeats)
        peak = _peak_in_fresh_process(label, args)
        rows[label] = {"median_s": seconds, "times_s": times, "peak_rss_growth_bytes": peak}
        print(f"{label:28s} median {seconds:8.3f} s   peak RSS growth {peak / 2**20:9.1f} MiB")

    ours, paper = rows["sap_kernels"], rows["paper (cat + sort + '<')"]
    ratio = paper["median_s"] / ours["median_s"]
    print(
        f"\nspeed-up (paper / sap_kernels): {ratio:.2f}x; peak memory "
        f"{ours['peak_rss_growth_bytes'] / 2**20:.0f} MiB vs "
        f"{paper['peak_rss_growth_bytes'] / 2**20:.0f} MiB ({size / 2**20:.0f} MiB of weights)"
    )
    print(
        f"first step: PQI {ours_pqi:.10f} (float64) vs {paper_pqi:.10f} (paper, float32); "
        f"c_t {ours_count:,} vs {paper_count:,}; removed {removed_ours:,} vs {removed_paper:,}; "
        f"identical masks: {same_masks}"
    )
    result = {
        "benchmark": "one SAP iteration, global scope",
        "params": sum(w.numel() for w in weights),
        "bytes": size,
        "pqi_backend": pqi_backend,
        "selection_backend": select_backend,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "speedup_paper_over_sap_kernels": ratio,
        "first_step": {
            "pqi": [ours_pqi, paper_pqi],
            "count": [ours_count, paper_count],
            "removed": [removed_ours, removed_paper],
            "identical_masks": same_masks,
            "pqi_abs_difference": abs(ours_pqi - paper_pqi) if math.isfinite(paper_pqi) else None,
        },
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

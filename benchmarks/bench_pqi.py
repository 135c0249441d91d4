"""PQ Index on LLM-shaped shards: sap_kernels vs pure PyTorch, in one run.

Columns: sap_kernels (cpu, and triton/cuda when available), eager PyTorch
written two ways (concatenate, per-tensor loop), torch.compile'd PyTorch, and
the bandwidth probe (torch.sum over the same shards). Median of --repeats runs.

    python benchmarks/bench_pqi.py                 # ~1 GB float32, CPU
    python benchmarks/bench_pqi.py --params 1e8 --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import sap_kernels
from sap_kernels.benchmarking import (
    bytes_of,
    llm_shaped_weights,
    median_time,
    random_masks,
    sum_probe,
)
from sap_kernels.sparsity import pqi_from_sums

EXPONENTS = [(0.5, 1.0), (0.7, 1.3)]


def eager_concatenate(weights, masks, p, q):
    """What users write today: one big vector, two norms (float32)."""
    flat = torch.cat([w[m] if m is not None else w.reshape(-1) for w, m in zip(weights, masks)])
    d = flat.numel()
    ratio = torch.linalg.vector_norm(flat, p) / torch.linalg.vector_norm(flat, q)
    return 1 - d ** (1 / q - 1 / p) * ratio


def eager_loop(weights, masks, p, q):
    """Per-tensor loop with float64 accumulation of float32 powers."""
    sp = sq = d = 0.0
    for w, m in zip(weights, masks):
        a = w.abs() if m is None else torch.where(m, w.abs(), 0)
        sp = sp + a.pow(p).sum(dtype=torch.float64)
        sq = sq + a.pow(q).sum(dtype=torch.float64)
        d = d + (w.numel() if m is None else m.sum())
    return pqi_from_sums(torch.as_tensor(sp), torch.as_tensor(sq), torch.as_tensor(d), p, q)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.date.today().isoformat(),
    }


def run(params: float, repeats: int, dtype: torch.dtype, device: str) -> list[dict]:
    names, weights = llm_shaped_weights(params, dtype=dtype, device=device)
    masks_dense = [None] * len(weights)
    masks_half = random_masks(weights, 0.5)
    weight_bytes = bytes_of(weights)
    backends = [b for b in sap_kernels.available_backends(torch.device(device)) if b != "reference"]
    rows = []
    probe_s, _ = median_time(sum_probe(weights), repeats, device=device)
    probe_gbs = weight_bytes / probe_s / 1e9
    rows.append(
        dict(
            op="probe: torch.sum",
            masked=False,
            p=None,
            q=None,
            ms=probe_s * 1e3,
            gbs=probe_gbs,
            bytes=weight_bytes,
        )
    )
    cases = [(masked, p, q) for masked in (False, True) for p, q in EXPONENTS]
    progress = tqdm(total=len(cases) * (len(backends) + 3), desc="bench_pqi", file=sys.stderr)
    for masked, p, q in cases:
        masks = masks_half if masked else masks_dense
        nbytes = weight_bytes + (bytes_of(masks_half) if masked else 0)
        truth = float(sap_kernels.pqi(weights, masks, p=p, q=q, backend="reference"))
        timings = {}

        def record(label, fn, reps=repeats, extra=None):
            seconds, _ = median_time(fn, reps, device=device)
            value = float(fn())
            timings[label] = seconds
            rows.append(
                dict(
                    op=label,
                    masked=masked,
                    p=p,
                    q=q,
                    ms=seconds * 1e3,
                    gbs=nbytes / seconds / 1e9,
                    bytes=nbytes,
                    error=abs(value - truth),
                    **(extra or {}),
                )
            )
            progress.update()

        for backend in backends:
            record(
                f"sap_kernels {backend}",
                lambda b=backend: sap_kernels.pqi(weights, masks, p=p, q=q, backend=b),
            )
        record(
            "eager: cat + vector_norm",
            lambda: eager_concatenate(weights, masks, p, q),
            reps=max(3, repeats // 2),
        )
        record(
            "eager: per-tensor loop",
            lambda: eager_loop(weights, masks, p, q),
            reps=max(3, repeats // 2),
        )
        torch._dynamo.reset()
        compiled = torch.compile(eager_loop)
        start = time.perf_counter()
        compiled(weights, masks, p, q)
        compile_s = time.perf_counter() - start
        record(
            "torch.compile: per-tensor loop",
            lambda: compiled(weights, masks, p, q),
            extra={"compile_s": compile_s},
        )
        for row in rows:
            if row.get("p") == p and row.get("masked") == masked:
                row["probe_fraction"] = row["gbs"] / probe_gbs
                for ref in ("eager: per-tensor loop", "torch.compile: per-tensor loop"):
                    key = "x_vs_eager" if ref.startswith("eager") else "x_vs_compiled"
                    row[key] = timings[ref] / (row["ms"] / 1e3)
                row["x_probe_time"] = row["ms"] / 1e3 / probe_s
    progress.close()
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| op | masks | p, q | median ms | GB/s | time / probe | × vs eager loop "
        "| × vs compiled | abs error vs float64 |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        pq = "" if r["p"] is None else f"{r['p']}, {r['q']}"
        lines.append(
            f"| {r['op']} | {'50%' if r['masked'] else 'none'} | {pq} | {r['ms']:.1f} "
            f"| {r['gbs']:.1f} | {r.get('x_probe_time', 1.0):.2f} "
            f"| {r.get('x_vs_eager', math.nan):.1f} | {r.get('x_vs_compiled', math.nan):.1f} "
            f"| {r.get('error', 0.0):.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params",
        type=float,
        default=2.7e8,
        help="parameters in the synthetic model (default 2.7e8 = 1.08 GB fp32)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write machine-readable results here")
    args = parser.parse_args(argv)
    rows = run(args.params, args.repeats, getattr(torch, args.dtype), args.device)
    info = machine() | {"params": args.params, "dtype": args.dtype, "repeats": args.repeats}
    print(f"\n{info}\n")
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

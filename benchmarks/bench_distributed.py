"""Time and bytes exchanged for the distributed PQI and global threshold.

The same total model (LLM-shaped, float32 by default) is split by rows over 1, 2
and 4 CPU processes (gloo on 127.0.0.1); every rank builds only its own shard.
World size 1 runs in one process twice: without a group (the single-process
API; with the reference backend its threshold is torch.cat + kthvalue) and with
a gloo group of one (the distributed code path, trivial collectives).
Each time is the median over repeats of the slowest rank; bytes are what one
rank hands to collectives (sap_kernels.distributed.last_exchange), which does
not depend on the model size.

    python benchmarks/bench_distributed.py --params 5e7 --worlds 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import sap_kernels  # noqa: E402
from sap_kernels.benchmarking import shape_for_params
from sap_kernels.distributed import last_exchange  # noqa: E402


def _backend_for(op: str) -> str:
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"sap_kernels::{op}", "CPU")
    except RuntimeError:
        has = False
    return "cpu" if has else "reference"


def _local_shard(params: float, dtype: torch.dtype, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's rows of every matrix of an LLM-shaped model (seeded per tensor)."""
    shape = shape_for_params(params)
    tensors = []
    for index, (_, dims) in enumerate(shape.tensor_shapes()):
        if len(dims) < 2:
            continue
        rows = torch.tensor_split(torch.arange(dims[0]), world)[rank]
        generator = torch.Generator().manual_seed(1000 * index + rank)
        local = torch.randn((rows.numel(), *dims[1:]), generator=generator) * dims[-1] ** -0.5
        tensors.append(local.to(dtype))
    return tensors


def _slowest(seconds: float, group) -> float:
    if group is None:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return float(value)


def _measure(fn, group, repeats: int) -> tuple[float, int, int]:
    """(median of the slowest rank's seconds, payload bytes, collectives) of fn()."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        fn()
        times.append(_slowest(time.perf_counter() - start, group))
    exchange = last_exchange() if group is not None else None
    return (
        statistics.median(times),
        exchange.payload_bytes if exchange else 0,
        exchange.collectives if exchange else 0,
    )


def run_rank(
    rank: int, world: int, port: int, options: dict, out_path: str, use_group: bool = True
) -> None:
    torch.set_num_threads(max(1, options["threads"] // world))
    group = None
    if use_group:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=600),
        )
        group = dist.group.WORLD
    dtype = getattr(torch, options["dtype"])
    tensors = _local_shard(options["params"], dtype, rank, world)
    local_numel = sum(t.numel() for t in tensors)
    total = local_numel
    if group is not None:
        count = torch.tensor([local_numel])
        dist.all_reduce(count, group=group)
        total = int(count)
    pqi_backend, select_backend = _backend_for("masked_power_sums"), options["select_backend"]
    rows = []
    cases = [
        ("pqi global", lambda: sap_kernels.pqi(tensors, backend=pqi_backend, group=group)),
        (
            "pqi layer",
            lambda: sap_kernels.pqi(tensors, scope="layer", backend=pqi_backend, group=group),
        ),
        (
            "threshold global (k = N/2)",
            lambda: sap_kernels.magnitude_threshold(
                tensors, total // 2, backend=select_backend, group=group
            ),
        ),
    ]
    for name, fn in cases:
        seconds, payload, collectives = _measure(fn, group, options["repeats"])
        rows.append(
            {
                "case": name,
                "world": world if use_group else "1, no group",
                "total_params": total,
                "units": len(tensors) if "layer" in name else 1,
                "seconds": seconds,
                "payload_bytes": payload,
                "collectives": collectives,
                "backend": pqi_backend if name.startswith("pqi") else select_backend,
            }
        )
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    if group is not None:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=5e7)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--select-backend", default=_backend_for("magnitude_histogram"))
    parser.add_argument("--json", default="benchmarks/results/distributed.json")
    args = parser.parse_args(argv)
    options = {
        "params": args.params,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "threads": args.threads,
        "select_backend": args.select_backend,
    }
    results = []
    for world in args.worlds:
        out_path = f"/tmp/bench_distributed_{os.getpid()}_{world}.json"
        if world == 1:  # without a group, then through the distributed path on 1 rank
            run_rank(0, 1, 0, options, out_path, use_group=False)
            results.extend(json.loads(Path(out_path).read_text()))
            run_rank(0, 1, _free_port(), options, out_path)
        else:
            mp.spawn(run_rank, args=(world, _free_port(), options, out_path), nprocs=world)
        results.extend(json.loads(Path(out_path).read_text()))
        os.remove(out_path)
    print("| case | processes | params | time (s) | bytes sent per rank | collectives | backend |")
    print("|" + "---|" * 7)
    for row in results:
        print(
            f"| {row['case']} | {row['world']} | {row['total_params'] / 1e6:.1f}M | "
            f"{row['seconds']:.3f} | {row['payload_bytes']:,} | {row['collectives']} | "
            f"{row['backend']} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))


if __name__ == "__main__":
    main()

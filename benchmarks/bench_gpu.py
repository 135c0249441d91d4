"""Issue 4's GPU benchmark: PQI, global threshold, prune and apply_masks_ on
LLM-shaped shards, sap_kernels (CUDA, Triton) against pure PyTorch, with a
device-to-device copy as the bandwidth probe, in one run, and the issue's
targets checked against the figures of that run.

    python benchmarks/bench_gpu.py --params 1e9 --out benchmarks/results/gpu-h100
    python benchmarks/bench_gpu.py --device cpu --params 3e5 --repeats 2   # smoke run

For each dtype, unmasked and with 50% random masks (k = 20% of the retained
weights, p = 0.5, q = 1):
  copy probe        dst.copy_(src) for every shard: bytes read + written / time
  pqi               sap_kernels.pqi per backend; eager per-tensor loop (float32
                    powers, float64 sums); eager torch.cat + vector_norm;
                    torch._foreach_norm (unmasked); torch.compile of the loop
  threshold         sap_kernels.magnitude_threshold per backend (and the radix
                    select alone where the API samples first); torch.kthvalue
                    and torch.topk(k, largest=False) on the concatenated |w|
  prune / prune_    sap_kernels.prune (new masks) and prune_ (in place; the
                    masks' reset runs before each timed call, untimed); eager:
                    kthvalue on the concatenation, then |w| > t (ties inexact)
  apply_masks_      sap_kernels.apply_masks_ per backend (masked runs only);
                    eager w.mul_(m) loop and torch._foreach_mul_
Times are medians of --repeats runs (CUDA events on a GPU; the PyTorch
baselines a quarter of them, at least 3, and one if the first took 5 s). GB/s counts the
bytes an op must read (weights, plus masks when masked). Peak extra memory is
the growth of allocated GPU memory during one call, its outputs included; the
target check subtracts the outputs of `prune` (new masks by design). A failing
or out-of-memory method is reported with its error, never hidden. Results are
written after every configuration, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import sap_kernels
from sap_kernels import ops, selection
from sap_kernels.benchmarking import (
    bytes_of,
    llm_shaped_weights,
    median_time,
    peak_cuda_growth,
    peak_rss_growth,
    random_masks,
    synchronize,
)
from sap_kernels.reference import key_bits_for, keys_to_values
from sap_kernels.sparsity import pqi_from_sums

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pqi import eager_concatenate, eager_loop  # noqa: E402
from gpu_report import MB, PRUNE_FRACTION, P, Q, check_targets, markdown, write  # noqa: E402


def retained_magnitudes(weights, masks):
    return torch.cat([(w if m is None else w[m]).reshape(-1).abs() for w, m in zip(weights, masks)])


def foreach_norm(weights, p, q):
    """torch._foreach_norm per tensor (float32), the norms' powers summed in float64."""
    sp = torch.stack(torch._foreach_norm(weights, p)).double().pow(p).sum()
    sq = torch.stack(torch._foreach_norm(weights, q)).double().pow(q).sum()
    d = torch.tensor(float(sum(w.numel() for w in weights)), dtype=torch.float64)
    return pqi_from_sums(sp, sq, d.to(sp.device), p, q)


def machine(device: torch.device) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "cuda_runtime": torch.version.cuda,
        }
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


class Runner:
    """Times methods of one configuration and collects their rows."""

    def __init__(self, device, repeats, config, weight_bytes, mask_bytes, bar):
        self.device, self.repeats, self.config, self.bar = device, repeats, config, bar
        self.weight_bytes, self.mask_bytes = weight_bytes, mask_bytes
        self.rows: list[dict] = []

    def time(self, op, method, fn, *, check=None, setup=None, memory=False, output_bytes=0):
        """Times fn; `check(result)` gives the error column; memory: also one
        call under the peak-memory counter."""
        row = self.config | {"op": op, "method": method, "status": "ok"}
        self.bar.set_postfix_str(f"{op} / {method}")
        try:
            if setup is not None:
                setup()
            start = time.perf_counter()
            result = fn()
            synchronize(self.device)
            first = time.perf_counter() - start
            row["first_call_s"] = first
            if check is not None:
                row["error"] = check(result)
            del result
            # the PyTorch baselines get a quarter of the runs (at least 3), and
            # a method whose first call took 5 s or more only that one
            ours = method.startswith("sap_kernels") or op == "copy probe"
            repeats = self.repeats if ours else max(3, self.repeats // 4)
            if first >= 5:
                repeats = 1
            seconds, times = median_time(fn, repeats, 0, self.device, setup)
            read = self.weight_bytes + (self.mask_bytes if op != "copy probe" else 0)
            row |= {"ms": seconds * 1e3, "runs": len(times), "bytes_read": read}
            row["gb_per_s"] = read / seconds / 1e9
            if memory:
                if setup is not None:
                    setup()
                if self.device.type == "cuda":
                    extra = peak_cuda_growth(fn, self.device)
                else:
                    extra = peak_rss_growth(fn)
                row["peak_extra_mb"] = extra / MB
                row["working_extra_mb"] = max(0, extra - output_bytes) / MB
        except Exception as error:  # reported in the table, never hidden
            row["status"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            if isinstance(error, torch.OutOfMemoryError):
                row["status"] = "out of memory"
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.rows.append(row)
        self.bar.update()
        return row


def run_configuration(weights, masks, device, backends, repeats, compile_loop, bar, config):
    weight_bytes = bytes_of(weights)
    mask_list = masks if masks is not None else [None] * len(weights)
    mask_bytes = bytes_of(masks) if masks is not None else 0
    runner = Runner(device, repeats, config, weight_bytes, mask_bytes, bar)
    copies = [torch.empty_like(w) for w in weights]

    def copy_all():
        for dst, src in zip(copies, weights):
            dst.copy_(src)

    probe = runner.time("copy probe", "device-to-device copy", copy_all)
    if "ms" in probe:
        probe["bytes_moved"] = 2 * weight_bytes
        probe["gb_per_s"] = 2 * weight_bytes / (probe["ms"] / 1e3) / 1e9
    copies.clear()

    truth = float(sap_kernels.pqi(weights, masks, p=P, q=Q, backend="reference"))

    def pqi_error(value):
        return abs(float(value) - truth)

    for b in backends:
        fn = lambda b=b: sap_kernels.pqi(weights, masks, p=P, q=Q, backend=b)  # noqa: E731
        runner.time("pqi", f"sap_kernels {b}", fn, check=pqi_error, memory=True)
    runner.time("pqi", "eager loop", lambda: eager_loop(weights, mask_list, P, Q), check=pqi_error)
    runner.time(
        "pqi",
        "eager cat + vector_norm",
        lambda: eager_concatenate(weights, mask_list, P, Q),
        check=pqi_error,
    )
    if masks is None:
        runner.time(
            "pqi", "torch._foreach_norm", lambda: foreach_norm(weights, P, Q), check=pqi_error
        )
    if compile_loop:
        torch._dynamo.reset()
        compiled = torch.compile(eager_loop, dynamic=False)
        row = runner.time(
            "pqi", "torch.compile loop", lambda: compiled(weights, mask_list, P, Q), check=pqi_error
        )
        row["note"] = "first_call_s includes compilation"

    retained = sum(int(w.numel() if m is None else m.sum()) for w, m in zip(weights, mask_list))
    k = max(1, round(PRUNE_FRACTION * retained))
    exact = None
    try:
        exact = float(torch.kthvalue(retained_magnitudes(weights, mask_list).float(), k).values)
    except torch.OutOfMemoryError:
        pass
    gc.collect()

    def threshold_error(value):
        return abs(float(value) - exact) if exact is not None else math.nan

    for b in backends:
        fn = lambda b=b: sap_kernels.magnitude_threshold(weights, k, masks, backend=b)  # noqa: E731
        runner.time("threshold", f"sap_kernels {b}", fn, check=threshold_error, memory=True)
    for b in sampled_backends(backends):
        # the API brackets the k-th key with a sample first; the radix select
        # (what compiled graphs and a sample's miss use) for comparison
        row = runner.time(
            "threshold",
            f"sap_kernels {b} radix",
            lambda b=b: radix_threshold(b, weights, mask_list, k),
            check=threshold_error,
            memory=True,
        )
        row["note"] = "radix select: histogram passes, no sample"
    runner.time(
        "threshold",
        "cat + torch.kthvalue",
        lambda: torch.kthvalue(retained_magnitudes(weights, mask_list), k).values,
        check=threshold_error,
    )
    runner.time(
        "threshold",
        "cat + torch.topk",
        lambda: torch.topk(retained_magnitudes(weights, mask_list), k, largest=False).values.max(),
        check=threshold_error,
    )

    def removed_error(new_masks):
        """|weights removed - k| (prune must remove exactly k)."""
        before = retained
        after = sum(int(m.sum()) for m in new_masks)
        return abs(before - after - k)

    base_masks = (
        masks if masks is not None else [torch.ones_like(w, dtype=torch.bool) for w in weights]
    )
    work = [m.clone() for m in base_masks]

    def reset():
        for w, m in zip(work, base_masks):
            w.copy_(m)

    for b in backends:
        fn = lambda b=b: sap_kernels.prune(weights, masks, k, backend=b)  # noqa: E731
        runner.time(
            "prune",
            f"sap_kernels {b}",
            fn,
            check=removed_error,
            memory=True,
            output_bytes=bytes_of(base_masks),
        )
        fn = lambda b=b: sap_kernels.prune_(weights, work, k, backend=b)  # noqa: E731
        runner.time("prune_", f"sap_kernels {b}", fn, check=removed_error, setup=reset, memory=True)

    def eager_prune():
        t = torch.kthvalue(retained_magnitudes(weights, mask_list), k).values
        return [
            (w.abs() > t) if m is None else m & (w.abs() > t) for w, m in zip(weights, mask_list)
        ]

    row = runner.time("prune", "cat + kthvalue + compare", eager_prune, check=removed_error)
    row["note"] = "ties not broken: may remove fewer than k"
    work.clear()

    if masks is not None:
        for b in backends:
            fn = lambda b=b: sap_kernels.apply_masks_(weights, masks, backend=b)  # noqa: E731
            runner.time("apply_masks_", f"sap_kernels {b}", fn, memory=True)

        def mul_loop():
            for w, m in zip(weights, masks):
                w.mul_(m)

        runner.time("apply_masks_", "eager w.mul_(m) loop", mul_loop)
        runner.time(
            "apply_masks_", "torch._foreach_mul_", lambda: torch._foreach_mul_(weights, masks)
        )
    return runner.rows


def sampled_backends(backends) -> list:
    """The backends whose API threshold takes the sampled select."""
    return [b for b in backends if ops.has_sample_select(b)]


def radix_threshold(backend, weights, mask_list, k):
    """The global k-th smallest retained |w| by the radix select alone."""
    key_bits = key_bits_for(weights)
    keys, _ = selection._select_radix(
        backend, weights, mask_list, 0, key_bits, torch.tensor([k]), None, "k", False, str,
        selection._nonfinite_digit(key_bits, weights[0].dtype),
    )  # fmt: skip
    return keys_to_values(keys, key_bits, weights[0].dtype)


def methods_per_configuration(backends, masked: bool, compiled: bool) -> int:
    """Rows run_configuration adds: the probe, PQI (+ eager x2, + _foreach_norm
    unmasked, + compiled), threshold (+ 2, + the radix select of each backend
    with a sampled one), prune and prune_ (+ 1), and with masks apply_masks_
    (+ 2)."""
    n = len(backends)
    threshold = n + 2 + len(sampled_backends(backends))
    rows = 1 + (n + 2 + (not masked) + compiled) + threshold + (2 * n + 1)
    return rows + (n + 2 if masked else 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--masks", default="none,50%", help="none, 50%% or both (comma-separated)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=None, help="default: every kernel backend there")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile loop")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md (after every step)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    available = [b for b in sap_kernels.available_backends(device) if b != "reference"]
    backends = available if args.backends is None else args.backends.split(",")
    missing = [b for b in backends if b not in available]
    if missing:
        parser.error(f"--backends: {missing[0]!r} is not available on {device} (have {available})")
    dtypes = args.dtypes.split(",")
    # unmasked first: the masked configuration ends with apply_masks_, which
    # zeroes half of the weights
    mask_modes = sorted((m.strip() for m in args.masks.split(",")), key=lambda m: m != "none")
    given = sys.argv[1:] if argv is None else argv
    result = {
        "machine": machine(device),
        "command": " ".join(["python benchmarks/bench_gpu.py", *given]),
        "repeats": args.repeats,
        "backends": backends,
        "rows": [],
        "targets": [],
    }
    bar = tqdm(
        total=len(dtypes) * sum(methods_per_configuration(backends, m != "none",
                                                          not args.no_compile) for m in mask_modes),
        desc="bench_gpu",
        file=sys.stderr,
    )  # fmt: skip
    for name in dtypes:
        dtype = getattr(torch, name)
        _, weights = llm_shaped_weights(args.params, dtype=dtype, device=device)
        result |= {"params": sum(w.numel() for w in weights), "tensors": len(weights)}
        for mode in mask_modes:
            masks = None if mode == "none" else random_masks(weights, 0.5, seed=1)
            config = {"dtype": name, "masked": masks is not None, "weight_bytes": bytes_of(weights)}
            result["rows"] += run_configuration(
                weights, masks, device, backends, args.repeats, not args.no_compile, bar, config
            )
            del masks
            result["targets"] = check_targets(result["rows"])
            if args.out:
                write(result, args.out)
        del weights
        gc.collect()
    bar.close()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

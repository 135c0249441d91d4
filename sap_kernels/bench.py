"""The engine behind `sap-kernels bench`: every op on every backend against pure
PyTorch and a bandwidth probe, on synthetic LLM-shaped weights, in one run.

    from sap_kernels.bench import BenchConfig, run_benchmark
    from sap_kernels.bench_report import format_table, write_outputs
    result = run_benchmark(BenchConfig(params=2e7, repeats=3))
    print(format_table(result))          # result.rows: one dict per (op, implementation)
    write_outputs(result, "bench-out")   # bench.json, bench.md, bench.png

Implementations timed per op:
- each available sap_kernels backend ('cpu', 'cuda', 'triton');
- 'eager': pure PyTorch, the float64 references in sap_kernels.reference
  (also the oracle for the error column);
- 'compiled' (PQI ops only): `torch.compile` of a pure PyTorch PQI over the
  shards (|w|^p in float32, sums accumulated in float64); its
  compile time is reported separately and excluded from the median;
- 'probe': the bandwidth probe, `torch.sum` over every shard on CPU, a
  device-to-device copy of every shard on GPU.

GB/s is the op's input bytes (weights, plus masks with --masked) divided by
its median time; '% probe' compares that with the probe's GB/s (the copy probe
counts bytes read and written). The error column is the largest absolute
difference from the float64 reference (PQI, threshold) or, for ops that
return masks (prune, SAP iteration), the number of mask entries that differ.
A failing implementation is reported in the table with its error, never hidden.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from . import reference
from .bench_report import MASK_ERROR_UNIT
from .benchmarking import (
    ModelShape,
    bytes_of,
    llm_shaped_weights,
    median_time,
    random_masks,
    shape_for_params,
    sum_probe,
    synchronize,
)

OPS = ("pqi_global", "pqi_layer", "pqi_neuron", "threshold", "prune", "sap_iteration")
PQI_SCOPES = {"pqi_global": "global", "pqi_layer": "layer", "pqi_neuron": "neuron"}
KERNEL_BACKENDS = ("cpu", "cuda", "triton")
COLUMNS = (
    "op",
    "implementation",
    "median_ms",
    "gb_per_s",
    "percent_of_probe",
    "speedup_vs_eager",
    "speedup_vs_compiled",
    "max_abs_error",
    "error_unit",
    "compile_s",
    "repeats",
    "status",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_WEIGHT_BYTES = 1 << 30
# The eager prune baseline (float64 stable sort of the concatenation) needs
# about 12x the weights' bytes; the default size keeps that within memory.
MEMORY_PER_WEIGHT_BYTE = 16
SLOW_SECONDS = 5.0  # a first run slower than this is not repeated


class BenchConfigError(ValueError):
    """A configuration that cannot run; the message is one line."""


@dataclass
class BenchConfig:
    params: float | None = None  # None: about 1 GB of weights, capped by free memory
    model_shape: ModelShape | None = None
    dtype: str = "float32"
    device: str | None = None  # None: cuda if available, else cpu
    masked: bool = False
    density: float = 0.5
    backends: list[str] | None = None  # None: every available kernel backend
    ops: list[str] = field(default_factory=lambda: list(OPS))
    repeats: int = 5
    p: float = 0.5
    q: float = 1.0
    prune_fraction: float = 0.2
    compile: bool = True
    seed: int = 0


@dataclass
class BenchResult:
    config: dict
    machine: dict
    model: dict
    probe: dict
    rows: list[dict]

    def to_dict(self) -> dict:
        return _json_safe(asdict(self) | {"columns": list(COLUMNS)})


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --- configuration -----------------------------------------------------------


def parse_model_shape(text: str) -> ModelShape:
    """'VOCAB,HIDDEN,INTERMEDIATE,LAYERS', e.g. '32000,4096,11008,32' (Llama-2 7B)."""
    parts = text.replace("x", ",").split(",")
    try:
        vocab, hidden, intermediate, layers = (int(float(s)) for s in parts)
    except ValueError:
        raise BenchConfigError(
            f"--model-shape {text!r}: expected VOCAB,HIDDEN,INTERMEDIATE,LAYERS "
            "(e.g. 32000,4096,11008,32)"
        ) from None
    if min(vocab, hidden, intermediate, layers) < 1 or hidden < 4:
        raise BenchConfigError(f"--model-shape {text!r}: every size must be positive")
    return ModelShape(vocab, hidden, intermediate, layers)


def config_from_args(args) -> BenchConfig:
    ops = list(OPS) if not args.ops else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise BenchConfigError(f"--ops: unknown op {unknown[0]!r}; choose from {', '.join(OPS)}")
    backends = None
    if args.backend and args.backend != "all":
        backends = [b.strip() for b in args.backend.split(",") if b.strip()]
        bad = [b for b in backends if b not in KERNEL_BACKENDS]
        if bad:
            raise BenchConfigError(
                f"--backend: unknown backend {bad[0]!r}; choose from {', '.join(KERNEL_BACKENDS)}"
            )
    if args.repeats < 1:
        raise BenchConfigError("--repeats must be at least 1")
    if args.params is not None and args.params < 1e5:
        raise BenchConfigError("--params must be at least 1e5")
    if not 0 < args.density <= 1:
        raise BenchConfigError("--density must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError("--device cuda: no CUDA device is available")
    return BenchConfig(
        params=args.params,
        model_shape=parse_model_shape(args.model_shape) if args.model_shape else None,
        dtype=args.dtype,
        device=args.device,
        masked=args.masked,
        density=args.density,
        backends=backends,
        ops=ops,
        repeats=args.repeats,
        p=args.p,
        q=args.q,
        compile=not args.no_compile,
        seed=args.seed,
    )


def default_params(dtype: torch.dtype, device: torch.device) -> float:
    """About 1 GB of weights, fewer where free memory is short."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    weight_bytes = min(DEFAULT_WEIGHT_BYTES, free // MEMORY_PER_WEIGHT_BYTE)
    element_size = torch.empty((), dtype=dtype).element_size()
    return max(2e6, weight_bytes / element_size)


# --- implementations -----------------------------------------------------------


def _pure_pqi(shards, masks, p: float, q: float, scope: str):
    """PQ Index in pure PyTorch: |w|^p in float32, sums accumulated in float64."""
    sums = []
    for w, m in zip(shards, masks):
        rows = w.reshape(w.shape[0], -1) if scope == "neuron" else w.reshape(1, -1)
        a = rows.abs().float()  # fused by torch.compile: no float32 copy is stored
        count = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.float64, device=w.device)
        if m is not None:
            keep = m.reshape(rows.shape)
            a = torch.where(keep, a, torch.zeros_like(a))
            count = keep.sum(1, dtype=torch.float64)
        sum_p = a.pow(p).sum(1, dtype=torch.float64)
        sum_q = a.pow(q).sum(1, dtype=torch.float64)
        sums.append(torch.stack([sum_p, sum_q, count], dim=1))
    sums = torch.cat(sums)
    if scope == "global":
        sums = sums.sum(0, keepdim=True)
    sum_p, sum_q, count = sums.unbind(1)
    log_ratio = (1 / q - 1 / p) * count.log() + sum_p.log() / p - sum_q.log() / q
    values = -torch.expm1(log_ratio)
    return values[0] if scope == "global" else values


def _flat_pqi(value) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        return torch.cat([v.reshape(-1) for v in value]).double().cpu()
    return value.reshape(-1).double().cpu()


def _max_abs_error(value, oracle) -> float:
    a, b = _flat_pqi(value), _flat_pqi(oracle)
    if a.shape != b.shape:
        return math.inf
    both_nan = a.isnan() & b.isnan()
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    return float(diff.nan_to_num(nan=math.inf).max()) if diff.numel() else 0.0


def _mask_mismatches(masks, oracle) -> float:
    return float(sum(int((a.cpu() != b.cpu()).sum()) for a, b in zip(masks, oracle)))


def _tasks(config: BenchConfig, backends: list[str], shards, masks):
    """(op, implementation, function, error function or None, note) in run order.
    Each op's 'eager' task comes first: its result is the oracle for the others."""
    import sap_kernels
    from sap_kernels.sparsity import pqi_from_sums, sap_prune_counts

    p, q = config.p, config.q
    mask_list = masks if masks is not None else [None] * len(shards)
    retained = (
        sum(int(m.sum()) for m in masks) if masks is not None else sum(t.numel() for t in shards)
    )
    k = max(1, round(config.prune_fraction * retained))
    tasks = []
    for op in config.ops:
        if op in PQI_SCOPES:
            scope = PQI_SCOPES[op]
            tasks.append(
                (
                    op,
                    "eager",
                    _bind(
                        sap_kernels.pqi, shards, masks, p=p, q=q, scope=scope, backend="reference"
                    ),
                    None,
                )
            )
            for b in backends:
                fn = _bind(sap_kernels.pqi, shards, masks, p=p, q=q, scope=scope, backend=b)
                tasks.append((op, b, fn, _max_abs_error))
            if config.compile:
                compiled = torch.compile(_pure_pqi, dynamic=False)
                fn = _bind(compiled, shards, mask_list, p, q, scope)
                tasks.append((op, "compiled", fn, _max_abs_error))
        elif op == "threshold":
            eager = _bind(
                reference.magnitude_threshold_by_concatenation, shards, k, masks, "global"
            )
            tasks.append((op, "eager", eager, None))
            for b in backends:
                fn = _bind(
                    sap_kernels.magnitude_threshold, shards, k, masks, scope="global", backend=b
                )
                tasks.append((op, b, fn, _max_abs_error))
        elif op == "prune":
            tasks.append(
                (
                    op,
                    "eager",
                    _bind(reference.prune_by_stable_sort, shards, masks, k, "global"),
                    None,
                )
            )
            for b in backends:
                fn = _bind(sap_kernels.prune, shards, masks, k, scope="global", backend=b)
                tasks.append((op, b, fn, _mask_mismatches))
        elif op == "sap_iteration":

            def sap_iteration(backend):
                sums = sap_kernels.pq_sums(shards, masks, p=p, q=q, backend=backend)
                value = pqi_from_sums(sums.sum_p, sums.sum_q, sums.count, p, q)
                _, count = sap_prune_counts(value, sums.count, p=p, q=q)
                if backend == "reference":
                    return reference.prune_by_stable_sort(shards, masks, count, "global")
                return sap_kernels.prune(shards, masks, count, scope="global", backend=backend)

            tasks.append((op, "eager", _bind(sap_iteration, "reference"), None))
            for b in backends:
                tasks.append((op, b, _bind(sap_iteration, b), _mask_mismatches))
    return tasks


def _bind(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


def _time(fn, repeats: int, device, compiled: bool = False):
    """(result, first-run seconds, median seconds, runs timed). The first run is
    the warm-up (for a compiled function, the compilation) and is not timed,
    except that a non-compiled first run slower than SLOW_SECONDS is the only one."""
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    first = time.perf_counter() - start
    if first > SLOW_SECONDS and not compiled:
        return result, first, first, 1
    median, times = median_time(fn, repeats=repeats, warmup=0, device=device)
    return result, first, median, len(times)


def _one_line(error: BaseException) -> str:
    """The first sentence of the first line of an error, with its type."""
    text = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(error).__name__}: {text}"[:160]


def _empty_row(op: str, implementation: str) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(op=op, implementation=implementation, status="ok")
    return row


# --- the run -----------------------------------------------------------------


def _machine(device: torch.device) -> dict:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _probe(shards, device, repeats: int) -> dict:
    weight_bytes = bytes_of(shards)
    if device.type == "cuda":
        copies = [torch.empty_like(t) for t in shards]

        def run():
            for dst, src in zip(copies, shards):
                dst.copy_(src)

        name, moved = "device-to-device copy", 2 * weight_bytes
    else:
        run, name, moved = sum_probe(shards), "torch.sum over the shards", weight_bytes
    _, _, median, runs = _time(run, max(repeats, 3), device)
    return {
        "name": name,
        "bytes": moved,
        "median_ms": median * 1e3,
        "gb_per_s": moved / median / 1e9,
        "repeats": runs,
    }


def run_benchmark(config: BenchConfig, progress: bool = False) -> BenchResult:
    """Runs every op of `config` on every implementation; see the module docstring."""
    from .ops import available_backends

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[config.dtype]
    shape = config.model_shape or shape_for_params(
        config.params if config.params is not None else default_params(dtype, device)
    )
    names, shards = llm_shaped_weights(dtype=dtype, device=device, seed=config.seed, shape=shape)
    masks = random_masks(shards, config.density, config.seed + 1) if config.masked else None
    available = [b for b in available_backends(device) if b in KERNEL_BACKENDS]
    backends = available if config.backends is None else config.backends
    input_bytes = bytes_of(shards) + (bytes_of(masks) if masks is not None else 0)
    model = {
        "shape": asdict(shape),
        "params": shape.numel(),
        "tensors": len(shards),
        "dtype": config.dtype,
        "weight_bytes": bytes_of(shards),
        "mask_bytes": bytes_of(masks) if masks is not None else 0,
        "device": str(device),
        "available_backends": available,
    }
    probe_before = _probe(shards, device, config.repeats)
    rows = []
    tasks = _tasks(config, backends, shards, masks)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="bench", unit="run", leave=False, disable=None)
    oracles = {}
    for op, implementation, fn, error_of in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{op} / {implementation}")
        row = _empty_row(op, implementation)
        try:
            if implementation not in ("eager", "compiled") and implementation not in available:
                raise RuntimeError(f"backend {implementation!r} is not available on {device}")
            result, first, median, runs = _time(
                fn, config.repeats, device, compiled=implementation == "compiled"
            )
            row.update(median_ms=median * 1e3, gb_per_s=input_bytes / median / 1e9, repeats=runs)
            if implementation == "compiled":
                row["compile_s"] = max(0.0, first - median)
            if implementation == "eager":
                oracles[op] = result
                row["max_abs_error"] = 0.0
            elif op in oracles:
                row["max_abs_error"] = error_of(result, oracles[op])
            if op in ("prune", "sap_iteration"):
                row["error_unit"] = MASK_ERROR_UNIT
            else:
                row["error_unit"] = "abs vs float64"
            del result
        except Exception as error:  # reported in the table, not raised
            row["status"] = "error: " + _one_line(error)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # the probe runs before and after the ops; the faster run counts, so a burst
    # of load from elsewhere on the machine does not inflate '% probe'
    probe_after = _probe(shards, device, config.repeats)
    probe = dict(max(probe_before, probe_after, key=lambda r: r["gb_per_s"]))
    probe["gb_per_s_before_and_after"] = [probe_before["gb_per_s"], probe_after["gb_per_s"]]
    rows.insert(
        0,
        _empty_row("probe", "probe")
        | {
            "median_ms": probe["median_ms"],
            "gb_per_s": probe["gb_per_s"],
            "repeats": probe["repeats"],
            "status": f"ok ({probe['name']})",
        },
    )
    for row in rows:
        if row["gb_per_s"] is not None:
            row["percent_of_probe"] = 100.0 * row["gb_per_s"] / probe["gb_per_s"]
    _add_speedups(rows)
    config_dict = asdict(config)
    config_dict["model_shape"] = asdict(shape)
    config_dict["device"] = str(device)
    return BenchResult(config_dict, _machine(device), model, probe, rows)


def _add_speedups(rows: list[dict]) -> None:
    base = {(r["op"], r["implementation"]): r["median_ms"] for r in rows if r["median_ms"]}
    for row in rows:
        if row["median_ms"] is None or row["op"] == "probe":
            continue
        for column, name in (("speedup_vs_eager", "eager"), ("speedup_vs_compiled", "compiled")):
            reference_ms = base.get((row["op"], name))
            if reference_ms:
                row[column] = reference_ms / row["median_ms"]

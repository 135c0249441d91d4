"""Shared pieces of the benchmarks: LLM-shaped synthetic weights, timing by
median of repeated runs, peak resident-memory growth, bandwidth probes."""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer: embedding, per-layer attention and MLP
    matrices and norm vectors, and an output head."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        h, f = self.hidden, self.intermediate
        shapes = [("embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"layers.{i}."
            shapes += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (h // 4, h)),
                (p + "self_attn.v_proj.weight", (h // 4, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
            ]
        shapes += [("norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return shapes

    def numel(self) -> int:
        return sum(_prod(s) for _, s in self.tensor_shapes())


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shape_for_params(params: float) -> ModelShape:
    """A Llama-like shape with about `params` parameters (>= ~2M)."""
    hidden = 256
    while True:
        layers = max(2, min(32, hidden // 128))
        shape = ModelShape(
            vocab=8 * hidden, hidden=hidden, intermediate=(hidden * 8) // 3, layers=layers
        )
        if shape.numel() >= params or hidden >= 16384:
            break
        hidden += 128
    # fine-tune with the layer count
    while shape.numel() > params * 1.05 and shape.layers > 2:
        shape = ModelShape(shape.vocab, shape.hidden, shape.intermediate, shape.layers - 1)
    return shape


def llm_shaped_weights(
    params: float = 2.7e8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    shape: ModelShape | None = None,
) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a synthetic model (normal weights, heavier-tailed
    embeddings, norms near 1), generated chunk by chunk to bound peak memory."""
    shape = shape or shape_for_params(params)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    names, tensors = [], []
    for name, dims in shape.tensor_shapes():
        t = torch.empty(dims, dtype=dtype, device=device)
        if len(dims) == 1:
            t.fill_(1.0).add_(torch.randn(dims, generator=generator).to(dtype) * 0.05)
        else:
            std = dims[-1] ** -0.5
            flat = t.view(-1)
            step = 1 << 24
            for start in range(0, flat.numel(), step):
                n = min(step, flat.numel() - start)
                chunk = torch.randn(n, generator=generator)
                if "embed" in name:
                    chunk = chunk * chunk.abs().sqrt()  # heavier tails
                flat[start : start + n].copy_(chunk * std)
        names.append(name)
        tensors.append(t)
    return names, tensors


def random_masks(tensors, density: float = 0.5, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.rand(t.shape, generator=generator) < density).to(t.device) for t in tensors]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    setup: Callable[[], object] | None = None,
) -> tuple[float, list[float]]:
    """Median time in seconds over `repeats` runs after `warmup` runs; `setup`
    (untimed) runs before each. On CUDA each run is timed by a pair of CUDA
    events on the current stream, which counts the GPU idling while the host
    prepares launches; elsewhere by the wall clock."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    on_cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_cuda_growth(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak growth of allocated CUDA memory (bytes) while fn runs, its result included."""
    synchronize(device)
    gc.collect()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - base)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_rss_growth(fn: Callable[[], object], interval: float = 0.002) -> int:
    """Peak growth of resident memory (bytes) while fn runs, sampled by a thread."""
    gc.collect()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        peak = max(peak, _rss_bytes())
    finally:
        done.set()
        thread.join()
    del result
    return max(0, peak - base)


def bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sum_probe(tensors) -> Callable[[], object]:
    """The bandwidth probe: torch.sum over every shard (reads each byte once)."""

    def run():
        return [t.sum() for t in tensors]

    return run

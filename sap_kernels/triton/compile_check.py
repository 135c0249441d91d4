"""Compiles every Triton kernel to PTX for sm_80 and sm_90 without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' arithmetic in numpy and
accepts code the GPU compiler rejects; this check runs the real compiler
(Triton -> LLVM -> PTX, ptxas included) for each weight type and reports how
many 16-byte loads each aligned variant got. Pointer arguments are declared
16-byte aligned, as Triton specialises them at launch when data_ptr() % 16 == 0.

    python -m sap_kernels.triton.compile_check        # exit status 1 on failure
"""

from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import kernels, sample_kernels, select_kernels  # noqa: E402

I64 = "*i64"
BITS = {kernels.FLOAT32: "*i32", kernels.BFLOAT16: "*i16", kernels.FLOAT16: "*i16"}


def _variants():
    """(name, kernel, signature, constexprs) for every kernel and weight type."""
    for weight_type, bits in BITS.items():
        common = {"weight_bits": bits, "mask_bytes": "*u8", "pieces": I64}
        p_kind, q_kind = [
            (kernels.POW_HALF, kernels.POW_ONE),
            (kernels.POW_GENERAL, kernels.POW_GENERAL),
            (kernels.POW_INT, kernels.POW_TWO),
        ][weight_type]
        yield (
            f"power_sums[{weight_type}]",
            kernels.power_sums_kernel,
            {**common, "chunk_starts": I64, "partials": "*fp64", "p": "fp64", "q": "fp64",
             "safe_min": "fp32", "safe_max": "fp32"},
            {"WEIGHT_TYPE": weight_type, "P_KIND": p_kind, "Q_KIND": q_kind,
             "P_INT": 3 if p_kind == kernels.POW_INT else 0, "Q_INT": 0, "ALIGNED": True,
             "BLOCK": 1024},
        )  # fmt: skip
        key_bits = 32 if weight_type == kernels.FLOAT32 else 16
        yield (
            f"histogram[{weight_type}]",
            select_kernels.histogram_kernel,
            {**common, "chunk_starts": I64, "prefixes": I64, "histogram": I64},
            {"WEIGHT_TYPE": weight_type, "KEY_BITS": key_bits, "PASS_INDEX": 0,
             "ALIGNED": True, "BLOCK": 1024},
        )  # fmt: skip
        yield (
            f"rowwise_kth[{weight_type}]",
            select_kernels.rowwise_kth_kernel,
            {**common, "ks": I64, "result": I64, "nonfinite": "*i32"},
            {"WEIGHT_TYPE": weight_type, "KEY_BITS": 32, "BLOCK": 1024},
        )
        yield (
            f"sample_keys[{weight_type}]",
            sample_kernels.sample_keys_kernel,
            {**common, "sample_rows": I64, "sample_offsets": I64, "keys": I64,
             "num_samples": "i64"},
            {"WEIGHT_TYPE": weight_type, "KEY_BITS": key_bits, "BLOCK": 1024},
        )  # fmt: skip
        yield (
            f"bracket_histogram[{weight_type}]",
            sample_kernels.bracket_histogram_kernel,
            {**common, "chunk_starts": I64, "lows": I64, "highs": I64, "shifts": I64,
             "counters": I64, "histogram": I64, "bins_per_unit": "i64"},
            {"WEIGHT_TYPE": weight_type, "KEY_BITS": key_bits,
             "INF_KEY": 0x7F800000 if key_bits == 32 else 0x7F80, "ALIGNED": True,
             "BLOCK": 1024},
        )  # fmt: skip
        yield (
            f"count_equal[{weight_type}]",
            select_kernels.count_equal_kernel,
            {**common, "chunk_starts": I64, "threshold_keys": I64, "remove_equal": I64,
             "equal_counts": I64},
            {"WEIGHT_TYPE": weight_type, "KEY_BITS": key_bits, "ALIGNED": True, "BLOCK": 1024},
        )  # fmt: skip
        yield (
            f"prune[{weight_type}]",
            select_kernels.prune_kernel,
            {**common, "out_bytes": "*u8", "out_begins": I64, "chunk_starts": I64,
             "threshold_keys": I64, "remove_equal": I64, "equal_before": I64},
            {"WEIGHT_TYPE": weight_type, "KEY_BITS": key_bits, "ALIGNED": True, "BLOCK": 1024},
        )  # fmt: skip
        yield (
            f"apply_masks[{weight_type}]",
            select_kernels.apply_masks_kernel,
            {**common, "chunk_starts": I64},
            {"ALIGNED": True, "BLOCK": 1024},
        )
    yield (
        "short_rows_power_sums",
        kernels.short_rows_power_sums_kernel,
        {"weight_bits": "*i16", "mask_bytes": "*u8", "mask_begin": "i64", "num_rows": "i64",
         "row_length": "i64", "first_piece": "i64", "partials": "*fp64", "p": "fp64", "q": "fp64",
         "safe_min": "fp32", "safe_max": "fp32"},
        {"WEIGHT_TYPE": kernels.BFLOAT16, "P_KIND": kernels.POW_HALF, "Q_KIND": kernels.POW_ONE,
         "P_INT": 0, "Q_INT": 0, "ROWS": 16, "COLUMNS": 256},
    )  # fmt: skip
    yield (
        "reduce_many_units",
        kernels.reduce_many_units_kernel,
        {"partials": "*fp64", "unit_starts": I64, "out": "*fp64", "num_units": "i64"},
        {"UNITS": 1024},
    )
    yield (
        "reduce_partials",
        kernels.reduce_partials_kernel,
        {"partials": "*fp64", "unit_starts": I64, "out": "*fp64"},
        {"BLOCK": 256},
    )


def compile_all(capabilities=(80, 90)) -> bool:
    ok = True
    for capability in capabilities:
        target = GPUTarget("cuda", capability, 32)
        for name, fn, signature, constexprs in _variants():
            signature = {**signature, **{k: "constexpr" for k in constexprs}}
            pointers = [i for i, t in enumerate(signature.values()) if t.startswith("*")]
            attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
            try:
                ptx = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                    target=target,
                ).asm["ptx"]
            except Exception as error:  # report every failure, not just the first
                ok = False
                print(f"sm_{capability} {name}: FAILED: {type(error).__name__}: {error}")
                continue
            vector_loads = len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4", ptx))
            print(f"sm_{capability} {name}: ok, {vector_loads} 16-byte loads")
    return ok


if __name__ == "__main__":
    sys.exit(0 if compile_all() else 1)

"""Output of `sap-kernels bench`: the text table, a markdown table, the JSON
file and a plot (matplotlib, Agg backend) of a `BenchResult`."""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bench import BenchResult

MASK_ERROR_UNIT = "mask entries differing"

_HEADER = [
    "op",
    "impl",
    "ms",
    "GB/s",
    "% probe",
    "x eager",
    "x compiled",
    "max error",
    "compile s",
    "status",
]


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e6):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table_rows(result: BenchResult) -> list[list[str]]:
    rows = []
    for r in result.rows:
        error = r["max_abs_error"]
        if r["error_unit"] == MASK_ERROR_UNIT and error is not None:
            error_text = f"{int(error)} masks"
        else:
            error_text = _cell(error)
        rows.append(
            [
                r["op"],
                r["implementation"],
                _cell(r["median_ms"], 1),
                _cell(r["gb_per_s"], 1),
                _cell(r["percent_of_probe"], 0),
                _cell(r["speedup_vs_eager"]),
                _cell(r["speedup_vs_compiled"]),
                error_text,
                _cell(r["compile_s"], 1),
                r["status"],
            ]
        )
    return rows


def _title(result: BenchResult) -> str:
    m = result.model
    masked = f", masked (density {result.config['density']})" if m["mask_bytes"] else ""
    return (
        f"{m['params'] / 1e6:.1f}M params in {m['tensors']} tensors, {m['dtype']}{masked}, "
        f"{m['weight_bytes'] / 1e9:.2f} GB on {m['device']}; p={result.config['p']} "
        f"q={result.config['q']}; probe: {result.probe['name']}"
    )


def format_table(result: BenchResult) -> str:
    """The text table printed at the end of `sap-kernels bench`."""
    rows = _table_rows(result)
    widths = [max(len(x[i]) for x in [_HEADER, *rows]) for i in range(len(_HEADER))]
    lines = [_title(result), ""]
    for cells in [_HEADER, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    lines.append("")
    lines.append(
        "eager = pure PyTorch float64 reference; compiled = torch.compile of pure "
        "PyTorch; error vs the float64 reference (masks: entries differing)."
    )
    return "\n".join(lines)


def format_markdown(result: BenchResult) -> str:
    rows = _table_rows(result)
    lines = [
        f"# sap-kernels bench\n\n{_title(result)}\n",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "---|" * len(_HEADER),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(result: BenchResult, out_dir: str) -> list[str]:
    """bench.json, bench.md and bench.png (if matplotlib is installed) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")]
    with open(paths[0], "w") as f:
        json.dump(result.to_dict(), f, indent=2, allow_nan=False)
    with open(paths[1], "w") as f:
        f.write(format_markdown(result))
    plot = _plot(result, os.path.join(out_dir, "bench.png"))
    if plot:
        paths.append(plot)
    return paths


def _plot(result: BenchResult, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in result.rows if r["gb_per_s"] and r["op"] != "probe"]
    if not timed:
        return None
    labels = [f"{r['op']} / {r['implementation']}" for r in timed]
    figure, axis = plt.subplots(figsize=(8, 0.3 * len(timed) + 1.5))
    colors = {"eager": "tab:gray", "compiled": "tab:orange"}
    axis.barh(
        labels,
        [r["gb_per_s"] for r in timed],
        color=[colors.get(r["implementation"], "tab:blue") for r in timed],
    )
    axis.axvline(
        result.probe["gb_per_s"],
        color="tab:red",
        linestyle="--",
        label=f"probe ({result.probe['name']})",
    )
    axis.set_xscale("log")
    axis.invert_yaxis()
    axis.set_xlabel("GB/s (input bytes / median time)")
    axis.set_title(_title(result), fontsize=7)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

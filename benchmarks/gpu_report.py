"""Issue 4's targets and the report of benchmarks/bench_gpu.py: verdicts from
one run's rows, a markdown table and a plot of each method's share of the
copy probe's bandwidth."""

from __future__ import annotations

import json
import math
from pathlib import Path

P, Q = 0.5, 1.0
PRUNE_FRACTION = 0.2
MB = 1 << 20
# Issue 4's targets, all measured in the same run.
COPY_FRACTION = 0.85  # PQI GB/s (bytes read) / copy GB/s (bytes read + written)
THRESHOLD_OVER_PQI = 3.5
VS_EAGER, VS_COMPILED = 20.0, 3.0
TRITON_OVER_CUDA = 1.3
BUDGET_MB, BUDGET_FRACTION = 64, 0.01  # peak extra memory: 64 MB + 1% of the weights


def _timed(rows, op):
    return [r for r in rows if r["op"] == op and "ms" in r]


def _find(rows, op, method):
    return next((r for r in rows if r["op"] == op and r["method"] == method and "ms" in r), None)


def check_targets(rows) -> list[dict]:
    """Issue 4's targets, per configuration and backend, from this run's rows."""
    verdicts = []
    for (dtype, masked), mine in _by_config(rows).items():
        budget_mb = BUDGET_MB + BUDGET_FRACTION * mine[0]["weight_bytes"] / MB

        def verdict(target, value, limit, higher_is_better, backend):
            ok = value >= limit if higher_is_better else value <= limit
            verdicts.append(
                dict(
                    dtype=dtype,
                    masked=masked,
                    backend=backend,
                    target=target,
                    value=value,
                    limit=limit,
                    met=ok,
                )
            )

        copy = _find(mine, "copy probe", "device-to-device copy")
        eager = [
            r["ms"]
            for r in _timed(mine, "pqi")
            if r["method"].startswith("eager") or r["method"] == "torch._foreach_norm"
        ]
        compiled = _find(mine, "pqi", "torch.compile loop")
        for backend in ("cuda", "triton", "cpu"):
            pqi = _find(mine, "pqi", f"sap_kernels {backend}")
            if pqi is None:
                continue
            if copy:
                verdict(
                    "PQI GB/s / copy GB/s",
                    pqi["gb_per_s"] / copy["gb_per_s"],
                    COPY_FRACTION,
                    True,
                    backend,
                )
            threshold = _find(mine, "threshold", f"sap_kernels {backend}")
            if threshold:
                verdict(
                    "threshold time / PQI time",
                    threshold["ms"] / pqi["ms"],
                    THRESHOLD_OVER_PQI,
                    False,
                    backend,
                )
            if eager:
                verdict(
                    "PQI speed-up vs fastest eager", min(eager) / pqi["ms"], VS_EAGER, True, backend
                )
            if compiled:
                verdict(
                    "PQI speed-up vs torch.compile",
                    compiled["ms"] / pqi["ms"],
                    VS_COMPILED,
                    True,
                    backend,
                )
            for r in mine:
                if r["method"] == f"sap_kernels {backend}" and "working_extra_mb" in r:
                    verdict(
                        f"{r['op']} peak extra MB (outputs excluded)",
                        r["working_extra_mb"],
                        budget_mb,
                        False,
                        backend,
                    )
        for op in ("pqi", "threshold", "prune", "prune_", "apply_masks_"):
            cuda, triton = (_find(mine, op, f"sap_kernels {b}") for b in ("cuda", "triton"))
            if cuda and triton:
                verdict(
                    f"{op}: Triton time / CUDA time",
                    triton["ms"] / cuda["ms"],
                    TRITON_OVER_CUDA,
                    False,
                    "triton",
                )
    return verdicts


def markdown(result: dict) -> str:
    m = result["machine"]
    device = m.get("gpu") or m.get("cpu")
    lines = [
        f"# sap_kernels on {device}",
        "",
        f"{m['date']}; torch {m['torch']}, triton {m['triton']}, CUDA runtime "
        f"{m.get('cuda_runtime')}, driver {m.get('driver')}; {result['params']:,} parameters in "
        f"{result['tensors']} LLM-shaped tensors; p={P}, q={Q}, k = {PRUNE_FRACTION:.0%} of the "
        f"retained weights; median of the runs column. Command: `{result['command']}`",
        "",
        "| dtype | masks | op | method | median ms | runs | GB/s | % copy GB/s | × vs this op's "
        "fastest PyTorch | peak extra MB | error | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (dtype, masked), rows in _by_config(result["rows"]).items():
        copy = _find(rows, "copy probe", "device-to-device copy")
        for r in rows:
            best = best_pytorch_ms(rows, r["op"])
            ms = r.get("ms")
            lines.append(
                f"| {dtype} | {'50%' if masked else 'none'} | {r['op']} | {r['method']} "
                f"| {_fmt(ms, '.3f')} | {r.get('runs', '')} | {_fmt(r.get('gb_per_s'), '.0f')} "
                f"| {_fmt(100 * r['gb_per_s'] / copy['gb_per_s'] if copy and ms else None, '.0f')} "
                f"| {_fmt(best / ms if ms and best else None, '.1f')} "
                f"| {_fmt(r.get('peak_extra_mb'), '.1f')} | {_fmt(r.get('error'), '.2g')} "
                f"| {r['status']}{' (' + r['note'] + ')' if r.get('note') else ''} |"
            )
    lines += [
        "",
        "## Issue 4 targets (this run)",
        "",
        "| dtype | masks | backend | target | value | limit | met |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for v in result["targets"]:
        met = "yes" if v["met"] else "**no**"
        lines.append(
            f"| {v['dtype']} | {'50%' if v['masked'] else 'none'} | {v['backend']} | {v['target']} "
            f"| {_fmt(v['value'], '.3g')} | {v['limit']:.3g} | {met} |"
        )
    return "\n".join(lines) + "\n"


def best_pytorch_ms(rows, op):
    """The fastest pure-PyTorch time for `op` (prune_'s baseline is prune's)."""
    family = "prune" if op == "prune_" else op
    times = [
        r["ms"]
        for r in rows
        if r["op"] == family and "ms" in r and not r["method"].startswith("sap_kernels")
    ]
    return min(times, default=None)


def _by_config(rows):
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["masked"]), []).append(r)
    return groups


def _fmt(value, spec):
    return (
        ""
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def write(result: dict, out: Path) -> None:
    """OUT.json (every row and verdict), OUT.md and, with matplotlib, OUT.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(result))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        pass


def plot(result: dict, path: Path) -> None:
    """One panel per configuration: each method's GB/s as a share of the copy probe's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_config(result["rows"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 7), squeeze=False)
    for ax, ((dtype, masked), rows) in zip(axes[0], groups.items()):
        copy = _find(rows, "copy probe", "device-to-device copy")
        timed = [r for r in rows if "ms" in r and r["op"] != "copy probe"]
        labels = [f"{r['op']}: {r['method']}" for r in timed]
        shares = [100 * r["gb_per_s"] / copy["gb_per_s"] if copy else 0.0 for r in timed]
        colors = [
            "tab:blue" if r["method"].startswith("sap_kernels") else "tab:gray" for r in timed
        ]
        ax.barh(range(len(timed)), shares, color=colors)
        ax.set_yticks(range(len(timed)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100 * COPY_FRACTION, color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel("% of the copy probe's GB/s (bytes read / time)")
        ax.set_title(f"{dtype}, {'50% masks' if masked else 'no masks'}")
    machine = result["machine"]
    fig.suptitle(
        f"sap_kernels (blue) vs PyTorch (grey) on {machine.get('gpu') or machine['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

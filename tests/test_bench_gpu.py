"""benchmarks/bench_gpu.py (issue 4's GPU benchmark) runs end to end on CPU at a
small size, and its target verdicts follow the issue's definitions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import sap_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402
import gpu_report  # noqa: E402

pytestmark = pytest.mark.skipif(not sap_kernels.has_extension(), reason="extension not built")


# On CPU the kernel backend alone (Triton's interpreter would take minutes);
# on a GPU every backend there.
RUNS = [("cpu", "cpu")]
if torch.cuda.is_available():
    RUNS.append(("cuda", ",".join(sap_kernels.available_backends(torch.device("cuda"))[:-1])))


@pytest.mark.parametrize("device,backends", RUNS)
def test_small_run_writes_exact_results(tmp_path, device, backends):
    out = tmp_path / "gpu"
    argv = ["--device", device, "--backends", backends, "--params", "3e5", "--repeats", "1"]
    argv += ["--dtypes", "bfloat16", "--masks", "none,50%", "--no-compile", "--out", str(out)]
    assert bench_gpu.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    names = backends.split(",")
    expected_rows = sum(bench_gpu.methods_per_configuration(names, m, False) for m in (False, True))
    assert len(rows) == expected_rows  # the progress bar's total
    assert result["command"].endswith("--out " + str(out))
    sap_rows = [r for r in rows if r["method"].startswith("sap_kernels")]
    assert {(r["op"], r["masked"], r["method"]) for r in sap_rows} == {
        (op, masked, f"sap_kernels {b}")
        for op in ("pqi", "threshold", "prune", "prune_", "apply_masks_")
        for masked in (False, True)
        for b in names
        if op != "apply_masks_" or masked
    } | {
        ("threshold", masked, f"sap_kernels {b} radix")
        for masked in (False, True)
        for b in bench_gpu.sampled_backends(names)
    }
    for r in sap_rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["gb_per_s"] > 0
        if r["op"] == "pqi":
            assert r["error"] < 1e-6
        elif r["op"] != "apply_masks_":
            assert r["error"] == 0, r  # exact threshold; exactly k weights removed
    # the baselines ran too, and the exact ones agree with sap_kernels
    assert any(r["method"] == "cat + torch.kthvalue" and r["error"] == 0 for r in rows)
    assert any(r["method"] == "torch._foreach_norm" for r in rows)
    targets = {(v["target"], v["masked"]) for v in result["targets"]}
    assert ("PQI GB/s / copy GB/s", True) in targets
    assert ("threshold time / PQI time", False) in targets
    assert "Issue 4 targets" in out.with_suffix(".md").read_text()


def _row(op, method, ms, **extra):
    return {"dtype": "float32", "masked": False, "weight_bytes": 100 * gpu_report.MB,
            "op": op, "method": method, "status": "ok", "ms": ms, **extra}  # fmt: skip


def test_targets_follow_the_issue_definitions():
    rows = [
        _row("copy probe", "device-to-device copy", 2.0, gb_per_s=1000.0),
        _row("pqi", "sap_kernels cuda", 1.0, gb_per_s=860.0, working_extra_mb=65.0),
        _row("pqi", "sap_kernels triton", 1.31, gb_per_s=840.0, working_extra_mb=65.1),
        _row("pqi", "eager loop", 20.0),
        _row("pqi", "eager cat + vector_norm", 19.0),
        _row("pqi", "torch.compile loop", 3.0),
        _row("threshold", "sap_kernels cuda", 3.5),
        _row("threshold", "sap_kernels triton", 3.6),
    ]
    verdicts = {
        (v["backend"], v["target"]): (round(v["value"], 6), v["met"])
        for v in gpu_report.check_targets(rows)
    }
    assert verdicts[("cuda", "PQI GB/s / copy GB/s")] == (0.86, True)
    assert verdicts[("triton", "PQI GB/s / copy GB/s")] == (0.84, False)
    assert verdicts[("cuda", "threshold time / PQI time")] == (3.5, True)
    # the fastest eager method is the baseline: 19 / 1 < 20
    assert verdicts[("cuda", "PQI speed-up vs fastest eager")] == (19.0, False)
    assert verdicts[("cuda", "PQI speed-up vs torch.compile")] == (3.0, True)
    # budget: 64 MB + 1% of 100 MB
    assert verdicts[("cuda", "pqi peak extra MB (outputs excluded)")] == (65.0, True)
    assert verdicts[("triton", "pqi peak extra MB (outputs excluded)")] == (65.1, False)
    assert verdicts[("triton", "pqi: Triton time / CUDA time")] == (1.31, False)
    assert verdicts[("triton", "threshold: Triton time / CUDA time")][1] is True

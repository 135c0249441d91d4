"""`sap-kernels bench` end to end at a tiny size: every op, every column, the
JSON/markdown/plot outputs, failing backends reported in the table."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sap_kernels.bench import COLUMNS, OPS, BenchConfig, parse_model_shape, run_benchmark
from sap_kernels.cli import EXIT_INPUT_ERROR, EXIT_OK, main
from sap_kernels.ops import available_backends

# one decoder layer, hidden 64: about 0.2M parameters in 12 tensors
TINY = ["--model-shape", "1024,64,176,1", "--repeats", "1"]


def _rows(data, op, implementation):
    return [r for r in data["rows"] if r["op"] == op and r["implementation"] == implementation]


def test_bench_end_to_end_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench-out"
    code = main(["bench", *TINY, "--no-compile", "--masked", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_OK
    data = json.loads((out / "bench.json").read_text())
    assert data["columns"] == list(COLUMNS)
    for row in data["rows"]:
        assert set(row) == set(COLUMNS), row
    assert data["model"]["mask_bytes"] > 0
    assert data["probe"]["gb_per_s"] > 0
    for op in OPS:
        (eager,) = _rows(data, op, "eager")
        assert eager["status"] == "ok", eager
        assert eager["median_ms"] > 0 and eager["gb_per_s"] > 0
        assert eager["speedup_vs_eager"] == pytest.approx(1.0)
        assert eager["max_abs_error"] == 0.0
    kernels = [b for b in available_backends(torch.device("cpu")) if b != "reference"]
    for backend in kernels:
        for op in ("pqi_global", "pqi_layer", "pqi_neuron"):
            (row,) = _rows(data, op, backend)
            assert row["status"] == "ok", row
            assert row["max_abs_error"] < 1e-6  # the accuracy contract
            assert row["percent_of_probe"] > 0 and row["speedup_vs_eager"] > 0
        for op in ("threshold", "prune", "sap_iteration"):
            (row,) = _rows(data, op, backend)
            # an op whose kernel is missing is reported, not fatal; when it runs it is exact
            assert row["status"] == "ok" or row["status"].startswith("error: ")
            if row["status"] == "ok":
                assert row["max_abs_error"] == 0
    markdown = (out / "bench.md").read_text()
    assert markdown.count("| pqi_global |") >= 2
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional
        assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert not (out / "bench.png").exists()
    assert "pqi_neuron" in printed and "wrote" in printed


def test_compiled_baseline_counts_compile_time_separately():
    config = BenchConfig(
        model_shape=parse_model_shape("512,64,176,1"),
        ops=["pqi_global"],
        repeats=1,
    )
    result = run_benchmark(config)
    (compiled,) = [r for r in result.rows if r["implementation"] == "compiled"]
    assert compiled["status"] == "ok", compiled
    assert compiled["compile_s"] > 0
    assert compiled["max_abs_error"] < 1e-6
    assert compiled["speedup_vs_compiled"] == pytest.approx(1.0)


def test_unavailable_backend_is_reported_not_fatal(capsys):
    code = main(["bench", *TINY, "--no-compile", "--ops", "pqi_global", "--backend", "cuda"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    if "cuda" not in available_backends(torch.device("cpu")):
        assert "error: RuntimeError: backend 'cuda' is not available" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--ops", "pqi_global,sorting"], "unknown op 'sorting'"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--model-shape", "big"], "expected VOCAB,HIDDEN,INTERMEDIATE,LAYERS"),
        (["--params", "10"], "--params must be at least"),
    ],
)
def test_bad_bench_arguments(capsys, arguments, message):
    assert main(["bench", *arguments]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("sap-kernels bench: error: ") and message in err
    assert "Traceback" not in err

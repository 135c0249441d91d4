"""`sap-kernels pqi` and `sap-kernels demo` from the command line: output,
exit codes, and one-line errors (never a traceback) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from sap_kernels.cli import EXIT_INPUT_ERROR, EXIT_OK, EXIT_USAGE, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "a.weight": torch.randn(16, 8, generator=generator),
            "a.bias": torch.randn(16, generator=generator),
            "b.weight": torch.randn(8, 16, generator=generator).bfloat16(),
            "c.weight": torch.randint(0, 9, (4, 4), generator=generator, dtype=torch.int32),
        },
        str(path),
    )
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["pqi", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("sap-kernels pqi: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_table_lists_layers_and_skipped_tensors(capsys, checkpoint):
    code, out, err = run(capsys, checkpoint, "--quiet")
    assert code == EXIT_OK, err
    assert "global PQI: 0." in out
    assert "a.weight" in out and "b.weight" in out
    assert "a.bias" not in out  # not selected by the default rule
    assert "c.weight [4, 4] int32: not a floating-point tensor" in out
    assert "1 tensors not selected by the filter" in out


def test_json_and_filters(capsys, checkpoint):
    code, out, _ = run(capsys, checkpoint, "--json", "--filter", "^a\\.")
    assert code == EXIT_OK
    data = json.loads(out)
    assert [layer["name"] for layer in data["layers"]] == ["a.bias", "a.weight"]
    assert data["filter"] == "^a\\."
    code, out, _ = run(capsys, checkpoint, "--json", "--all", "--p", "0.7", "--q", "1.3")
    data = json.loads(out)
    assert (data["p"], data["q"]) == (0.7, 1.3)
    assert len(data["layers"]) == 3 and data["skipped"][0]["name"] == "c.weight"


def test_neuron_scope_table(capsys, checkpoint):
    code, out, _ = run(capsys, checkpoint, "--scope", "neuron", "--quiet")
    assert code == EXIT_OK
    assert "row PQI min" in out


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, tmp_path / "absent.safetensors")
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "no such file")


def test_truncated_header(capsys, tmp_path, checkpoint):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(checkpoint.read_bytes()[:40])
    code, _, err = run(capsys, path)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "not a readable safetensors file", "header")


def test_truncated_data(capsys, tmp_path, checkpoint):
    path = tmp_path / "short.safetensors"
    path.write_bytes(checkpoint.read_bytes()[:-64])
    code, _, err = run(capsys, path)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "not a readable safetensors file")


@pytest.mark.parametrize("name", ["notes.txt", "weights.bin"])
def test_file_that_is_not_a_checkpoint(capsys, tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not a checkpoint\n" * 10)
    code, _, err = run(capsys, path)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "not a checkpoint")


def test_zip_that_is_not_a_torch_file(capsys, tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme", "hello")
    code, _, err = run(capsys, path)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "not a checkpoint")


def test_pickle_with_code_is_refused(capsys, tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"weights": torch.zeros(2, 2), "thing": zipfile.ZipInfo("x")}, path)
    code, _, err = run(capsys, path)
    assert code == EXIT_INPUT_ERROR  # weights_only=True refuses arbitrary objects
    assert_one_line_error(err, "not a checkpoint")


def test_index_problems(capsys, tmp_path, checkpoint):
    bad = tmp_path / "bad.safetensors.index.json"
    bad.write_text('{"metadata": {}}')
    code, _, err = run(capsys, bad)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "not a checkpoint index")
    missing = tmp_path / "missing.safetensors.index.json"
    missing.write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    code, _, err = run(capsys, missing)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "gone.safetensors", "missing")
    stale = tmp_path / "stale.safetensors.index.json"
    stale.write_text(json.dumps({"weight_map": {"z.weight": checkpoint.name}}))
    code, _, err = run(capsys, stale)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "z.weight is listed in the index but not in model.safetensors")


def test_only_non_floating_tensors(capsys, tmp_path):
    path = tmp_path / "ints.safetensors"
    save_file({"q.weight": torch.ones(4, 4, dtype=torch.int8)}, str(path))
    code, _, err = run(capsys, path)
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "no floating-point tensor", "q.weight")


def test_filter_matching_nothing(capsys, checkpoint):
    code, _, err = run(capsys, checkpoint, "--filter", "^nothing$")
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "no tensor matches", "^nothing$")


def test_invalid_regex_and_exponents(capsys, checkpoint):
    code, _, err = run(capsys, checkpoint, "--filter", "(")
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "regular expression")
    code, _, err = run(capsys, checkpoint, "--p", "1.0", "--q", "0.5")
    assert code == EXIT_INPUT_ERROR
    assert_one_line_error(err, "q must be greater than p")


def test_usage_error_exits_2(capsys, checkpoint):
    with pytest.raises(SystemExit) as exit_info:
        main(["pqi", str(checkpoint), "--scope", "row"])
    assert exit_info.value.code == EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_demo_missing_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sap_kernels.demo", None)  # import fails
    monkeypatch.delattr("sap_kernels.demo", raising=False)
    assert main(["demo"]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("sap-kernels demo: error: the demo is not available")
    assert "Traceback" not in err


def test_demo_is_called_with_its_arguments(capsys, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("sap_kernels.demo")
    fake.add_demo_arguments = lambda parser: parser.add_argument("--steps", type=int, default=1)
    fake.run_demo = lambda args: calls.append(args.steps)
    monkeypatch.setitem(sys.modules, "sap_kernels.demo", fake)
    monkeypatch.setattr("sap_kernels.demo", fake, raising=False)
    assert main(["demo", "--steps", "3"]) == EXIT_OK
    assert calls == [3]


def test_demo_prefers_its_own_runner(capsys, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("sap_kernels.demo")
    fake.add_demo_arguments = lambda parser: parser.add_argument(
        "--no-progress", action="store_true"
    )
    fake.run_demo = lambda output_dir="demo-out", *, progress=True: calls.append("run_demo")
    fake.run_demo_from_args = lambda args: calls.append(("from_args", args.no_progress)) or 0
    monkeypatch.setitem(sys.modules, "sap_kernels.demo", fake)
    monkeypatch.setattr("sap_kernels.demo", fake, raising=False)
    assert main(["demo", "--no-progress"]) == EXIT_OK
    assert calls == [("from_args", True)]


def test_module_entry_point_in_a_subprocess(checkpoint):
    done = subprocess.run(
        [sys.executable, "-m", "sap_kernels.cli", "pqi", str(checkpoint), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": REPO},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["global_pqi"] > 0
    missing = subprocess.run(
        [sys.executable, "-m", "sap_kernels.cli", "pqi", "/nonexistent/model.safetensors"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": REPO},
        timeout=120,
    )
    assert missing.returncode == EXIT_INPUT_ERROR
    assert "Traceback" not in missing.stderr and "no such file" in missing.stderr

"""The digits demo runs end to end on a reduced size and writes its outputs."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sap_kernels import demo  # noqa: E402


def test_reduced_demo_runs_end_to_end(tmp_path, capsys):
    parser = demo.add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--reduced", "--no-progress", "--output-dir", str(tmp_path)])
    assert demo.run_demo_from_args(args) == 0
    assert "| model | policy |" in capsys.readouterr().out

    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    config = results["config"]
    assert config["reduced"] and config["iterations"] == 2
    pairs = {(m, p) for m in demo.MODEL_NAMES for p in demo.POLICY_FACTORIES}
    assert {(r["model"], r["policy"]) for r in rows} == pairs
    assert len(rows) == len(pairs) * 3
    for model_name, policy_name in pairs:
        series = [r for r in rows if r["model"] == model_name and r["policy"] == policy_name]
        assert [r["iteration"] for r in series] == [0, 1, 2]
        remaining = [r["remaining_percent"] for r in series]
        assert remaining[0] == 100.0
        assert all(b <= a for a, b in zip(remaining, remaining[1:]))
        assert remaining[-1] < 100.0
        for r in series:
            assert 0.0 <= r["test_accuracy"] <= 1.0
            assert 0.0 <= r["pqi"] < 1.0
            assert r["next_remaining_percent"] <= r["remaining_percent"]
    baseline = [r for r in rows if r["policy"] == "lottery-ticket"]
    assert [round(r["remaining_percent"], 1) for r in baseline[:3]] == [100.0, 80.0, 64.0]

    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "results.md").read_text().count("\n") == len(rows) + 2
    for name in ("accuracy_vs_remaining.png", "pqi_vs_iteration.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_demo_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="policy"):
        demo.run_demo(tmp_path, policies=["magic"], reduced=True, progress=False)
    with pytest.raises(ValueError, match="model"):
        demo.run_demo(tmp_path, models=["resnet"], reduced=True, progress=False)

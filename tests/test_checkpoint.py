"""Streaming PQI of checkpoints (sap_kernels.checkpoint) against sap_kernels.pqi
on the same tensors in memory, and its memory bound."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import sap_kernels
from sap_kernels.checkpoint import ALL_TENSORS, CheckpointError, pqi_of_checkpoint
from sap_kernels.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-9


def _weights(generator) -> dict[str, dict[str, torch.Tensor]]:
    """Two shards of mixed dtypes: measured weights (float32, bfloat16, float16,
    float64, one with exact zeros), a norm vector and a bias (not selected by
    the default rule), an int8 '*weight' (selected, skipped) and int64 ids."""

    def normal(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)

    sparse = normal(48, 40)
    sparse[torch.rand(48, 40, generator=generator) < 0.3] = 0.0
    return {
        "model-00001-of-00002.safetensors": {
            "embed_tokens.weight": normal(300, 32),
            "layers.0.self_attn.q_proj.weight": normal(32, 32, dtype=torch.bfloat16),
            "layers.0.input_layernorm.weight": 1 + 0.05 * normal(32),
            "layers.0.mlp.up_proj.weight": sparse,
            "layers.0.position_ids": torch.arange(16).reshape(1, 16),
        },
        "model-00002-of-00002.safetensors": {
            "layers.1.mlp.down_proj.weight": normal(32, 88, dtype=torch.float16),
            "layers.1.mlp.down_proj.bias": normal(32),
            "layers.1.qint.weight": torch.randint(-8, 8, (16, 16), generator=generator).to(
                torch.int8
            ),
            "lm_head.weight": normal(300, 32, dtype=torch.float64),
        },
    }


def write_sharded(folder, shards) -> str:
    weight_map = {}
    for file_name, tensors in shards.items():
        save_file(tensors, os.path.join(folder, file_name))
        weight_map |= dict.fromkeys(tensors, file_name)
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return index


@pytest.fixture
def sharded(tmp_path):
    shards = _weights(torch.Generator().manual_seed(1234))
    index = write_sharded(tmp_path, shards)
    flat = {name: t for tensors in shards.values() for name, t in tensors.items()}
    return index, flat


def _selected(flat, rule=lambda name, t: name.endswith("weight") and t.dim() > 1):
    return {n: t for n, t in flat.items() if rule(n, t) and t.is_floating_point()}


def _cli_json(capsys, *args) -> dict:
    assert main(["pqi", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "backend, dtypes",
    [
        # float64 is evaluated by the reference only; 'auto' then uses it for the whole list
        ("reference", None),
        ("auto", (torch.float32, torch.bfloat16, torch.float16)),
    ],
)
def test_streamed_pqi_equals_in_memory_pqi(sharded, capsys, backend, dtypes):
    index, flat = sharded
    rule = None if dtypes is None else "proj|embed|qint"
    data = _cli_json(capsys, index, "--backend", backend, *(["--filter", rule] if rule else []))
    if dtypes is None:
        selected = _selected(flat)
    else:
        selected = {n: t for n, t in flat.items() if t.dtype in dtypes and n != "layers.1.qint"}
        selected = {n: t for n, t in selected.items() if any(k in n for k in rule.split("|"))}
    names = [layer["name"] for layer in data["layers"]]
    assert sorted(names) == sorted(selected)
    tensors = [selected[n] for n in names]
    expected_global = float(sap_kernels.pqi(tensors, backend=backend))
    expected_layers = sap_kernels.pqi(tensors, scope="layer", backend=backend).tolist()
    assert abs(data["global_pqi"] - expected_global) <= TOLERANCE
    for layer, expected in zip(data["layers"], expected_layers):
        assert abs(layer["pqi"] - expected) <= TOLERANCE, layer["name"]
        tensor = selected[layer["name"]]
        assert layer["shape"] == list(tensor.shape)
        assert layer["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert layer["zero_fraction"] == pytest.approx(float((tensor == 0).double().mean()))
    assert [s["name"] for s in data["skipped"]] == ["layers.1.qint.weight"]
    assert data["skipped"][0]["dtype"] == "int8"
    assert data["total_weights"] == sum(t.numel() for t in tensors)


def test_neuron_scope_and_blocks_match_in_memory(sharded):
    index, flat = sharded
    whole = pqi_of_checkpoint(index, scope="neuron", backend="reference")
    blocks = pqi_of_checkpoint(index, scope="neuron", backend="reference", block_bytes=256)
    for a, b in zip(whole.layers, blocks.layers):
        expected = sap_kernels.pqi([flat[a.name]], scope="neuron", backend="reference")[0]
        assert torch.allclose(
            torch.tensor(a.row_pqi, dtype=torch.float64), expected, atol=TOLERANCE, rtol=0
        )
        assert torch.allclose(
            torch.tensor(b.row_pqi, dtype=torch.float64), expected, atol=TOLERANCE, rtol=0
        )
        assert abs(a.pqi - b.pqi) <= TOLERANCE
    assert abs(whole.global_pqi - blocks.global_pqi) <= TOLERANCE


def test_state_dict_file_matches_safetensors(sharded, tmp_path):
    index, flat = sharded
    path = tmp_path / "state.pt"
    torch.save({"model": flat, "step": 7}, path)  # nested dicts are flattened with dots
    from_torch = pqi_of_checkpoint(path, filter="^model\\..*weight$", backend="reference")
    from_safetensors = pqi_of_checkpoint(index, filter=ALL_TENSORS, backend="reference")
    measured = {layer.name.removeprefix("model."): layer.pqi for layer in from_torch.layers}
    expected = {
        layer.name: layer.pqi for layer in from_safetensors.layers if layer.name.endswith("weight")
    }
    assert measured.keys() == expected.keys()
    for name, value in measured.items():
        assert abs(value - expected[name]) <= TOLERANCE, name
    assert [s.name for s in from_torch.skipped] == ["model.layers.1.qint.weight"]


def test_sharded_state_dict_index(sharded, tmp_path):
    index, flat = sharded
    weight_map = json.load(open(index))["weight_map"]
    folder = tmp_path / "bin"
    folder.mkdir()
    for shard in set(weight_map.values()):
        names = [n for n, s in weight_map.items() if s == shard]
        torch.save({n: flat[n] for n in names}, folder / shard.replace(".safetensors", ".bin"))
    bin_map = {n: s.replace(".safetensors", ".bin") for n, s in weight_map.items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": bin_map}))
    from_bins = pqi_of_checkpoint(folder, backend="reference")  # the directory finds the index
    from_safetensors = pqi_of_checkpoint(index, backend="reference")
    assert from_bins.format == "sharded"
    assert {x.name: x.pqi for x in from_bins.layers} == {
        x.name: x.pqi for x in from_safetensors.layers
    }
    assert from_bins.global_pqi == from_safetensors.global_pqi


def test_result_object_and_all_tensors(sharded):
    index, flat = sharded
    result = pqi_of_checkpoint(index, filter=ALL_TENSORS, scope="global")
    floating = [n for n, t in flat.items() if t.is_floating_point()]
    assert sorted(layer.name for layer in result.layers) == sorted(floating)
    assert {s.name for s in result.skipped} == {"layers.1.qint.weight", "layers.0.position_ids"}
    assert result.format == "sharded"
    assert json.loads(result.to_json())["global_pqi"] == pytest.approx(result.global_pqi)


def test_all_zero_tensor_is_nan_not_an_error(tmp_path):
    path = tmp_path / "zeros.safetensors"
    save_file({"a.weight": torch.zeros(4, 4), "b.weight": torch.randn(4, 4)}, str(path))
    result = pqi_of_checkpoint(path)
    assert math.isnan(result.layers[0].pqi) and result.layers[0].zero_fraction == 1.0
    assert math.isfinite(result.global_pqi)
    assert json.loads(result.to_json())["layers"][0]["pqi"] is None  # strict JSON


def test_nan_weights_are_skipped_and_listed(tmp_path):
    path = tmp_path / "nan.safetensors"
    bad = torch.randn(4, 4)
    bad[1, 2] = math.nan
    save_file({"a.weight": bad, "b.weight": torch.randn(4, 4)}, str(path))
    result = pqi_of_checkpoint(path, backend="reference")
    assert [layer.name for layer in result.layers] == ["b.weight"]
    assert result.skipped[0].name == "a.weight" and "NaN" in result.skipped[0].reason


def test_filter_matching_nothing_raises(sharded):
    index, _ = sharded
    with pytest.raises(CheckpointError, match="no tensor matches"):
        pqi_of_checkpoint(index, filter="^nothing$")


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from sap_kernels.checkpoint import pqi_of_checkpoint

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    torch.zeros(1).sum()
    before = status("VmRSS")
    result = pqi_of_checkpoint(sys.argv[1], block_bytes=16 << 20)
    print(json.dumps({"growth": status("VmHWM") - before, "weights": result.total_weights}))
    """
)


def _write_large_checkpoint(folder) -> tuple[str, int]:
    """3 shards of ~110 MB (a float32 and a bfloat16 matrix each), written one
    tensor pair at a time; returns the index path and the number of weights."""
    weight_map, weights = {}, 0
    generator = torch.Generator().manual_seed(7)
    for shard in range(3):
        name = f"model-{shard}.safetensors"
        tensors = {
            f"layers.{shard}.mlp.weight": torch.randn(6400, 4096, generator=generator),
            f"layers.{shard}.attn.weight": torch.randn(1024, 2048, generator=generator).bfloat16(),
        }
        save_file(tensors, os.path.join(folder, name))
        weight_map |= dict.fromkeys(tensors, name)
        weights += sum(t.numel() for t in tensors.values())
        del tensors
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"weight_map": weight_map}, f)
    return index, weights


@pytest.mark.slow
def test_peak_memory_far_below_checkpoint_size(tmp_path):
    index, weights = _write_large_checkpoint(tmp_path)
    size = sum(
        os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith(".safetensors")
    )
    assert size > 300e6
    # a fresh process that only reads: its peak RSS (VmHWM, which also counts
    # memory-mapped file pages) minus its RSS before reading
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, index],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": REPO},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["weights"] == weights
    # about 30 MB seen with 16 MiB blocks, for ~330 MB read
    assert report["growth"] < size / 5, f"peak RSS grew {report['growth'] / 1e6:.0f} MB"

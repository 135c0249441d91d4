"""The CUDA ops' host-side piece tables and their cache (csrc/cuda/piece_tables.h)
checked with the host compiler: no GPU, torch or CUDA toolkit needed. The checks
themselves are in tests/cpp/test_piece_tables.cpp (a reference piece builder on
random layouts with empty tensors and rows, the cache key's fields, the LRU)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILER = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_piece_tables_host(tmp_path):
    binary = tmp_path / "test_piece_tables"
    source = ROOT / "tests" / "cpp" / "test_piece_tables.cpp"
    flags = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread"]
    build = subprocess.run(
        [COMPILER, *flags, f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout

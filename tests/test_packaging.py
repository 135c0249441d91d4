"""The package imports and the reference backend works when the extension is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_EXTENSION = """
import sys, warnings
sys.modules["sap_kernels._C"] = None  # as if the build had failed
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import sap_kernels
assert not sap_kernels.has_extension()
assert any("only backend='reference'" in str(w.message) for w in caught), caught
import torch
value = sap_kernels.pqi([torch.ones(4), torch.zeros(3)])
assert abs(float(value) - (1 - 7 ** (1 - 2) * 16 / 4)) < 1e-12, value
assert sap_kernels.available_backends(torch.device("cpu"))[-1] == "reference"
try:
    sap_kernels.pqi([torch.ones(4)], backend="cpu")
except RuntimeError as error:
    assert "compiled extension" in str(error)
else:
    raise AssertionError("backend='cpu' should fail without the extension")
print("ok")
"""


def test_imports_without_extension():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTENSION], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

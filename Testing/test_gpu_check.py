"""benchmarks/gpu_check.sh keeps working on machines without a GPU: its --tiny run at toy sizes on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_at_toy_sizes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED" not in table
    from CounterfactualVALib.methods import available_methods

    for name in available_methods():
        assert f"training step {name} 16^3" in table
    for check in ("generator forward 16^3", "ICAM 2-sample maps", "fresh process", "warm worker"):
        assert check in table, check

"""Data-parallel training under torchrun: two CPU ranks (Gloo) train one model and stay in sync."""

from __future__ import annotations

import os
import subprocess
import sys

from CounterfactualVALib.checkpoint import read_metadata


def test_torchrun_two_ranks_trains_one_model(synthetic_2d, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "CounterfactualVACLI", "train", "--method", "vantgan", "--data", str(synthetic_2d), "--out", str(out),
        "--steps", "3", "--spatial-dims", "2", "--size", "32", "32", "--spacing", "1", "1", "--crop", "image", "--intensity", "minmax",
        "--config", "ngf=8", "--config", "n_blocks=2", "--config", "ndf=8", "--val-every", "3", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CFVA_DEBUG_SYNC": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = read_metadata(out / "model.safetensors")
    assert metadata.training["world_size"] == 2
    # every rank reported the same digest of its weights after the last step (see loop._report_sync)
    digests = sorted(line.split()[-1] for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("SYNC"))
    assert len(digests) == 2 and digests[0] == digests[1], digests

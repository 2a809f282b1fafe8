"""CUDA checks, run by benchmarks/gpu_check.sh on a lent GPU (skipped where torch sees no CUDA device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = REPO / "samples" / "vantgan_phantom3d.safetensors"
SAMPLE_SCAN = REPO / "samples" / "phantom_atrophy.nii.gz"


def test_the_sample_maps_on_the_gpu_match_the_cpu(tmp_path):
    from CounterfactualVALib.inference import run_attribution

    cpu = run_attribution(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "cpu", device="cpu", figure=False)
    gpu = run_attribution(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "gpu", device="cuda", figure=False)
    assert gpu.device.startswith("CUDA")
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cpu" / cpu.outputs.attribution)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "gpu" / gpu.outputs.attribution)))
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3  # fp32 on both (TF32 off by default for convolutions? bounded anyway)


def test_bf16_channels_last_generator_stays_close_to_fp32():
    from CounterfactualVALib.networks import ResNetGenerator

    torch.manual_seed(0)
    net = ResNetGenerator(3, ngf=16, n_blocks=3, output_activation="tanh2").cuda().eval()
    x = torch.randn(1, 1, 64, 64, 64, device="cuda")
    with torch.no_grad():
        reference = net(x)
        net = net.to(memory_format=torch.channels_last_3d)
        with torch.autocast("cuda", torch.bfloat16):
            fast = net(x.contiguous(memory_format=torch.channels_last_3d)).float()
    error = float((fast - reference).norm() / reference.norm())
    assert 0 < error < 3e-2, error


def test_the_worker_runs_on_the_gpu_and_releases_it(tmp_path):
    from CounterfactualVALib.worker import WorkerClient

    with WorkerClient() as client:
        summary = client.attribute(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "out", device="cuda", figure=False)
        assert summary.device.startswith("CUDA")
        client.release()

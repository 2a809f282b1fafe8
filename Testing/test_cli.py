"""The shell front door, end to end: the same command the Slicer module runs in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_oblique_volume, tiny_method_config

from CounterfactualVALib.checkpoint import ModelMetadata, save_model
from CounterfactualVALib.methods import create_method
from CounterfactualVALib.inference import STAGES
from CounterfactualVALib.preprocessing import PreprocessingConfig, head_mask


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "CounterfactualVACLI", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def random_3d_model(tmp_path_factory):
    """An untrained 3D VANT-GAN in a valid model file: enough to test geometry and I/O."""
    import torch

    path = tmp_path_factory.mktemp("model3d") / "vantgan3d.safetensors"
    torch.manual_seed(0)  # fixed weights: the test's numbers do not change from run to run
    method = create_method("vantgan", 3, tiny_method_config())
    pre = PreprocessingConfig(spatial_dims=3, size=(32, 32, 32), spacing=(2.0, 2.0, 2.0))
    meta = ModelMetadata(method="vantgan", method_config=method.config, preprocessing=pre.to_dict(), networks=["a2m"], outputs=list(method.outputs))
    return save_model(path, method.inference_state_dict(), meta)


def test_attribute_3d_oblique_nrrd_outputs_overlay_the_input(random_3d_model, tmp_path):
    image = make_oblique_volume()
    scan = tmp_path / "scan.nrrd"
    sitk.WriteImage(image, str(scan))
    out = tmp_path / "out"
    result = run_cli("attribute", "--model", random_3d_model, "--input", scan, "--out", out, "--progress")
    assert result.returncode == 0, result.stderr
    progress = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PROGRESS")]
    assert progress == sorted(progress) and progress[-1] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    files = summary["outputs"]
    assert files["counterfactual"] == "scan_counterfactual.nrrd" and files["mask"] == "scan_mask.nrrd"
    for key in ("counterfactual", "attribution", "mask"):
        written = sitk.ReadImage(str(out / files[key]))
        assert written.GetSize() == image.GetSize()
        assert np.allclose(written.GetOrigin(), image.GetOrigin())
        assert np.allclose(written.GetSpacing(), image.GetSpacing())
        assert np.allclose(written.GetDirection(), image.GetDirection())
    cf = sitk.GetArrayFromImage(sitk.ReadImage(str(out / files["counterfactual"])))
    amap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / files["attribution"])))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / files["mask"])))
    assert np.allclose(cf, sitk.GetArrayFromImage(image) + amap, atol=1e-3)  # counterfactual = input + map
    assert set(np.unique(mask)) <= {0, 1} and mask.sum() > 0
    # the paper rule on a head-cropped model: half the largest |map| inside the head (an untrained model's
    # largest value may lie in the air around it)
    head = head_mask(sitk.GetArrayFromImage(image))
    assert np.isclose(summary["thresholds"]["applied_to_abs_map"], 0.5 * np.abs(amap[head]).max(), rtol=1e-5)
    assert (out / "scan_figure.png").stat().st_size > 10_000
    assert list(summary["timings_s"]) == [*STAGES, "total"]


def test_attribute_2d_trained_model_percentile_rule(tiny_2d_model, synthetic_2d, tmp_path):
    image_path = next((synthetic_2d.parent / "images").iterdir())
    out = tmp_path / "out"
    result = run_cli("attribute", "--model", tiny_2d_model, "--input", image_path, "--out", out, "--threshold-rule", "percentile", "--threshold-value", 90, "--format", ".nii.gz")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / summary["outputs"]["mask"])))
    assert 0.05 <= mask.mean() <= 0.15  # top 10 % of |map| over the (all-foreground) synthetic image


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda p: p.write_text("not an image"), "Cannot read"),
        (lambda p: sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(p)), "components per voxel"),
        (lambda p: sitk.WriteImage(sitk.Image([16, 16, 16], sitk.sitkFloat32), str(p)), "constant"),
    ],
)
def test_bad_input_exits_2_with_a_named_error_and_writes_nothing(random_3d_model, tmp_path, make_input, message):
    bad = tmp_path / "bad.nrrd"
    make_input(bad)
    out = tmp_path / "out"
    result = run_cli("attribute", "--model", random_3d_model, "--input", bad, "--out", out)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR:") and message in last
    assert not out.exists() or not any(out.iterdir())


def test_2d_image_to_3d_model_is_refused(random_3d_model, tmp_path):
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(20, 20)).astype(np.float32)), str(flat))
    result = run_cli("attribute", "--model", random_3d_model, "--input", flat, "--out", tmp_path / "o")
    assert result.returncode == 2 and "model is 3D but the input is a 2D image" in result.stderr


def test_info_prints_metadata_without_weights(random_3d_model):
    result = run_cli("info", random_3d_model)
    assert result.returncode == 0
    assert json.loads(result.stdout)["preprocessing"]["size"] == [32, 32, 32]


def test_one_slice_oblique_volume_keeps_its_own_geometry_through_a_2d_model(tiny_2d_model, tmp_path):
    """A 2D slice saved as a one-slice oblique 3D file (as Slicer does) comes back in that file's geometry."""
    array = np.random.default_rng(3).normal(size=(1, 32, 32)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.8, 3.0))
    image.SetOrigin((10.0, -20.0, 35.5))
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.2, 0.1, -0.3)
    image.SetDirection(rotation.GetMatrix())
    scan = tmp_path / "slice.nrrd"
    sitk.WriteImage(image, str(scan))
    out = tmp_path / "out"
    result = run_cli("attribute", "--model", tiny_2d_model, "--input", scan, "--out", out, "--no-figure")
    assert result.returncode == 0, result.stderr
    for name in ("counterfactual", "attribution", "mask"):
        written = sitk.ReadImage(str(out / f"slice_{name}.nrrd"))
        assert written.GetSize() == image.GetSize()
        assert np.allclose(written.GetSpacing(), image.GetSpacing())
        assert np.allclose(written.GetOrigin(), image.GetOrigin())
        assert np.allclose(written.GetDirection(), image.GetDirection())

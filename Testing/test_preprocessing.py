"""Preprocessing to the model grid and back: outputs must overlay the input voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_oblique_volume

from CounterfactualVALib.imageio import InputError
from CounterfactualVALib.preprocessing import PreprocessingConfig, preprocess, preprocess_companion, to_input_grid

CONFIG_3D = PreprocessingConfig(spatial_dims=3, size=(48, 48, 48), spacing=(1.5, 1.5, 1.5))


def test_model_grid_has_configured_geometry_and_range():
    image = make_oblique_volume()
    array, state = preprocess(image, CONFIG_3D)
    assert array.shape == (48, 48, 48)
    assert state.spacing == (1.5, 1.5, 1.5)
    # RAS orientation expressed in ITK's LPS physical space: x axis points to -L, y to -P, z to +S
    assert np.allclose(np.asarray(state.direction).reshape(3, 3), np.diag([-1, -1, 1]))
    assert array.min() >= -1 and array.max() <= 1
    assert array.min() == pytest.approx(-1, abs=1e-3)  # background maps to -1


def test_round_trip_restores_input_geometry_and_values():
    """intensity -> model grid -> input grid: identical geometry; values agree inside the head up to
    interpolation error (two linear resamplings of a step edge), and the off-centre blob lands in place."""
    image = make_oblique_volume()
    array, state = preprocess(image, CONFIG_3D)
    back = to_input_grid(array, state, image, kind="intensity")
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetOrigin(), image.GetOrigin())
    assert np.allclose(back.GetSpacing(), image.GetSpacing())
    assert np.allclose(back.GetDirection(), image.GetDirection())
    original = sitk.GetArrayFromImage(image)
    restored = sitk.GetArrayFromImage(back)
    # the blob's centre of mass in physical space survives the round trip to within a voxel
    def blob_centre(a):
        idx = np.argwhere(a > 150)
        return np.asarray(image.TransformContinuousIndexToPhysicalPoint(idx.mean(0)[::-1].tolist()))

    assert np.linalg.norm(blob_centre(original) - blob_centre(restored)) < 1.0
    interior = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Cast(image > 50, sitk.sitkUInt8), [3, 3, 2])) > 0
    error = np.abs(original - restored)[interior & (original < 150)]
    assert np.median(error) < 2.0  # noise std is 1 on a 100 plateau


def test_difference_maps_map_back_in_input_units_and_zero_outside():
    image = make_oblique_volume()
    small_grid = PreprocessingConfig(spatial_dims=3, size=(24, 24, 24), spacing=(1.5, 1.5, 1.5))
    array, state = preprocess(image, small_grid)
    constant = np.full_like(array, 0.5)  # +0.5 model units everywhere on the model grid
    back = sitk.GetArrayFromImage(to_input_grid(constant, state, image, kind="difference"))
    inside = back[back != 0]
    assert np.allclose(inside[np.abs(inside - inside.max()) < 1e-3], 0.5 * state.intensity_scale, rtol=1e-4)
    # the model grid (36 mm cube) does not cover the whole input (44 x 32 x 60 mm, oblique): outside it, no difference
    assert (back == 0).any()


def test_companion_difference_is_converted_to_model_units():
    image = make_oblique_volume()
    _, state = preprocess(image, CONFIG_3D)
    diff = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    diff.CopyInformation(image)
    diff += 10.0
    on_grid = preprocess_companion(diff, state, "difference")
    assert np.allclose(on_grid[on_grid != 0], 10.0 / state.intensity_scale, rtol=1e-4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), "components per voxel"),
        (lambda: sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), "4D"),
        (lambda: sitk.Image([8, 8, 8], sitk.sitkFloat32), "constant"),
        (lambda: sitk.Image([8, 8], sitk.sitkFloat32) + 1, "2D image"),
    ],
)
def test_bad_inputs_are_named(make, message):
    with pytest.raises(InputError, match=message):
        preprocess(make(), CONFIG_3D)


def test_nan_voxels_are_reported_with_a_fix():
    image = make_oblique_volume()
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    with pytest.raises(InputError, match="1 NaN/Inf voxels.*[Rr]eplace them"):
        preprocess(bad, CONFIG_3D)


def test_single_slice_volume_feeds_a_2d_model():
    config = PreprocessingConfig(spatial_dims=2, size=(16, 16), spacing=(1.0, 1.0), crop="image", intensity="minmax")
    values = np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    array, _ = preprocess(image, config)
    # the slice on the model's own grid: the voxels unchanged but for the min-max mapping to [-1, 1]
    expected = 2 * (values[0] - values.min()) / (values.max() - values.min()) - 1
    np.testing.assert_allclose(array, expected, atol=1e-5)
    with pytest.raises(InputError, match="model is 2D but the input is a 3D volume"):
        preprocess(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32)), config)

"""Training-time anatomy augmentation (issue 9) and the U-Net decoder without a transposed-convolution grid."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from CounterfactualVALib.networks.vagan import MapUNet
from CounterfactualVATrainingLib.augmentation import AnatomyAugmentation, make_augmentation
from CounterfactualVATrainingLib.data import CohortTensors, UnpairedSampler, step_generator

SHAPE = (20, 24, 22)  # (z, y, x)


def _head(shape=SHAPE, radius=7.0) -> torch.Tensor:
    """A ball of tissue (0.2) on background (-1), with a bright marker (0.9) left of the centre (low x)."""
    z, y, x = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    ball = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius**2
    image = np.where(ball, 0.2, -1.0).astype(np.float32)
    marker = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2] + 4) ** 2) <= 2.0**2
    image[marker] = 0.9
    return torch.from_numpy(image)[None, None]


def test_augmentation_is_a_function_of_the_step_generator_only():
    image = _head().repeat(3, 1, 1, 1, 1)
    augment = AnatomyAugmentation()
    first = augment(image, torch.Generator().manual_seed(7))[0]
    again = augment(image, torch.Generator().manual_seed(7))[0]
    other = augment(image, torch.Generator().manual_seed(8))[0]
    assert torch.equal(first, again), "a resumed step must augment exactly as the uninterrupted one did"
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1]), "every image of a batch gets its own draw"


def test_zero_strength_augmentation_is_the_identity():
    image = _head()
    still = AnatomyAugmentation(scale=0, rotate_degrees=0, translate_voxels=0, bias=0, log_gamma=0)
    assert torch.allclose(still(image, torch.Generator().manual_seed(0))[0], image, atol=1e-5)


def test_head_size_changes_within_the_scale_range_and_background_stays_background():
    image = _head()
    tissue = int((image > -0.5).sum())
    augment = AnatomyAugmentation(scale=0.15, rotate_degrees=0, translate_voxels=0, bias=0, log_gamma=0)
    ratios = []
    for seed in range(12):
        out = augment(image, torch.Generator().manual_seed(seed))[0]
        assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
        assert float(out[0, 0, 0, 0, 0]) == -1.0, "padding must bring in background (-1), not 0"
        ratios.append(int((out > -0.5).sum()) / tissue)
    # volume scales by the product of three factors in [0.85, 1.15], within voxelisation error
    assert 0.85**3 - 0.05 <= min(ratios) and max(ratios) <= 1.15**3 + 0.05
    assert max(ratios) - min(ratios) > 0.2, f"head sizes barely vary: {ratios}"


def test_no_flip_a_left_marker_stays_left():
    image = _head()
    x_centre = (SHAPE[2] - 1) / 2
    augment = AnatomyAugmentation()
    for seed in range(20):
        out = augment(image, torch.Generator().manual_seed(seed))[0][0, 0].numpy()
        marker = np.argwhere(out > 0.6)
        assert len(marker), "the marker vanished"
        assert marker[:, 2].mean() < x_centre - 2, f"seed {seed}: a lateralised effect changed side"


def test_bias_field_is_smooth_and_multiplicative():
    flat = torch.full((1, 1) + SHAPE, 0.0)  # tissue at (x + 1) / 2 = 0.5 everywhere
    augment = AnatomyAugmentation(scale=0, rotate_degrees=0, translate_voxels=0, bias=0.2, log_gamma=0)
    out = augment(flat, torch.Generator().manual_seed(3))[0][0, 0].numpy()
    gain = (out + 1.0) / 2.0 / 0.5
    assert 0.75 < gain.min() < gain.max() < 1.3 and gain.max() - gain.min() > 0.05
    # smooth: neighbouring voxels differ by a small fraction of the field's range
    step = np.abs(np.diff(gain, axis=2)).max()
    assert step < 0.25 * (gain.max() - gain.min())


def test_sampler_augments_each_class_and_moves_the_mask_with_its_image():
    images = torch.cat([_head(), _head()], 0)
    masks = (images > 0.6).float()  # the marker, as an abnormal subject's truth
    cohort = CohortTensors(images, torch.tensor([0, 1]), masks, torch.ones(2, dtype=torch.bool), ["n", "a"])
    plain = UnpairedSampler(cohort, batch_size=2)
    augmented = UnpairedSampler(cohort, batch_size=2, augmentation=AnatomyAugmentation())
    generator = step_generator(0, 3)
    batch = augmented.batch(generator, torch.device("cpu"))
    reference = plain.batch(step_generator(0, 3), torch.device("cpu"))
    assert not torch.equal(batch["normal"], reference["normal"])
    assert not torch.equal(batch["abnormal"][0], batch["abnormal"][1])
    for image, mask in zip(batch["abnormal"], batch["abnormal_mask"]):
        # the moved mask still marks the moved marker
        bright = image[0] > 0.6
        assert float(mask[0][bright].mean()) > 0.5


def test_unknown_augmentation_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="one of none, anatomy"):
        make_augmentation("flip")
    assert make_augmentation("none") is None
    result = subprocess.run(
        [sys.executable, "-m", "CounterfactualVACLI", "train", "--method", "vantgan", "--data", "x.csv", "--out", "o", "--augmentation", "flip"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "--augmentation" in result.stderr


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_interpolating_decoder_prints_no_grid_while_the_transposed_one_does(spatial_dims):
    """On a constant input, the output away from the borders has the same value at even and odd voxels when
    every output voxel is made the same way; a stride-2 transposed convolution gives its two kernel phases per
    axis different values (the checkerboard seen in short-trained 3D maps)."""
    size = 56  # the centre lies beyond the reach of the zero padding at every level (receptive field ~20 voxels)
    inner = (0, 0) + (slice(22, size - 22),) * spatial_dims
    phase_gap = {}
    for upsample in ("linear", "transposed"):
        torch.manual_seed(1)
        net = MapUNet(spatial_dims, 1, 1, channels=(4, 8, 16), norm=None, head_init_std=0.5, upsample=upsample)
        for p in net.parameters():  # biases too, so that no unit is dead on a constant input
            torch.nn.init.normal_(p, 0.0, 0.3)
        with torch.no_grad():
            out = net(torch.full((1, 1) + (size,) * spatial_dims, 0.3))[inner]
        even, odd = out[0::2].mean(), out[1::2].mean()  # along the first axis
        phase_gap[upsample] = float((even - odd).abs() / (out.abs().mean() + 1e-12))
    assert phase_gap["linear"] < 1e-3, phase_gap
    assert phase_gap["transposed"] > 1e-2, phase_gap


def test_interpolating_decoder_keeps_odd_grid_sizes():
    net = MapUNet(3, 1, 1, channels=(4, 8, 16), norm=None, upsample="linear")
    assert net(torch.zeros(1, 1, 21, 23, 19)).shape == (1, 1, 21, 23, 19)
    with pytest.raises(ValueError, match="upsample"):
        MapUNet(3, 1, 1, channels=(4, 8), upsample="nearest-ish")


def test_geometry_augmentation_moves_the_head_and_keeps_its_intensities():
    """"geometry" draws size and pose only: a flat tissue stays at its value (no bias, no contrast change),
    while the head's extent changes from draw to draw."""
    flat = torch.full((1, 1) + SHAPE, 0.0)
    geometry, anatomy = make_augmentation("geometry"), make_augmentation("anatomy")
    centre = tuple(slice(s // 2 - 2, s // 2 + 2) for s in SHAPE)
    inside = geometry(flat, torch.Generator().manual_seed(3))[0][(0, 0) + centre]
    assert torch.allclose(inside, torch.zeros_like(inside), atol=1e-5)
    changed = anatomy(flat, torch.Generator().manual_seed(3))[0][(0, 0) + centre]
    assert float((changed - 0.0).abs().max()) > 0.02  # the full augmentation does change intensities
    image = _head()
    extents = {int((geometry(image, torch.Generator().manual_seed(seed))[0] > -0.5).sum()) for seed in range(6)}
    assert len(extents) > 3

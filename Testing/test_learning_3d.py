"""3D training learns within a CPU minute: the CPU configuration (change-predicting U-Net with an interpolating
decoder, cycle weight 1, no identity term, batch > 1, generator weight average) trained by the shared loop on a
small 3D cohort localises a planted effect on held-out subjects, far above the untrained model (issue 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from CounterfactualVALib.cohort import write_cohort_csv, write_image
from CounterfactualVALib.inference import load_model
from CounterfactualVALib.methods import create_method
from CounterfactualVALib.metrics import map_scores
from CounterfactualVATrainingLib.data import cache_split, load_cohort
from CounterfactualVALib.preprocessing import PreprocessingConfig
from CounterfactualVATrainingLib.loop import TrainingConfig, train

SIZE = 16
PREPROCESSING = {"spatial_dims": 3, "size": [SIZE] * 3, "spacing": [1.0] * 3, "crop": "image", "intensity": "none"}
CPU_CONFIG = {
    "generator": "unet", "unet_channels": [8, 16], "unet_upsample": "linear", "ndf": 8, "n_layers_d": 2,
    "lambda_cycle": 1.0, "identity_fraction": 0.0, "decay_start_fraction": 1.0, "lr": 1e-3,
    "ema_decay": 0.95,
}


def _cohort(folder, n_per_class=40, n_test=8, seed=0):
    """A 'brain': one fixed smooth pattern (the anatomy every subject shares), shifted by up to a voxel per axis,
    plus each subject's own smooth variation and noise; abnormal subjects lose intensity (-0.5 at the peak) in
    a blob at one place of that anatomy. The effect sits at the same place in every patient, and finding it
    means telling it from the variation, as in the phantoms, at a size a test can train on in a minute."""
    rng = np.random.default_rng(seed)
    anatomy = gaussian_filter(np.random.default_rng(123).standard_normal((SIZE + 2,) * 3), 1.5)
    anatomy = anatomy / anatomy.std() * 0.3 - 0.2
    z, y, x = np.indices((SIZE,) * 3)
    rows = []
    for i in range(2 * n_per_class + 2 * n_test):
        label = i % 2
        split = "test" if i >= 2 * n_per_class else ("val" if i >= 2 * n_per_class - 16 else "train")
        shift = rng.integers(0, 3, 3)
        own = gaussian_filter(rng.standard_normal((SIZE,) * 3), 1.5)
        image = anatomy[shift[0]:shift[0] + SIZE, shift[1]:shift[1] + SIZE, shift[2]:shift[2] + SIZE]
        image = image + own / own.std() * 0.08 + 0.02 * rng.standard_normal((SIZE,) * 3)
        effect = np.zeros_like(image)
        if label:
            c = np.array([5, 8, 10]) - shift + 1
            effect = -0.5 * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * 1.5**2))
        write_image((image + effect).astype(np.float32), folder / f"img_{i:03d}.nii.gz")
        mask = ""
        if label:
            write_image(effect.astype(np.float32), folder / f"diff_{i:03d}.nii.gz")
            mask = f"diff_{i:03d}.nii.gz"
        rows.append({"path": f"img_{i:03d}.nii.gz", "label": label, "mask": mask, "split": split})
    return write_cohort_csv(folder / "cohort.csv", rows)


def _test_ncc(method, csv_path) -> float:
    test = cache_split(load_cohort(csv_path)["test"], PreprocessingConfig(**PREPROCESSING))
    abnormal = test.labels == 1
    with torch.no_grad():
        maps = method.attribute(test.images[abnormal]).attribution
    return float(np.mean([map_scores(m[0].numpy(), t[0].numpy())["ncc"] for m, t in zip(maps, test.masks[abnormal])]))


@pytest.mark.parametrize("augmentation", ["none"])
def test_cpu_configuration_learns_a_3d_effect_in_a_minute(tmp_path, augmentation):
    csv_path = _cohort(tmp_path)
    torch.manual_seed(0)
    untrained = _test_ncc(create_method("vantgan", 3, CPU_CONFIG), csv_path)
    config = TrainingConfig(
        method="vantgan", data=str(csv_path), out=str(tmp_path / "run"), preprocessing=PREPROCESSING,
        method_config=CPU_CONFIG, steps=150, batch_size=4, augmentation=augmentation,
        val_every=25, checkpoint_every=150, command="pytest 3D learning",
    )
    model_file = train(config)
    trained = _test_ncc(load_model(model_file).method, csv_path)
    # measured when written: 0.72 (validation 0.33 / 0.41 / 0.75 / 0.70 / 0.73 / 0.66 every 25 steps), untrained
    # -0.04; without the weight average the same run swung between 0.07 and 0.74, with discriminator position
    # channels the map did not leave zero in 200 steps
    assert trained > 0.45 and trained > untrained + 0.4, f"held-out NCC {trained:.3f} (untrained {untrained:.3f})"


def test_training_leaves_denormal_floats_representable(tmp_path):
    """Training flushes denormals for speed; the process (a Slicer console, a test run) gets IEEE floats back."""
    import sys as _sys

    csv_path = _cohort(tmp_path, n_per_class=10, n_test=2)
    config = TrainingConfig(method="vantgan", data=str(csv_path), out=str(tmp_path / "run"), preprocessing=PREPROCESSING,
                            method_config=CPU_CONFIG, steps=2, batch_size=2, val_every=2, checkpoint_every=2, command="pytest")
    train(config)
    tiny = np.array([_sys.float_info.min]) / np.array([4.0])  # computed on the CPU's vector unit, where FTZ acts
    assert tiny[0] != 0 and float(torch.tensor(1e-45) * 1.0) != 0, "denormals are still flushed to zero after training"

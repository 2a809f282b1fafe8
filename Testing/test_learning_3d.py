"""3D training learns within a CPU minute: the light CPU configurations (VANT-GAN's change-predicting U-Net with an
interpolating decoder, cycle weight 1, no identity term, generator weight average; VA-GAN's and the attention
CycleGAN's narrow networks) trained by the shared loop on a small 3D cohort localise a planted effect on held-out
subjects, far above the untrained model and above a classifier's Grad-CAM trained on the same data (issue 9)."""

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
    "ema_decay": 0.95, "unet_activation": "leaky_relu",
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


def _test_ncc(method, csv_path, **options) -> float:
    test = cache_split(load_cohort(csv_path)["test"], PreprocessingConfig(**PREPROCESSING))
    abnormal = test.labels == 1
    with torch.no_grad():
        maps = method.attribute(test.images[abnormal], **options).attribution
    return float(np.mean([map_scores(m[0].numpy(), t[0].numpy())["ncc"] for m, t in zip(maps, test.masks[abnormal])]))


def _train(method, config, csv_path, out, steps, batch_size, augmentation="none"):
    return load_model(train(TrainingConfig(
        method=method, data=str(csv_path), out=str(out), preprocessing=PREPROCESSING, method_config=config,
        steps=steps, batch_size=batch_size, augmentation=augmentation, val_every=25, checkpoint_every=steps,
        command="pytest 3D learning",
    ))).method


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The toy cohort and the Grad-CAM NCC of a classifier trained on it (the baseline every generator must beat)."""
    folder = tmp_path_factory.mktemp("cohort3d")
    csv_path = _cohort(folder)
    torch.manual_seed(0)
    classifier = _train("classifier", {"channels": 8, "n_layers": 2, "lr": 1e-3}, csv_path, folder / "classifier", 100, 8)
    return csv_path, _test_ncc(classifier, csv_path, explainer="gradcam")


#: the light 3D configurations (docs/design.md, "3D on a CPU budget"), at the toy's 16^3 with one U-Net level less
LEARNING_CASES = {
    # measured when written: 0.72 (Grad-CAM 0.28; validation 0.33 / 0.41 / 0.75 / 0.70 / 0.73 / 0.66 every 25 steps), untrained
    # -0.04; without the weight average the same run swung between 0.07 and 0.74, with discriminator position
    # channels the map did not leave zero in 200 steps
    "vantgan": (CPU_CONFIG, 150, 4),
    # measured when written: 0.63 after 150 steps, untrained 0.16 (the classifier's Grad-CAM: 0.28)
    "vagan": ({"channels": [8, 16], "critic_channels": [8, 16, 32], "critic_convs_per_stage": [1, 1, 2],
               "critic_iters_warmup": 20, "warmup_generator_steps": 10}, 150, 4),
    # measured when written: 0.68 after 150 steps, untrained -0.03. The reference code's two stages, not the seed
    # paper's one stage (the 2D default): frozen attention confines a short run's change (one stage: 0.40)
    "agcyclegan": ({"ngf": 8, "n_blocks": 2, "n_downsampling": 2, "ndf": 8, "n_layers_d": 2, "attention_channels": [8, 16],
                    "lr": 1e-3, "lr_d": 1e-3, "decay_start_fraction": 1.0, "attention_freeze_fraction": 0.3, "beta2": 0.999}, 150, 4),
}


@pytest.mark.parametrize("method", list(LEARNING_CASES))
def test_cpu_configuration_learns_a_3d_effect_in_a_minute(tmp_path, cohort, method):
    """A generator trained in the test beats the untrained generator and a classifier's Grad-CAM on held-out
    subjects (issue 9: the 3D check)."""
    csv_path, gradcam = cohort
    config, steps, batch_size = LEARNING_CASES[method]
    torch.manual_seed(0)
    untrained = _test_ncc(create_method(method, 3, config), csv_path)
    trained = _test_ncc(_train(method, config, csv_path, tmp_path / "run", steps, batch_size), csv_path)
    report = f"{method}: held-out NCC {trained:.3f} (untrained {untrained:.3f}, Grad-CAM {gradcam:.3f})"
    print(report)  # the measured numbers, in the run's log (pytest -rA)
    assert trained > 0.45 and trained > untrained + 0.3, report
    assert trained > gradcam + 0.2, report


def test_training_leaves_denormal_floats_representable(tmp_path):
    """Training flushes denormals for speed; the process (a Slicer console, a test run) gets IEEE floats back."""
    import sys as _sys

    csv_path = _cohort(tmp_path, n_per_class=10, n_test=2)
    config = TrainingConfig(method="vantgan", data=str(csv_path), out=str(tmp_path / "run"), preprocessing=PREPROCESSING,
                            method_config=CPU_CONFIG, steps=2, batch_size=2, val_every=2, checkpoint_every=2, command="pytest")
    train(config)
    tiny = np.array([_sys.float_info.min]) / np.array([4.0])  # computed on the CPU's vector unit, where FTZ acts
    assert tiny[0] != 0 and float(torch.tensor(1e-45) * 1.0) != 0, "denormals are still flushed to zero after training"

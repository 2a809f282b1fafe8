"""ICAM: a training step updates every network; inference gives class probability, single-swap map and
mean/std maps over rejection-sampled codes.

Not here yet: a short-training behavioural check. Measured on 120 synthetic 32x32 images, the attribute-space
classifier's held-out AUC was 0.56 after 150 steps and 0.62 after 400 (about 2 CPU-minutes): too weak and slow
for a reliable CI test; see the issue's notes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CounterfactualVALib.methods import TrainingContext, create_method

PRE_2D = {"spatial_dims": 2, "size": [32, 32], "spacing": [1.0, 1.0], "crop": "image", "intensity": "minmax"}


def test_training_step_updates_every_network_with_finite_losses():
    torch.manual_seed(0)
    method = create_method("icam", 2, {"grid_size": [32, 32]}, training=True)
    before = {k: [p.detach().clone() for p in v.parameters()] for k, v in method.networks.items()}
    ctx = TrainingContext(torch.device("cpu"), {k: v[0] for k, v in method.configure_optimizers(10).items()})
    g = torch.Generator().manual_seed(1)
    losses = method.training_step({"normal": torch.rand(1, 1, 32, 32, generator=g) * 2 - 1, "abnormal": torch.rand(1, 1, 32, 32, generator=g) * 2 - 1}, ctx)
    assert losses and all(np.isfinite(v) for v in losses.values())
    unchanged = [k for k, v in method.networks.items() if all(torch.equal(a, b) for a, b in zip(before[k], v.parameters()))]
    assert not unchanged, f"networks not updated: {unchanged}"


@pytest.mark.parametrize("dims, size", [(2, (32, 32)), (3, (32, 32, 32))])
def test_inference_outputs(dims, size):
    torch.manual_seed(0)
    method = create_method("icam", dims, {"grid_size": list(size)}).eval()
    x = torch.rand(1, 1, *size) * 2 - 1
    result = method.attribute(x, samples=6)
    assert result.attribution.shape == x.shape and result.counterfactual.shape == x.shape
    assert torch.allclose(result.attribution, result.counterfactual - x, atol=1e-5)
    assert result.extras["icam_mean"].shape == x.shape and result.extras["icam_std"].shape == x.shape
    assert (result.extras["icam_std"] >= 0).all()
    assert 0.0 <= result.scalars["class_probability"] <= 1.0
    with pytest.raises(ValueError, match="unknown options"):
        method.attribute(x, sample=3)

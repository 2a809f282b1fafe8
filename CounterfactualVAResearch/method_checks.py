"""Checks that belong to one method, as its paper reports them (used by the protocol's `medxgan` section).

- medXGAN inversion convergence (medxgan Table 3): repeated inversions of one image from random N(0, I) starts
  of both codes; mean pairwise cosine similarity of the concatenated codes and SSIM (MONAI) of the images.
- LIG/IG attributed-voxel ratio (medxgan section 4.2): voxels whose |attribution| exceeds 1 % of the map's
  maximum under latent IG, divided by the same count under pixel IG on the same frozen classifier. The paper
  counts "non-zero" pixels; float maps are never exactly zero, so a relative tolerance stands for zero.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

#: |attribution| above this fraction of the map's maximum counts as "attributed" (LIG/IG ratio)
ATTRIBUTED_TOLERANCE = 0.01


def medxgan_convergence(method, inputs, runs: int = 3, steps: int = 500, lr: float = 0.01) -> dict:
    """Table 3: pairwise cosine of the inverted codes and SSIM of their images over `runs` random restarts."""
    from monai.metrics import SSIMMetric

    x = torch.cat(inputs)
    spatial_dims = x.dim() - 2
    codes, images = [], []
    generator = method.generator
    generator.eval()
    for run in range(runs):
        z1, z2, _ = method.invert(x, steps=steps, lr=lr, seed=1000 + run, z1_start="normal")
        codes.append(torch.cat([z1, z2], 1))
        with torch.no_grad():
            images.append(generator(z1, z2).float().clamp(-1, 1))
    ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=2.0, win_size=min(11, min(x.shape[2:]) // 2 * 2 - 1))
    cosines, ssims = [], []
    for a, b in itertools.combinations(range(runs), 2):
        cosines.append(torch.nn.functional.cosine_similarity(codes[a], codes[b], dim=1))
        ssims.append(ssim(images[a], images[b]).flatten())
    cos, sim = torch.cat(cosines), torch.cat(ssims)
    return {
        "runs": runs,
        "images": len(x),
        "inversion_steps": steps,
        "cosine_mean": float(cos.mean()),
        "cosine_std": float(cos.std()) if len(cos) > 1 else 0.0,
        "ssim_mean": float(sim.mean()),
        "ssim_std": float(sim.std()) if len(sim) > 1 else 0.0,
    }


def attributed_fraction(amap: np.ndarray, tolerance: float = ATTRIBUTED_TOLERANCE) -> float:
    magnitude = np.abs(amap)
    peak = magnitude.max()
    return float((magnitude > tolerance * peak).mean()) if peak > 0 else 0.0


def lig_ig_ratio(method, inputs, inversion_steps: int = 500, ig_steps: int = 50, tolerance: float = ATTRIBUTED_TOLERANCE) -> dict:
    """medXGAN 4.2: attributed voxels of latent IG over those of pixel IG (Captum) on the same classifier."""
    from CounterfactualVALib.methods.classifier import integrated_gradients

    x = torch.cat(inputs)
    method.generator.eval()
    z1, z2, _ = method.invert(x, steps=inversion_steps)
    lig = method.latent_integrated_gradients(z1, z2, method.attribute_options["ig_steps"]).detach().numpy()
    classifier = method.networks["classifier"].net
    with torch.enable_grad():
        ig = integrated_gradients(classifier, x, 1, ig_steps, -1.0).detach().numpy()
    ratios = []
    for a, b in zip(lig, ig):
        denominator = attributed_fraction(b, tolerance)
        if denominator > 0:
            ratios.append(attributed_fraction(a, tolerance) / denominator)
    return {"images": len(x), "tolerance": tolerance, "ratio_mean": float(np.mean(ratios)), "ratio_std": float(np.std(ratios))}

"""Training-time augmentation that varies what a cohort of T1 scans varies by, and leaves the disease alone.

Tens to a few hundred subjects are too few for a discriminator or a classifier not to memorise them (issue 9:
a classifier reached training accuracy 1.0 and test accuracy 0.5 on 60 varied phantoms). The nuisance that
separates one scan from another after preprocessing is head size and position, a smooth intensity bias and
contrast; `AnatomyAugmentation` draws new values of exactly those per image, so every step shows the networks a
subject they have not seen, while an atrophy stays where it is relative to the anatomy around it. It makes no
flips: a left-right flip is not neutral for a lateralised effect (it moves a left hippocampal atrophy to the
right, a pattern the abnormal class may never show).

Everything is drawn from the step's `torch.Generator`, so a resumed run augments exactly as the uninterrupted
run would have. Dimension-agnostic (2D and 3D), on whatever device the batch is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# torch is imported where it is used: the CLI's parser and the Slicer training panel read AUGMENTATIONS and
# must not pay for (or, before dependencies are installed, fail on) importing it

#: the names `TrainingConfig.augmentation` accepts
AUGMENTATIONS = ("none", "anatomy", "geometry")


def _uniform(generator, n: int, k: int, half_width: float):
    import torch

    return (torch.rand(n, k, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * half_width


def _rotation(angles, dims: int):
    """(n, dims, dims) rotation matrices; 3D: the product of rotations about the three axes."""
    import torch

    n = angles.shape[0]
    if dims == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    rotation = torch.eye(3, dtype=angles.dtype).expand(n, 3, 3)
    for axis in range(3):
        i, j = [a for a in range(3) if a != axis]
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        r = torch.eye(3, dtype=angles.dtype).repeat(n, 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        rotation = rotation @ r
    return rotation


@dataclass(frozen=True)
class AnatomyAugmentation:
    """Per image: a random affine (each axis scaled by ``1 +- scale``, rotated by up to ``rotate_degrees`` about
    each axis, shifted by up to ``translate_voxels``), a smooth multiplicative bias field ``exp(b)`` with ``|b|``
    up to about ``bias`` (a few control points per axis, interpolated), and a contrast change ``x ** gamma`` with
    ``log gamma`` up to ``log_gamma``. Images are in the preprocessing's range, background at -1 and the robust
    maximum at 1: the bias and the contrast act on ``(x + 1) / 2`` (background 0), the result is clipped back
    to [-1, 1] as preprocessing clips. Masks given to `__call__` move with their image's geometry only."""

    scale: float = 0.06
    rotate_degrees: float = 4.0
    translate_voxels: float = 1.5
    bias: float = 0.15
    bias_control_points: int = 3
    log_gamma: float = 0.1

    def __call__(self, image, generator, masks: tuple = ()) -> tuple:
        """`image` (batch, channels, *spatial) augmented, and each of `masks` (same batch and grid) moved with it;
        every draw from the torch.Generator `generator`."""
        import torch
        import torch.nn.functional as F

        n, dims = image.shape[0], image.dim() - 2
        spatial = image.shape[2:]
        # affine_grid works in normalised coordinates ordered (x, y[, z]), the reverse of the array axes
        size_xyz = torch.tensor(list(reversed(spatial)), dtype=torch.float64)
        scale = 1.0 + _uniform(generator, n, dims, self.scale)
        angles = _uniform(generator, n, 1 if dims == 2 else 3, math.radians(self.rotate_degrees))
        shift = _uniform(generator, n, dims, self.translate_voxels) * 2.0 / size_xyz
        # output voxel -> input voxel: the image shown is the subject scaled by `scale` (a larger head samples
        # the input nearer its centre); rotation in physical units, so anisotropic grids rotate correctly
        to_physical = torch.diag_embed(size_xyz.expand(n, dims))
        matrix = torch.linalg.inv(to_physical) @ _rotation(angles, dims) @ to_physical @ torch.diag_embed(1.0 / scale)
        theta = torch.cat([matrix, shift.unsqueeze(-1)], -1).to(image.device, torch.float32)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        unit = (image.float() + 1.0) * 0.5  # background 0: what the padding brings in is background
        moved = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved_masks = tuple(
            F.grid_sample(m.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(m.dtype) for m in masks
        )

        if self.bias > 0:
            control = _uniform(generator, n, self.bias_control_points**dims, self.bias)
            control = control.reshape(n, 1, *([self.bias_control_points] * dims)).to(image.device, torch.float32)
            mode = "trilinear" if dims == 3 else "bilinear"
            field = F.interpolate(control, size=tuple(spatial), mode=mode, align_corners=True)
            moved = moved * torch.exp(field)
        if self.log_gamma > 0:
            gamma = torch.exp(_uniform(generator, n, 1, self.log_gamma)).to(image.device, torch.float32)
            gamma = gamma.reshape(n, *([1] * (dims + 1)))
            moved = moved.clamp_min(0.0).pow(gamma)
        augmented = (moved * 2.0 - 1.0).clamp(-1.0, 1.0)
        return (augmented.to(image.dtype),) + moved_masks


def make_augmentation(name: str) -> AnatomyAugmentation | None:
    """The augmentation called `name` (one of :data:`AUGMENTATIONS`); None for "none"."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {name!r}.")
    if name == "anatomy":
        return AnatomyAugmentation()
    # size and pose only, without the bias and contrast draws that turned VANT-GAN's map into an intensity change;
    # measured on the varied 3D cohort it did not help either (test NCC 0.038 against 0.211 without augmentation:
    # design.md, '3D on a CPU budget'), so neither is a default
    return AnatomyAugmentation(bias=0.0, log_gamma=0.0) if name == "geometry" else None

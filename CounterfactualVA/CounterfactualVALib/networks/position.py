"""Position channels: each voxel's place on the model grid, as extra input channels.

On inputs preprocessed onto one grid (same orientation, spacing and head-centred field of view), a disease
effect that sits in the same anatomical places in every patient sits at nearly the same grid positions. A
fully convolutional network, and even more one trained on patches, must otherwise infer where it is from the
anatomy it sees; given its coordinates it can learn what is normal *here* directly (CoordConv, Liu et al.
2018). A patch carries the coordinates of its voxels in the whole grid, so a network trained on patches and
applied to the whole volume sees the same values at the same places.
"""

from __future__ import annotations

import torch


def grid_coordinates(shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """(len(shape), *shape): per axis, the voxel's position from -1 (first voxel) to 1 (last)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)


def with_position(x: torch.Tensor, coordinates: torch.Tensor | None) -> torch.Tensor:
    """`x` (batch, channels, *spatial) with the coordinate channels appended; `coordinates` is (batch, dims,
    *spatial) or None for the whole grid of `x` itself."""
    if coordinates is None:
        coordinates = grid_coordinates(tuple(x.shape[2:]), x.device, x.dtype).expand(x.shape[0], -1, *x.shape[2:])
    return torch.cat([x, coordinates.to(x.dtype)], 1)

"""A light U-Net generator (``MapUNet`` without normalisation) in one of three roles: a change map, the input
plus a change, or a whole new image. The CPU-budget generator of the cycle methods and the attention CycleGAN."""

from __future__ import annotations

import torch
from torch import nn

from .position import with_position
from .vagan import MapUNet


class ChangeGenerator(nn.Module):
    """A light U-Net generator. ``role``: ``"map"`` outputs a bounded change ``2 tanh(u)`` (it can move any voxel
    in [-1, 1] to any other), ``"residual"`` outputs ``x + 2 tanh(u)``, ``"image"`` a whole new image
    ``tanh(u)`` (ANT-GAN's plain translator: it starts at a grey image, not at the identity)."""

    ROLES = ("map", "residual", "image")

    def __init__(
        self, spatial_dims: int, channels, role: str, position_channels: bool = False, head_init_std: float = 1e-3,
        upsample: str = "transposed", activation: str = "relu",
    ):
        super().__init__()
        in_channels = 1 + (spatial_dims if position_channels else 0)
        self.unet = MapUNet(
            spatial_dims, in_channels, 1, channels=tuple(channels), norm=None, head_init_std=head_init_std, upsample=upsample,
            activation=activation,
        )
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {self.ROLES}, got {role!r}")
        self.role = role
        self.position_channels = position_channels

    def forward(self, x: torch.Tensor, coordinates: torch.Tensor | None = None) -> torch.Tensor:
        inputs = with_position(x, coordinates) if self.position_channels else x
        out = self.unet(inputs)
        if self.role == "image":
            return torch.tanh(out)
        change = 2.0 * torch.tanh(out)
        return change if self.role == "map" else x + change

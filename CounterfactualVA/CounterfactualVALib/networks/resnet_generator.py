"""CycleGAN-style ResNet generator for 2D or 3D images.

Stem conv (k7, reflection padding) -> `n_downsampling` stride-2 convs -> `n_blocks` residual blocks ->
as many transposed convs -> k7 conv. Built from `layers` (torch.nn classes by dimensionality) so one class serves both
dimensionalities. `output_activation` selects how the last layer is bounded: "tanh" for images in
[-1, 1], "tanh2" (2 * tanh) for difference maps, which must reach +-2 to turn any [-1, 1] voxel into any
other, and "none" for unbounded outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import BATCH_NORM, CONV, CONV_TRANSPOSE, INSTANCE_NORM


def _norm(spatial_dims: int, channels: int, norm: str) -> nn.Module:
    if norm == "instance":
        return INSTANCE_NORM[spatial_dims](channels, affine=False)
    if norm == "batch":
        return BATCH_NORM[spatial_dims](channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")


class ResidualBlock(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, norm: str = "instance"):
        super().__init__()
        conv = CONV[spatial_dims]
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1, padding_mode="reflect", bias=norm != "batch"),
            _norm(spatial_dims, channels, norm),
            nn.ReLU(inplace=True),
            conv(channels, channels, 3, padding=1, padding_mode="reflect", bias=norm != "batch"),
            _norm(spatial_dims, channels, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetGenerator(nn.Module):
    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_downsampling: int = 2,
        n_blocks: int = 9,
        norm: str = "instance",
        output_activation: str = "tanh",
    ):
        super().__init__()
        if output_activation not in ("tanh", "tanh2", "none"):
            raise ValueError(f"output_activation must be tanh, tanh2 or none, got {output_activation!r}")
        conv = CONV[spatial_dims]
        conv_t = CONV_TRANSPOSE[spatial_dims]
        bias = norm != "batch"
        layers: list[nn.Module] = [
            conv(in_channels, ngf, 7, padding=3, padding_mode="reflect", bias=bias),
            _norm(spatial_dims, ngf, norm),
            nn.ReLU(inplace=True),
        ]
        channels = ngf
        for _ in range(n_downsampling):
            layers += [conv(channels, channels * 2, 3, stride=2, padding=1, bias=bias), _norm(spatial_dims, channels * 2, norm), nn.ReLU(inplace=True)]
            channels *= 2
        layers += [ResidualBlock(spatial_dims, channels, norm) for _ in range(n_blocks)]
        for _ in range(n_downsampling):
            layers += [
                conv_t(channels, channels // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                _norm(spatial_dims, channels // 2, norm),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [conv(channels, out_channels, 7, padding=3, padding_mode="reflect")]
        self.model = nn.Sequential(*layers)
        self.output_activation = output_activation
        self.spatial_multiple = 2**n_downsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.spatial_multiple for s in x.shape[2:]):
            raise ValueError(
                f"ResNetGenerator needs spatial sizes divisible by {self.spatial_multiple}, got {tuple(x.shape[2:])}; "
                "choose a model grid size that is a multiple of it."
            )
        y = self.model(x)
        if self.output_activation == "tanh":
            return torch.tanh(y)
        if self.output_activation == "tanh2":
            return 2.0 * torch.tanh(y)
        return y

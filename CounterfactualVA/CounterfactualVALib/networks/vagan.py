"""VA-GAN's networks (Baumgartner et al. 2018), dimension-agnostic (`spatial_dims` 2 or 3).

* :class:`MapUNet` — the map generator: a U-Net with four resolution levels of 16/32/64/128 channels,
  two 3x3 convolutions with batch norm and ReLU per level, max pooling on the way down, transposed
  convolutions (batch norm, ReLU) on the way up with skip concatenation, and a linear 1x1 convolution to the
  map (no output activation: the map is a signed intensity change), initialised small so the map starts ~0.
* :class:`C3DCritic` — the WGAN critic, shaped like C3D (one, one, two, two, three 3x3 convolutions per
  stage at 16/32/64/128/256 channels, ReLU, max pooling between stages) but without any normalisation (batch
  norm would break the per-sample gradient penalty), ending in a 1x1 convolution and a global average pool to
  one score per image.

Both are built from MONAI's ``Convolution`` block layout (:func:`~CounterfactualVALib.networks.layers.conv_block`:
the same modules and state-dict keys, without importing MONAI). MONAI's ``UNet`` does its first convolution at stride 2
(no full-resolution encoder features) and ``BasicUNet`` has a fixed five-level layout, so neither matches
VA-GAN's map generator; this is the classic U-Net from the same blocks. Any input size works: pooling uses
``ceil_mode`` and the decoder crops to the skip connection's size, and the critic only pools axes that are
at least two voxels long.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_block


def _double_conv(spatial_dims: int, in_channels: int, out_channels: int, norm, act) -> nn.Sequential:
    return nn.Sequential(
        conv_block(spatial_dims, in_channels, out_channels, kernel_size=3, norm=norm, act=act, bias=norm is None),
        conv_block(spatial_dims, out_channels, out_channels, kernel_size=3, norm=norm, act=act, bias=norm is None),
    )


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    """2x max pooling (ceil mode) along every spatial axis that is at least 2 long; shorter axes are kept."""
    dims = x.dim() - 2
    kernel = tuple(2 if s >= 2 else 1 for s in x.shape[2:])
    if all(k == 1 for k in kernel):
        return x
    pool = F.max_pool3d if dims == 3 else F.max_pool2d
    return pool(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


class MapUNet(nn.Module):
    """U-Net that outputs a signed map with the input's spatial size. ``upsample``: ``"transposed"``
    (stride-2 transposed convolutions, the original layout) or ``"linear"`` (1x1 convolution, then
    interpolation)."""

    UPSAMPLING = ("transposed", "linear")
    #: "leaky_relu" (slope 0.2, as the CycleGAN discriminators): a narrow U-Net without normalisation can lose
    #: a whole level to ReLUs that output zero everywhere, after which no gradient reaches what lies before it
    ACTIVATIONS = {"relu": "relu", "leaky_relu": ("leakyrelu", 0.2)}

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str | None = "batch",
        head_init_std: float = 1e-3,
        upsample: str = "transposed",
        activation: str = "relu",
    ):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"MapUNet needs at least two levels, got channels={tuple(channels)}")
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"MapUNet: activation must be one of {tuple(self.ACTIVATIONS)}, got {activation!r}")
        self.spatial_dims = spatial_dims
        act = self.ACTIVATIONS[activation]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.encoders.append(_double_conv(spatial_dims, previous, c, norm, act))
            previous = c
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        if upsample not in self.UPSAMPLING:
            raise ValueError(f"MapUNet: upsample must be one of {self.UPSAMPLING}, got {upsample!r}")
        for deeper, c in zip(reversed(channels[1:]), reversed(channels[:-1])):
            if upsample == "transposed":
                layer = conv_block(
                    spatial_dims, deeper, c, stride=2, kernel_size=2, norm=norm, act=act,
                    transposed=True, padding=0, output_padding=0, bias=norm is None,
                )
            else:
                # a 1x1 convolution at the coarse level, then interpolation: every output voxel is made the same
                # way, so the map carries no 2x2 grid (a stride-2, kernel-2 transposed convolution prints a
                # checkerboard wherever its kernel phases differ, which a short training never evens out); the
                # decoder's 3x3 convolutions after the skip concatenation do the spatial mixing. Cheaper than
                # the transposed convolution (the channel change happens at the coarse level).
                mode = "trilinear" if spatial_dims == 3 else "bilinear"
                layer = nn.Sequential(
                    conv_block(spatial_dims, deeper, c, kernel_size=1, norm=norm, act=act, bias=norm is None),
                    nn.Upsample(scale_factor=2, mode=mode, align_corners=False),
                )
            self.upsamplers.append(layer)
            self.decoders.append(_double_conv(spatial_dims, 2 * c, c, norm, act))
        self.head = conv_block(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)
        # Start near the identity (map ~ 0): the L1 term then starts at its minimum and the critic decides what
        # changes, instead of the generator first spending steps shrinking a random initial map. Adam's
        # per-parameter step size makes the small head weights no obstacle to learning the earlier layers.
        nn.init.normal_(self.head.conv.weight, 0.0, head_init_std)
        nn.init.zeros_(self.head.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                h = _max_pool(h)
            h = encoder(h)
            skips.append(h)
        h = skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            skip = skips.pop()
            h = upsample(h)
            # ceil-mode pooling can make the upsampled map one voxel longer than the skip: crop it back
            h = h[(slice(None), slice(None)) + tuple(slice(0, s) for s in skip.shape[2:])]
            h = decoder(torch.cat([skip, h], dim=1))
        return self.head(h)


class C3DCritic(nn.Module):
    """WGAN critic: C3D-like stages without normalisation, global average pool, one score per image."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        convs_per_stage: Sequence[int] = (1, 1, 2, 2, 3),
        negative_slope: float = 0.0,
    ):
        super().__init__()
        if len(channels) != len(convs_per_stage):
            raise ValueError("C3DCritic: channels and convs_per_stage must have the same length")
        act = "relu" if negative_slope == 0 else ("leakyrelu", negative_slope)
        self.stages = nn.ModuleList()
        previous = in_channels
        for c, n in zip(channels, convs_per_stage):
            layers = []
            for _ in range(n):
                layers.append(conv_block(spatial_dims, previous, c, kernel_size=3, norm=None, act=act))
                previous = c
            self.stages.append(nn.Sequential(*layers))
        self.head = conv_block(spatial_dims, previous, 1, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, stage in enumerate(self.stages):
            if i > 0:
                h = _max_pool(h)
            h = stage(h)
        return self.head(h).flatten(1).mean(dim=1)
